"""``ptq4dit``: PTQ4DiT (Wu et al., NeurIPS 2024) on DiT, under the shared protocol.

Follows the paper:
- **Channel-wise salience balancing (CSB)** on the inputs of ``attn.qkv``, ``attn.proj`` and
  ``mlp.fc1`` (not fc2). For Y = X·Wᵀ with input channel j: s(X_j) = max|X_j|, s(W_j) = max|W_{:,j}|,
  s̃_j = √(s(X_j)·s(W_j)); X̃_j = X_j·b_j and W̃_{:,j} = W_{:,j}/b_j with b_j = s̃_j / s(X_j), so both
  operands have salience s̃_j and the product is unchanged.
- **Spearman-ρ-guided salience calibration (SSC)** over timesteps, as the paper states (the released
  code does it over samples): for each calibration step t, ρ_t = Spearman(s(X⁽ᵗ⁾), s(W));
  η = softmax(−ρ) over the steps; s(X) := Σ_t η_t s(X⁽ᵗ⁾). Steps where activation and weight
  salience are less correlated (complementary) weigh more.
- **Re-parameterization** (``balance``): ``runtime`` (default) as the released code runs it — the
  layer's input is multiplied by b at run time ahead of its quantizer (``InputScale``) and its weight
  divided by b — or ``fold``, offline as the paper describes it: b for qkv and fc1 goes into the
  block's adaLN modulation — modulate(x) = LN(x)(1 + scale)
  + shift becomes LN(x)(1 + scale') + shift' with shift' = b·shift and 1 + scale' = b(1 + scale),
  i.e. rows of the adaLN Linear scaled by b and the scale bias b·bias + b − 1; b for proj goes into
  the v rows of qkv (the attention output is linear in v per channel). The weights are divided by
  b. The FP model's output is unchanged (tests check ≤ 1e-5). Within a block qkv is balanced
  before proj, whose fold scales qkv's v rows: every factor is then the unbalanced model's, as the
  code computes them.
  Paper vs code: the paper presents the fold as exact, which it is in floating point only: the fold
  hands v's quantizer v·b and the quantized adaLN rows carry b, while the code leaves v and adaLN
  unchanged. The paper's numbers come from the code, so ``runtime`` is the default: it reproduces
  what the authors ran; ``fold`` is the paper's deployment form.
- Then the Q-Diffusion-style reconstruction it builds on (``tqdit.quant.reconstruct``), with
  rounding and activation steps learned jointly in one pass over the blocks, as its code
  (``phase_order=joint``; 20k iterations per block, β 20→2, warm-up 0.2, λ 0.01, Lp p = 2 summed
  over dim 1 and averaged over the rest as its ``lp_loss``, activation lr 4e-5).
- **Operands** (``protocol=published``, its code's ``quant_model``): every Linear (blocks, timestep
  MLP, adaLN, final layer), the patch-embedding convolution and both attention matmuls, attention
  probabilities at 8 bits whatever a_bits (``--sm_abit 8`` in every README command). As its
  ``recon_model``, the layers outside the blocks are reconstructed too: the patch embedding and the
  timestep MLP's two Linears one layer at a time before the blocks, the final layer (adaLN and Linear,
  its ``QuantFinalLayer``) as one unit after them (``recon.outside_blocks``). ``protocol=shared``:
  scope ``blocks`` with the post-softmax operand at a_bits, like every method.
- Quantizers as its code: weights per output channel, asymmetric; activations per tensor,
  asymmetric (non-negative post-softmax → unsigned codes). Calibration: 25 steps × 32 inputs from
  FP trajectories with guidance (uniform stride).
Deviation: the code initialises every range (weights per output channel, activations per tensor)
by choosing among the percentile ranges {0.999, 0.9999, 0.99999} by L2 error; here the engine's L2
(p = 2) search over 100 range multipliers 0.01–1.2 of the min/max range initialises them. Not a
superset: the multipliers scale [min, max], the percentiles clip each end by its own quantile.
Measured against the code's choice (tests/test_official_code.py, 16-element weight rows): per-channel
L2 error higher on 8–9 of 64 channels (up to 1.01× at 4 bits, 1.28× at 8), a per-tensor activation
1.0008× at 8 bits and 0.93× at 4. Reconstruction then learns the rounding and the steps from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tqdit.models.adapters import TQDIT, family_of
from tqdit.quant.calibrate import start_cost
from tqdit.quant.layers import quantization_disabled
from tqdit.quant.methods.qdiffusion import (QDiffusionConfig, calibration_index, engine_config,
                                            initialise_and_reconstruct)
from tqdit.quant.reconstruct import ReconConfig
from tqdit.quant.search import SearchConfig
from tqdit.quant.wrapping import resolve_scope, wrap

# qkv before proj: the code takes every factor from the unbalanced weights; proj's fold then scales qkv's
# v rows after qkv's factor is taken (tests/test_official_code.py compares the factors with the code's)
BALANCED = ("attn.qkv", "attn.proj", "mlp.fc1")
ROLE_OF = {"attn.proj": "proj", "attn.qkv": "qkv", "mlp.fc1": "fc1"}  # the layers' roles in any DiT family


@dataclass(frozen=True, kw_only=True)
class PTQ4DiTConfig(QDiffusionConfig):
    num_inputs: int = 800  # 25 steps x 32 inputs (the paper's 256x256 setting)
    search: SearchConfig = field(default_factory=lambda: SearchConfig(criterion="lp"))  # see Deviation
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(p=2.0, act_lr=4e-5))
    calib_steps: int = 25
    p: float = 2.0  # Lp exponent of the initial scale search (the reconstruction's p is recon.p)
    ssc: bool = True  # False: plain CSB with s(X) = max over all calibration inputs
    layers: list = field(default_factory=lambda: list(BALANCED))
    phase_order: str = "joint"  # rounding and activation steps learned together (its code)
    balance: str = "runtime"  # runtime: x·b ahead of the quantizer (its code) | fold: into adaLN, v (paper)
    phase_orders = ("joint",)

    def __post_init__(self):
        super().__post_init__()
        if self.recon.act_p is not None:
            raise ValueError(f"PTQ4DiTConfig: recon.act_p={self.recon.act_p}: PTQ4DiT learns the steps "
                             "jointly with the rounding, under recon.p; leave act_p unset")
        if self.balance not in ("runtime", "fold"):
            raise ValueError(f"PTQ4DiTConfig: balance={self.balance!r}: use runtime (its code) or fold "
                             "(its paper)")
        unknown = sorted(set(self.layers) - set(BALANCED))
        if unknown:
            raise ValueError(f"PTQ4DiTConfig: layers={list(self.layers)}: PTQ4DiT balances only "
                             f"{', '.join(BALANCED)}, not {unknown}")


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two 1-D tensors (ties broken by order, which float data rarely has)."""
    ranks_a = a.argsort().argsort().double()
    ranks_b = b.argsort().argsort().double()
    ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    return (ranks_a * ranks_b).sum() / (ranks_a.norm() * ranks_b.norm()).clamp(min=1e-12)


