"""W8A8 integer matmul with the calibrated grids: int8 × int8 → int32, scales applied in the epilogue.

A uniform 8-bit fake quantizer represents x̂ = (n − z)·Δ with integer codes n and zero point z.
For a linear layer with a per-tensor (optionally per-time-group) input grid (Δx, zx) and a
per-output-channel weight grid (Δw[o], zw[o]):

    ŷ[r, o] = Δx[s]·Δw[o] · Σ_k (n[r, k] − zx[s]) (m[o, k] − zw[o]) + b[o]      (s: row r's sample)

Codes are stored signed: a = n − oa and w = m − ow, with oa, ow = 128 for unsigned (asymmetric)
grids and 0 for signed ones, so every code fits int8 whatever the zero point. With the offsets
cx = oa − zx and cw = ow − zw, the sum expands into one int8 matmul and rank-one corrections:

    Σ_k (a + cx)(w + cw) = Σ_k a·w  +  cx·Σ_k w  +  cw·(Σ_k a + K·cx)

All of it is exact in int32 for K < 32,768 (partial sums ≤ K·2^16), so, unlike FP8, this path computes
the fake-quantized layer's function itself, with float32 rounding only in the epilogue (fake
quantization rounds every product and partial sum in the model dtype). ``Σ_k w`` is
precomputed per channel; ``Σ_k a`` (only needed when a weight grid has a nonzero cw, i.e. an
asymmetric weight quantizer) is summed from the tiles the kernel loads anyway.

On CUDA, :func:`int8_linear` runs a Triton kernel (tensor-core int8 MMA, autotuned over a few
tilings per layer shape, the epilogue — corrections, per-sample input scale, per-channel weight
scale, bias — fused, output in the model dtype). Elsewhere it runs the same arithmetic with
PyTorch ops: the int8 matmul as a float32 matmul of the codes, exact for K ≤ 1,024 (every partial
sum is an integer below 2^24), float64 above. The kernel runs on the CPU under Triton's interpreter
(tests) through :func:`launch`.

Measured (H200, DiT-XL/2's four linear shapes at 65,536 tokens, ``benchmarks/gemm_8bit.py``,
docs/performance.md): 762–1,033 TOP/s with symmetric weights, 1.14–1.52× bf16 and 1.20–1.35×
``torch._int_mm`` (which has no epilogue), but 0.74–0.88× row-wise scaled FP8; with asymmetric
weights (the Σa reduction in the loop) 588–748 TOP/s.
"""

from __future__ import annotations

import torch

from tqdit.kernels import triton_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None

