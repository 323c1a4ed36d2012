"""fc1 → GELU → fc2's FP8 input in one kernel: an FP8 GEMM whose epilogue writes the next layer's codes.

In a DiT block's MLP under real FP8 (:class:`tqdit.kernels.lowbit.Fp8Mlp`) both linears run on FP8
tensor cores. Unfused, fc1's GEMM writes its (tokens, 4·hidden) output in bf16, and one more kernel
reads it back to apply GELU and round it onto fc2's input scale: per DiT-XL/2 block at 65,536 tokens
a 1.2 GB round trip, the largest activation of the model. Here fc1's GEMM does all of it from the
accumulator:

    h[r, o]    = bf16(Σ_k a[r, k]·w[o, k] · sa[s] · sw[o] + b[o])      (s: row r's sample)
    g[r, o]    = model(½h·(1 + tanh u)),  u = √(2/π)·(h + 0.044715·h³)  (GELU(tanh))
    out[r, o]  = e4m3(clamp(g · (1/sb[s]), ±448))                       (fc2's per-sample input scale)

with ``a``, ``w`` the e4m3 codes of fc1's input and weight, ``sa`` each sample's input scale (its time
group's), ``sw`` the per-output-channel weight scale and ``sb`` fc2's input scale. The roundings are
those of the unfused path: :class:`~tqdit.kernels.lowbit.Fp8Linear`'s GEMM returns bf16, and GELU
rounds to the model dtype (``model``: bf16 or fp16, none for float32), so the fused kernel computes
the same function up to how the GEMM accumulates (Hopper's FP8 MMA keeps partial sums at reduced
precision, cuBLAS's and this kernel's alike) and GELU's float32 arithmetic: on the GPU the kernel
takes the hardware's approximate tanh (:func:`_gelu_tanh`).

On CUDA, :func:`fp8_linear_gelu` runs a Triton kernel: persistent (one program per SM walking the
output tiles), operands loaded by TMA, FP8 tensor-core MMA, autotuned over a few tilings. Elsewhere
the same arithmetic in PyTorch ops (:func:`reference`, also the tests' check of the kernel, which
they run on the CPU under Triton's interpreter through :func:`launch`). Measured speed:
docs/performance.md.
"""

from __future__ import annotations

import torch

