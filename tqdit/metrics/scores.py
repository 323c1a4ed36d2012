"""Sample-quality metrics from features, with the ADM evaluator's definitions.

- FID / sFID: Fréchet distance between Gaussians fitted to pooled / spatial features
  (torch-fidelity's eigenvalue formulation, float64).
- IS: exp(E[KL(p(y|x) || p(y))]) over consecutive, unshuffled parts of ``split_size`` samples; the
  mean over parts is reported. The ADM evaluator uses parts of 5,000 samples (the last may be shorter):
  10 parts at 50k samples, but only 2 at 10k. The ImageNet evaluation configs keep that; the embedded
  one uses 10 parts of N // 10 (remainder dropped).
- Precision / recall: Kynkäänniemi et al. with k = 3 nearest neighbours on pooled features
  (torch-fidelity's implementation, given our features rather than its VGG16 default).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric, KEY_METRIC_FID
from torch_fidelity.metric_prc import calculate_precision_recall_part


def gaussian_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance (float64, unbiased) of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features for statistics, got shape {features.shape}")
    return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), in float64."""
    stats_1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    stats_2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"feature dimensions differ ({stats_1['mu'].shape[0]} vs {stats_2['mu'].shape[0]}): "
                         "the reference statistics come from another feature network or layer")
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray, split_size: int | None = None, parts: int = 10) -> float:
    """ADM's Inception Score: softmax of the logits, consecutive parts of ``split_size`` samples (the last
    may be shorter), mean over parts of exp(mean KL(p(y|x) || p(y))).

    ``split_size`` None: ``parts`` equal parts of N // parts samples, the remainder dropped (the
    embedded evaluation's 10 splits).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if split_size is None:
        split_size = len(logits) // parts
        logits = logits[: split_size * parts]
    if split_size < 1 or len(logits) < 2:
        raise ValueError(
            "Inception Score needs parts of at least 1 sample and 2 samples in all, "
            f"got {split_size} and {len(logits)}"
        )
    probs, log_probs = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for start in range(0, len(logits), split_size):
        p, log_p = probs[start : start + split_size], log_probs[start : start + split_size]
        log_marginal = p.mean(dim=0, keepdim=True).log()
        scores.append(torch.exp((p * (log_p - log_marginal)).sum(dim=1).mean()).item())
    return float(np.mean(scores))


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds: generated in the real manifold, real in the generated one."""
    gen = torch.as_tensor(np.asarray(generated), dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    # the batched form: never holds an N×N distance matrix (50k samples would need 20 GB)
    return calculate_precision_recall_part(gen, ref, neighborhood=k, batch_size=10000)


def all_metrics(
    generated: dict[str, np.ndarray], reference: dict, split_size: int | None, k: int = 3
) -> dict[str, float | None]:
    """FID, sFID, IS, precision and recall.

    ``generated``: features {pool, spatial, logits}. ``reference``: features {pool, spatial} and/or
    precomputed statistics {pool_stats, spatial_stats} (an ADM reference batch's mu/sigma, mu_s/sigma_s),
    which take precedence, as in the ADM evaluator. Without reference ``pool`` features, precision and
    recall are None.
    """
    def reference_stats(name: str) -> dict:
        return reference.get(f"{name}_stats") or gaussian_statistics(reference[name])

    precision, recall = (
        precision_recall(generated["pool"], reference["pool"], k)
        if reference.get("pool") is not None
        else (None, None)
    )
    return {
        "fid": frechet_distance(gaussian_statistics(generated["pool"]), reference_stats("pool")),
        "sfid": frechet_distance(gaussian_statistics(generated["spatial"]), reference_stats("spatial")),
        "is": inception_score(generated["logits"], split_size),
        "precision": precision,
        "recall": recall,
    }
