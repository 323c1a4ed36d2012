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
  full precision (``recon.iters``, 20k in the paper, β 20→2, warm-up 0.2, λ 0.01, Lp p = 2.4),
  then LSQ-style activation steps with the rounded weights (``act_iters`` 5k, Adam 4e-4, cosine).
Not applicable to DiT: the shortcut-splitting quantizer for UNet skip concatenations.
Protocol choices: q, k and v use the engine's symmetric quantizers like every method's.
"""

import time
from dataclasses import dataclass, field, replace

import numpy as np

from tqdit.data.calibration import select_uniform_steps
from tqdit.models.adapters import family_of
from tqdit.quant.calibrate import calibrate, peak_memory, start_cost
from tqdit.quant.config import ReconstructingConfig
from tqdit.quant.methods.ptq4dm import check_lp_exponent
from tqdit.quant.reconstruct import ReconConfig, reconstruct_blocks
from tqdit.quant.search import SearchConfig


@dataclass(frozen=True, kw_only=True)
class QDiffusionConfig(ReconstructingConfig):
    num_inputs: int = 800  # 25 steps x 32 inputs (PTQ4DiT's setting of this baseline on DiT)
    search: SearchConfig = field(default_factory=lambda: SearchConfig(criterion="lp"))
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(p=2.4, act_lr=4e-4))
    calib_steps: int = 25  # sampling steps at a uniform stride (all of them when the schedule is shorter)
    p: float = 2.4         # Lp exponent of the initial scale search
    fixed_search = "lp"

    def __post_init__(self):
        super().__post_init__()
        check_lp_exponent(self)
        if not isinstance(self.calib_steps, int) or self.calib_steps < 1:
            raise ValueError(
                f"{type(self).__name__}: calib_steps={self.calib_steps} must be a positive integer"
            )


def calibration_index(calib, config: QDiffusionConfig) -> np.ndarray:
    """Q-Diffusion's uniform-stride selection of ``config.num_inputs`` inputs."""
    steps = min(config.calib_steps, len(calib.timesteps))
    return select_uniform_steps(
        calib.step.numpy(), len(calib.timesteps), steps, -(-config.num_inputs // steps), config.seed
    )


def initialise_and_reconstruct(model, calib, config: QDiffusionConfig, index: np.ndarray, joint: bool,
                               start: float | None = None):
    """Lp-initialised asymmetric quantizers, then block reconstruction; cost covers both (from ``start``)."""
    start = start_cost(next(model.parameters()).device) if start is None else start
    search = replace(config.search, criterion="lp", p=config.p)
    cfg = config.calibration(multi_region=False, weight_symmetric=False, search=search)
    model, cost = calibrate(model, calib, cfg, index=index, started=start)
    device = next(model.parameters()).device
    x, t, y = calib.x[index].to(device), calib.t[index].to(device), calib.y[index].to(device)
    recon_start = time.perf_counter()
    reports = reconstruct_blocks(model, x.to(next(model.parameters()).dtype), t, y, cfg.recon, joint=joint)
    peak, kind = peak_memory(device)
    cost.update(
        calibration_s=round(time.perf_counter() - start, 2),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        reconstruction={
            "blocks": len(reports),
            "seconds": round(time.perf_counter() - recon_start, 2),
            "joint": joint,
            "error_nearest": [round(r["error_nearest"], 6) for r in reports],
            "error_after": [round(r["error_after"], 6) for r in reports],
            "undecided_rounding": max((r["undecided_rounding"] for r in reports), default=0.0),
            "resumed_blocks": sum(bool(r.get("resumed")) for r in reports),
            "engine": cfg.recon.engine,
        },
    )
    blocks = family_of(model).block_list + "."
    names = [f"{name}.weight" for name, module in model.named_modules()
             if name.startswith(blocks) and hasattr(module, "weight_quant")]
    model.quant_modified_parameters = sorted(
        set(getattr(model, "quant_modified_parameters", [])) | set(names)
    )
    return model, cost


def quantize(model, calib, config: QDiffusionConfig):
    return initialise_and_reconstruct(model, calib, config, calibration_index(calib, config), joint=False)
