"""Block reconstruction: BRECQ-style, per DiT block, with AdaRound weights and LSQ activation steps.

The machinery Q-Diffusion and PTQ4DiT build on (after the engine has initialised every quantizer):

- **AdaRound** (Nagel et al. 2020): each in-scope weight becomes s·(⌊W/s⌋ + h(V)) with
  h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, V initialised so that h(V) equals the
  fractional part of W/s (the soft weight starts at W). The loss adds λ·Σ(1 − |2h(V) − 1|^β), β
  annealed from ``b_start`` to ``b_end`` after a warm-up fraction with λ = 0, which drives every h to
  0 or 1. The result is hard rounding: ⌊W/s⌋ or ⌊W/s⌋ + 1 per element, stored as the layer's weight
  (on its grid, so the layer's weight quantizer returns it unchanged).
- **LSQ-style steps** (Esser et al. 2020): per-tensor activation steps Δ become learnable, with the
  straight-through gradient of ``torch._fake_quantize_learnable_per_tensor_affine`` and no gradient
  scale, as Q-Diffusion's and PTQ4DiT's code (LSQ's 1/√(numel·qmax) is not in their code).
- **Reconstruction target** (BRECQ): a block is fed the output of the already quantized blocks
  before it and fitted to the FP block output on the FP input. The loss is |Ŷ − Y|^p summed over
  dim 1 (the tokens of a block's output) and averaged over the rest (inputs, hidden channels), as
  BRECQ's, Q-Diffusion's and PTQ4DiT's code compute it (``reduction="dim1"``); ``"all"`` sums over
  tokens × hidden (D times larger, i.e. the rounding weight λ is in effect λ/D). The conditioning
  c = t_emb + y_emb is shared by every block and computed once.

With ``outside_blocks`` (default, as the baselines' code walks the model) the quantized units outside
the blocks are fitted the same way: the patch embedding and the timestep MLP's Linears one layer at a
time before the blocks, the final layer as one unit after them. Targets always come from FP: a fitted
layer stores its rounded weight, so the FP references (outside units' outputs, blocks' weights for a
second pass) are taken before anything is fitted.

``reconstruct_blocks`` runs this block by block, in one of three orders (``ORDERS``): ``joint``
learns rounding and steps together in one pass (PTQ4DiT's code); ``weights_first`` fits the rounding
of every block with activation quantization off everywhere, then learns the steps of every block with
it on, each block fed the FP model's inputs (Q-Diffusion's code: two passes over the model, the second
collecting its data with ``asym=False``); ``per_block`` does both phases of a block before
the next (rounding with the block's activations in full precision, then its steps). Only per-tensor,
ungrouped ``UniformQuantizer`` activations learn their steps; other quantizers keep their initial
parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from tqdit.models.adapters import family_of
from tqdit.quant.layers import QuantLinear, QuantMatMul, quantization_disabled, quantizers
from tqdit.quant.quantizers import UniformQuantizer
from tqdit.utils import atomic_write_bytes

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


def _fused(x: torch.Tensor):
    """The fused Triton kernels (``tqdit.kernels.recon``) where they serve ``x`` (CUDA with Triton), else
    None; looked up at call time, so the algorithm imports no kernel code on the CPU."""
    if not x.is_cuda:
        return None
    from tqdit.kernels import recon

    return recon if recon.available(x) else None


@dataclass
class ReconConfig:
    """Reconstruction settings; defaults are the papers' (Q-Diffusion / BRECQ)."""

    iters: int = 20000  # rounding iterations per block
    act_iters: int = 5000  # activation-step iterations per block (sequential mode)
    batch: int = 32  # calibration inputs per iteration
    lr: float = 1e-3  # Adam on the rounding variables (BRECQ/AdaRound default)
    act_lr: float = 4e-4  # Adam on activation steps, cosine-annealed to 0
    warmup: float = 0.2  # fraction of iters without the rounding loss
    b_start: float = 20.0
    b_end: float = 2.0
    round_weight: float = 0.01  # λ of the rounding loss
    p: float = 2.4  # exponent of the reconstruction loss (the rounding phase's, and the joint phase's)
    act_p: float | None = None  # the step phase's exponent (Q-Diffusion's code: 2.4 there, 2 for rounding)
    reduction: str = "dim1"  # dim1: Σ over dim 1, mean over the rest (BRECQ's code) | all: Σ per input
    seed: int = 0
    # The quantized layers outside the blocks, fitted too, as the baselines' code does (BRECQ's walk over
    # the model): before the blocks the patch embedding and the timestep MLP one layer at a time, after
    # them the final layer as one unit (PTQ4DiT's QuantFinalLayer). False: they keep their initial grids.
    outside_blocks: bool = True
    # How the iterations run (not part of a setting: the result is the same within float rounding, tests
    # check it). "fast": batch indices, β, λ and learning rates as device tables read by a device counter,
    # no host sync per iteration, and on CUDA the whole iteration (forward, loss, backward, Adam) captured
    # once as a CUDA graph and replayed; "eager": the reference loop (Python schedules, one launch per op).
    engine: str = "fast"
    # Arithmetic of the block's forward and backward while fitting: "fp32" (the papers'; TF32 GEMMs where
    # the job enables them) or "bf16" (autocast: GEMMs and the activations between them in bfloat16; the
    # rounding variables, steps, loss and Adam stay float32). A setting: bf16 changes some decisions
    # (docs/performance.md has how many), so it is part of checkpoints' fingerprints and of results.
    precision: str = "fp32"
    log_every: int = 100  # iterations between progress updates (the fast loop's only host syncs)
    # Folder for per-block state (set by the job, not a setting): a killed calibration resumes after
    # its last finished block. None: nothing is written.
    checkpoint_dir: str | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(
                f"quant.recon.engine={self.engine!r} is unknown: use one of {', '.join(ENGINES)}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"quant.recon.precision={self.precision!r} is unknown: use one of {', '.join(PRECISIONS)}"
            )
        for key in ("p", "act_p"):
            value = getattr(self, key)
            if value is None and key == "act_p":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"quant.recon.{key}={value!r} must be a positive exponent")
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"quant.recon.reduction={self.reduction!r} is unknown: use one of {', '.join(REDUCTIONS)}"
            )
        if not isinstance(self.outside_blocks, bool):
            raise ValueError(f"quant.recon.outside_blocks={self.outside_blocks!r} must be true or false")
        if self.log_every < 1:
            raise ValueError("quant.recon.log_every must be a positive number of iterations")


