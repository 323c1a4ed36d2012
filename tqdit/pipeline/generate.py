"""Drawing N labelled samples in batches; sample i depends only on (seed, i)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tqdit.data import to_uint8
from tqdit.diffusion import GaussianDiffusion, PerSampleNoise, guided_model, sample_loop, sample_seed
from tqdit.utils import atomic_write_bytes


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
    shard_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) for samples 0..num_samples-1.

    ``decode`` maps final latents to model-range pixels (the VAE for latent models; None = identity).
    ``shard_dir``: each finished batch is written there atomically (``samples_<first>_<end>.npz``) and a
    batch whose shard is already there is read instead of sampled, so a killed job loses at most the
    batch in flight. A shard that cannot be read or does not hold exactly its samples is reported and
    sampled again.
    """
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    images, all_labels = [], []
    batches = range(0, num_samples, batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        indices = np.arange(start, min(start + batch_size, num_samples))
        batch_labels = sample_labels(indices, model.num_classes, labels, seed)
        shard = shard_dir / f"samples_{indices[0]:07d}_{indices[-1] + 1:07d}.npz" if shard_dir is not None else None
        finished = read_shard(shard, len(indices), batch_labels) if shard is not None and shard.exists() else None
        if finished is not None:
            images.append(finished)
            all_labels.append(batch_labels)
            continue
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
        if shard is not None:
            write_shard(shard, images[-1], batch_labels)
    return np.concatenate(images), np.concatenate(all_labels).astype(np.int64)


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    atomic_write_bytes(path, buffer.getvalue())


def read_shard(path: Path, count: int, labels: np.ndarray) -> np.ndarray | None:
    """The images of a finished batch, or None (with a warning) if the shard is damaged or not this batch's."""
    try:
        with np.load(path) as shard:
            images, stored = shard["images"], shard["labels"]
    except Exception as error:
        warnings.warn(f"sample shard {path.name} is damaged ({type(error).__name__}); sampling that batch again", stacklevel=2)
        return None
    if len(images) != count or images.dtype != np.uint8 or not np.array_equal(stored, labels):
        warnings.warn(f"sample shard {path.name} does not hold its batch's samples; sampling that batch again", stacklevel=2)
        return None
    return images
