"""``qdiffusion``: Q-Diffusion (Li et al., ICCV 2023) on DiT, under the shared protocol.

Follows the paper (and its BRECQ-based code where the paper is silent):
- **Time step-aware calibration**: ``calib_steps`` sampling steps at a uniform stride over the whole
  trajectory, ⌈num_inputs / calib_steps⌉ inputs at each, from the FP sampler's trajectories
  (25 steps × 32 inputs = 800 by default, PTQ4DiT's DiT setting of this baseline).
- **Initialisation**: weights per output channel (asymmetric, BRECQ's quantizer), activations per
  tensor (asymmetric; the post-softmax operand is non-negative, so its codes are unsigned); each
  scale by an Lp (p = 2.4) search over its code's 80 shrink factors 1.00, 0.99, …, 0.21 of the
  observed range (``UniformAffineQuantizer.init_quantization_scale``, scale_method ``mse``).
- **Reconstruction** (``tqdit.quant.reconstruct``): per DiT block, BRECQ-style, inputs from the
  already quantized blocks and targets from FP. The paper names the phases, not their order or
  losses; its code (``scripts/sample_diffusion_ldm.py``) is followed: first AdaRound weight rounding of
  *every* block with activation quantization off in the whole model (``recon.iters``, 20k, β 20→2,
  warm-up 0.2, λ 0.01, Lp p = 2, the default of its ``block_reconstruction``), then a second pass
  learning the activation steps of every block with weights and activations quantized, each block fed
  the FP model's inputs (its code collects that pass's data with ``asym=False``) (``act_iters``
  5k, Adam 4e-4 cosine, p = 2.4 = ``--cali_p``); loss |Ŷ − Y|^p summed over dim 1, averaged over the
  rest (``recon.reduction=dim1``). ``phase_order=per_block`` runs both phases of a block before the
  next (tqdit's earlier order). The steps learn by the code's straight-through gradient, without
  LSQ's scale 1/√(numel·qmax) (``tests/test_official_code.py`` compares gradient and Adam updates).
- **Operands** (``protocol=published``): as PTQ4DiT ran this baseline on DiT with Q-Diffusion's code —
  every Linear (timestep MLP, adaLN and final layer included), the patch-embedding convolution (as
  the Linear over patches it is) and both attention matmuls, the
  attention probabilities at 8 bits (``--sm_abit 8``, also Q-Diffusion's own default) whatever a_bits.
Not applicable to DiT: the shortcut-splitting quantizer for UNet skip concatenations.
- **Layers outside the blocks**, as its ``recon_model`` walks the model (and PTQ4DiT's harness on DiT):
  the patch embedding and the timestep MLP's Linears layer by layer before the blocks, the final layer
  as one unit after them, in both passes (``recon.outside_blocks``). Every pass fits to FP targets
  (the model with quantization off and its FP weights, as its ``GetLayerInpOut``).
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
    # its code's init grid: 80 shrink factors 1.00, 0.99, ..., 0.21 of the observed range (never widened)
    search: SearchConfig = field(
        default_factory=lambda: SearchConfig(criterion="lp", candidates=80, alpha_min=0.21, alpha_max=1.0))
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(p=2.0, act_p=2.4, act_lr=4e-4))
    calib_steps: int = 25  # sampling steps at a uniform stride (all of them when the schedule is shorter)
    p: float = 2.4         # Lp exponent of the initial scale search
    phase_order: str = "weights_first"  # weights_first (its code: two passes) | per_block
    fixed_search = "lp"
    phase_orders = ("weights_first", "per_block")
    # As PTQ4DiT ran this baseline on DiT (its harness is Q-Diffusion's code): every Linear and the
    # attention matmuls, probabilities at 8 bits (``--sm_abit 8``, also Q-Diffusion's own default).
    published_scope = "all"
    published_softmax_bits = 8

    def __post_init__(self):
        super().__post_init__()
        check_lp_exponent(self)
        if self.phase_order not in self.phase_orders:
            raise ValueError(f"{type(self).__name__}: phase_order={self.phase_order!r}: use one of "
                             f"{', '.join(self.phase_orders)}")
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


def engine_config(config: QDiffusionConfig, **fixed):
    """The engine's settings for both methods: Lp-searched asymmetric per-channel weights, per-tensor
    activations (``fixed``: a method's further choices)."""
    search = replace(config.search, criterion="lp", p=config.p)
    return config.calibration(multi_region=False, weight_symmetric=False, search=search, **fixed)


def initialise_and_reconstruct(model, calib, config: QDiffusionConfig, index: np.ndarray,
                               start: float | None = None, cfg=None):
    """Lp-initialised asymmetric quantizers, then block reconstruction; cost covers both (from ``start``).
    ``cfg``: the engine's settings (default ``engine_config(config)``)."""
    start = start_cost(next(model.parameters()).device) if start is None else start
    cfg = engine_config(config) if cfg is None else cfg
    model, cost = calibrate(model, calib, cfg, index=index, started=start)
    device = next(model.parameters()).device
    x, t, y = calib.x[index].to(device), calib.t[index].to(device), calib.y[index].to(device)
    recon_start = time.perf_counter()
    reports = reconstruct_blocks(model, x.to(next(model.parameters()).dtype), t, y, cfg.recon,
                                 order=config.phase_order)
    peak, kind = peak_memory(device)
    cost.update(
        calibration_s=round(time.perf_counter() - start, 2),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        reconstruction={
            "blocks": len(family_of(model).blocks(model)),
            "units": [r["unit"] for r in reports],
            "seconds": round(time.perf_counter() - recon_start, 2),
            "order": config.phase_order,
            "pass": [r["pass"] for r in reports],
            "error_nearest": [round(r["error_nearest"], 6) for r in reports],
            "error_after": [round(r["error_after"], 6) for r in reports],
            "undecided_rounding": max((r["undecided_rounding"] for r in reports), default=0.0),
            "resumed_blocks": sum(bool(r.get("resumed")) for r in reports),
            "engine": cfg.recon.engine,
        },
    )
    units = {r["unit"] for r in reports}  # the blocks and the units outside them that were fitted
    names = [f"{name}.weight" for name, module in model.named_modules()
             if hasattr(module, "weight_quant") and any(name == u or name.startswith(u + ".") for u in units)]
    model.quant_modified_parameters = sorted(
        set(getattr(model, "quant_modified_parameters", [])) | set(names)
    )
    return model, cost


def quantize(model, calib, config: QDiffusionConfig):
    return initialise_and_reconstruct(model, calib, config, calibration_index(calib, config))
