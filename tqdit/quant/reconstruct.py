"""Block reconstruction: BRECQ-style, per DiT block, with AdaRound weights and LSQ activation steps.

The machinery Q-Diffusion and PTQ4DiT build on (after the engine has initialised every quantizer):

- **AdaRound** (Nagel et al. 2020): each in-scope weight becomes s·(⌊W/s⌋ + h(V)) with
  h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, V initialised so that h(V) equals the
  fractional part of W/s (the soft weight starts at W). The loss adds λ·Σ(1 − |2h(V) − 1|^β), β
  annealed from ``b_start`` to ``b_end`` after a warm-up fraction with λ = 0, which drives every h to
  0 or 1. The result is hard rounding: ⌊W/s⌋ or ⌊W/s⌋ + 1 per element, stored as the layer's weight
  (on its grid, so the layer's weight quantizer returns it unchanged).
- **LSQ** (Esser et al. 2020): per-tensor activation steps Δ become learnable, with the gradient of
  ``torch._fake_quantize_learnable_per_tensor_affine`` (scaled by 1/√(numel·qmax) as LSQ prescribes).
- **Reconstruction target** (BRECQ): a block is fed the output of the already quantized blocks
  before it and fitted to the FP block output on the FP input: loss = mean over inputs of
  Σ|Ŷ − Y|^p. The conditioning c = t_emb + y_emb is shared by every block and computed once.

``reconstruct_blocks`` runs this block by block, in order; ``joint`` learns rounding and steps
together (PTQ4DiT), otherwise rounding first with activations in full precision, then steps with
the rounded weights (Q-Diffusion). Only per-tensor, ungrouped ``UniformQuantizer`` activations learn
their steps; other quantizers keep their initial parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tqdit.quant.layers import QuantLinear, QuantMatMul, quantization_disabled
from tqdit.quant.quantizers import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


@dataclass
class ReconConfig:
    """Reconstruction settings; defaults are the papers' (Q-Diffusion / BRECQ)."""

    iters: int = 20000         # rounding iterations per block
    act_iters: int = 5000      # activation-step iterations per block (sequential mode)
    batch: int = 32            # calibration inputs per iteration
    lr: float = 1e-3           # Adam on the rounding variables (BRECQ/AdaRound default)
    act_lr: float = 4e-4       # Adam on activation steps, cosine-annealed to 0
    warmup: float = 0.2        # fraction of iters without the rounding loss
    b_start: float = 20.0
    b_end: float = 2.0
    round_weight: float = 0.01  # λ of the rounding loss
    p: float = 2.4             # exponent of the reconstruction loss
    seed: int = 0


class AdaRoundWeight(nn.Module):
    """Learned up/down rounding of one per-channel weight quantizer; replaces it during reconstruction."""

    def __init__(self, weight: torch.Tensor, quantizer: UniformQuantizer):
        super().__init__()
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", quantizer.scale[0].reshape(shape).to(weight.device).float())
        self.register_buffer("zero_point", quantizer.zero_point[0].reshape(shape).to(weight.device).float())
        scaled = weight.detach().float() / self.scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest
        self.hard = False
        self.enabled = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounding = (self.v >= 0).float() if self.hard else self.h()
        codes = torch.clamp(self.floor + rounding + self.zero_point, self.qmin, self.qmax)
        return ((codes - self.zero_point) * self.scale).to(weight.dtype)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


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
        grad_factor = 1.0 / math.sqrt(x[0].numel() * max(q.qmax, 1))
        out = torch._fake_quantize_learnable_per_tensor_affine(x.float(), self.step.to(x.device), self.zero_point.to(x.device),
                                                               q.qmin, q.qmax, grad_factor)
        return out.to(x.dtype)

    def commit(self) -> None:
        self.quantizer.scale.fill_(float(self.step.detach().clamp(min=1e-8)))
        self.quantizer.refresh()


def _beta(iteration: int, cfg: ReconConfig) -> float | None:
    """Rounding-loss temperature at ``iteration``; None during the warm-up (no rounding loss)."""
    warm = cfg.warmup * cfg.iters
    if iteration < warm:
        return None
    progress = (iteration - warm) / max(cfg.iters - warm, 1)
    return cfg.b_end + (cfg.b_start - cfg.b_end) * max(0.0, 1.0 - progress)