from tqdit.kernels import triton_gemm

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# The model dtype's rounding of GELU's output, as a kernel constant.
ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Tilings of the persistent kernel tried on the GPU for each (N, K); FP8 MMA wants K tiles of ≥ 32.
# Measured at fc1's shape (65,536 × 4608 × 1152, H200, with the hardware tanh): 128 × 256 × 128 0.794
# ms, 128 × 256 × 64 0.835, 128 × 128 × 128 (8 warps) 0.890; with 4 warps (not kept) 0.990.
GPU_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
]
# Small tiles and 3 programs, so the CPU tests walk several tiles per program and partial tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1)
INTERPRETER_PROGRAMS = 3


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _round_to_bf16(x):
        """float32 → nearest bf16 (ties to even), kept in float32. Written on the bits: the GPU's
        conversion gives the same, but Triton's interpreter (the CPU tests) truncates instead."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_model_dtype(x, ROUND: tl.constexpr):
        if ROUND == 1:
            x = _round_to_bf16(x)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _gelu_tanh(h, HARDWARE_TANH: tl.constexpr):
        """GELU(tanh) of float32 ``h``, the epilogue's arithmetic and so what it costs over a plain GEMM.
        On the GPU ½h·(1 + tanh u) with the hardware's approximate tanh (PTX tanh.approx.f32, one
        special-function instruction per value): 8–10 % faster than h·σ(2u) with an exponential and an
        approximate division (two), and 0.03 % of fc1's output codes differ between the two (H200,
        docs/performance.md). Triton's interpreter cannot run PTX, so the CPU tests take the σ form.
        Literals, not tqdit.models.dit.SQRT_8_OVER_PI: compiled kernels may read only constexpr
        globals, which Triton's interpreter in turn cannot multiply with a tensor."""
        if HARDWARE_TANH:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # √(2/π)·(h + 0.044715·h³)
            tanh_u = tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1
            )
            half = 0.5 * h
            return half + half * tanh_u
        else:
            two_u = 1.5957691216057308 * (h + 0.044715 * h * h * h)
            return tl.fdiv(h, 1.0 + tl.exp(-two_u), ieee_rounding=False)

    @triton.jit
    def _fp8_linear_gelu_kernel(
        a_desc, w_desc, out_desc, InputScale, WeightScale, Bias, OutInvScale, M, N, K, rows_per_sample,
        HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, HARDWARE_TANH: tl.constexpr, OUT_FP8: tl.constexpr,
        PROGRAMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Persistent: at most PROGRAMS programs (one per SM) step through the output tiles. Flattening
        # the two loops lets the compiler's pipeline load the next tile's operands (TMA, into shared
        # memory) while this tile's epilogue runs: 0.79 against 0.86 ms at fc1's shape with one
        # program per tile (docs/performance.md). TMA reads past the edges as zeros and clips stores.
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
            first_row, first_col = triton_gemm.tile_offsets(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k_tile in range(k_tiles):
                a = a_desc.load([first_row, k_tile * BLOCK_K])
                w = w_desc.load([first_col, k_tile * BLOCK_K])
                acc = tl.dot(a, w.T, acc)

            rows, cols = first_row + tl.arange(0, BLOCK_M), first_col + tl.arange(0, BLOCK_N)
            row_ok, col_ok = rows < M, cols < N
            sample = rows // rows_per_sample
            input_scale = tl.load(InputScale + sample, mask=row_ok, other=0.0)
            out_inv_scale = tl.load(OutInvScale + sample, mask=row_ok, other=0.0)
            weight_scale = tl.load(WeightScale + cols, mask=col_ok, other=0.0)
            h = acc * input_scale[:, None] * weight_scale[None, :]
            if HAS_BIAS:
                h += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            h = _round_to_bf16(h)  # Fp8Linear's GEMM returns bf16
            gelu = _round_to_model_dtype(_gelu_tanh(h, HARDWARE_TANH), ROUND)
            scaled = tl.minimum(tl.maximum(gelu * out_inv_scale[:, None], -448.0), 448.0)  # FP8_MAX
            if OUT_FP8:
                out_desc.store([first_row, first_col], scaled.to(tl.float8e4nv))
            else:
                out_desc.store([first_row, first_col], scaled)

    def _set_block_shapes(arguments: dict) -> None:
        """Give the tensor descriptors the block shapes of the tiling about to run."""
        arguments["a_desc"].block_shape = [arguments["BLOCK_M"], arguments["BLOCK_K"]]
        arguments["w_desc"].block_shape = [arguments["BLOCK_N"], arguments["BLOCK_K"]]
        arguments["out_desc"].block_shape = [arguments["BLOCK_M"], arguments["BLOCK_N"]]

    _autotuned_kernel = triton_gemm.autotuned(
        _fp8_linear_gelu_kernel, GPU_CONFIGS, key=["N", "K", "HAS_BIAS", "ROUND"], pre_hook=_set_block_shapes
    )


def check_operands(
    a, weight, input_scale, weight_scale, bias, out_inv_scale, rows_per_sample: int, model_dtype
) -> None:
    """Shapes and dtypes the kernel relies on (it reads memory by them), else a ValueError naming the
    mismatch."""
    m, k = a.shape
    n = weight.shape[0]
    problems = []
    if a.dtype != FP8 or weight.dtype != FP8:
        problems.append(f"input and weight must be {FP8}, got {a.dtype} and {weight.dtype}")
    if weight.shape[1] != k:
        problems.append(f"input has K={k} but the weight {tuple(weight.shape)}")
    if k % 16 or n % 16:
        problems.append(
            f"K={k} and N={n} must be multiples of 16 (the rows the kernel's TMA reads and writes "
            "must start 16-byte aligned, as for cuBLAS's FP8 GEMM)"
        )
    samples = m // max(rows_per_sample, 1)
    if (
        rows_per_sample < 1
        or m % rows_per_sample
        or input_scale.shape != (samples,)
        or out_inv_scale.shape != (samples,)
    ):
        problems.append(
            f"per-sample scales {tuple(input_scale.shape)}/{tuple(out_inv_scale.shape)} "
            f"do not give one value per {rows_per_sample} of the {m} rows"
        )
    if weight_scale.shape != (n,) or (bias is not None and bias.shape != (n,)):
        problems.append(f"per-channel weight scale and bias must each be ({n},)")
    if model_dtype not in ROUNDING:
        problems.append(f"model dtype {model_dtype} is not one of {', '.join(map(str, ROUNDING))}")
    if problems:
        raise ValueError("fp8_linear_gelu: " + "; ".join(problems))


def launch(
    a,
    weight,
    input_scale,
    weight_scale,
    bias,
    out_inv_scale,
    rows_per_sample: int,
    model_dtype: torch.dtype,
    out_dtype: torch.dtype = FP8,
    config: dict | None = None,
) -> torch.Tensor:
    """Run the Triton kernel, autotuned where ``config`` is None, else with that one tiling (e.g.
    :data:`INTERPRETER_CONFIG`): one program per SM on the GPU, :data:`INTERPRETER_PROGRAMS` on the CPU.

    ``out_dtype`` other than FP8 (float32) stores the clamped, scaled values before the e4m3
    rounding: the CPU tests use it, because Triton 3.8's interpreter rounds some values to the wrong
    e4m3 code (7.96 → 4, where the GPU's conversion instruction gives 8).
    """
    check_operands(a, weight, input_scale, weight_scale, bias, out_inv_scale, rows_per_sample, model_dtype)
    a, weight = (aligned(t) for t in (a, weight))  # TMA reads rows of unit stride from 16-byte boundaries
    m, k = a.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    programs = (
        torch.cuda.get_device_properties(a.device).multi_processor_count
        if a.is_cuda
        else INTERPRETER_PROGRAMS
    )
    descriptors = [
        TensorDescriptor.from_tensor(t, [1, 1]) for t in (a, weight, out)
    ]  # block shapes: _set_block_shapes
    args = (*descriptors, input_scale, weight_scale, weight_scale if bias is None else bias, out_inv_scale,
            m, n, k, rows_per_sample)
    flags = dict(HAS_BIAS=bias is not None, ROUND=ROUNDING[model_dtype], HARDWARE_TANH=a.is_cuda,
                 OUT_FP8=out_dtype == FP8, PROGRAMS=programs)
    if config is not None:
        _set_block_shapes(dict(zip(("a_desc", "w_desc", "out_desc"), descriptors), **config))
    triton_gemm.run(
        _fp8_linear_gelu_kernel, _autotuned_kernel, m, n, args, flags, config, max_programs=programs
    )
    return out


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 16-byte boundary (a copy only where it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def reference(
    a,
    weight,
    input_scale,
    weight_scale,
    bias,
    out_inv_scale,
    rows_per_sample: int,
    model_dtype: torch.dtype,
    out_dtype: torch.dtype = FP8,
) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch ops (the CPU path; the tests' independent check of the kernel)."""
    check_operands(a, weight, input_scale, weight_scale, bias, out_inv_scale, rows_per_sample, model_dtype)
    acc = a.float() @ weight.float().t()  # e4m3 × e4m3 products are exact in float32
    h = acc * input_scale.float().repeat_interleave(rows_per_sample)[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        h = h + bias.float()[None, :]
    h = h.to(torch.bfloat16).float()
    gelu = torch.nn.functional.gelu(h, approximate="tanh").to(model_dtype).float()
    scaled = (gelu * out_inv_scale.float().repeat_interleave(rows_per_sample)[:, None]).clamp(
        -FP8_MAX, FP8_MAX
    )
    return scaled.to(out_dtype)


@torch.library.custom_op("tqdit::fp8_linear_gelu", mutates_args=())
def fp8_linear_gelu(
    a: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_inv_scale: torch.Tensor,
    rows_per_sample: int,
    model_dtype: torch.dtype,
) -> torch.Tensor:
    """(M, K) e4m3 input × (N, K) e4m3 weight → (M, N) e4m3 codes of GELU(linear) on the next scale.

    ``input_scale`` and ``out_inv_scale`` (float32) hold one value per sample, row r belonging to
    sample r // ``rows_per_sample``; ``weight_scale`` (float32) and ``bias`` (N,) one per output
    channel; ``model_dtype`` is the dtype whose rounding the unfused layers would apply (module docstring).
    """
    if a.is_cuda and available():
        return launch(a, weight, input_scale, weight_scale, bias, out_inv_scale, rows_per_sample, model_dtype)
    return reference(a, weight, input_scale, weight_scale, bias, out_inv_scale, rows_per_sample, model_dtype)


@fp8_linear_gelu.register_fake
def _(a, weight, input_scale, weight_scale, bias, out_inv_scale, rows_per_sample, model_dtype):
    return a.new_empty(a.shape[0], weight.shape[0], dtype=FP8)