ENGINES = ("fast", "eager")
REDUCTIONS = ("dim1", "all")
ORDERS = ("joint", "weights_first", "per_block")
PRECISIONS = ("fp32", "bf16")
# ReconConfig fields that change how, not what, is computed: left out of checkpoints' fingerprints
RUN_ONLY = ("engine", "log_every", "checkpoint_dir")


class AdaRoundWeight(nn.Module):
    """Learned up/down rounding of one per-channel weight quantizer; replaces it during reconstruction."""

    def __init__(self, weight: torch.Tensor, quantizer: UniformQuantizer):
        super().__init__()
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", quantizer.scale[0].reshape(shape).to(weight.device).float())
        self.register_buffer("zero_point", quantizer.zero_point[0].reshape(shape).to(weight.device).float())
        scaled = weight.detach().float().contiguous() / self.scale  # row-major: the fused kernels index so
        self.register_buffer("floor", torch.floor(scaled))
        rest = scaled - self.floor  # in [0, 1): V stays finite (γ < 0 < 1 < ζ), as AdaRound's code
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest
        self.hard = False
        self.enabled = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.hard and _fused(self.v):  # one fused kernel each way on CUDA
            soft = _fused(self.v).soft_weight(
                self.v, self.floor, self.scale, self.zero_point, self.qmin, self.qmax, ZETA, GAMMA
            )
            return soft.to(weight.dtype)
        rounding = (self.v >= 0).float() if self.hard else self.h()
        codes = torch.clamp(self.floor + rounding + self.zero_point, self.qmin, self.qmax)
        return ((codes - self.zero_point) * self.scale).to(weight.dtype)

    def rounding_loss(self, beta: torch.Tensor) -> torch.Tensor:
        if _fused(self.v):
            return _fused(self.v).rounding_penalty(self.v, beta, ZETA, GAMMA)
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def lsq_fake_quant(
    x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, grad_factor: float
) -> torch.Tensor:
    """(clamp(round(x/Δ) + z, qmin, qmax) − z)·Δ with LSQ's gradients, in tensor ops only.

    The same values and gradients as ``torch._fake_quantize_learnable_per_tensor_affine`` (x: 1 inside
    the code range, 0 outside; Δ: round(x/Δ) − x/Δ inside, qmin − z or qmax − z outside, times
    ``grad_factor``), which reads Δ back to the host on every call and so cannot run in a CUDA graph.
    Rounding is half to even, like that op's; tests compare the two.
    """
    step = step * grad_factor + (step - step * grad_factor).detach()  # value Δ, gradient × grad_factor
    scaled = x / step
    rounded = torch.round(scaled)
    codes = torch.clamp(rounded + zero_point, qmin, qmax)
    inside = codes == rounded + zero_point  # decided on the exact codes, as the op does
    # inside: the value round(x/Δ) exactly (plus an exact zero) with the gradient of x/Δ (straight through)
    straight = torch.where(inside, rounded + (scaled - scaled.detach()), codes - zero_point)
    return straight * step


