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
        return np.array(
            [np.random.default_rng(sample_seed(seed, i) + 1).integers(num_classes) for i in indices]
        )
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
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) for samples 0..num_samples-1.

    With ``world_size`` > 1 (one process per GPU), this process draws only the batches b with
    b mod world_size == rank and returns those; each is written to ``shard_dir`` (required then),
    from which :func:`merge_shards` assembles the whole set.

    ``decode`` maps final latents to model-range pixels (the VAE for latent models; None = identity).
    ``shard_dir``: each finished batch is written there atomically (``samples_<first>_<end>.npz``) and a
    batch whose shard is already there is read instead of sampled, so a killed job loses at most the
    batch in flight. A shard that cannot be read or does not hold exactly its samples is reported and
    sampled again.
    """
    if world_size > 1 and shard_dir is None:
        raise ValueError("sampling with several processes needs a shard_dir to merge from")
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    images, all_labels = [], []
    mine = batch_ranges(num_samples, batch_size)[rank::world_size]
    # one tick per denoising step of a batch (a batch of a few hundred images takes minutes on a CPU)
    total_images = sum(map(len, mine))
    with tqdm(total=len(mine) * diffusion.num_steps, desc="sampling", unit="step",
              disable=not progress or rank != 0) as bar:
        finished_images = 0
        for indices in mine:
            bar.set_postfix(images=f"{finished_images}/{total_images}")
            batch_labels = sample_labels(indices, model.num_classes, labels, seed)
            shard = shard_path(shard_dir, indices) if shard_dir is not None else None
            finished = None
            if shard is not None and shard.exists():
                finished = read_shard(shard, len(indices), batch_labels)
            if finished is not None:
                images.append(finished)
                all_labels.append(batch_labels)
                bar.update(diffusion.num_steps)
                finished_images += len(indices)
                continue
            y = torch.as_tensor(batch_labels, device=device)
            noise = PerSampleNoise(seed, indices, shape, device)
            denoise = guided_model(model, y, cfg_scale, cfg_channels)
            x = sample_loop(denoise, diffusion, noise, method=method, eta=eta, clip_denoised=clip_denoised,
                            model_dtype=dtype, after_step=lambda: bar.update(1))
            if decode is not None:
                x = decode(x)
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"samples {indices[0]}..{indices[-1]} contain NaN/Inf (model or sampler diverged)"
                )
            images.append(to_uint8(x).numpy())
            all_labels.append(batch_labels)
            if shard is not None:
                write_shard(shard, images[-1], batch_labels)
            finished_images += len(indices)
        bar.set_postfix(images=f"{finished_images}/{total_images}")
    if not images:  # more processes than batches: this one had nothing to draw
        return np.zeros((0, 0, 0, 0), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(images), np.concatenate(all_labels).astype(np.int64)


def batch_ranges(num_samples: int, batch_size: int) -> list[np.ndarray]:
    """Sample indices of each batch: [0..b), [b..2b), ..."""
    return [
        np.arange(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)
    ]


def shard_path(shard_dir: Path, indices: np.ndarray) -> Path:
    return shard_dir / f"samples_{indices[0]:07d}_{indices[-1] + 1:07d}.npz"


def finished_batches(shard_dir: Path, num_samples: int, batch_size: int) -> list[np.ndarray]:
    """Sample indices of the batches whose shard an earlier run of the job left in ``shard_dir``
    (what sampling will read back instead of drawing; a damaged shard is drawn again, with a warning)."""
    batches = batch_ranges(num_samples, batch_size)
    return [indices for indices in batches if shard_path(shard_dir, indices).exists()]


def merge_shards(
    shard_dir: Path, num_samples: int, batch_size: int, seed: int, labels: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """All samples from the shards every process wrote, in index order (what one process would return)."""
    images, all_labels = [], []
    for indices in batch_ranges(num_samples, batch_size):
        batch_labels = sample_labels(indices, num_classes, labels, seed)
        path = shard_path(shard_dir, indices)
        batch = read_shard(path, len(indices), batch_labels) if path.exists() else None
        if batch is None:
            raise RuntimeError(
                f"shard {path.name} is missing or damaged after sampling; run the job again to redraw it"
            )
        images.append(batch)
        all_labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(all_labels).astype(np.int64)


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    atomic_write_bytes(path, buffer.getvalue())


def read_shard(path: Path, count: int, labels: np.ndarray) -> np.ndarray | None:
    """The images of a finished batch, or None (with a warning) if the shard is damaged or not
    this batch's."""
    try:
        with np.load(path) as shard:
            images, stored = shard["images"], shard["labels"]
    except Exception as error:
        warnings.warn(
            f"sample shard {path.name} is damaged ({type(error).__name__}); sampling that batch again",
            stacklevel=2,
        )
        return None
    if len(images) != count or images.dtype != np.uint8 or not np.array_equal(stored, labels):
        warnings.warn(
            f"sample shard {path.name} does not hold its batch's samples; sampling that batch again",
            stacklevel=2,
        )
        return None
    return images
