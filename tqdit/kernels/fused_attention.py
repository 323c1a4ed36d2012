"""Quantized attention in one Triton kernel: fake-quantized q, k, v and post-softmax values, fused.

The explicit quantized attention (``Attention`` with ``fused=False``) materialises the score matrix
and passes it through softmax and the post-softmax quantizer as separate kernels; on DiT-XL/2 that
is most of what fake quantization costs once the linears are compiled. This kernel computes, per
(sample, head, block of queries), the same function without writing the scores to memory:

    q̂ = Q_q(q · d^-½),  k̂ = Q_k(k),  v̂ = Q_v(v)        uniform, per tensor, per time group
    S = q̂ k̂ᵀ (rounded to the model dtype, as the explicit path's matmul output is)
    P = softmax(S) (rounded to the model dtype)
    out = Q_p(P) v̂,  Q_p = TQ-DiT's post-softmax MRQ (two regions) or a uniform quantizer

in two passes over the keys: the first finds each row's max and sum of exponentials, the second
forms the *normalised* probabilities — which the post-softmax quantizer needs, as its regions are
fixed in [0, 1] — quantizes them and accumulates P̂ v̂. The scores are recomputed in the second pass
(1.5× the attention FLOPs, a few per cent of a DiT block's) instead of being stored. Measured and
dropped (docs/performance.md): a one-pass variant for sequences that fit one key tile (3.6–5×
slower: its tile spills registers), the 72-wide head as a 64- plus a 16-wide tile (wrong results on
the H100 with Triton 3.6), and fusing only the softmax half after PyTorch's q̂k̂ᵀ (slower than
inductor's kernels for the explicit path).

Each operand's parameters are gathered per sample (its time group) on the device and passed as one
float table, so the kernel takes time groups without a device sync or a recompilation. Rounding is
half to even, as in :mod:`tqdit.quant.quantizers`. What still differs from the explicit path is
float rounding: summation order, the softmax's normalisation (a multiply by 1/sum here),
on the GPU the compiler's fusing of the scale multiply into the rounding add (an FMA: a product
within an ulp of a half-way point can take the neighbouring code) and the hardware exp. These can
move a value to the neighbouring code: on the CPU the kernel lands within 1 % of the quantization
error of the explicit path, at DiT-XL/2 shapes in bf16 on an H100 within 12 % of it
(``tests/test_fused_attention.py``, docs/performance.md). The kernel is registered as the custom op
``tqdit::quant_attention`` so ``torch.compile`` keeps it whole. On the CPU it runs only under
Triton's interpreter (``TRITON_INTERPRET=1``, tests).

Where it pays (H100, one DiT-XL/2 attention on 256 bf16 inputs of mixed time groups,
docs/performance.md): 2.0 ms against 12.8 ms for the explicit path run eagerly, but compiled,
inductor's kernels for the explicit path take 1.4 ms (FP SDPA: 0.33 ms). So jobs use it on CUDA for
bf16/fp16 models that are not compiled (``quant.attention=auto``); float32 runs were not measured.
"""

from __future__ import annotations

import torch

from tqdit.quant.layers import QuantMatMul
from tqdit.quant.quantizers import SoftmaxMRQ, UniformNoise, UniformQuantizer, per_sample

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None

