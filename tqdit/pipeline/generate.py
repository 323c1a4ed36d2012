"""Drawing N labelled samples in batches; sample i depends only on (seed, i)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from tqdit.data import to_uint8
from tqdit.diffusion import GaussianDiffusion, PerSampleNoise, guided_model, sample_loop, sample_seed


def sample_labels(indices: np.ndarray, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Labels of samples ``indices``: ``balanced`` (i mod num_classes) or ``random`` (from (seed, i))."""
    if mode == "balanced":
        return np.asarray(indices) % num_classes
    if mode == "random":
        return np.array([np.random.default_rng(sample_seed(seed, i) + 1).integers(num_classes) for i in indices])
    raise ValueError(f"unknown label mode '{mode}': use balanced or random")


def generate(
    model,
    diffusion: GaussianDiffusion,
    num_samples: int,
    batch_size: int,
    seed: int,
    *,
    labels: str = "balanced",
    cfg_scale: float = 1.5,
    cfg_channels: int | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = False,
    dtype: torch.dtype = torch.float32,
    decode=None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) for samples 0..num_samples-1.

    ``decode`` maps final latents to model-range pixels (the VAE for latent models; None = identity).
    """
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    images, all_labels = [], []
    batches = range(0, num_samples, batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        indices = np.arange(start, min(start + batch_size, num_samples))
        batch_labels = sample_labels(indices, model.num_classes, labels, seed)
        y = torch.as_tensor(batch_labels, device=device)
        noise = PerSampleNoise(seed, indices, shape, device)
        denoise = guided_model(model, y, cfg_scale, cfg_channels)
        x = sample_loop(denoise, diffusion, noise, method=method, eta=eta, clip_denoised=clip_denoised, model_dtype=dtype)
        if decode is not None:
            x = decode(x)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"samples {indices[0]}..{indices[-1]} contain NaN/Inf (model or sampler diverged)")
        images.append(to_uint8(x).numpy())
        all_labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(all_labels).astype(np.int64)
