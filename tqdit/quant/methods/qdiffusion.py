"""``qdiffusion``: Q-Diffusion (Li et al., ICCV 2023) on DiT, under the shared protocol.

Follows the paper (and its BRECQ-based code where the paper is silent):
- **Time step-aware calibration**: ``calib_steps`` sampling steps at a uniform stride over the whole
  trajectory, ⌈num_inputs / calib_steps⌉ inputs at each, from the FP sampler's trajectories
  (25 steps × 32 inputs = 800 by default, PTQ4DiT's DiT setting of this baseline).
- **Initialisation**: weights per output channel (asymmetric, BRECQ's quantizer), activations per
  tensor (asymmetric; the post-softmax operand is non-negative, so its codes are unsigned); each
  scale by an Lp (p = 2.4) search over shrink factors of the observed range.
- **Reconstruction** (``tqdit.quant.reconstruct``): per DiT block, BRECQ-style, inputs from the
  already quantized blocks and targets from FP; first AdaRound weight rounding with activations in
  full precision (``quant.recon.iters``, 20k in the paper, β 20→2, warm-up 0.2, λ 0.01, Lp p = 2.4),
  then LSQ-style activation steps with the rounded weights (``act_iters`` 5k, Adam 4e-4, cosine).
Not applicable to DiT: the shortcut-splitting quantizer for UNet skip concatenations.
Protocol choices: q, k and v use the engine's symmetric quantizers like every method's.
"""

import time
from dataclasses import dataclass, replace

import numpy as np

from tqdit.data.calibration import select_uniform_steps
from tqdit.quant.calibrate import QuantConfig, calibrate, method_settings, peak_memory, start_cost
from tqdit.quant.reconstruct import reconstruct_blocks


@dataclass
class Settings:
    calib_steps: int = 25  # sampling steps at a uniform stride (all of them when the schedule is shorter)
    p: float = 2.4         # Lp exponent of the initial scale search


def calibration_index(calib, cfg: QuantConfig, steps: int) -> np.ndarray:
    """Q-Diffusion's uniform-stride selection of ``cfg.num_inputs`` inputs."""
    steps = min(steps, len(calib.timesteps))
    return select_uniform_steps(calib.step.numpy(), len(calib.timesteps), steps, -(-cfg.num_inputs // steps), cfg.seed)


def initialise_and_reconstruct(model, calib, cfg: QuantConfig, index: np.ndarray, p: float, joint: bool,
                               start: float | None = None):
    """Lp-initialised asymmetric quantizers, then block reconstruction; cost covers both (from ``start``)."""
    start = start_cost(next(model.parameters()).device) if start is None else start
    search = replace(cfg.search, criterion="lp", p=p)
    model, cost = calibrate(model, calib, replace(cfg, multi_region=False, time_groups=1, weight_symmetric=False, search=search),
                            index=index, started=start)
    device = next(model.parameters()).device
    x, t, y = calib.x[index].to(device), calib.t[index].to(device), calib.y[index].to(device)
    recon_start = time.perf_counter()
    reports = reconstruct_blocks(model, x.to(next(model.parameters()).dtype), t, y, cfg.recon, joint=joint)
    peak, kind = peak_memory(device)
    cost.update(calibration_s=round(time.perf_counter() - start, 2), peak_memory_bytes=peak, peak_memory_kind=kind,
                reconstruction={"blocks": len(reports), "seconds": round(time.perf_counter() - recon_start, 2), "joint": joint,
                                "error_nearest": [round(r["error_nearest"], 6) for r in reports],
                                "error_after": [round(r["error_after"], 6) for r in reports],
                                "undecided_rounding": max((r["undecided_rounding"] for r in reports), default=0.0),
                                "resumed_blocks": sum(bool(r.get("resumed")) for r in reports), "engine": cfg.recon.engine})
    names = [f"{name}.weight" for name, module in model.named_modules() if name.startswith("blocks.") and hasattr(module, "weight_quant")]
    model.quant_modified_parameters = sorted(set(getattr(model, "quant_modified_parameters", [])) | set(names))
    return model, cost


def quantize(model, calib, cfg: QuantConfig):
    settings = method_settings(Settings, cfg.params, "qdiffusion")
    index = calibration_index(calib, cfg, settings.calib_steps)
    return initialise_and_reconstruct(model, calib, cfg, index, settings.p, joint=False)
