"""Metric code against independent numpy/scipy computations, and the torch-fidelity registration."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity

from tqdit.data import load_digits
from tqdit.metrics import (
    build_extractor,
    extract_features,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    precision_recall,
)
from tqdit.metrics.reference import reference_features, reference_key

from test_adm_formulas import reference_fid, reference_inception_score


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(300, 16)) @ rng.normal(size=(16, 16))
    ours = frechet_distance(gaussian_statistics(a), gaussian_statistics(b))
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(gaussian_statistics(a), gaussian_statistics(a)) == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="another feature network"):
        frechet_distance(gaussian_statistics(a), gaussian_statistics(b[:, :8]))


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """The ADM evaluator's loop, in numpy: parts of split_size (the last may be shorter)."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_equals_adm_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(1003, 12))
    for split_size in (100, 250, 1003):  # 11 parts with a short last one; 5 parts; one part
        assert inception_score(logits, split_size) == pytest.approx(
            adm_inception_score(logits, split_size), rel=1e-9
        )
    assert inception_score(logits, 250) != pytest.approx(
        inception_score(logits, 100), rel=1e-3
    )  # the split matters
    # no split size: 10 parts of N // 10, the remainder dropped (the embedded evaluation)
    assert inception_score(logits) == pytest.approx(adm_inception_score(logits[:1000], 100), rel=1e-9)
    assert inception_score(logits[:15]) == pytest.approx(adm_inception_score(logits[:10], 1), rel=1e-9)
    confident = np.eye(10)[np.arange(1000) % 10] * 50  # every class equally often, each sample certain
    assert inception_score(confident, 100) == pytest.approx(10, rel=1e-6)


def test_precision_recall_equals_brute_force():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(120, 5)), rng.normal(loc=0.7, size=(90, 5))

    def knn_radius(x, k=3):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    d_fake_real = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean((d_fake_real <= knn_radius(real)[None]).any(1))
    recall = np.mean((d_fake_real.T <= knn_radius(fake)[None]).any(1))
    assert precision_recall(fake, real) == pytest.approx((precision, recall))
    assert 0 < precision < 1 and 0 < recall < 1


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("tqdit-mnist", torch.device("cpu"))


def test_classifier_features_shapes_and_accuracy(extractor):
    images, labels = load_digits()
    feats = extract_features(images[:500, ..., None], extractor, progress=False)
    assert (
        feats["pool"].shape == (500, 128)
        and feats["spatial"].shape == (500, 256)
        and feats["logits"].shape == (500, 10)
    )
    assert (feats["logits"].argmax(1) == labels[:500]).mean() > 0.95
    rgb = extract_features(np.repeat(images[:10, ..., None], 3, axis=-1), extractor, progress=False)
    np.testing.assert_allclose(rgb["pool"], feats["pool"][:10], rtol=1e-6, atol=1e-6)


class UInt8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = torch.tensor(images).permute(0, 3, 1, 2)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_registered_with_torch_fidelity(extractor, tmp_path):
    """torch-fidelity, given our registered extractor, and tqdit agree with the NumPy ADM formulas.

    The expected numbers come from tests/test_adm_formulas.py's reference (no torch-fidelity code):
    tqdit's frechet_distance calls torch-fidelity's fid_statistics_to_metric, so comparing it with
    calculate_metrics alone would check that function against itself.
    Mutation caught: torch_fidelity.metric_fid.fid_statistics_to_metric patched to drop the trace term's
    factor 2 (both tqdit and calculate_metrics then agree with each other, not with the formula)."""
    images = load_digits()[0][..., None]
    noise = np.random.default_rng(0).integers(-60, 60, images[:500].shape)
    fake = np.clip(images[:500].astype(int) + noise, 0, 255).astype(np.uint8)
    real = images[1000:2000]
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(fake),
        input2=UInt8Images(real),
        feature_extractor="tqdit-mnist",
        fid=True,
        isc=True,
        cuda=False,
        cache=False,
        verbose=False,
        samples_shuffle=False,
        save_cpu_ram=True,
        batch_size=250,
    )
    ours_fake = extract_features(fake, extractor, progress=False)
    ours_real = extract_features(real, extractor, progress=False)
    expected_fid = reference_fid(ours_fake["pool"], ours_real["pool"])
    expected_is = reference_inception_score(ours_fake["logits"], 50)  # torch-fidelity: 10 parts of N // 10
    fid = frechet_distance(gaussian_statistics(ours_fake["pool"]), gaussian_statistics(ours_real["pool"]))
    assert fid == pytest.approx(expected_fid, rel=1e-8)
    # torch-fidelity takes the mean of float32 features in float32: 7e-8 apart here
    assert theirs["frechet_inception_distance"] == pytest.approx(expected_fid, rel=1e-6)
    assert inception_score(ours_fake["logits"], 50) == pytest.approx(expected_is, rel=1e-10)
    assert theirs["inception_score_mean"] == pytest.approx(expected_is, rel=1e-10)
    assert fid > 1.0  # noise moved the features: the comparison is not trivially zero


def test_reference_cache_is_keyed_by_content(extractor, tmp_path):
    images = load_digits()[0][:200, ..., None]
    first = reference_features(images, extractor, "net:abc", tmp_path)
    assert len(list(tmp_path.glob("reference-*.npz"))) == 1
    again = reference_features(images, extractor, "net:abc", tmp_path)
    np.testing.assert_array_equal(first["pool"], again["pool"])
    changed = images.copy()
    changed[0, 10, 10, 0] ^= 0xFF
    assert reference_key(changed, "net:abc") != reference_key(images, "net:abc")
    assert reference_key(images, "net:other-weights") != reference_key(images, "net:abc")
    moved = reference_features(changed, extractor, "net:abc", tmp_path)
    assert len(list(tmp_path.glob("reference-*.npz"))) == 2
    assert not np.array_equal(moved["pool"][0], first["pool"][0])
    next(tmp_path.glob("reference-*.npz")).write_bytes(b"damaged")
    reference_features(images, extractor, "net:abc", tmp_path)  # a damaged entry is recomputed, not trusted
