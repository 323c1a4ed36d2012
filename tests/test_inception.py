"""ImageNet-scale metrics with a random-weight Inception-v3 of the real architecture.

The weights are saved to a temp file and read through the path a user takes (``eval.weights``); every
number is compared with an independent computation: torch-fidelity's own ``calculate_metrics``, a
hook of our own on ``Mixed_6d.branch1x1`` with scipy's ``sqrtm``, and the ADM evaluator's IS loop.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from omegaconf import OmegaConf
from scipy import linalg

from test_metrics import UInt8Images, adm_inception_score
from tqdit.errors import TqditError
from tqdit.metrics import all_metrics, build_extractor, extract_features, load_reference
from tqdit.metrics.inception import (
    INCEPTION_FILE,
    INCEPTION_URL,
    InceptionWeightsError,
    inception_weights,
    save_random_weights,
)
from tqdit.pipeline.job import evaluate


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    save_random_weights(path)
    return path


@pytest.fixture(scope="module")
def extractor(weights):
    return build_extractor("tqdit-inception-v3", torch.device("cpu"), str(weights))


def image_sets(count: int = 24, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Two different sets of RGB images: smooth colour ramps with noise, and noisier darker ones."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None, None] * rng.uniform(60, 200, (count, 1, 1, 3))
    ramp = ramp + np.linspace(0, 1, size)[None, None, :, None] * rng.uniform(0, 50, (count, 1, 1, 3))
    first = np.clip(ramp + rng.normal(0, 20, (count, size, size, 3)), 0, 255).astype(np.uint8)
    second = np.clip(0.6 * ramp + rng.normal(0, 45, (count, size, size, 3)), 0, 255).astype(np.uint8)
    return first, second


def hooked_features(weights, images: np.ndarray) -> dict[str, np.ndarray]:
    """pool3, unbiased logits and Mixed_6d.branch1x1 (NHWC, 7 channels) from torch-fidelity's own module."""
    net = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
    )
    seen = []
    net.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: seen.append(output.detach().clone())
    )
    with torch.no_grad():
        pool, logits = net(torch.tensor(images).permute(0, 3, 1, 2))
    spatial = seen[0].numpy()  # (N, 192, 17, 17)
    spatial = np.transpose(spatial, (0, 2, 3, 1))[..., :7].reshape(len(images), -1)
    return {
        "pool": pool.double().numpy(),
        "logits": logits.double().numpy(),
        "spatial": spatial.astype(np.float64),
    }


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_torch_fidelity(weights, extractor):
    fake, real = image_sets()
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(fake),
        input2=UInt8Images(real),
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights),
        fid=True,
        cuda=False,
        cache=False,
        verbose=False,
        batch_size=12,
    )
    ours = all_metrics(
        extract_features(fake, extractor, progress=False),
        extract_features(real, extractor, progress=False),
        split_size=12,
    )
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["fid"] > 1e-3  # the two sets differ: the comparison is not trivially zero


