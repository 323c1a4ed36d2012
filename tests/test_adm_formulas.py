"""tqdit's FID, sFID, IS and precision/recall against the ADM evaluator's formulas, written here in NumPy.

The ADM evaluator (openai/guided-diffusion, evaluations/evaluator.py) computes
- FID = ||mu1 - mu2||² + tr(S1 + S2 - 2 sqrtm(S1 S2)), float64 statistics (np.cov, rowvar=False);
  sFID the same on the spatial features;
- IS = exp(mean KL(p(y|x) || p(y))) per consecutive, unshuffled part of the softmax predictions,
  averaged over the parts;
- precision / recall: k-NN manifolds (k = 3, the point itself not counted) on pooled features.

The reference below shares no code with tqdit or torch-fidelity: the covariance is written out, and
tr sqrtm(S1 S2) comes from the eigenvalues of sqrt(S1) S2 sqrt(S1) (similar to S1 S2, symmetric),
with sqrt(S1) from np.linalg.eigh. Each test names, in its docstring, a deliberate change to tqdit's
code that it was seen to catch (applied, the test failed; then reverted).
"""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tqdit.metrics import (all_metrics, frechet_distance, gaussian_statistics, inception_score,
                           precision_recall)

ROOT = Path(__file__).resolve().parents[1]


# --- the reference -----------------------------------------------------------------------------------

def reference_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (what np.cov(rowvar=False) gives), written out in float64."""
    x = np.asarray(features, dtype=np.float64)
    mu = x.sum(axis=0) / len(x)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigh."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr S1 + tr S2 - 2 tr sqrtm(S1 S2).

    S1 S2 = R (R S2 R) R⁻¹ with R = sqrt(S1): S1 S2 has the eigenvalues of the symmetric PSD matrix R S2 R,
    so tr sqrtm(S1 S2) is the sum of their square roots.
    """
    root = psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    return reference_frechet(*reference_statistics(a), *reference_statistics(b))


def reference_parts(n: int, split_size: int | None, parts: int = 10) -> list[tuple[int, int]]:
    """tqdit's protocol (README, "Protocol decisions"): ``split_size`` given, consecutive parts of that
    size, the last may be shorter (the ADM evaluator's loop); None, ``parts`` parts of n // parts, the
    remainder dropped."""
    if split_size is None:
        size = n // parts
        return [(i * size, (i + 1) * size) for i in range(parts)]
    return [(start, min(start + split_size, n)) for start in range(0, n, split_size)]