class LearnedStep(nn.Module):
    """An ungrouped per-tensor UniformQuantizer with a learnable step (LSQ); zero point fixed."""

    def __init__(self, quantizer: UniformQuantizer):
        super().__init__()
        self.__dict__["quantizer"] = quantizer  # not a submodule: the swap must not find it again
        self.step = nn.Parameter(quantizer.scale.detach().reshape(1).float().clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().reshape(1).float().clone())
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        # The straight-through gradient of the step, as Q-Diffusion's and PTQ4DiT's code learn it: no LSQ
        # gradient scale 1/√(numel·qmax), which Adam cancels only while |scale·g| ≫ ε (not at DiT-XL/2 sizes)
        args = (self.step, self.zero_point, q.qmin, q.qmax, 1.0)
        if _fused(x):
            return _fused(x).learned_step_quant(x, *args)
        return lsq_fake_quant(x.float(), *args).to(x.dtype)

    def commit(self) -> None:
        self.quantizer.scale.fill_(float(self.step.detach().clamp(min=1e-8)))
        self.quantizer.refresh()


def _beta(iteration: int, cfg: ReconConfig) -> float | None:
    """Rounding-loss temperature at ``iteration`` (from 0); None during the warm-up (no rounding loss).

    As BRECQ's ``LossFunction`` (Q-Diffusion's, PTQ4DiT's): its counter is incremented before use, so
    iteration i is count i + 1; the loss is off while count < warmup·iters, and β decays linearly from
    b_start at count = warmup·iters to exactly b_end at the last iteration."""
    warm = cfg.warmup * cfg.iters
    count = iteration + 1
    if count < warm:
        return None
    progress = (count - warm) / max(cfg.iters - warm, 1)
    return cfg.b_end + (cfg.b_start - cfg.b_end) * max(0.0, 1.0 - progress)


def lp_loss(prediction: torch.Tensor, target: torch.Tensor, p: float,
            reduction: str = "dim1") -> torch.Tensor:
    """The reconstruction loss |ŷ − y|^p: ``dim1`` sums over dim 1 and averages over the other dims
    (BRECQ's code, which Q-Diffusion and PTQ4DiT use; for a (batch, tokens, hidden) block output the
    sum runs over tokens); ``all`` sums over every feature of an input and averages over inputs."""
    error = (prediction.float() - target.float()).abs().pow(p)
    if reduction == "dim1":
        return error.sum(dim=1).mean()
    return error.reshape(len(error), -1).sum(dim=1).mean()


def _swap_activations(block: nn.Module) -> list[tuple[nn.Module, str, LearnedStep]]:
    """Replace every learnable activation quantizer inside ``block`` by a LearnedStep; returns the swaps."""
    swaps = []
    for parent in list(block.modules()):
        for child_name, child in list(parent.named_children()):
            learnable = (
                isinstance(child, UniformQuantizer)
                and child.enabled
                and child.groups == 1
                and child.scale.shape[1] == 1
                and child_name != "weight_quant"
            )
            if learnable:
                learned = LearnedStep(child)
                setattr(parent, child_name, learned)
                swaps.append((parent, child_name, learned))
    return swaps


def _restore_activations(swaps) -> None:
    for parent, child_name, learned in swaps:
        learned.commit()
        setattr(parent, child_name, learned.quantizer)


def _batched(fn, *tensors, batch: int) -> torch.Tensor:
    return torch.cat([fn(*(t[i : i + batch] for t in tensors)) for i in range(0, len(tensors[0]), batch)])