def input_salience_per_step(
    model, names: list[str], x, t, y, step: np.ndarray, batch: int = 64
) -> dict[str, torch.Tensor]:
    """{layer: (steps, in_features)} max |input| over tokens and inputs of each calibration step."""
    steps = np.unique(step)
    row_of_step = {int(s): i for i, s in enumerate(steps)}
    rows = torch.as_tensor([row_of_step[int(s)] for s in step])
    result = {
        name: torch.zeros(len(steps), model.get_submodule(name).weight.shape[1], device=x.device)
        for name in names
    }
    current = {}
    family = family_of(model)

    def hook(name):
        def record(module, args):
            per_input = args[0].detach().abs().float().amax(dim=1)  # (batch, in_features)
            index = current["rows"].to(x.device)[:, None].expand_as(per_input)
            result[name].scatter_reduce_(0, index, per_input, "amax")
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for start in range(0, len(t), batch):
                current["rows"] = rows[start:start + batch]
                family.predict(model, x[start:start + batch], t[start:start + batch], y[start:start + batch])
    finally:
        for handle in handles:
            handle.remove()
    return result


def balancing_factors(weight: torch.Tensor, salience_per_step: torch.Tensor, ssc: bool) -> torch.Tensor:
    """b (in_features,): X̃ = X·b, W̃ = W/b, with s̃ = √(s(X)·s(W)) and s(X) from SSC over the steps."""
    weight_salience = weight.detach().abs().float().amax(dim=0).clamp(min=1e-8)
    if ssc and len(salience_per_step) > 1:
        rho = torch.stack([spearman(s, weight_salience) for s in salience_per_step]).float()
        eta = torch.softmax(-rho, dim=0)
        activation_salience = (eta[:, None] * salience_per_step).sum(dim=0)
    else:
        activation_salience = salience_per_step.amax(dim=0)
    activation_salience = activation_salience.clamp(min=1e-8)
    balanced = torch.sqrt(activation_salience * weight_salience)
    return balanced / activation_salience


