"""Sample-quality metrics from features, with the ADM evaluator's definitions.

- FID / sFID: Fréchet distance between Gaussians fitted to pooled / spatial features
  (torch-fidelity's eigenvalue formulation, float64).
- IS: exp(E[KL(p(y|x) || p(y))]) over 10 consecutive, unshuffled splits of the logits; the mean of
  the splits is reported (ADM drops the remainder when N is not divisible by the split count).
- Precision / recall: Kynkäänniemi et al. with k = 3 nearest neighbours on pooled features
  (torch-fidelity's implementation, given our features rather than its VGG16 default).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric, KEY_METRIC_FID
from torch_fidelity.metric_prc import calculate_precision_recall_full


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


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """ADM's Inception Score: softmax of the logits, ``splits`` consecutive parts, mean of exp(mean KL)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if len(logits) < splits:
        raise ValueError(f"Inception Score over {splits} splits needs at least {splits} samples, got {len(logits)}")
    probs, log_probs = logits.softmax(dim=1), logits.log_softmax(dim=1)
    size = len(logits) // splits
    scores = []
    for i in range(splits):
        p, log_p = probs[i * size : (i + 1) * size], log_probs[i * size : (i + 1) * size]
        log_marginal = p.mean(dim=0, keepdim=True).log()
        scores.append(torch.exp((p * (log_p - log_marginal)).sum(dim=1).mean()).item())
    return float(np.mean(scores))


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds: generated in the real manifold, real in the generated one."""
    gen = torch.as_tensor(np.asarray(generated), dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    return calculate_precision_recall_full(gen, ref, neighborhood=k, batch_size=10000)


def all_metrics(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], splits: int = 10, k: int = 3) -> dict[str, float]:
    """FID, sFID, IS, precision and recall from generated and reference feature dicts (pool, spatial, logits)."""
    precision, recall = precision_recall(generated["pool"], reference["pool"], k)
    return {
        "fid": frechet_distance(gaussian_statistics(generated["pool"]), gaussian_statistics(reference["pool"])),
        "sfid": frechet_distance(gaussian_statistics(generated["spatial"]), gaussian_statistics(reference["spatial"])),
        "is": inception_score(generated["logits"], splits),
        "precision": precision,
        "recall": recall,
    }
