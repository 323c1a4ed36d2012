"""``ditas``: DiTAS (Dong et al., WACV 2025, arXiv 2409.07756; code DZY122/DiTAS) on DiT.

The paper's method section and tables could not be read here (only its abstract: W4A8 "comparable" to
full precision); what follows is the released code (``LinearQuant.py``, ``utils_qaunt.py``,
``QuantDiT.py``), and where tqdit differs from it, why.
- **Training-free low-rank weight term** (LoftQ-style): L·R = 0, then K = 10 times Q_k = Q(W − L_{k−1}R_{k−1})
  and L_k, R_k = the rank-32 truncated SVD of W − Q_k (√S split into both factors); kept: Q_K and L_K·R_K,
  both multiplied by the quantized input. No activations are used. Followed (``fit_low_rank``). The
  error ‖W − Ŵ‖ is not monotone in the alternations (rounding is discontinuous): measured on a random
  256 × 128 weight at W4, rank 32, it drops 30 % at the first and then moves by ~1 % either way; the
  code keeps the last alternation, and so does tqdit.
- **Weights**: the code's grid is asymmetric min/max per group of 32 elements taken from the flattened
  weight viewed as (32, −1), i.e. 32 elements of one input column in rows out/32 apart, with
  Δ = (max − min)/2^b (so the top value is clipped one step), no clipping search. Followed
  (``GroupWeightQuantizer(strided)``).
- **Activations**: the code computes an asymmetric min/max grid at run time over the *whole batch*
  (both guidance halves), Δ = (max − min)/2^b. tqdit computes it per sample (``DynamicQuantizer(sample)``):
  a grid shared by the batch would make each image depend on which others, and how many, were generated
  with it (the protocol's per-sample determinism).
- **Temporal-aggregated smoothing** on qkv, proj, fc1, fc2 of every block: a_j = max |X_j| over every
  call of an FP sampling pass (all timesteps, samples, tokens: a running max), w_j = max over output rows
  of |Q_K|_{:,j} (the quantized weight, as the code), s_j = max(a_j^α / w_j^(1−α), 1e-4); α per layer
  from {0, 0.05, …, 1} minimising Σ MSE(FP output, quantized output) over FP inputs of the layer
  (errors of earlier layers not included). The code scores the first 50 calls of one sampling pass and
  takes a_j from all of it; tqdit takes both from the same ``num_inputs`` inputs of the shared
  calibration set (FP trajectories with guidance, spread over every step). The code folds s into the
  adaLN modulation (qkv, fc1) and the v rows (proj) and divides at run time for fc2; tqdit divides at
  run time for all four (the same product up to float rounding; the quantized weight's columns, each
  inside one group, scale exactly).
- Inputs ("data-free"): the code samples from Gaussian noise with 16 fixed labels, guidance 1.5; the
  shared calibration set is the same kind of data (FP trajectories from noise, with the protocol's
  guidance and labels). Nothing from a dataset.
- Scope: the code quantizes qkv, proj, fc1, fc2 only (``gemms``, ``protocol=published``); under the
  shared ``scope=blocks`` the adaLN Linear
  gets the same weight grid and low-rank term (no smoothing), and the attention operands the per-sample
  dynamic grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tqdit.models.adapters import family_of
from tqdit.quant.calibrate import by_unit, calibration_cost, draw_inputs, start_cost
from tqdit.quant.capture import capture_unit
from tqdit.quant.config import MethodConfig
from tqdit.quant.search import SearchConfig
from tqdit.quant.layers import QuantLinear, QuantMatMul
from tqdit.quant.quantizers import GroupWeightQuantizer
from tqdit.quant.wrapping import wrap

SMOOTHED_ROLES = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True, kw_only=True)
class DiTASConfig(MethodConfig):
    runtime_grids = True  # dynamic activation grids: simulated quantization only
    published_scope = "gemms"  # its code quantizes qkv, proj, fc1 and fc2 only
    fixed_search = "minmax"  # every grid is the min/max of its group, computed from the tensor itself
    search: SearchConfig = field(default_factory=lambda: SearchConfig(criterion="minmax"))
    rank: int = 32  # of the low-rank weight term
    alternations: int = 10  # LoftQ alternations
    group_elements: int = 32  # elements per weight group (the code's num_groups)
    alphas: list = field(default_factory=lambda: [round(0.05 * k, 2) for k in range(21)])
    smooth: bool = True  # False: no smoothing (the ablation without TAS)

    def __post_init__(self):
        super().__post_init__()
        for key in ("rank", "alternations", "group_elements"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) or (
                    getattr(self, key) < (0 if key == "rank" else 1)):
                raise ValueError(f"DiTASConfig: {key}={getattr(self, key)} must be a positive integer"
                                 + (" (0: no low-rank term)" if key == "rank" else ""))
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"DiTASConfig: alphas={list(self.alphas)} must be values in [0, 1]")


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L (out, r), R (r, in) with L·R the best rank-r approximation of ``matrix`` (√S in both)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


@torch.no_grad()
def fit_low_rank(quantizer: GroupWeightQuantizer, weight: torch.Tensor, alternations: int) -> list[float]:
    """DiTAS's alternation; sets the quantizer's shift and low-rank term; returns ‖W − Ŵ‖_F after each."""
    rank = quantizer.lora_left.shape[1]
    weight = weight.float()
    left, right = torch.zeros_like(quantizer.lora_left), torch.zeros_like(quantizer.lora_right)
    errors = []
    for _ in range(alternations):
        shift_left, shift_right = left, right
        quantized = quantizer.quantize_groups(weight - shift_left @ shift_right)
        left, right = svd_factors(weight - quantized, rank)
        errors.append(float((weight - quantized - left @ right).norm()))
    for buffer, value in (("shift_left", shift_left), ("shift_right", shift_right), ("lora_left", left),
                          ("lora_right", right)):
        getattr(quantizer, buffer).copy_(value)
    quantizer.refresh()
    return errors


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = a_j^α / w_j^(1−α), floored at 1e-4 as the code does."""
    return (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-4)