@torch.no_grad()
def fold_adaln(adaln: torch.nn.Linear, chunk_shift: int, chunk_scale: int, b: torch.Tensor) -> None:
    """Fold X̃ = modulate(LN(x), shift, scale)·b into the adaLN Linear that produces shift and scale."""
    width = b.numel()
    shift, scale = slice(chunk_shift * width, (chunk_shift + 1) * width), slice(
        chunk_scale * width, (chunk_scale + 1) * width
    )
    b = b.to(adaln.weight.dtype)
    adaln.weight[shift] *= b[:, None]
    adaln.bias[shift] *= b
    adaln.weight[scale] *= b[:, None]
    adaln.bias[scale] = adaln.bias[scale] * b + (b - 1)


@torch.no_grad()
def balance_block(block, factors: dict[str, torch.Tensor], family=TQDIT) -> list[str]:
    """Apply CSB with folded re-parameterization to one DiT block (``factors`` keyed by BALANCED names);
    returns the changed parameter names, relative to the block."""
    changed = []
    names = {role: family.block_roles[role] for role in ("qkv", "proj", "fc1", "adaln")}
    qkv, proj, fc1, adaln = (block.get_submodule(names[role]) for role in ("qkv", "proj", "fc1", "adaln"))
    if "attn.proj" in factors:
        b = factors["attn.proj"].to(proj.weight.dtype)
        width = b.numel()
        qkv.weight[2 * width:] *= b[:, None]  # v rows: the attention output scales with v
        qkv.bias[2 * width:] *= b
        proj.weight /= b[None, :]
        changed += [f"{names['qkv']}.weight", f"{names['qkv']}.bias", f"{names['proj']}.weight"]
    if "attn.qkv" in factors:
        b = factors["attn.qkv"]
        fold_adaln(adaln, 0, 1, b)  # shift_msa, scale_msa
        qkv.weight /= b.to(qkv.weight.dtype)[None, :]
        changed += [f"{names['adaln']}.weight", f"{names['adaln']}.bias", f"{names['qkv']}.weight"]
    if "mlp.fc1" in factors:
        b = factors["mlp.fc1"]
        fold_adaln(adaln, 3, 4, b)  # shift_mlp, scale_mlp
        fc1.weight /= b.to(fc1.weight.dtype)[None, :]
        changed += [f"{names['adaln']}.weight", f"{names['adaln']}.bias", f"{names['fc1']}.weight"]
    return changed


