"""Feature extraction through torch-fidelity's feature-extractor registry, batched with a progress bar."""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

from tqdit.metrics.base import FEATURES
from tqdit.metrics import classifier, inception
from tqdit.utils import sha256_file

# tqdit's feature networks, by torch-fidelity registry name (registered on first use, once).
EXTRACTORS = {classifier.FEATURE_EXTRACTOR_NAME: classifier.DigitFeatureExtractor,
              inception.FEATURE_EXTRACTOR_NAME: inception.InceptionFeatureExtractor}


def register_extractors() -> None:
    """Make tqdit's feature networks known to torch-fidelity's registry (idempotent)."""
    for name, extractor in EXTRACTORS.items():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, extractor)

def build_extractor(name: str, device: torch.device, weights_path: str | None = None):
    """A torch-fidelity feature extractor by registry name, on ``device``, providing FEATURES."""
    register_extractors()
    extractor = create_feature_extractor(
        name, list(FEATURES), cuda=False, verbose=False, feature_extractor_weights_path=weights_path
    )
    return extractor.to(device).eval()


def extractor_identity(extractor) -> str:
    """Name and weights hash of a feature network: part of every reference-statistics cache key."""
    return f"{extractor.get_name()}:{sha256_file(extractor.weights_path)}"


@torch.no_grad()
def extract_features(
    images: np.ndarray, extractor, batch_size: int = 500, progress: bool = True, desc: str = "features"
) -> dict[str, np.ndarray]:
    """uint8 NHWC images -> {feature name: float64 (N, D)} in the extractor's FEATURES order."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} with shape {images.shape}")
    device = next(extractor.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in extractor.get_requested_features_list()}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        batch = torch.tensor(images[start : start + batch_size]).permute(0, 3, 1, 2).to(device)
        outputs = extractor.convert_features_tuple_to_dict(extractor(batch))
        for name, value in outputs.items():
            chunks[name].append(value.double().cpu().numpy())
    features = {name: np.concatenate(parts) for name, parts in chunks.items()}
    for name, value in features.items():
        if not np.isfinite(value).all():
            raise FloatingPointError(
                f"feature '{name}' has NaN/Inf values; check the images and the feature network weights"
            )
    return features
