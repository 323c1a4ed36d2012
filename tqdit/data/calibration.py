"""Calibration sets: the FP model's own sampling trajectories, captured at chosen steps.

The FP sampler runs exactly as in evaluation (class labels, classifier-free guidance), and every
model input of the chosen steps is kept: with guidance, both halves of the doubled batch — the
conditional input (x_t, t, y) and the unconditional one (x_t, t, null). Policies:

- ``all``      every sampling step (time grouping needs data from every group);
- ``uniform``  ``num_steps`` steps at a uniform stride over the trajectory (Q-Diffusion style);

Sets are cached on disk under a key that hashes the model weights and every setting that changes
the captured data, so the jobs of a sweep capture once. Jobs capture every step by default and each
method then *selects* its inputs from the shared set (one capture serves the whole sweep):

- ``select_per_group``  the same number of random inputs from every time group (TQ-DiT's methods);
- ``select_uniform_steps``  ``steps`` steps at a uniform stride, ``per_step`` inputs each
  (Q-Diffusion, PTQ4DiT);
- ``select_ndtc``  PTQ4DM's normally distributed timestep calibration: steps drawn from N(μ, σ)
  (fractions of the trajectory, counted from the clean end), distinct inputs.

Labels: ``spread`` (default) draws the trajectories' classes across all classes, seeded — a random
permutation of the classes per round of ``num_classes`` trajectories, so fewer trajectories than classes
still see random classes from the whole range and more see each class equally often; ``first`` labels
trajectory i with class i mod num_classes (32 trajectories of ImageNet then cover classes 0–31 only).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from tqdit.diffusion import GaussianDiffusion, PerSampleNoise, guided_model, sample_loop
from tqdit.utils import atomic_write_bytes

CACHE_VERSION = 1


@dataclass(frozen=True)
class CalibrationSpec:
    policy: str = "all"           # all | uniform
    num_samples: int = 32         # FP trajectories (images); each step yields 2 inputs with guidance
    num_steps: int | None = None  # for policy=uniform: how many steps to keep
    seed: int = 1234              # trajectories' seed (kept apart from evaluation seeds)
    cfg_scale: float = 1.5
    cfg_channels: int | None = None
    labels: str = "spread"        # spread: seeded draw across all classes | first: i mod num_classes
    method: str = "ddpm"
    clip_denoised: bool = False


@dataclass
class CalibrationSet:
    """Model inputs captured along FP trajectories: x (M, C, H, W), t (M,) original steps,
    y (M,), step index (M,)."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    step: torch.Tensor  # respaced index of the sampling step (0 = last, cleanest)
    timesteps: torch.Tensor  # the sampling schedule it was captured with (original timestep per index)

    def __len__(self) -> int:
        return len(self.t)


def uniform_stride(num_steps: int, count: int) -> list[int]:
    """``count`` step indices at a uniform stride over 0..num_steps−1, both ends included."""
    return sorted({round(i) for i in np.linspace(0, num_steps - 1, count)})


def kept_steps(spec: CalibrationSpec, num_steps: int) -> list[int]:
    """Respaced step indices captured by the policy."""
    if spec.policy == "all":
        return list(range(num_steps))
    if spec.policy == "uniform":
        count = spec.num_steps or num_steps
        if not 1 <= count <= num_steps:
            raise ValueError(
                f"calibration num_steps={count} must be between 1 and the {num_steps} sampling steps"
            )
        return uniform_stride(num_steps, count)
    raise ValueError(f"unknown calibration policy '{spec.policy}': use all or uniform")


def select_per_group(step: np.ndarray, group_of_step: np.ndarray, per_group: int, seed: int) -> np.ndarray:
    """Indices of ``per_group`` random inputs from every time group (fewer where a group has fewer)."""
    rng = np.random.default_rng(seed)
    step_group = group_of_step[step]
    chosen = []
    for g in np.unique(group_of_step):
        pool = np.flatnonzero(step_group == g)
        if len(pool) == 0:
            raise ValueError(
                f"the calibration set has no inputs from time group {g}; capture all steps (policy=all)"
            )
        chosen.append(np.sort(rng.choice(pool, min(per_group, len(pool)), replace=False)))
    return np.concatenate(chosen)


def select_uniform_steps(
    step: np.ndarray, num_steps: int, steps: int, per_step: int, seed: int
) -> np.ndarray:
    """Q-Diffusion's time step-aware calibration: ``steps`` sampling steps at a uniform stride over the
    whole trajectory (clean end and noisy end included), ``per_step`` random inputs at each."""
    steps = min(steps, num_steps)
    rng = np.random.default_rng(seed)
    chosen = []
    for s in uniform_stride(num_steps, steps):
        pool = np.flatnonzero(step == s)
        if len(pool) == 0:
            raise ValueError(
                f"the calibration set has no inputs from sampling step {s}; capture all steps (policy=all)"
            )
        chosen.append(np.sort(rng.choice(pool, min(per_step, len(pool)), replace=False)))
    return np.concatenate(chosen)