MAX_EXACT_K = 2**15 - 1  # partial sums ≤ K·2^16 < 2^31: the int32 accumulator and corrections cannot overflow
# Tilings tried per (N, K) on the GPU; the autotuner keeps the fastest. int8 MMA wants K tiles of ≥ 64.
GPU_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _int8_linear_kernel(
        A, W, Out, SampleScale, SampleOffset, WeightScale, WeightOffset, WeightSum, Bias,
        M, N, K, rows_per_sample, stride_am, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, WEIGHT_OFFSET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        rows, cols = triton_gemm.tile_rows_and_columns(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        a_ptr = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]  # 64-bit: rows × K can pass 2^31
        w_ptr = W + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for start in range(0, K, BLOCK_K):
            k_ok = (start + ks) < K
            a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            if WEIGHT_OFFSET:
                a_sum += tl.sum(a.to(tl.int32), axis=1)
            a_ptr += BLOCK_K
            w_ptr += BLOCK_K

        sample = rows // rows_per_sample
        input_scale = tl.load(SampleScale + sample, mask=row_ok, other=0.0)
        input_offset = tl.load(SampleOffset + sample, mask=row_ok, other=0)
        weight_scale = tl.load(WeightScale + cols, mask=col_ok, other=0.0)
        weight_sum = tl.load(WeightSum + cols, mask=col_ok, other=0)
        total = acc + input_offset[:, None] * weight_sum[None, :]
        if WEIGHT_OFFSET:
            weight_offset = tl.load(WeightOffset + cols, mask=col_ok, other=0)
            total += weight_offset[None, :] * (a_sum + K * input_offset)[:, None]
        y = total.to(tl.float32) * input_scale[:, None] * weight_scale[None, :]
        if HAS_BIAS:
            y += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptr = Out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out_ptr, y.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    _autotuned_kernel = triton_gemm.autotuned(
        _int8_linear_kernel, GPU_CONFIGS, key=["N", "K", "WEIGHT_OFFSET"]
    )


def check_operands(a, weight, sample_scale, sample_offset, weight_scale, weight_offset, weight_sum, bias,
                   rows_per_sample: int) -> None:
    """Shapes and dtypes the kernel relies on (it reads memory by them), else a ValueError naming the
    mismatch."""
    m, k = a.shape
    n = weight.shape[0]
    problems = []
    if a.dtype != torch.int8 or weight.dtype != torch.int8:
        problems.append(f"codes must be int8, got {a.dtype} and {weight.dtype}")
    if weight.shape[1] != k:
        problems.append(f"input has K={k} but the weight {tuple(weight.shape)}")
    if k > MAX_EXACT_K:
        problems.append(f"K={k} could overflow the int32 sums (at most {MAX_EXACT_K})")
    if rows_per_sample < 1 or m % rows_per_sample or sample_scale.shape != (m // max(rows_per_sample, 1),) \
            or sample_offset.shape != sample_scale.shape or sample_offset.dtype != torch.int32:
        problems.append(
            f"per-sample scale/offset {tuple(sample_scale.shape)}/{tuple(sample_offset.shape)} "
            f"(int32 offsets) do not give one value per {rows_per_sample} of the {m} rows"
        )
    per_channel = [weight_scale, weight_sum] + [t for t in (weight_offset, bias) if t is not None]
    if any(t.shape != (n,) for t in per_channel) or weight_sum.dtype != torch.int32 or \
            (weight_offset is not None and weight_offset.dtype != torch.int32):
        problems.append(f"per-channel scale/offset/sum/bias must each be ({n},), offsets and sums int32")
    if problems:
        raise ValueError("int8_linear: " + "; ".join(problems))


def launch(
    a,
    weight,
    sample_scale,
    sample_offset,
    weight_scale,
    weight_offset,
    weight_sum,
    bias,
    rows_per_sample: int,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> torch.Tensor:
    """Run the Triton kernel (``config``: one fixed tiling, e.g. :data:`INTERPRETER_CONFIG`;
    None: autotuned)."""
    check_operands(
        a, weight, sample_scale, sample_offset, weight_scale, weight_offset, weight_sum, bias, rows_per_sample
    )
    a, weight = a.contiguous(), weight.contiguous()  # the kernel steps along K with unit stride
    m, k = a.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    unused = weight_scale  # a placeholder pointer for the absent optional tensors (never read)
    args = (
        a,
        weight,
        out,
        sample_scale,
        sample_offset,
        weight_scale,
        unused if weight_offset is None else weight_offset,
        weight_sum,
        unused if bias is None else bias,
        m,
        n,
        k,
        rows_per_sample,
        a.stride(0),
        weight.stride(0),
        out.stride(0),
    )
    flags = dict(HAS_BIAS=bias is not None, WEIGHT_OFFSET=weight_offset is not None)
    triton_gemm.run(_int8_linear_kernel, _autotuned_kernel, m, n, args, flags, config)
    return out


def reference(
    a,
    weight,
    sample_scale,
    sample_offset,
    weight_scale,
    weight_offset,
    weight_sum,
    bias,
    rows_per_sample: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch ops (the CPU path; the tests' independent check of the kernel)."""
    check_operands(
        a, weight, sample_scale, sample_offset, weight_scale, weight_offset, weight_sum, bias, rows_per_sample
    )
    k = a.shape[1]
    wide = torch.float32 if k <= 1024 else torch.float64  # integer partial sums stay exact in either
    acc = (a.to(wide) @ weight.to(wide).t()).to(torch.int32)
    input_scale = sample_scale.repeat_interleave(rows_per_sample)[:, None]
    input_offset = sample_offset.to(torch.int32).repeat_interleave(rows_per_sample)[:, None]
    total = acc + input_offset * weight_sum.to(torch.int32)[None, :]
    if weight_offset is not None:
        a_sum = a.to(torch.int32).sum(dim=1, dtype=torch.int32)[:, None]
        total += weight_offset.to(torch.int32)[None, :] * (a_sum + k * input_offset)
    y = total.float() * input_scale * weight_scale[None, :]
    if bias is not None:
        y += bias.float()[None, :]
    return y.to(out_dtype)


@torch.library.custom_op("tqdit::int8_linear", mutates_args=())
def int8_linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    sample_scale: torch.Tensor,
    sample_offset: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_offset: torch.Tensor | None,
    weight_sum: torch.Tensor,
    bias: torch.Tensor | None,
    rows_per_sample: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(M, K) int8 input codes × (N, K) int8 weight codes → (M, N) ``out_dtype`` (see module docstring).

    ``sample_scale`` (float32) and ``sample_offset`` (int32, cx) hold one value per sample, row r
    belonging to sample r // ``rows_per_sample``; ``weight_scale`` (float32), ``weight_offset``
    (int32, cw; None where every cw is 0, as for symmetric weights) and ``weight_sum`` (int32, Σ_k w)
    one per output channel; ``bias`` (N,) or None.
    """
    if a.is_cuda and available():
        return launch(a, weight, sample_scale, sample_offset, weight_scale, weight_offset, weight_sum, bias,
                      rows_per_sample, out_dtype)
    return reference(a, weight, sample_scale, sample_offset, weight_scale, weight_offset, weight_sum, bias,
                     rows_per_sample, out_dtype)


@int8_linear.register_fake
def _(
    a,
    weight,
    sample_scale,
    sample_offset,
    weight_scale,
    weight_offset,
    weight_sum,
    bias,
    rows_per_sample,
    out_dtype,
):
    return a.new_empty(a.shape[0], weight.shape[0], dtype=out_dtype)