def test_sfid_and_is_equal_hand_computations(weights, extractor):
    fake, real = image_sets()
    ours_fake, ours_real = extract_features(fake, extractor, progress=False), extract_features(
        real, extractor, progress=False
    )
    hand_fake, hand_real = hooked_features(weights, fake), hooked_features(weights, real)
    assert ours_fake["spatial"].shape == (len(fake), 2023)  # 17 × 17 × 7, as the ADM evaluator
    np.testing.assert_allclose(ours_fake["spatial"], hand_fake["spatial"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_fake["logits"], hand_fake["logits"], rtol=1e-5, atol=1e-5)
    metrics = all_metrics(ours_fake, ours_real, split_size=10)
    # near-singular covariances of 24 samples in 2023 dims: scipy's sqrtm and the eigenvalue form
    # agree to ~1e-4
    assert metrics["sfid"] == pytest.approx(
        scipy_frechet(hand_fake["spatial"], hand_real["spatial"]), rel=1e-3
    )
    assert metrics["is"] == pytest.approx(
        adm_inception_score(hand_fake["logits"], 10), rel=1e-6
    )  # parts 10, 10, 4
    assert metrics["is"] > 1.0


@pytest.mark.slow  # 60 s on a 2-core CPU (a real Inception pass over the reference batch)
def test_adm_reference_batch_through_the_job_evaluation(weights, tmp_path):
    """FID and sFID use the batch's stored statistics (as the ADM evaluator); precision/recall its images."""
    fake, real = image_sets()
    _, other = image_sets(count=30, size=48)  # the stored statistics come from other images than arr_0
    hand_real, hand_other, hand_fake = (
        hooked_features(weights, real),
        hooked_features(weights, other),
        hooked_features(weights, fake),
    )
    np.savez(
        tmp_path / "VIRTUAL_test.npz",
        arr_0=real,
        mu=hand_other["pool"].mean(0),
        sigma=np.cov(hand_other["pool"], rowvar=False),
        mu_s=hand_other["spatial"].mean(0),
        sigma_s=np.cov(hand_other["spatial"], rowvar=False),
    )
    eval_cfg = OmegaConf.create(
        {
            "feature_extractor": "tqdit-inception-v3",
            "weights": str(weights),
            "reference": str(tmp_path / "VIRTUAL_test.npz"),
            "batch_size": 16,
            "is_split_size": 5000,
            "pr_k": 3,
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    metrics = evaluate(fake, eval_cfg, torch.device("cpu"))
    assert metrics["fid"] == pytest.approx(scipy_frechet(hand_fake["pool"], hand_other["pool"]), rel=1e-3)
    assert metrics["sfid"] == pytest.approx(
        scipy_frechet(hand_fake["spatial"], hand_other["spatial"]), rel=1e-3
    )
    assert metrics["fid"] != pytest.approx(
        scipy_frechet(hand_fake["pool"], hand_real["pool"]), rel=1e-2
    )  # not arr_0's
    assert metrics["is"] == pytest.approx(adm_inception_score(hand_fake["logits"], 5000), rel=1e-6)
    from tqdit.metrics import precision_recall

    assert (metrics["precision"], metrics["recall"]) == pytest.approx(
        precision_recall(hand_fake["pool"], hand_real["pool"]), abs=1e-6
    )
    assert (
        len(list((tmp_path / "cache").glob("reference-*.npz"))) == 1
    )  # the batch's images' features, for precision/recall


def test_reference_cache_invalidates_when_images_change(extractor, tmp_path):
    _, real = image_sets(count=8)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    first = load_reference(tmp_path / "ref.npz", extractor, real.shape[1:], tmp_path / "cache")
    again = load_reference(tmp_path / "ref.npz", extractor, real.shape[1:], tmp_path / "cache")
    np.testing.assert_array_equal(first["pool"], again["pool"])
    assert len(list((tmp_path / "cache").glob("reference-*.npz"))) == 1
    changed = real.copy()
    changed[3] = 255 - changed[3]
    np.savez(tmp_path / "ref.npz", arr_0=changed)  # same name, new content
    moved = load_reference(tmp_path / "ref.npz", extractor, real.shape[1:], tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("reference-*.npz"))) == 2
    assert not np.allclose(moved["pool"][3], first["pool"][3])
    np.testing.assert_array_equal(moved["pool"][:3], first["pool"][:3])


def test_reference_errors_name_the_problem(extractor, tmp_path):
    _, real = image_sets(count=4)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    with pytest.raises(
        TqditError,
        match="reference images are 64×64 but samples are 256×256.*VIRTUAL_imagenet256_labeled.npz",
    ):
        load_reference(tmp_path / "ref.npz", extractor, (256, 256, 3), None)
    np.savez(
        tmp_path / "bad.npz",
        arr_0=real,
        mu=np.zeros(128),
        sigma=np.eye(128),
        mu_s=np.zeros(2023),
        sigma_s=np.eye(2023),
    )
    with pytest.raises(TqditError, match="'mu' is \\(128,\\), not \\(2048,\\)"):
        load_reference(tmp_path / "bad.npz", extractor, real.shape[1:], None)
    with pytest.raises(TqditError, match="not found.*ref_batches/imagenet/256"):
        load_reference(tmp_path / "missing.npz", extractor, (256, 256, 3), None)
    (tmp_path / "folder").mkdir()
    with pytest.raises(TqditError, match="no images"):
        load_reference(tmp_path / "folder", extractor, (64, 64, 3), None)


def test_image_folder_reference_equals_npz(extractor, tmp_path):
    from PIL import Image

    _, real = image_sets(count=6)
    (tmp_path / "folder").mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image).save(tmp_path / "folder" / f"{i:03d}.png")
    np.savez(tmp_path / "ref.npz", arr_0=real)
    from_folder = load_reference(tmp_path / "folder", extractor, real.shape[1:], None)
    from_npz = load_reference(tmp_path / "ref.npz", extractor, real.shape[1:], None)
    np.testing.assert_array_equal(from_folder["pool"], from_npz["pool"])


def test_missing_weights_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionWeightsError) as error:
        inception_weights(None)
    message = str(error.value)
    assert (
        INCEPTION_FILE in message
        and INCEPTION_URL in message
        and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    )
    assert "eval.weights=" in message
    with pytest.raises(InceptionWeightsError, match="file not found"):
        inception_weights(tmp_path / "nowhere.pth")


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / INCEPTION_FILE
    with open(path, "wb") as handle:
        pickle.dump({"fc.weight": Exploit()}, handle)
    with pytest.raises(InceptionWeightsError, match="weights_only=True"):
        inception_weights(path)
