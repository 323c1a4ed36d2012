"""One job: model -> samples -> metrics -> results.json, all in the job directory.

Knows the config's shape (an OmegaConf/dict tree) but not Hydra itself; ``run.py`` passes the
composed config and the job directory in.
"""

from __future__ import annotations

import io
import platform
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tqdit.data import load_digits
from tqdit.diffusion import create_diffusion, space_timesteps
from tqdit.errors import TqditError
from tqdit.metrics import all_metrics, build_extractor, extract_features, reference_features
from tqdit.models import DIT_CONFIGS, load_model
from tqdit.pipeline.generate import generate
from tqdit.utils import atomic_write_bytes, atomic_write_json, resolve_device, resolve_dtype, sha256_file


def validate(cfg: DictConfig) -> None:
    """Cheap checks before any compute is spent; each error names the config key and the fix."""
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise TqditError(message)

    check(isinstance(cfg.num_samples, int) and cfg.num_samples >= cfg.eval.is_splits,
          f"num_samples={cfg.num_samples} must be an integer of at least eval.is_splits={cfg.eval.is_splits}")
    check(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be a positive integer")
    check(cfg.sampler.method in ("ddpm", "ddim"), f"sampler.method={cfg.sampler.method} is unknown: use ddpm or ddim")
    check(cfg.model.arch in DIT_CONFIGS, f"model.arch={cfg.model.arch} is unknown: choose one of {', '.join(DIT_CONFIGS)}")
    try:
        space_timesteps(1000, cfg.sampler.steps)
        resolve_dtype(cfg.dtype)
        device = resolve_device(cfg.device)
    except ValueError as error:
        raise TqditError(str(error)) from None
    check(not (cfg.dtype == "fp16" and device.type == "cpu"), "dtype=fp16 is not supported on the CPU; use dtype=fp32 or bf16")
    check(cfg.labels in ("balanced", "random"), f"labels={cfg.labels} is unknown: use balanced or random")
    checkpoint = cfg.model.checkpoint
    check(checkpoint is None or Path(str(checkpoint)).expanduser().is_file(),
          f"model.checkpoint={checkpoint}: file not found; give the path of the weights file")


def save_samples(job_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM layout: ``arr_0`` uint8 NHWC images, ``arr_1`` labels, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images, arr_1=labels)
    atomic_write_bytes(job_dir / "samples.npz", buffer.getvalue())


def save_grid(path: Path, images: np.ndarray, columns: int = 10, rows: int = 10) -> None:
    """The first rows×columns samples as one PNG (with balanced labels, column c shows class c)."""
    count = min(len(images), columns * rows)
    rows = -(-count // columns)
    h, w, c = images.shape[1:]
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(count):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def evaluate(images: np.ndarray, eval_cfg: DictConfig, device: torch.device) -> dict[str, float]:
    """Metrics of ``images`` against the configured reference set."""
    if eval_cfg.reference != "mnist_digits":
        raise ValueError(f"unknown eval.reference '{eval_cfg.reference}'; the embedded evaluation uses mnist_digits")
    extractor = build_extractor(eval_cfg.feature_extractor, device, eval_cfg.weights)
    weights = eval_cfg.weights
    extractor_id = f"{eval_cfg.feature_extractor}:{sha256_file(weights) if weights else 'shipped'}"
    if weights is None:
        from tqdit.assets import asset_path

        extractor_id = f"{eval_cfg.feature_extractor}:{sha256_file(asset_path('mnist_classifier.safetensors'))}"
    real_images = load_digits()[0][..., None]
    reference = reference_features(real_images, extractor, extractor_id, eval_cfg.cache_dir, eval_cfg.batch_size)
    generated = extract_features(images, extractor, eval_cfg.batch_size, desc="sample features")
    return all_metrics(generated, reference, splits=eval_cfg.is_splits, k=eval_cfg.pr_k)


def run_job(cfg: DictConfig, job_dir: str | Path) -> dict:
    """Run one configured job and return (and write) its results."""
    job_dir = Path(job_dir)
    validate(cfg)
    timings: dict[str, float] = {}
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the reference sampler does
    torch.backends.cudnn.allow_tf32 = True

    start = time.perf_counter()
    model = load_model(cfg.model.arch, cfg.model.input_size, cfg.model.checkpoint).to(device=device, dtype=dtype)
    if cfg.compile:
        model.compile()  # ~1.9x on DiT-XL/2 on an H100 (README, Performance); costs a minute to compile
    diffusion = create_diffusion(cfg.sampler.steps, learn_sigma=model.learn_sigma)
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    images, labels = generate(
        model, diffusion, cfg.num_samples, cfg.batch_size, cfg.seed,
        labels=cfg.labels, cfg_scale=cfg.sampler.cfg_scale, cfg_channels=cfg.sampler.cfg_channels,
        method=cfg.sampler.method, eta=cfg.sampler.eta, clip_denoised=cfg.sampler.clip_denoised, dtype=dtype,
    )
    timings["sampling_s"] = time.perf_counter() - start
    save_samples(job_dir, images, labels)
    save_grid(job_dir / "grid.png", images)

    start = time.perf_counter()
    metrics = evaluate(images, cfg.eval, device)
    timings["metrics_s"] = time.perf_counter() - start

    results = {
        "metrics": metrics,
        "seed": cfg.seed,
        "num_samples": cfg.num_samples,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "image_steps_per_s": round(cfg.num_samples * diffusion.num_steps / timings["sampling_s"], 1),
        "environment": {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(job_dir / "results.json", results)
    return results


def summary_line(results: dict) -> str:
    m, cfg = results["metrics"], results["config"]
    return (f"{cfg['model']['arch']} {cfg['sampler']['method']}-{cfg['sampler']['steps']} cfg={cfg['sampler']['cfg_scale']} "
            f"N={results['num_samples']} seed={results['seed']}: FID {m['fid']:.3f}  sFID {m['sfid']:.3f}  IS {m['is']:.3f}  "
            f"precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"(sampling {results['timings']['sampling_s']:.0f} s, {results['image_steps_per_s']:.0f} image-steps/s)")
