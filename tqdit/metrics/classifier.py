"""The embedded feature network: a small digit classifier standing in for Inception-v3.

Registered with torch-fidelity as ``tqdit-mnist``. It reads uint8 images (N, C, 32, 32) — one
channel, or three (averaged) as torch-fidelity's datasets deliver — and provides three features,
mirroring the ADM evaluator's roles:

- ``pool``    128-d global-average-pooled last conv map (FID, precision/recall), like pool3;
- ``logits``  10 class logits (Inception Score), like the 1008 logits;
- ``spatial`` the 8×8 conv map, first 4 channels, channels-last, flattened to 256 dims (sFID),
  like ``Mixed_6d.branch1x1``'s first 7 channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from tqdit.metrics.base import RoleFeatureExtractor

FEATURE_EXTRACTOR_NAME = "tqdit-mnist"
SPATIAL_CHANNELS = 4


class DigitClassifier(nn.Module):
    """Four 3×3 convolutions (32×32 -> 16 -> 8 -> 4), global average pool, linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GELU()
        )
        self.mid = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU())  # 8×8: sFID's layer
        self.top = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GELU())  # 4×4
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: float (N, 1, 32, 32) in [-1, 1] -> (pool (N, 128), logits (N, 10),
        spatial map (N, 64, 8, 8))."""
        spatial = self.mid(self.stem(x))
        pool = self.top(spatial).mean(dim=(2, 3))
        return pool, self.head(self.dropout(pool)), spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C ∈ {1, 3} -> float (N, 1, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"the feature network expects uint8 images, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[-2:] != (32, 32):
        raise ValueError(
            f"the feature network expects uint8 (N, 1|3, 32, 32) images, got shape {tuple(images.shape)}"
        )
    x = images.float().mean(dim=1, keepdim=True)
    return x / 127.5 - 1.0


class DigitFeatureExtractor(RoleFeatureExtractor):
    """torch-fidelity wrapper of :class:`DigitClassifier`; weights from ``feature_extractor_weights_path``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = DigitClassifier()
        path = feature_extractor_weights_path
        if path is None:
            from tqdit.assets import asset_path

            path = asset_path("mnist_classifier.safetensors")
        self.weights_path = Path(path)
        self.classifier.load_state_dict(load_file(str(self.weights_path)))
        self.classifier.eval()

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

    def roles(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool, logits, spatial = self.classifier.features(uint8_to_input(images))
        return pool, logits, spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