@torch.no_grad()
def search_smoothing(layer: QuantLinear, inputs: list[torch.Tensor], alphas,
                     batch: int) -> tuple[float, float]:
    """The α (and its summed output MSE) whose smoothing makes the quantized layer closest to FP on
    ``inputs`` (FP inputs of the layer, one tensor per calibration input); sets it on the layer."""
    act_max = torch.stack([x.abs().float().reshape(-1, x.shape[-1]).amax(0) for x in inputs]).amax(0)
    quantizer = layer.weight_quant
    shift = quantizer.low_rank()[0] if quantizer.low_rank() is not None else 0
    weight_max = quantizer.quantize_groups(layer.weight.float() - shift).abs().amax(0).clamp(min=1e-8)
    weight = layer.quantized_weight().float()
    bias = None if layer.bias is None else layer.bias.float()
    errors = []
    for alpha in alphas:
        layer.act.set_smoothing(smoothing_factors(act_max, weight_max, alpha))
        error = 0.0
        for start in range(0, len(inputs), batch):
            x = torch.stack(inputs[start:start + batch])
            reference = F.linear(x.float(), layer.weight.float(), bias)
            error += float((F.linear(layer.act(x).float(), weight, bias) - reference).square()
                           .mean(dim=tuple(range(1, x.dim()))).sum())
        errors.append(error)
    best = min(range(len(alphas)), key=errors.__getitem__)
    layer.act.set_smoothing(smoothing_factors(act_max, weight_max, alphas[best]))
    return float(alphas[best]), errors[best]


def quantize(model, calib, config: DiTASConfig):
    device = next(model.parameters()).device
    start = start_cost(device)
    model.requires_grad_(False)
    cfg = config.calibration(weight_grid="strided", activation_grid="sample",
                             group_size=config.group_elements,
                             low_rank=config.rank, smoothing=config.smooth)
    names = wrap(model, cfg, calib.timesteps.numpy())
    family = family_of(model)
    weight_errors = {}
    for name in tqdm(names, desc="ditas low-rank", unit="layer"):
        module = model.get_submodule(name)
        if isinstance(module, QuantMatMul):
            module.a_quant.refresh()
            module.b_quant.refresh()
            continue
        module.act.refresh()
        if config.rank > min(module.weight.shape):
            limit = min(module.weight.shape)
            raise ValueError(f"DiTASConfig: rank={config.rank} exceeds {name}'s smaller dimension {limit}; "
                             f"choose quant.params.rank ≤ {limit}")
        if config.rank > 0:
            weight_errors[name] = fit_low_rank(module.weight_quant, module.weight, config.alternations)
        else:
            module.weight_quant.refresh()
        module.freeze()
    smoothed = [n for n in names if isinstance(model.get_submodule(n), QuantLinear)
                and family.role_of(n) in SMOOTHED_ROLES] if config.smooth else []
    x, t, y = draw_inputs(model, calib, config.num_inputs, config.seed)
    alphas = {}
    for unit, members in tqdm(by_unit(model, smoothed).items(), desc="ditas smoothing", unit="unit"):
        records = capture_unit(model, unit, members, x, t, y, None, False, config.capture_batch)
        for name in members:
            alphas[name] = search_smoothing(model.get_submodule(name), records[name]["inputs"][0],
                                            list(config.alphas), config.capture_batch)
        del records
    return model, calibration_cost(
        start, device, len(names), len(t) if smoothed else 0,
        smoothing_alpha={name: alpha for name, (alpha, _) in alphas.items()},
        weight_error_first_last={name: [round(e[0], 6), round(e[-1], 6)]
                                 for name, e in weight_errors.items()},
    )
