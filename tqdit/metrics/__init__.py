"""Sample-quality metrics: feature networks (torch-fidelity registry), FID, sFID, IS, precision/recall."""

from tqdit.metrics.features import FEATURES, build_extractor, extract_features, extractor_identity
from tqdit.metrics.reference import load_reference, reference_features
from tqdit.metrics.scores import (
    all_metrics,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    precision_recall,
)

__all__ = [
    "FEATURES",
    "all_metrics",
    "build_extractor",
    "extract_features",
    "extractor_identity",
    "load_reference",
    "frechet_distance",
    "gaussian_statistics",
    "inception_score",
    "precision_recall",
    "reference_features",
]