def block_inputs(
    model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens entering block 0, what each block is given besides them: tqdit's DiT the conditioning
    c = t_emb + y_emb, diffusers' the pair (t, y)) for calibration inputs, computed as the model does."""
    embed = family_of(model).embed
    with torch.no_grad():
        parts = [
            embed(model, x[i : i + batch], t[i : i + batch], y[i : i + batch])
            for i in range(0, len(x), batch)
        ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class BlockCall(nn.Module):
    """One block called as its family calls it: ``(tokens, condition) -> tokens``."""

    def __init__(self, block: nn.Module, run_block):
        super().__init__()
        self.block, self.run_block = block, run_block

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.run_block(self.block, tokens, condition)


class UnitCall(nn.Module):
    """A module outside the blocks called as a block is: ``(inputs, condition)``. A one-input layer (the
    patch embedding, a timestep-MLP Linear) ignores the condition, which is then a column of zeros."""

    def __init__(self, module: nn.Module, takes_condition: bool):
        super().__init__()
        self.module, self.takes_condition = module, takes_condition

    def forward(self, inputs: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.module(inputs, condition) if self.takes_condition else self.module(inputs)


PRE_BLOCK_ROLES = ("patch_embed", "timestep_fc1", "timestep_fc2")  # in the order the model runs them
FINAL_ROLES = ("final_adaln", "final_linear")


def _fits(module: nn.Module) -> bool:
    """Whether reconstruction has something to fit in ``module``: a quantized Linear or matmul."""
    return any(isinstance(m, (QuantLinear, QuantMatMul)) for m in module.modules())


def outside_units(model: nn.Module) -> tuple[list[str], list[str]]:
    """The quantized modules outside the blocks that reconstruction fits, by name, in the order the
    model runs them: (before the blocks: the patch embedding and the timestep MLP's Linears, one layer
    each; after them: the final layer as one unit where the family has one, else its Linears)."""
    family = family_of(model)
    before = [family.model_roles[r] for r in PRE_BLOCK_ROLES if r in family.model_roles]
    after = (
        [family.final_unit]
        if family.final_unit is not None
        else [family.model_roles[r] for r in FINAL_ROLES if r in family.model_roles]
    )
    quantized = lambda names: [n for n in names if _fits(model.get_submodule(n))]  # noqa: E731
    return quantized(before), quantized(after)


def _weights_of(modules) -> dict[QuantLinear, torch.Tensor]:
    """A host copy of the weight of every quantized Linear in ``modules``."""
    return {m: m.weight.detach().to("cpu", copy=True)
            for module in modules for m in module.modules() if isinstance(m, QuantLinear)}


@contextmanager
def _weights_restored(module: nn.Module, saved: dict[QuantLinear, torch.Tensor]):
    """``module``'s Linears with the weights ``saved`` holds for them (their FP weights, where an
    earlier pass stored rounded ones), then back."""
    swapped = [(m, m.weight) for m in module.modules() if m in saved]
    for m, weight in swapped:
        m.weight = nn.Parameter(saved[m].to(weight.device), requires_grad=False)
    try:
        yield
    finally:
        for m, weight in swapped:
            m.weight = weight


class _Captured(Exception):
    """Raised by the capture hook once its module has run: the rest of the model is not needed."""


def unit_io(model, name: str, x, t, y, batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The positional inputs module ``name`` is given, and its output, when the model as it is
    (quantized or not) runs on the calibration inputs; each forward stops after the module."""
    module, predict = model.get_submodule(name), family_of(model).predict
    calls = []
    counter = module.register_forward_hook(lambda *_: calls.append(1))
    try:  # one whole forward of one input: a module called twice would be fitted on its first call only
        with torch.no_grad():
            predict(model, x[:1], t[:1], y[:1])
    finally:
        counter.remove()
    if len(calls) != 1:
        raise RuntimeError(f"{name} runs {len(calls)} times in one forward: reconstruction fits a module "
                           "outside the blocks only if the model calls it once; "
                           "set quant.recon.outside_blocks=false")
    inputs, outputs = [], []

    def keep(_module, args, output):
        inputs.append([a.detach() for a in args])
        outputs.append(output.detach())
        raise _Captured

    handle = module.register_forward_hook(keep)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                try:
                    predict(model, x[i : i + batch], t[i : i + batch], y[i : i + batch])
                except _Captured:
                    pass
    finally:
        handle.remove()
    return [torch.cat(parts) for parts in zip(*inputs)], torch.cat(outputs)


@dataclass
class Phase:
    """One optimisation phase of a block: what it learns, for how many iterations, on which batches."""

    name: str
    iterations: int
    learn_rounding: bool
    groups: list[dict]  # Adam parameter groups: {"params", "lr", "cosine": bool}
    index: torch.Tensor  # (iterations, batch) calibration-input indices, drawn up front
    p: float  # exponent of its reconstruction loss


def _learning_rate(group: dict, iteration: int, iterations: int) -> float:
    """The step learning rate is cosine-annealed to 0; the rounding lr stays constant, as in BRECQ."""
    if not group["cosine"]:
        return group["lr"]
    return group["lr"] * 0.5 * (1 + math.cos(math.pi * iteration / iterations))


def _rounding_term(linears, beta, weight):
    return weight * sum(layer.weight_quant.rounding_loss(beta) for layer in linears)


def _adam(groups: list[dict], device: torch.device) -> torch.optim.Adam:
    """Adam over the phase's parameter groups. On CUDA the fused kernel (one launch for every tensor,
    step count and learning rate read on the device, so a CUDA graph may capture it) with each
    group's learning rate a device tensor the loops fill; elsewhere the default implementation."""
    if device.type != "cuda":
        return torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in groups])
    groups = [{"params": g["params"], "lr": torch.tensor(g["lr"], device=device)} for g in groups]
    return torch.optim.Adam(groups, fused=True, capturable=True)


def _arithmetic(cfg: ReconConfig, device: torch.device):
    """The context the block's forward runs in during fitting (its backward follows the same casts)."""
    if cfg.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)  # no cache: graph-safe