def calibration_labels(num_samples: int, num_classes: int, policy: str, seed: int) -> np.ndarray:
    """The trajectories' class labels (see the module docstring for the policies)."""
    if policy == "first":
        return np.arange(num_samples) % num_classes
    if policy != "spread":
        raise ValueError(f"calibration labels={policy!r} is unknown: use spread or first")
    rng = np.random.default_rng(seed)
    rounds = -(-num_samples // num_classes)
    return np.concatenate([rng.permutation(num_classes) for _ in range(rounds)])[:num_samples]


def ndtc_step_probabilities(num_steps: int, mean: float, std: float) -> np.ndarray:
    """P(step = s) under ``ndtc_steps``: the normal mass of [s, s+1)/num_steps, the tails in the end steps."""
    edges = np.arange(1, num_steps) / num_steps
    cdf = np.array([0.5 * (1 + math.erf((e - mean) / (std * math.sqrt(2)))) for e in edges])
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def ndtc_steps(num_steps: int, count: int, mean: float, std: float, rng: np.random.Generator) -> np.ndarray:
    """PTQ4DM's NDTC: ``count`` sampling-step indices (0 = cleanest) with fraction u ~ N(mean, std) of the
    trajectory counted from the clean end, step = clamp(⌊u · num_steps⌋, 0, num_steps − 1)."""
    fraction = rng.normal(mean, std, size=count)
    return np.clip(np.floor(fraction * num_steps), 0, num_steps - 1).astype(np.int64)


def select_ndtc(
    step: np.ndarray, num_steps: int, count: int, mean: float, std: float, seed: int,
    replacement: bool = False,
) -> np.ndarray:
    """Indices of ``count`` inputs whose steps follow NDTC.

    Without replacement (default): ``count`` distinct inputs, each weighted by its step's NDTC
    probability over the number of inputs of that step — the paper's sampler runs a fresh trajectory
    for every drawn timestep, so no input repeats; where a step's inputs run out, its further draws
    go to the other steps in proportion. With replacement: each draw takes a random input of its step
    (repeats once a step is drawn more often than it has inputs: with 64 inputs per step and 1024
    draws, about 900 distinct inputs)."""
    if not replacement:
        if count > len(step):
            raise ValueError(f"PTQ4DM wants {count} distinct calibration inputs but the set has {len(step)}; "
                             "capture more trajectories (quant.calib.num_samples) or lower num_inputs")
        per_step = np.bincount(step, minlength=num_steps)
        probability = ndtc_step_probabilities(num_steps, mean, std)
        missing = np.flatnonzero((per_step == 0) & (probability > 0))
        if len(missing):
            raise ValueError(f"the calibration set has no inputs from sampling step {missing[0]}, which NDTC "
                             "draws; capture all steps (policy=all)")
        weight = probability[step] / per_step[step]
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(step), count, replace=False, p=weight / weight.sum()))
    rng = np.random.default_rng(seed)
    wanted = ndtc_steps(num_steps, count, mean, std, rng)
    chosen = []
    for s, n in zip(*np.unique(wanted, return_counts=True)):
        pool = np.flatnonzero(step == s)
        if len(pool) == 0:
            raise ValueError(
                f"the calibration set has no inputs from sampling step {s}; capture all steps (policy=all)"
            )
        chosen.append(rng.choice(pool, n, replace=n > len(pool)))
    return np.sort(np.concatenate(chosen))


def capture(model, diffusion: GaussianDiffusion, spec: CalibrationSpec) -> CalibrationSet:
    """Run the FP sampler on ``spec.num_samples`` labels (``spec.labels``); keep the chosen steps' inputs."""
    device = next(model.parameters()).device
    keep = set(kept_steps(spec, diffusion.num_steps))
    indices = np.arange(spec.num_samples)
    labels = torch.as_tensor(calibration_labels(spec.num_samples, model.num_classes, spec.labels, spec.seed),
                             device=device)
    xs, ts, ys, steps = [], [], [], []
    use_cfg = spec.cfg_scale != 1.0

    def on_step(index, x, t):
        if index in keep:
            both = (
                (
                    torch.cat([x, x]),
                    torch.cat([t, t]),
                    torch.cat([labels, torch.full_like(labels, model.null_class)]),
                )
                if use_cfg
                else (x, t, labels)
            )
            xs.append(both[0].cpu()), ts.append(both[1].cpu()), ys.append(both[2].cpu())
            steps.append(torch.full((len(both[1]),), index, dtype=torch.long))

    noise = PerSampleNoise(
        spec.seed, indices, (model.in_channels, model.input_size, model.input_size), device
    )
    sample_loop(guided_model(model, labels, spec.cfg_scale, spec.cfg_channels), diffusion, noise,
                method=spec.method, clip_denoised=spec.clip_denoised, on_step=on_step,
                model_dtype=next(model.parameters()).dtype)  # a bf16 model captures in bf16, as it samples
    return CalibrationSet(
        torch.cat(xs).float(),
        torch.cat(ts),
        torch.cat(ys),
        torch.cat(steps),
        torch.as_tensor(diffusion.timesteps),
    )


def model_fingerprint(model) -> str:
    """sha256 over the model's state (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cached_capture(
    model, diffusion: GaussianDiffusion, spec: CalibrationSpec, cache_dir: str | Path | None
) -> tuple[CalibrationSet, bool]:
    """(calibration set, whether it came from the cache). The key covers weights, schedule and spec."""
    key_source = json.dumps(
        {
            "v": CACHE_VERSION,
            "model": model_fingerprint(model),
            "timesteps": diffusion.timesteps.tolist(),
            "spec": asdict(spec),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_source.encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"calibration-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            tensors = load(path.read_bytes())
            return (
                CalibrationSet(
                    tensors["x"], tensors["t"], tensors["y"], tensors["step"], tensors["timesteps"]
                ),
                True,
            )
        except Exception:  # damaged entry: capture again
            path.unlink(missing_ok=True)
    calib = capture(model, diffusion, spec)
    if path is not None:
        atomic_write_bytes(
            path,
            save(
                {
                    "x": calib.x.contiguous(),
                    "t": calib.t,
                    "y": calib.y,
                    "step": calib.step,
                    "timesteps": calib.timesteps,
                }
            ),
        )
    return calib, False