# Columns of the per-sample parameter table: (1/scale, scale, zero point) for q, k, v, then the
# post-softmax quantizer's three numbers: uniform (1/scale, scale, zero point) or MRQ (split, Δ_lo, Δ_hi).
PARAMS_PER_SAMPLE = 12
OFF, UNIFORM, MRQ = 0, 1, 2
# Tile sizes and launch settings on the GPU: the fastest of the tilings measured at DiT-XL/2's shapes
# on an H100, in two runs (benchmarks/fused_attention_speed.py; docs/performance.md)
KERNEL_CONFIG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 1}
FLOAT32_KERNEL_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}  # not tuned


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        # adding and subtracting 1.5 · 2^23 rounds a float32 to an integer, half to even (the float
        # unit's own rounding), exact for |x| < 2^22; larger values are clamped by every caller
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _uniform(x, params, column: tl.constexpr, qmin, qmax):
        inv_scale = tl.load(params + column)
        scale = tl.load(params + column + 1)
        zero_point = tl.load(params + column + 2)
        codes = tl.minimum(tl.maximum(_round_half_even(x * inv_scale), qmin - zero_point), qmax - zero_point)
        return codes * scale

    @triton.jit
    def _load_operand(
        base,
        rows,
        cols,
        stride_row,
        n_rows,
        head_dim,
        params,
        column: tl.constexpr,
        MODE: tl.constexpr,
        qmin,
        qmax,
        multiplier,
        SCALED: tl.constexpr,
        DTYPE: tl.constexpr,
    ):
        mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
        x = tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALED:  # q · d^-½ in the model dtype, as the explicit path computes it
            x = (x * multiplier).to(DTYPE).to(tl.float32)
        if MODE == 1:  # UNIFORM
            x = _uniform(x, params, column, qmin, qmax)
        return x.to(DTYPE)

    @triton.jit
    def _scores(q, k, n_cols, start, cols_in_block, DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s.to(DTYPE).to(tl.float32)
        return tl.where((start + cols_in_block)[None, :] < n_cols, s, float("-inf"))

    @triton.jit
    def _quant_attention_kernel(
        Q, K, V, Out, Params,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        heads, n_ctx, sm_scale,
        qkv_qmin, qkv_qmax, p_qmin, p_qmax,
        Q_MODE: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr, P_MODE: tl.constexpr,
        HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr, PARAMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # (sample, head) on the large grid axis; 64-bit offsets: sample × its stride can pass 2^31
        sample = (tl.program_id(0) // heads).to(tl.int64)
        head = (tl.program_id(0) % heads).to(tl.int64)
        block_m = tl.program_id(1)
        params = Params + sample * PARAMS
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_in_block = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        q_base = Q + sample * stride_qb + head * stride_qh
        k_base = K + sample * stride_kb + head * stride_kh
        v_base = V + sample * stride_vb + head * stride_vh
        q = _load_operand(
            q_base,
            rows,
            dims,
            stride_qn,
            n_ctx,
            HEAD_DIM,
            params,
            0,
            Q_MODE,
            qkv_qmin,
            qkv_qmax,
            sm_scale,
            True,
            DTYPE,
        )

        # pass 1: each row's max and sum of exponentials
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, n_ctx, BLOCK_N):
            k = _load_operand(
                k_base,
                start + cols_in_block,
                dims,
                stride_kn,
                n_ctx,
                HEAD_DIM,
                params,
                3,
                K_MODE,
                qkv_qmin,
                qkv_qmax,
                1.0,
                False,
                DTYPE,
            )
            s = _scores(q, k, n_ctx, start, cols_in_block, DTYPE, PRECISION)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
            row_max = new_max

        # pass 2: normalised probabilities, quantized, times v̂
        inv_row_sum = 1.0 / row_sum
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(0, n_ctx, BLOCK_N):
            k = _load_operand(
                k_base,
                start + cols_in_block,
                dims,
                stride_kn,
                n_ctx,
                HEAD_DIM,
                params,
                3,
                K_MODE,
                qkv_qmin,
                qkv_qmax,
                1.0,
                False,
                DTYPE,
            )
            s = _scores(q, k, n_ctx, start, cols_in_block, DTYPE, PRECISION)
            p = (tl.exp(s - row_max[:, None]) * inv_row_sum[:, None]).to(DTYPE).to(tl.float32)
            if P_MODE == 1:  # UNIFORM
                p = _uniform(p, params, 9, p_qmin, p_qmax)
            elif P_MODE == 2:  # MRQ: Δ_lo below the split, Δ_hi above; codes 0..levels in each region
                below = p < tl.load(params + 9)
                step = tl.where(below, tl.load(params + 10), tl.load(params + 11))
                inv_step = tl.where(below, 1.0 / tl.load(params + 10), 1.0 / tl.load(params + 11))
                p = tl.minimum(tl.maximum(_round_half_even(p * inv_step), p_qmin), p_qmax) * step
            v = _load_operand(
                v_base,
                start + cols_in_block,
                dims,
                stride_vn,
                n_ctx,
                HEAD_DIM,
                params,
                6,
                V_MODE,
                qkv_qmin,
                qkv_qmax,
                1.0,
                False,
                DTYPE,
            )
            acc += tl.dot(p.to(DTYPE), v, input_precision=PRECISION)

        out_base = Out + sample * stride_ob + head * stride_oh
        mask = (rows[:, None] < n_ctx) & (dims[None, :] < HEAD_DIM)
        tl.store(out_base + rows[:, None] * stride_on + dims[None, :], acc.to(DTYPE), mask=mask)


@torch.library.custom_op("tqdit::quant_attention", mutates_args=())
def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: torch.Tensor, sm_scale: float,
                    modes: list[int], qkv_range: list[int], p_range: list[int]) -> torch.Tensor:
    """Quantized attention of (batch, heads, tokens, head_dim) q, k, v (any strides).

    ``params``: (batch, 12) float32, see ``PARAMS_PER_SAMPLE``. ``modes``: OFF/UNIFORM for q, k, v,
    then OFF/UNIFORM/MRQ for the post-softmax values. ``qkv_range``/``p_range``: (qmin, qmax) codes.
    Returns (batch, heads, tokens, head_dim), laid out as (batch, tokens, heads, head_dim) so the
    caller's merge of the heads is free.
    """
    q, k, v = (
        x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)
    )  # the kernel reads rows of head_dim
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty(batch, tokens, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not q.is_cuda:  # Triton's interpreter (tests)
        config = {"block_m": 16, "block_n": 16, "num_warps": 1, "num_stages": 1}
    else:  # float32 tiles take twice the shared memory: smaller ones fit GPUs with less than Hopper's
        config = KERNEL_CONFIG if q.element_size() <= 2 else FLOAT32_KERNEL_CONFIG
    grid = (batch * heads, triton.cdiv(tokens, config["block_m"]))
    dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[q.dtype]
    _quant_attention_kernel[grid](
        q,
        k,
        v,
        out,
        params.contiguous(),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads,
        tokens,
        sm_scale,
        qkv_range[0],
        qkv_range[1],
        p_range[0],
        p_range[1],
        Q_MODE=modes[0],
        K_MODE=modes[1],
        V_MODE=modes[2],
        P_MODE=modes[3],
        HEAD_DIM=head_dim,
        DTYPE=dtype,
        PARAMS=PARAMS_PER_SAMPLE,
        # float32 operands: TF32 tensor cores when PyTorch's matmuls use them (jobs enable it), as the
        # explicit path
        PRECISION="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        BLOCK_M=config["block_m"],
        BLOCK_N=config["block_n"],
        BLOCK_D=block_d,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out


@quant_attention.register_fake
def _(q, k, v, params, sm_scale, modes, qkv_range, p_range):
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty(batch, tokens, heads, head_dim).transpose(1, 2)


# --- the calibrated model's side: which attentions can run fused, and their parameter tables ---

def _per_sample(quantizer, values: torch.Tensor, batch: int) -> torch.Tensor:
    """(groups,) values -> (batch,): each sample's time group, or the one value for all."""
    return per_sample(quantizer.context if quantizer.groups > 1 else None, values, batch)


def _uniform_columns(quantizer, batch: int) -> torch.Tensor:
    """(batch, 3): 1/scale, scale, zero point of each sample's time group."""
    scale = _per_sample(quantizer, quantizer.scale[:, 0].float(), batch)
    zero_point = _per_sample(quantizer, quantizer.zero_point[:, 0].float(), batch)
    return torch.stack([1.0 / scale, scale, zero_point], dim=1)


def _mrq_columns(quantizer, batch: int) -> torch.Tensor:
    """(batch, 3): split 2^-i, Δ_lo = split / levels, Δ_hi = 1 / levels of each sample's time group."""
    split = torch.pow(2.0, -_per_sample(quantizer, quantizer.split_exponent, batch).float())
    return torch.stack(
        [split, split / quantizer.levels, torch.full_like(split, 1.0 / quantizer.levels)], dim=1
    )


def _quantizers(attn):
    return (
        attn.qk_matmul.a_quant,
        attn.qk_matmul.b_quant,
        attn.av_matmul.b_quant,
        attn.av_matmul.a_quant,
    )  # q, k, v, P


def supports(attn) -> bool:
    """Whether this attention's quantizers are ones the kernel computes: per-tensor uniform q, k, v
    sharing one code range, and a uniform or MRQ post-softmax quantizer."""
    if not (isinstance(attn.qk_matmul, QuantMatMul) and isinstance(attn.av_matmul, QuantMatMul)):
        return False
    *qkv, post_softmax = _quantizers(attn)
    if any(
        isinstance(q, UniformNoise) for q in (*qkv, post_softmax)
    ):  # the noise control: the kernel would round
        return False
    if not all(isinstance(q, UniformQuantizer) and q.scale.shape[1] == 1 for q in qkv):
        return False
    if len({(q.qmin, q.qmax) for q in qkv}) != 1:
        return False
    return isinstance(post_softmax, SoftmaxMRQ) or (
        isinstance(post_softmax, UniformQuantizer) and post_softmax.scale.shape[1] == 1
    )


def kernel_arguments(
    attn, batch: int, device: torch.device
) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """``quant_attention``'s (params, modes, qkv_range, p_range) for this attention's quantizers."""
    *qkv, post_softmax = _quantizers(attn)
    columns = [
        _uniform_columns(quantizer, batch) if quantizer.enabled else torch.zeros(batch, 3, device=device)
        for quantizer in qkv
    ]
    modes = [UNIFORM if quantizer.enabled else OFF for quantizer in qkv]
    if not post_softmax.enabled:
        columns.append(torch.zeros(batch, 3, device=device))
        modes.append(OFF)
        p_range = [0, 0]
    elif isinstance(post_softmax, SoftmaxMRQ):
        columns.append(_mrq_columns(post_softmax, batch))
        modes.append(MRQ)
        p_range = [0, post_softmax.levels]
    else:
        columns.append(_uniform_columns(post_softmax, batch))
        modes.append(UNIFORM)
        p_range = [post_softmax.qmin, post_softmax.qmax]
    params = torch.cat(columns, dim=1).to(device)
    return params, modes, [qkv[0].qmin, qkv[0].qmax], p_range


def fused_quantized_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.kernel``: the explicit quantized attention's function, computed by one Triton kernel."""
    params, modes, qkv_range, p_range = kernel_arguments(attn, q.shape[0], q.device)
    return torch.ops.tqdit.quant_attention(q, k, v, params, attn.scale, modes, qkv_range, p_range)


def use_fused_attention(model) -> int:
    """Route every quantized attention whose quantizers the kernel supports through it (after
    calibration: calibration reads the explicit path's matmul inputs). Returns how many blocks."""
    if not available():
        raise RuntimeError(
            "the fused quantized attention needs Triton (it ships with CUDA builds of PyTorch)"
        )
    count = 0
    for block in getattr(model, "blocks", []):
        if supports(block.attn):
            block.attn.kernel = fused_quantized_attention
            count += 1
    return count
