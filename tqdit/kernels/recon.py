"""Fused Triton kernels for block reconstruction's elementwise work, each with a hand-written backward.

Autograd over torch ops runs AdaRound's soft weight, its rounding penalty and LSQ's fake quantizer
as about ten passes over each tensor, forward and backward; at DiT-XL/2's sizes (24 M rounding
variables per block, activations of 8 M to 38 M elements per batch) those passes, not the GEMMs,
dominated an iteration (profiled on an H200: docs/performance.md). Here each is one kernel forward
and one backward. The functions compute what the torch-op references in ``tqdit.quant.reconstruct``
compute; only float rounding differs (fused multiply-adds, Triton's sigmoid, exp2/log2 for powers),
and tests compare the two (on the CPU under Triton's interpreter, on a GPU compiled).

``available(x)`` says whether the kernels serve tensor ``x``: on CUDA, with Triton installed.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None

BLOCK = 1024  # elements per program; every kernel here is memory-bound, so the size hardly matters


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        # adding and subtracting 1.5 · 2^23 rounds a float32 to an integer, half to even (the float
        # unit's own rounding), exact for |x| < 2^22; every caller clamps the codes afterwards
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _rectified_sigmoid(v, zeta, gamma):
        """AdaRound's h(v) = clamp(σ(v)(ζ − γ) + γ, 0, 1) and dh/dv (zero where the clamp holds h)."""
        sigmoid = tl.sigmoid(v)
        stretched = sigmoid * (zeta - gamma) + gamma
        h = tl.minimum(tl.maximum(stretched, 0.0), 1.0)
        slope = tl.where(
            (stretched >= 0.0) & (stretched <= 1.0), (zeta - gamma) * (1.0 - sigmoid) * sigmoid, 0.0
        )
        return h, slope

    @triton.jit
    def _power(base, exponent):
        # base ≥ 0 and exponent > 0 (β ≥ 1 here): 0^exponent = 0, without taking log2(0)
        return tl.where(base > 0.0, tl.exp2(exponent * tl.log2(tl.maximum(base, 1e-30))), 0.0)

    @triton.jit
    def _soft_codes(v_ptr, floor_ptr, scale_ptr, zero_ptr, numel, cols, zeta, gamma, BLOCK: tl.constexpr):
        """This program's elements: ⌊W/s⌋ + h(v) + z before the clamp to the code range, dh/dv, and
        each element's row scale and zero point; plus the offsets and their mask."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        row = offsets // cols
        h, slope = _rectified_sigmoid(tl.load(v_ptr + offsets, mask=mask, other=0.0), zeta, gamma)
        zero = tl.load(zero_ptr + row, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + row, mask=mask, other=0.0)
        codes = tl.load(floor_ptr + offsets, mask=mask, other=0.0) + h + zero
        return offsets, mask, codes, slope, scale, zero

    # fmt: off
    @triton.jit
    def _soft_weight_forward(v_ptr, floor_ptr, scale_ptr, zero_ptr, out_ptr, numel, cols, qmin, qmax,
                             zeta, gamma, BLOCK: tl.constexpr):
        offsets, mask, codes, _, scale, zero = _soft_codes(
            v_ptr, floor_ptr, scale_ptr, zero_ptr, numel, cols, zeta, gamma, BLOCK)
        codes = tl.minimum(tl.maximum(codes, qmin), qmax)
        tl.store(out_ptr + offsets, (codes - zero) * scale, mask=mask)

    @triton.jit
    def _soft_weight_backward(grad_ptr, v_ptr, floor_ptr, scale_ptr, zero_ptr, grad_v_ptr, numel, cols, qmin,
                              qmax, zeta, gamma, BLOCK: tl.constexpr):
        offsets, mask, codes, slope, scale, _ = _soft_codes(
            v_ptr, floor_ptr, scale_ptr, zero_ptr, numel, cols, zeta, gamma, BLOCK)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0) * scale
        grad = tl.where((codes >= qmin) & (codes <= qmax), grad, 0.0)  # the clamp to the code range
        tl.store(grad_v_ptr + offsets, grad * slope, mask=mask)
    # fmt: on

    @triton.jit
    def _penalty_forward(v_ptr, beta_ptr, partial_ptr, numel, zeta, gamma, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        h, _ = _rectified_sigmoid(tl.load(v_ptr + offsets, mask=mask, other=0.0), zeta, gamma)
        terms = 1.0 - _power(tl.abs(2.0 * h - 1.0), tl.load(beta_ptr))
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, terms, 0.0), axis=0))

    @triton.jit
    def _penalty_backward(grad_ptr, v_ptr, beta_ptr, grad_v_ptr, numel, zeta, gamma, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        h, slope = _rectified_sigmoid(tl.load(v_ptr + offsets, mask=mask, other=0.0), zeta, gamma)
        beta = tl.load(beta_ptr)
        centred = 2.0 * h - 1.0
        sign = tl.where(centred > 0.0, 1.0, tl.where(centred < 0.0, -1.0, 0.0))
        # d/dh (1 − |2h − 1|^β) = −2β |2h − 1|^(β−1) sign(2h − 1)
        grad_h = -2.0 * beta * _power(tl.abs(centred), beta - 1.0) * sign
        tl.store(grad_v_ptr + offsets, tl.load(grad_ptr) * grad_h * slope, mask=mask)

    @triton.jit
    def _lsq_forward(x_ptr, step_ptr, zero_ptr, out_ptr, numel, qmin, qmax, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        step, zero = tl.load(step_ptr), tl.load(zero_ptr)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        codes = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, step)) + zero, qmin), qmax)
        tl.store(out_ptr + offsets, (codes - zero) * step, mask=mask)

    @triton.jit
    def _lsq_backward(
        grad_ptr, x_ptr, step_ptr, zero_ptr, grad_x_ptr, partial_ptr, numel, qmin, qmax, BLOCK: tl.constexpr
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        step, zero = tl.load(step_ptr), tl.load(zero_ptr)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scaled = tl.math.div_rn(x, step)  # IEEE division, as torch's (Triton's `/` is approximate)
        rounded = _round_half_even(scaled)
        codes = tl.minimum(tl.maximum(rounded + zero, qmin), qmax)
        inside = codes == rounded + zero
        tl.store(grad_x_ptr + offsets, tl.where(inside, grad, 0.0), mask=mask)
        # LSQ: ∂/∂Δ is round(x/Δ) − x/Δ inside the code range, the clamped code − z outside
        step_terms = grad * tl.where(inside, rounded - scaled, codes - zero)
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, step_terms, 0.0), axis=0))


def _programs(numel: int) -> tuple[int]:
    if numel >= 2**31:  # the kernels' element offsets are int32
        raise ValueError(f"a tensor of {numel} elements is beyond the fused reconstruction kernels' 2^31")
    return (triton.cdiv(numel, BLOCK),)


class _SoftWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, floor, scale, zero_point, qmin, qmax, zeta, gamma):
        if not (v.is_contiguous() and floor.is_contiguous()):
            raise ValueError("soft_weight indexes rows in memory order: v and floor must be contiguous")
        out = torch.empty_like(v)
        rows = scale.numel()
        args = (v.numel(), v.numel() // rows, float(qmin), float(qmax), zeta, gamma)
        _soft_weight_forward[_programs(v.numel())](v, floor, scale, zero_point, out, *args, BLOCK=BLOCK)
        ctx.save_for_backward(v, floor, scale, zero_point)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad):
        v, floor, scale, zero_point = ctx.saved_tensors
        grad_v = torch.empty_like(v)
        _soft_weight_backward[_programs(v.numel())](
            grad.contiguous(), v, floor, scale, zero_point, grad_v, *ctx.args, BLOCK=BLOCK
        )
        return grad_v, None, None, None, None, None, None, None


class _RoundingPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, beta, zeta, gamma):
        partial = torch.empty(_programs(v.numel())[0], dtype=torch.float32, device=v.device)
        _penalty_forward[_programs(v.numel())](v, beta, partial, v.numel(), zeta, gamma, BLOCK=BLOCK)
        ctx.save_for_backward(v, beta)
        ctx.constants = (zeta, gamma)
        return partial.sum()

    @staticmethod
    def backward(ctx, grad):
        v, beta = ctx.saved_tensors
        grad_v = torch.empty_like(v)
        _penalty_backward[_programs(v.numel())](
            grad.reshape(1).float(), v, beta, grad_v, v.numel(), *ctx.constants, BLOCK=BLOCK
        )
        return grad_v, None, None, None


class _LearnedStepQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_factor):
        x = x.contiguous()
        # float32 out, rounded to x's dtype by torch (to nearest even; Triton's interpreter truncates)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _lsq_forward[_programs(x.numel())](
            x, step, zero_point, out, x.numel(), float(qmin), float(qmax), BLOCK=BLOCK
        )
        ctx.save_for_backward(x, step, zero_point)
        ctx.args = (float(qmin), float(qmax), grad_factor)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, step, zero_point = ctx.saved_tensors
        qmin, qmax, grad_factor = ctx.args
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        partial = torch.empty(_programs(x.numel())[0], dtype=torch.float32, device=x.device)
        _lsq_backward[_programs(x.numel())](
            grad.contiguous(), x, step, zero_point, grad_x, partial, x.numel(), qmin, qmax, BLOCK=BLOCK
        )
        return grad_x.to(x.dtype), (partial.sum() * grad_factor).reshape(step.shape), None, None, None, None


def soft_weight(v, floor, scale, zero_point, qmin: int, qmax: int, zeta: float, gamma: float) -> torch.Tensor:
    """s·(clamp(⌊W/s⌋ + h(v) + z, qmin, qmax) − z) in float32; ``scale`` and ``zero_point`` one per row
    of ``v`` (contiguous float32 tensors of any shape with the rows first)."""
    return _SoftWeight.apply(v, floor, scale.reshape(-1), zero_point.reshape(-1), qmin, qmax, zeta, gamma)


def rounding_penalty(v: torch.Tensor, beta: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """Σ (1 − |2h(v) − 1|^β) with β a one-element float32 tensor on v's device (graph-safe)."""
    return _RoundingPenalty.apply(v, beta.reshape(1).float(), zeta, gamma)


def learned_step_quant(x, step, zero_point, qmin: int, qmax: int, grad_factor: float) -> torch.Tensor:
    """LSQ's fake quantizer (``reconstruct.lsq_fake_quant``'s values and gradients) in x's dtype; ``step``
    and ``zero_point`` are one-element float32 tensors, only ``step`` receives a gradient."""
    return _LearnedStepQuant.apply(x, step, zero_point, qmin, qmax, grad_factor)