def lp_loss(prediction: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's reconstruction loss: Σ over features of |ŷ − y|^p, mean over inputs."""
    return (prediction.float() - target.float()).abs().pow(p).reshape(len(prediction), -1).sum(dim=1).mean()


def _swap_activations(block: nn.Module) -> list[tuple[nn.Module, str, LearnedStep]]:
    """Replace every learnable activation quantizer inside ``block`` by a LearnedStep; returns the swaps."""
    swaps = []
    for parent in list(block.modules()):
        for child_name, child in list(parent.named_children()):
            learnable = (isinstance(child, UniformQuantizer) and child.enabled and child.groups == 1 and child.scale.shape[1] == 1
                         and child_name != "weight_quant")
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
    return torch.cat([fn(*(t[i:i + batch] for t in tensors)) for i in range(0, len(tensors[0]), batch)])


def block_inputs(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens entering block 0, conditioning c) for calibration inputs, computed as the model does."""
    with torch.no_grad():
        tokens = _batched(lambda xb: model.x_embedder(xb) + model.pos_embed, x, batch=batch)
        cond = _batched(lambda tb, yb: model.t_embedder(tb) + model.y_embedder(yb, False), t, y, batch=batch)
    return tokens, cond


def reconstruct_block(model, block: nn.Module, x_q: torch.Tensor, cond: torch.Tensor, target: torch.Tensor,
                      cfg: ReconConfig, joint: bool, generator: torch.Generator, progress: bool, label: str) -> dict:
    """Fit one block's rounding (and activation steps) so that block(x_q) ≈ target; returns loss numbers."""
    linears = [m for m in block.modules() if isinstance(m, QuantLinear) and m.weight_quant.enabled]
    roundings = []
    for layer in linears:
        roundings.append((layer, layer.weight_quant))
        layer.weight_quant = AdaRoundWeight(layer.weight, layer.weight_quant)
        layer._frozen_weight = None
    n = len(x_q)

    def sample_batch():
        return torch.randint(0, n, (min(cfg.batch, n),), generator=generator).to(x_q.device)

    def block_error() -> float:
        with torch.no_grad():
            return float(sum(lp_loss(block(x_q[i:i + 256], cond[i:i + 256]), target[i:i + 256], 2.0) * len(x_q[i:i + 256])
                             for i in range(0, n, 256)) / n)

    def run(phase: str, iterations: int, learn_rounding: bool, learn_steps: bool) -> None:
        if iterations == 0:  # the phase is off (e.g. recon.act_iters=0: steps stay at their Lp initialisation)
            return
        swaps = _swap_activations(block) if learn_steps else []
        groups = []
        if learn_rounding and linears:  # a block the scope leaves unquantized has nothing to round
            groups.append({"params": [layer.weight_quant.v for layer in linears], "lr": cfg.lr})
        if learn_steps and swaps:
            groups.append({"params": [s.step for _, _, s in swaps], "lr": cfg.act_lr})
        if not groups:
            return
        optimizer = torch.optim.Adam(groups)
        scheduler = None
        if learn_steps and swaps:
            # cosine annealing of the step learning rate only (the rounding lr stays constant, as in BRECQ)
            lambdas = [(lambda i: 1.0)] * (1 if learn_rounding else 0) + [lambda i: 0.5 * (1 + math.cos(math.pi * i / iterations))]
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        bar = tqdm(range(iterations), desc=f"{label} {phase}", leave=False, disable=not progress)
        for iteration in bar:
            index = sample_batch()
            loss = lp_loss(block(x_q[index], cond[index]), target[index], cfg.p)
            beta = _beta(iteration, cfg) if learn_rounding else None
            if beta is not None:
                loss = loss + cfg.round_weight * sum(layer.weight_quant.rounding_loss(beta) for layer in linears)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        _restore_activations(swaps)

    with torch.no_grad():
        before = _nearest_error(block, linears, roundings, block_error)
    if joint:
        run("rounding+steps", cfg.iters, learn_rounding=True, learn_steps=True)
    else:
        with quantization_disabled(block, activations_only=True):
            run("rounding", cfg.iters, learn_rounding=True, learn_steps=False)
    soft = torch.cat([layer.weight_quant.h().detach().reshape(-1) for layer in linears]) if linears else torch.zeros(0)
    for layer, quantizer in roundings:  # hard rounding, stored on the grid
        layer.weight_quant.hard = True
        with torch.no_grad():
            layer.weight = nn.Parameter(layer.weight_quant(layer.weight).detach(), requires_grad=False)
        layer.weight_quant = quantizer
        layer.freeze()
    if not joint:
        run("steps", cfg.act_iters, learn_rounding=False, learn_steps=True)
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


def reconstruct_blocks(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg: ReconConfig,
                       joint: bool, progress: bool = True) -> list[dict]:
    """Reconstruct every DiT block in order (inputs from the quantized prefix, targets from FP)."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = 256
    with quantization_disabled(model):
        x_fp, cond_fp = block_inputs(model, x, t, y, batch)
    _, cond = block_inputs(model, x, t, y, batch)  # the timestep MLP may be quantized (scope "all")
    x_q = x_fp.clone()
    reports = []
    for number, block in enumerate(tqdm(model.blocks, desc="reconstruct", unit="block", disable=not progress)):
        with torch.no_grad(), quantization_disabled(model):
            target = _batched(block, x_fp, cond_fp, batch=batch)
        if any(isinstance(m, (QuantLinear, QuantMatMul)) for m in block.modules()):
            reports.append(reconstruct_block(model, block, x_q, cond, target, cfg, joint, generator, progress, f"block {number}"))
            with torch.no_grad():
                x_q = _batched(block, x_q, cond, batch=batch)
        else:  # outside the scope: nothing to fit; pass the quantized prefix's output on and report its error
            with torch.no_grad():
                x_q = _batched(block, x_q, cond, batch=batch)
                error = float(lp_loss(x_q, target, 2.0))
            reports.append({"error_nearest": error, "error_after": error, "undecided_rounding": 0.0})
        x_fp = target
    return reports