def _eager_loop(block, x_q, cond, target, linears, phase: Phase, cfg: ReconConfig, bar) -> None:
    """The reference: one iteration at a time, schedules as Python numbers. On CUDA, Adam is the
    fused one the fast loop uses, with its learning rate a device tensor filled from the same float32
    values: the engines then differ only in how the work is launched."""
    cuda = x_q.device.type == "cuda"
    optimizer = _adam(phase.groups, x_q.device)
    total = torch.zeros((), device=x_q.device)
    for iteration in range(phase.iterations):
        for group, spec in zip(optimizer.param_groups, phase.groups):
            if cuda:  # filled as float32, as the fast loop's table holds it
                group["lr"].fill_(_learning_rate(spec, iteration, phase.iterations))
            else:
                group["lr"] = _learning_rate(spec, iteration, phase.iterations)
        rows = phase.index[iteration].to(x_q.device)
        with _arithmetic(cfg, x_q.device):
            prediction = block(x_q[rows], cond[rows])
        loss = lp_loss(prediction, target[rows], phase.p, cfg.reduction)
        beta = _beta(iteration, cfg) if phase.learn_rounding else None
        if beta is not None:  # β a tensor, as in the fast loop (pow by a Python 2.0 squares: other bits)
            loss = loss + _rounding_term(linears, torch.tensor(beta, device=x_q.device), cfg.round_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if (iteration + 1) % cfg.log_every == 0 or iteration + 1 == phase.iterations:
            bar.update((iteration % cfg.log_every) + 1)
            bar.set_postfix(loss=f"{float(total) / ((iteration % cfg.log_every) + 1):.4g}")
            total.zero_()


def _fast_loop(block, x_q, cond, target, linears, phase: Phase, cfg: ReconConfig, bar) -> None:
    """The same iterations with every schedule in device tables indexed by a device counter: no host
    sync per iteration. On CUDA the iteration is captured once as a CUDA graph and replayed."""
    device = x_q.device
    graphed = device.type == "cuda"
    table = lambda values: torch.tensor(values, dtype=torch.float32, device=device)  # noqa: E731
    index = phase.index.to(device)
    betas = [_beta(i, cfg) if phase.learn_rounding else None for i in range(phase.iterations)]
    beta_table = table([cfg.b_start if b is None else b for b in betas])
    weight_table = table([0.0 if b is None else cfg.round_weight for b in betas])  # λ = 0 in the warm-up
    lr_tables = [
        table([_learning_rate(g, i, phase.iterations) for i in range(phase.iterations)]) for g in phase.groups
    ]
    optimizer = _adam(phase.groups, device)
    counter = torch.zeros(1, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device)

    def iteration(host_iteration: int) -> None:
        rows = index.index_select(0, counter).squeeze(0)
        with _arithmetic(cfg, device):
            prediction = block(x_q.index_select(0, rows), cond.index_select(0, rows))
        loss = lp_loss(prediction, target.index_select(0, rows), phase.p, cfg.reduction)
        if phase.learn_rounding:  # in the warm-up the term is multiplied by 0 (adds exact zeros)
            loss = loss + _rounding_term(
                linears,
                beta_table.index_select(0, counter).squeeze(0),
                weight_table.index_select(0, counter).squeeze(0),
            )
        loss.backward()
        for group, lrs, spec in zip(optimizer.param_groups, lr_tables, phase.groups):
            if graphed:
                group["lr"].copy_(lrs.index_select(0, counter).squeeze(0))
            else:  # CPU: no graph, the host knows the iteration
                group["lr"] = _learning_rate(spec, host_iteration, phase.iterations)
        optimizer.step()
        loss_sum.add_(loss.detach())
        counter.add_(1)

    def report(since: int) -> None:
        bar.update(since)
        bar.set_postfix(loss=f"{float(loss_sum) / since:.4g}")  # the one host sync per log_every iterations
        loss_sum.zero_()

    warmup = min(3, phase.iterations) if graphed else phase.iterations
    stream = torch.cuda.Stream() if graphed else None
    if graphed:  # warm-up iterations (real ones) on a side stream, as CUDA graph capture requires
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if graphed else nullcontext():
        for i in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            iteration(i)
            if (i + 1) % cfg.log_every == 0 or i + 1 == phase.iterations:
                report((i % cfg.log_every) + 1)
    if not graphed or warmup == phase.iterations:
        return
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's pool
    with torch.cuda.graph(graph):
        iteration(-1)
    for i in range(warmup, phase.iterations):
        graph.replay()
        if (i + 1) % cfg.log_every == 0 or i + 1 == phase.iterations:
            report((i % cfg.log_every) + 1)
    torch.cuda.synchronize(device)


def reconstruct_block(
    model,
    block: nn.Module,
    x_q: torch.Tensor,
    cond: torch.Tensor,
    target: torch.Tensor,
    cfg: ReconConfig,
    phases: tuple[str, ...],
    generator: torch.Generator,
    progress: bool,
    label: str,
) -> dict:
    """Fit one block so that block(x_q) ≈ target, in ``phases`` (in order): ``joint`` (rounding and
    steps together), ``rounding`` (the block's activations in full precision), ``steps`` (with the
    weights as they are: rounded by an earlier phase or pass). Returns loss numbers: the block error
    before (weights rounded to nearest where this call fits the rounding), after, and the fraction of
    roundings left undecided."""
    learn_rounding = "joint" in phases or "rounding" in phases
    linears = [m for m in block.modules() if isinstance(m, QuantLinear) and m.weight_quant.enabled]
    linears = linears if learn_rounding else []
    roundings = []
    for layer in linears:
        roundings.append((layer, layer.weight_quant))
        layer.weight_quant = AdaRoundWeight(layer.weight, layer.weight_quant)
        layer._frozen_weight = None
    n = len(x_q)
    loop = _fast_loop if cfg.engine == "fast" else _eager_loop

    def block_error() -> float:
        with torch.no_grad():
            return float(
                sum(
                    lp_loss(block(x_q[i : i + 256], cond[i : i + 256]), target[i : i + 256], 2.0, "all")
                    * len(x_q[i : i + 256])
                    for i in range(0, n, 256)
                )
                / n
            )

    def run(name: str, iterations: int, learn_rounding: bool, learn_steps: bool, p: float) -> None:
        if iterations == 0:  # the phase is off (recon.act_iters=0: steps keep their Lp initialisation)
            return
        swaps = _swap_activations(block) if learn_steps else []
        groups = []
        if learn_rounding and linears:  # a block the scope leaves unquantized has nothing to round
            groups.append(
                {"params": [layer.weight_quant.v for layer in linears], "lr": cfg.lr, "cosine": False}
            )
        if learn_steps and swaps:
            groups.append({"params": [s.step for _, _, s in swaps], "lr": cfg.act_lr, "cosine": True})
        if groups:
            # drawn from the block generator in one call: the same numbers as one draw per iteration
            index = torch.randint(0, n, (iterations, min(cfg.batch, n)), generator=generator)
            phase = Phase(name, iterations, learn_rounding, groups, index, p)
            with tqdm(
                total=iterations, desc=f"{label} {name}", leave=False, disable=not progress, unit="it"
            ) as bar:
                loop(block, x_q, cond, target, linears, phase, cfg, bar)
        _restore_activations(swaps)

    with torch.no_grad():
        before = _nearest_error(block, linears, roundings, block_error)
    if "joint" in phases:
        run("rounding+steps", cfg.iters, learn_rounding=True, learn_steps=True, p=cfg.p)
    elif "rounding" in phases:
        with quantization_disabled(block, activations_only=True):
            run("rounding", cfg.iters, learn_rounding=True, learn_steps=False, p=cfg.p)
    soft = (
        torch.cat([layer.weight_quant.h().detach().reshape(-1) for layer in linears])
        if linears
        else torch.zeros(0)
    )
    for layer, quantizer in roundings:  # hard rounding, stored on the grid
        layer.weight_quant.hard = True
        with torch.no_grad():
            layer.weight = nn.Parameter(layer.weight_quant(layer.weight).detach(), requires_grad=False)
        layer.weight_quant = quantizer
        layer.freeze()
    if "steps" in phases:
        run("steps", cfg.act_iters, learn_rounding=False, learn_steps=True,
            p=cfg.p if cfg.act_p is None else cfg.act_p)
    undecided = float(((soft > 0.01) & (soft < 0.99)).float().mean()) if soft.numel() else 0.0
    return {"error_nearest": before, "error_after": block_error(), "undecided_rounding": undecided}


def _nearest_error(block, linears, roundings, block_error) -> float:
    """Block output error with round-to-nearest weights (the starting point AdaRound must beat)."""
    adaround = [layer.weight_quant for layer in linears]
    for layer, quantizer in roundings:
        layer.weight_quant = quantizer
    error = block_error()
    for layer, rounding in zip(linears, adaround):
        layer.weight_quant = rounding
    return error


# Part of every checkpoint's fingerprint and of every job's record (quant.recon.algorithm). Raise it with
# any change here that makes the same settings fit differently, so that a job requeued across the change
# refits instead of mixing old and new blocks, its results form a row of their own and quant.load refuses
# the other version's calibrations. 1: whatever ran before the version was recorded (up to 2026-12-06,
# commit 8555c00; Q-Diffusion's step pass on the quantized prefix until 9eab76c); 2: every pass fits to
# FP targets, Q-Diffusion's step pass on FP inputs, units outside the blocks.
ALGORITHM_VERSION = 2


class BlockCheckpoints:
    """Per-block reconstruction state in a folder, so that a killed calibration resumes after its last
    finished block: ``block_NNN.safetensors`` holds block NNN's parameters and quantizer buffers once it is
    reconstructed, the batch generator's state after it and its report, written atomically.

    Files are used only under the same ``fingerprint`` (the reconstruction settings, the calibration
    inputs and the model's state before reconstruction, hashed): a folder left by another setting, or
    by a run on another kind of device whose float sums differ, is ignored and overwritten.
    """

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    def path(self, number: int) -> Path:
        return self.folder / f"block_{number:03d}.safetensors"

    def finished(self, blocks: int) -> int:
        """How many blocks from block 0 on have a saved state under this fingerprint."""
        done = 0
        while done < blocks and self.path(done).is_file():
            with safe_open(self.path(done), "pt") as handle:
                if (handle.metadata() or {}).get("fingerprint") != self.fingerprint:
                    break
            done += 1
        return done

    def save(self, number: int, block: nn.Module, report: dict, generator: torch.Generator) -> None:
        tensors = {f"block.{k}": v.detach().cpu().contiguous().clone() for k, v in block.state_dict().items()}
        tensors["generator"] = generator.get_state()
        metadata = {"fingerprint": self.fingerprint, "report": json.dumps(report)}
        atomic_write_bytes(self.path(number), save_safetensors(tensors, metadata=metadata))

    def load(self, number: int, block: nn.Module, generator: torch.Generator) -> dict:
        """Restore block ``number`` (strictly: every key) and the generator; returns its report."""
        tensors = load_safetensors(self.path(number).read_bytes())
        generator.set_state(tensors.pop("generator"))
        device = next(block.parameters()).device
        state = {k.removeprefix("block."): v.to(device) for k, v in tensors.items()}
        for layer in block.modules():  # reconstruction stored the rounded weights as new parameters
            if isinstance(layer, QuantLinear):
                layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        block.load_state_dict(state, strict=True)
        with safe_open(self.path(number), "pt") as handle:
            return json.loads(handle.metadata()["report"])


def fingerprint(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg: ReconConfig, order: str
) -> str:
    """A hash of what a reconstruction's result depends on (see BlockCheckpoints)."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}
    digest.update(json.dumps({"recon": settings, "order": order, "algorithm": ALGORITHM_VERSION},
                             sort_keys=True).encode())
    for tensor in (x, t, y):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    with torch.no_grad():
        sums = [v.double().sum() for v in model.state_dict().values() if v.is_floating_point()]
    digest.update(torch.stack(sums).cpu().numpy().tobytes() if sums else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ReconPass:
    """One pass over the model's units."""

    phases: tuple[str, ...]  # what each unit learns, in order (see reconstruct_block)
    activations_off: bool  # activation quantization off in the whole model (Q-Diffusion's weight pass)
    # each unit fitted on the FP model's inputs rather than the quantized prefix's (Q-Diffusion's step
    # pass: its code collects that pass's data with asym=False, i.e. inputs and outputs both from FP)
    fp_inputs: bool = False


def passes_of(order: str) -> list[ReconPass]:
    """The passes over the model an order makes."""
    if order not in ORDERS:
        raise ValueError(f"reconstruction order {order!r} is unknown: use one of {', '.join(ORDERS)}")
    return {
        "joint": [ReconPass(("joint",), activations_off=False)],
        "per_block": [ReconPass(("rounding", "steps"), activations_off=False)],
        "weights_first": [ReconPass(("rounding",), activations_off=True),
                          ReconPass(("steps",), activations_off=False, fp_inputs=True)],
    }[order]


def reconstruct_blocks(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg: ReconConfig,
    order: str,
    progress: bool = True,
) -> list[dict]:
    """Reconstruct every DiT block in ``order`` (ORDERS; inputs from the quantized prefix, or from FP in
    Q-Diffusion's step pass; targets from FP), and with ``cfg.outside_blocks`` the quantized units
    outside them (``outside_units``: the layers before the blocks first, the final layer last); returns
    one report per unit and pass (``unit`` names it, ``pass`` numbers the passes: 0 and 1 for
    ``weights_first``).

    With ``cfg.checkpoint_dir``, each finished unit of each pass is saved there, and those already
    saved under the same fingerprint are loaded instead of fitted (their reports say ``resumed``): the
    result is the one an uninterrupted run gives, since the batch generator's state is saved with each.
    """
    passes = passes_of(order)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = 256
    checkpoints = None
    if cfg.checkpoint_dir is not None:
        checkpoints = BlockCheckpoints(cfg.checkpoint_dir, fingerprint(model, x, t, y, cfg, order))
    family = family_of(model)
    blocks = family.blocks(model)
    before, after = outside_units(model) if cfg.outside_blocks else ([], [])
    per_pass = len(before) + len(blocks) + len(after)
    done = checkpoints.finished(len(passes) * per_pass) if checkpoints else 0
    # FP references, taken before anything is fitted (a fitted layer stores its rounded weight, so
    # "quantization off" no longer gives its FP output): the blocks' input, the outside units' outputs
    # (kept on the host) and, for orders that pass over the blocks again, the blocks' FP weights.
    keep_inputs = any(p.fp_inputs for p in passes)
    with quantization_disabled(model):
        x_fp_in, cond_fp = block_inputs(model, x, t, y, batch)
        fp_io = {}
        for name in before + after:
            inputs, output = unit_io(model, name, x, t, y, batch)
            fp_io[name] = ([i.cpu() for i in inputs] if keep_inputs else None, output.cpu())
    fp_weights = _weights_of(blocks) if len(passes) > 1 else {}
    reports = []

    def resume(unit: int, stored: nn.Module, activations_off: bool) -> dict:
        report = {**checkpoints.load(unit, stored, generator), "resumed": True}
        if activations_off:  # loading refreshed (enabled) the unit's quantizers; this pass has its
            for name, q in quantizers(stored):  # activations off, as the uninterrupted run
                if not name.endswith("weight_quant"):
                    q.enabled = False
        return report

    def fit_outside(name: str, unit: int, recon_pass: ReconPass) -> dict:
        """One unit outside the blocks: its inputs from the model as it now is (or from FP), its target
        from FP."""
        stored = model.get_submodule(name)
        if unit < done:
            return resume(unit, stored, recon_pass.activations_off)
        fp_inputs, fp_output = fp_io[name]
        target = fp_output.to(x.device)
        if recon_pass.fp_inputs:
            inputs = [i.to(x.device) for i in fp_inputs]
        else:
            inputs, _ = unit_io(model, name, x, t, y, batch)
        condition = inputs[1] if len(inputs) > 1 else torch.zeros(len(x), 1, device=x.device)
        call = UnitCall(stored, takes_condition=len(inputs) > 1)
        return reconstruct_block(model, call, inputs[0], condition, target, cfg, phases, generator, progress,
                                 name)

    def finish(report: dict, unit: int, name: str, stored: nn.Module, number_of_pass: int) -> None:
        report.update({"pass": number_of_pass, "unit": name})
        reports.append(report)
        if checkpoints and unit >= done:
            checkpoints.save(unit, stored, report, generator)

    for number_of_pass, recon_pass in enumerate(passes):
        phases, activations_off = recon_pass.phases, recon_pass.activations_off
        first = number_of_pass * per_pass  # the unit number of this pass's first unit
        # Q-Diffusion's weight pass runs the whole model with activation quantization off
        with quantization_disabled(model, activations_only=True) if activations_off else nullcontext():
            for offset, name in enumerate(before):
                report = fit_outside(name, first + offset, recon_pass)
                finish(report, first + offset, name, model.get_submodule(name), number_of_pass)
            if recon_pass.fp_inputs:  # every block on the FP chain's tokens and condition
                cond = cond_fp
            else:  # the quantized prefix: the patch embedding and timestep MLP may be quantized (scope "all")
                x_q, cond = block_inputs(model, x, t, y, batch)
            x_fp = x_fp_in
            label = "reconstruct" + (f" pass {number_of_pass + 1}/{len(passes)}" if len(passes) > 1 else "")
            for number, stored in enumerate(tqdm(blocks, desc=label, unit="block", disable=not progress)):
                unit = first + len(before) + number
                block = BlockCall(stored, family.run_block)
                # the FP target: the block's FP weights on the FP chain's tokens
                with torch.no_grad(), quantization_disabled(model), _weights_restored(stored, fp_weights):
                    target = _batched(block, x_fp, cond_fp, batch=batch)
                block_in = x_fp if recon_pass.fp_inputs else x_q
                if unit < done:
                    report = resume(unit, stored, activations_off)
                elif _fits(block):
                    report = reconstruct_block(model, block, block_in, cond, target, cfg, phases, generator,
                                               progress, f"block {number}")
                else:  # outside the scope: nothing to fit; its error is the quantized prefix's
                    with torch.no_grad():
                        output = _batched(block, block_in, cond, batch=batch)
                        error = float(lp_loss(output, target, 2.0, "all"))
                    report = {"error_nearest": error, "error_after": error, "undecided_rounding": 0.0}
                finish(report, unit, f"{family.block_list}.{number}", stored, number_of_pass)
                if not recon_pass.fp_inputs:  # the quantized prefix's tokens for the next block
                    with torch.no_grad():
                        x_q = _batched(block, x_q, cond, batch=batch)
                x_fp = target
            for offset, name in enumerate(after):
                unit = first + len(before) + len(blocks) + offset
                report = fit_outside(name, unit, recon_pass)
                finish(report, unit, name, model.get_submodule(name), number_of_pass)
    return reports