@torch.no_grad()
def balance_at_run_time(block, factors: dict[str, torch.Tensor], family=TQDIT) -> list[str]:
    """Apply CSB as PTQ4DiT's code does to one wrapped DiT block: the layer's ``input_scale`` becomes b
    (its input is multiplied by b at run time, ahead of its quantizer) and its weight is divided by b;
    returns the changed parameter names, relative to the block."""
    changed = []
    for layer, b in factors.items():
        local = family.block_roles[ROLE_OF[layer]]
        module = block.get_submodule(local)
        module.input_scale.set_factor(b)
        module.weight /= b.to(module.weight.dtype)[None, :]
        changed.append(f"{local}.weight")
    return changed


def salience_balance(model, x, t, y, step: np.ndarray, layers=BALANCED, ssc: bool = True,
                     scope: set[str] | None = None, runtime: bool = False) -> list[str]:
    """CSB + SSC on every block (or on the layers named in ``scope``: the quantized ones), folded into
    the weights, or with ``runtime`` set as run-time input factors of the wrapped model's layers;
    returns the changed parameter names.

    Layers are balanced in the order of BALANCED (qkv, proj, fc1), each from saliences measured on the
    model as it is at that point; no earlier fold changes a later layer's weight or input salience, so
    every factor is the one of the unbalanced model, as in the code (run-time factors change no other
    layer's input or weight at all).
    """
    unknown = set(layers) - set(BALANCED)
    if unknown:
        raise ValueError(f"ptq4dit balances only {', '.join(BALANCED)}; got {sorted(unknown)}")
    ordered = [layer for layer in BALANCED if layer in layers]
    family = family_of(model)
    family.prepare(model)
    changed = set()
    for layer in ordered:
        local = family.block_roles[ROLE_OF[layer]]
        name_of = {i: f"{family.block_list}.{i}.{local}" for i in range(len(family.blocks(model)))}
        blocks = [i for i in name_of if scope is None or name_of[i] in scope]
        if not blocks:
            continue
        salience = input_salience_per_step(model, [name_of[i] for i in blocks], x, t, y, step)
        for i in blocks:
            block = family.blocks(model)[i]
            b = balancing_factors(block.get_submodule(local).weight, salience[name_of[i]], ssc)
            apply = balance_at_run_time if runtime else balance_block
            changed |= {f"{family.block_list}.{i}.{name}" for name in apply(block, {layer: b}, family)}
    return sorted(changed)


def quantize(model, calib, config: PTQ4DiTConfig):
    device = next(model.parameters()).device
    start = start_cost(device)  # the salience stage's time and memory are part of the cost
    index = calibration_index(calib, config)
    x = calib.x[index].to(device, next(model.parameters()).dtype)
    t, y = calib.t[index].to(device), calib.y[index].to(device)
    cfg, changed = balance(model, x, t, y, calib, index, config)
    model.quant_modified_parameters = changed
    return initialise_and_reconstruct(model, calib, config, index, start=start, cfg=cfg)


def balance(model, x, t, y, calib, index, config: PTQ4DiTConfig):
    """CSB + SSC as ``config.balance`` says, on the calibration inputs x, t, y (``calib``'s ``index``);
    returns the engine's settings and the changed parameter names. ``runtime`` wraps the model first
    (the factors live in its wrapped layers) and measures the saliences with quantization off."""
    scope = set(resolve_scope(model, config.operand_scope()))
    runtime = config.balance == "runtime"
    cfg = engine_config(config, runtime_scaled_roles=tuple(ROLE_OF[layer] for layer in config.layers)
                        if runtime else ())
    if runtime:  # the factors live in the wrapped layers: wrap first (then measure with quantization off)
        wrap(model, cfg, calib.timesteps.numpy())
    with quantization_disabled(model):  # nothing to disable on the unwrapped model of a fold
        changed = salience_balance(model, x, t, y, calib.step.numpy()[index], config.layers, config.ssc,
                                   scope=scope, runtime=runtime)
    return cfg, changed