def reference_inception_score(logits: np.ndarray, split_size: int | None) -> float:
    """The ADM evaluator's loop on softmax predictions: the mean over parts of
    exp(mean_x KL(p(y|x) || p_part(y)))."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    scores = []
    for start, stop in reference_parts(len(preds), split_size):
        part = preds[start:stop]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((len(a), len(b)))
    for start in range(0, len(a), 100):  # exact differences, in chunks (no |a|² - 2ab + |b|² cancellation)
        out[start : start + 100] = ((a[start : start + 100, None, :] - b[None]) ** 2).sum(-1)
    return out


def reference_precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Fraction of generated points inside the real k-NN manifold, and of real points inside the
    generated one.

    A manifold is the union of balls around its points with the distance to the k-th nearest other point
    as radius (the ADM evaluator's ManifoldEstimator: kth=k of each row's sorted distances, self at 0).
    """
    gen, ref = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    radius_ref = np.sort(squared_distances(ref, ref), axis=1)[:, k]
    radius_gen = np.sort(squared_distances(gen, gen), axis=1)[:, k]
    cross = squared_distances(gen, ref)
    precision = (cross <= radius_ref[None, :]).any(axis=1).mean()
    recall = (cross.T <= radius_gen[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


# --- fixed features ----------------------------------------------------------------------------------

def ill_conditioned(rng, n: int, d: int, loc: float, low: float, high: float) -> np.ndarray:
    """Gaussian features whose covariance has eigenvalues from low² to high² (condition (high/low)²)."""
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scales = np.logspace(np.log10(low), np.log10(high), d)
    return loc + (rng.normal(size=(n, d)) * scales) @ basis.T


@pytest.fixture(scope="module")
def features():
    """Two differently distributed sets of 600 samples: pooled (64-d) and spatial (80-d) features, logits."""
    rng = np.random.default_rng(20240601)
    pool_a = ill_conditioned(rng, 600, 64, 0.0, 1e-3, 1e2)  # covariance condition ≈ 1e10
    pool_b = rng.standard_t(df=5, size=(600, 64)) @ rng.normal(scale=0.5, size=(64, 64)) + 0.4
    pool_b[:, 1] = pool_b[:, 0] + 1e-6 * rng.normal(size=600)  # two nearly collinear columns
    spatial_a = np.exp(rng.normal(scale=0.5, size=(600, 80)))  # skewed, like post-ReLU maps
    spatial_b = ill_conditioned(rng, 600, 80, 1.0, 1e-2, 10.0)
    logits = rng.normal(scale=3, size=(600, 10))
    return {"gen": {"pool": pool_a, "spatial": spatial_a, "logits": logits},
            "real": {"pool": pool_b, "spatial": spatial_b}}


def tqdit_fid(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(gaussian_statistics(a), gaussian_statistics(b))


def test_reference_is_right_on_cases_with_a_closed_form():
    """Checks the checker: commuting (diagonal) covariances, where sqrtm(S1 S2) is the elementwise root of
    the product, and np.cov.

    Mutation caught (in the reference itself): the factor 2 of the trace term dropped."""
    rng = np.random.default_rng(0)
    d1, d2 = rng.uniform(0.1, 5, 7), rng.uniform(0.1, 5, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    exact = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert reference_frechet(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(exact, rel=1e-12)
    # rotated by one orthogonal matrix: still commuting, same distance
    q = np.linalg.qr(rng.normal(size=(7, 7)))[0]
    rotated = reference_frechet(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
    assert rotated == pytest.approx(exact, rel=1e-10)
    x = rng.normal(size=(50, 4))
    np.testing.assert_allclose(reference_statistics(x)[1], np.cov(x, rowvar=False), rtol=1e-12)
    # IS of certain, balanced predictions is the number of classes
    certain = np.eye(10)[np.arange(1000) % 10] * 50
    assert reference_inception_score(certain, None) == pytest.approx(10, rel=1e-9)


def test_gaussian_statistics_are_the_unbiased_float64_moments(features):
    """Mutation caught: ``np.cov(..., ddof=0)`` in gaussian_statistics (the biased covariance)."""
    for x in (features["gen"]["pool"], features["real"]["pool"], features["gen"]["spatial"]):
        stats = gaussian_statistics(x.astype(np.float32))  # float32 features: statistics still float64
        mu, sigma = reference_statistics(x.astype(np.float32))
        assert stats["mu"].dtype == np.float64 and stats["sigma"].dtype == np.float64
        np.testing.assert_allclose(stats["mu"], mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-10, atol=1e-12 * np.abs(sigma).max())


def test_fid_and_sfid_equal_the_adm_formula(features):
    """Mutations caught: the trace term's factor 2 dropped (``- tr_covmean``); ``np.cov(..., ddof=0)``;
    the elementwise product S1 * S2 instead of the matrix product under the square root."""
    gen, real = features["gen"], features["real"]
    for name in ("pool", "spatial"):
        expected = reference_fid(gen[name], real[name])
        assert tqdit_fid(gen[name], real[name]) == pytest.approx(expected, rel=1e-8), name
        assert tqdit_fid(real[name], gen[name]) == pytest.approx(expected, rel=1e-8), name  # symmetric
    # the two ill-conditioned sets against each other (condition ≈ 1e10 and 1e6)
    expected = reference_fid(gen["pool"], real["spatial"][:, :64])
    assert tqdit_fid(gen["pool"], real["spatial"][:, :64]) == pytest.approx(expected, rel=1e-8)
    # same distribution, other samples: small but not zero; identical sets: zero
    # Here FID (≈ 451) is what is left of traces summing to ≈ 64,000 (condition ≈ 1e10): scipy's Schur
    # sqrtm and the reference's eigh then agree to ≈ 1e-9 of the traces, not of FID (2.5e-7 of FID on a
    # 2-core AMD EPYC, NumPy 2.4 / SciPy 1.17). The tolerance is 1e-8 of the traces: the mutations above
    # move this FID by hundreds to tens of thousands.
    first, second = gen["pool"][:300], gen["pool"][300:]
    traces = np.trace(reference_statistics(first)[1]) + np.trace(reference_statistics(second)[1])
    half = tqdit_fid(first, second)
    assert half == pytest.approx(reference_fid(first, second), abs=1e-8 * traces) and half > 0
    assert tqdit_fid(real["pool"], real["pool"]) == pytest.approx(0, abs=1e-6)


def configured_split_size(eval_config: str) -> int | None:
    return OmegaConf.load(ROOT / "conf" / "eval" / f"{eval_config}.yaml").is_split_size


def test_inception_score_equals_the_adm_formula_with_the_configured_parts():
    """Mutations caught: 10 parts always (``split_size`` ignored); the marginal p(y) over all samples
    instead of per part; the remainder of N // 10 kept in a short 11th part."""
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3, size=(1000, 10))
    for split_size in (None, 250, 300, 1000):  # 10 parts of 100; 4 parts; 3 + a short one of 100; one part
        expected = reference_inception_score(logits, split_size)
        assert inception_score(logits, split_size) == pytest.approx(expected, rel=1e-10), split_size
    assert configured_split_size("mnist") is None  # the embedded evaluation: 10 parts of N // 10
    uneven = rng.normal(scale=3, size=(1003, 10))  # remainder dropped: the last 3 samples count nowhere
    assert inception_score(uneven, None) == pytest.approx(reference_inception_score(uneven, None), rel=1e-10)
    assert reference_inception_score(uneven, None) == reference_inception_score(uneven[:1000], None)
    # the ImageNet evaluations: parts of 5,000, so 2 parts at 10k samples (not 10)
    big = rng.normal(scale=3, size=(10000, 10))
    for name in ("imagenet256", "imagenet512"):
        split_size = configured_split_size(name)
        assert split_size == 5000
        expected = reference_inception_score(big, split_size)
        assert inception_score(big, split_size) == pytest.approx(expected, rel=1e-10)
        assert expected != pytest.approx(reference_inception_score(big, 1000), rel=1e-4)  # parts matter here


def test_inception_score_depends_on_order_as_consecutive_parts_do():
    """Shuffling changes IS by exactly what the reference computes on the shuffled rows.

    Mutations caught: the rows shuffled (fixed seed) before the parts are cut; the parts taken as
    strided slices (``logits[i::parts]``) instead of consecutive ones."""
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(10), 100)  # sorted by class: each consecutive part holds one class
    logits = rng.normal(scale=1.0, size=(1000, 10)) + 4 * np.eye(10)[labels]
    shuffled = logits[rng.permutation(1000)]
    for split_size in (None, 250):
        ours, ours_shuffled = inception_score(logits, split_size), inception_score(shuffled, split_size)
        expected, expected_shuffled = (reference_inception_score(x, split_size) for x in (logits, shuffled))
        assert ours == pytest.approx(expected, rel=1e-10)
        assert ours_shuffled == pytest.approx(expected_shuffled, rel=1e-10)
        assert ours_shuffled - ours == pytest.approx(expected_shuffled - expected, rel=1e-8)
        assert expected_shuffled - expected > 1.0  # parts of one class have a low IS; mixed parts a high one


def test_precision_recall_equal_the_knn_manifold_formula(features):
    """Mutations caught: precision and recall swapped; k + 1 neighbours instead of k.

    torch-fidelity averages the 0/1 hits in float32, so the fractions are float32-rounded (|error| < 1e-7,
    far below one sample's 1/600): the tolerance allows that, not a single sample more or less."""
    gen, real = features["gen"]["pool"], features["real"]["pool"][:, :8]
    # inside the real manifold but covering only part of it; the reverse
    narrow, wide = real * 0.5 + 0.3, real * 2.0
    cases = [(narrow, real), (wide, real), (features["real"]["pool"][:300], features["real"]["pool"][300:]),
             (gen[:, :8] * 30, real)]
    for a, b in cases:
        assert precision_recall(a, b) == pytest.approx(reference_precision_recall(a, b), abs=1e-7)
    precision, recall = reference_precision_recall(narrow, real)
    assert precision > 0.9 and recall < 0.3  # far apart: a swap cannot pass
    for k in (1, 3, 5):
        expected = reference_precision_recall(narrow[:200], real, k)
        assert precision_recall(narrow[:200], real, k) == pytest.approx(expected, abs=1e-7)
    assert reference_precision_recall(narrow, real, 1)[1] < reference_precision_recall(narrow, real, 5)[1]


def test_all_metrics_equal_the_reference(features):
    """All five numbers as a job reports them; reference statistics, where given, take precedence over
    features.

    Mutations caught: sFID computed on the pooled features (pool for spatial); the reference's stored
    ``*_stats`` ignored (statistics recomputed from its features); ``split_size`` not passed on to IS."""
    gen, real = features["gen"], features["real"]
    expected = {
        "fid": reference_fid(gen["pool"], real["pool"]),
        "sfid": reference_fid(gen["spatial"], real["spatial"]),
        "is": reference_inception_score(gen["logits"], None),
        **dict(zip(("precision", "recall"), reference_precision_recall(gen["pool"], real["pool"]))),
    }
    # precision/recall: float32-rounded fractions (see the test above), within 1e-7 of the counts' ratio
    assert all_metrics(gen, real, split_size=None) == pytest.approx(expected, rel=1e-8, abs=1e-7)
    expected_is = reference_inception_score(gen["logits"], 200)
    assert all_metrics(gen, real, split_size=200)["is"] == pytest.approx(expected_is, rel=1e-10)
    # an ADM reference batch: stored mu/sigma (here of other features than arr_0's) are what FID uses
    other_pool, other_spatial = real["pool"][:, ::-1] * 1.5, real["spatial"] ** 2
    stored = {"pool": real["pool"], "spatial": real["spatial"],
              "pool_stats": dict(zip(("mu", "sigma"), reference_statistics(other_pool))),
              "spatial_stats": dict(zip(("mu", "sigma"), reference_statistics(other_spatial)))}
    metrics = all_metrics(gen, stored, split_size=None)
    assert metrics["fid"] == pytest.approx(reference_fid(gen["pool"], other_pool), rel=1e-8)
    assert metrics["sfid"] == pytest.approx(reference_fid(gen["spatial"], other_spatial), rel=1e-8)
    assert metrics["precision"] == pytest.approx(expected["precision"], abs=1e-7)  # float32-rounded fractions
    assert metrics["recall"] == pytest.approx(expected["recall"], abs=1e-7)
    no_images = all_metrics(gen, {k: v for k, v in stored.items() if k.endswith("_stats")}, split_size=None)
    assert no_images["precision"] is None and no_images["recall"] is None
    assert no_images["fid"] == metrics["fid"] and no_images["sfid"] == metrics["sfid"]
