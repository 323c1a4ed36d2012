"""Matmul throughput at DiT-XL/2's linear shapes: bf16 vs FP8 (e4m3) vs INT8, one run, one GPU.

    python benchmarks/gemm_8bit.py [--tokens 65536] [--out gemm.json]

Tokens = 2 × batch 128 (guidance) × 256 patches. For each layer shape (qkv, proj, fc1, fc2) on
random data:

- ``bf16``: ``torch.mm``;
- ``fp8_rowwise``: ``torch._scaled_mm`` with a (tokens, 1) × (1, out) scale pair (one scale per
  sample's row and per output channel, what :class:`tqdit.kernels.lowbit.Fp8Linear` needs);
  ``fp8_tensorwise_gemm_only`` with unit scalar scales (``fp8_tensorwise_bias`` with a bias too: the
  faster form, which would need one weight scale per tensor — docs/performance.md on its FID
  cost), and ``fp8_tensorwise_plus_scaling`` with the per-row and per-channel scales then applied
  to the bf16 output by one elementwise pass;
  ``fp8_rowwise_bias`` with a bf16 bias added in the GEMM's epilogue, and ``fp8_rowwise_plus_bias``
  with the bias added by a separate pass (what Fp8Linear does where the epilogue cannot);
  ``bf16_bias``: ``F.linear`` with a bias;
- ``int8_int_mm``: ``torch._int_mm`` (int32 out, no scales: PyTorch's own int8 GEMM);
- ``int8_tqdit``: :func:`tqdit.kernels.int8_gemm.int8_linear` as :class:`tqdit.kernels.lowbit.Int8Linear`
  calls it (per-sample input scale and offset, per-channel weight scale, bias, bf16 out, symmetric
  weights; autotuned tiling, reported) and ``int8_tqdit_asymmetric_weights`` (the Σa correction on).

At fc1's shape also fc1 → GELU → fc2's FP8 input (``fc1_gelu_to_fp8``): ``unfused`` is
``fp8_rowwise_bias`` followed by the compiled GELU + per-sample quantization kernel (what two
:class:`~tqdit.kernels.lowbit.Fp8Linear` compile to), ``fused`` is
:func:`tqdit.kernels.fp8_gemm.fp8_linear_gelu` (one kernel, autotuned; every tiling is timed too).

Each int8 and fused-FP8 result is checked against the same arithmetic in PyTorch ops. Median of
``triton.testing.do_bench``; TFLOP/s (TOP/s for int8) = 2·M·N·K / s. Results are written after
every layer (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tqdit.models.dit import gelu_tanh
from tqdit.kernels import fp8_gemm, int8_gemm
from tqdit.utils import atomic_write_json

SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--fc1-gelu-only", action="store_true", help="only the fc1 → GELU → FP8 comparison")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    from triton.testing import do_bench

    fp8 = torch.float8_e4m3fn
    m = args.tokens
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": m, "layers": {}}
    for name, (k, n) in {} if args.fc1_gelu_only else SHAPES.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, w8 = a.to(fp8), w.to(fp8)
        row = torch.rand(m, 1, device="cuda") + 0.5
        col = torch.rand(1, n, device="cuda") + 0.5
        one = torch.ones((), device="cuda")
        flops = 2 * m * n * k

        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)  # for every form that takes one

        def rowwise():
            return torch._scaled_mm(a8, w8.t(), scale_a=row, scale_b=col, out_dtype=torch.bfloat16)

        def rowwise_bias():
            return torch._scaled_mm(a8, w8.t(), scale_a=row, scale_b=col, bias=bias, out_dtype=torch.bfloat16)

        def tensorwise():
            out = torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            return (out * row * col).to(torch.bfloat16)

        a_int = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
        w_int = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
        samples = m // 256  # per-sample (time-group) input parameters, 256 tokens each
        int8_args = dict(a=a_int, weight=w_int, sample_scale=torch.rand(samples, device="cuda") * 1e-3 + 1e-4,
                         sample_offset=torch.randint(-127, 129, (samples,), device="cuda", dtype=torch.int32),
                         weight_scale=torch.rand(n, device="cuda") * 1e-3 + 1e-4, weight_offset=None,
                         weight_sum=w_int.to(torch.int32).sum(dim=1, dtype=torch.int32),
                         bias=bias, rows_per_sample=256, out_dtype=torch.bfloat16)
        asymmetric = dict(
            int8_args, weight_offset=torch.randint(-127, 129, (n,), device="cuda", dtype=torch.int32)
        )

        runs = {
            "bf16": lambda: a @ w.t(),
            "bf16_bias": lambda: torch.nn.functional.linear(a, w, bias),
            "fp8_rowwise": rowwise,
            "fp8_rowwise_bias": rowwise_bias,
            "fp8_rowwise_plus_bias": lambda: rowwise() + bias,
            "fp8_tensorwise_plus_scaling": tensorwise,
            "fp8_tensorwise_bias": lambda: torch._scaled_mm(
                a8, w8.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.bfloat16
            ),
            "fp8_tensorwise_gemm_only": lambda: torch._scaled_mm(
                a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
            ),
            "int8_int_mm": lambda: torch._int_mm(a_int, w_int.t()),
            "int8_tqdit": lambda: torch.ops.tqdit.int8_linear(**int8_args),
            "int8_tqdit_asymmetric_weights": lambda: torch.ops.tqdit.int8_linear(**asymmetric),
        }
        torch.testing.assert_close(rowwise(), tensorwise(), rtol=2e-2, atol=1e-1)
        torch.testing.assert_close(rowwise_bias(), rowwise() + bias, rtol=2e-2, atol=1e-1)
        layer = {"int8_vs_reference": {}}
        for label, ops in (("symmetric", int8_args), ("asymmetric", asymmetric)):
            ours, ref = torch.ops.tqdit.int8_linear(**ops).float(), int8_gemm.reference(**ops).float()
            # max difference over the largest value; bf16 outputs round at ~4e-3 relative
            layer["int8_vs_reference"][label] = (ours - ref).abs().max().item() / ref.abs().max().item()
        for label, fn in runs.items():
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            layer[label] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        # the autotuner's choice per (N, K, weight offsets)
        layer["int8_tqdit_config"] = {
            str(key): str(config)
            for key, config in getattr(int8_gemm._autotuned_kernel, "cache", {}).items()
            if key[:2] == (n, k)
        }
        results["layers"][name] = layer
        print(
            name,
            {label: v["tflops"] for label, v in layer.items() if isinstance(v, dict) and "tflops" in v},
            layer["int8_vs_reference"],
            layer["int8_tqdit_config"],
            flush=True,
        )
        if args.out:
            atomic_write_json(args.out, results)
    results["fc1_gelu_to_fp8"] = fc1_gelu_to_fp8(m, do_bench)
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_json(args.out, results)


def fc1_gelu_to_fp8(m: int, do_bench) -> dict:
    """fc1's GEMM, GELU and fc2's input quantization: cuBLAS + a compiled kernel against one fused kernel."""
    k, n = SHAPES["fc1"]
    samples = m // 256
    g = torch.Generator(device="cuda").manual_seed(0)
    ops = dict(a=(torch.randn(m, k, device="cuda", generator=g) * 40).to(fp8_gemm.FP8),
               weight=(torch.randn(n, k, device="cuda", generator=g) * 40).to(fp8_gemm.FP8),
               input_scale=torch.rand(samples, device="cuda", generator=g) * 2e-3 + 1e-3,
               weight_scale=torch.rand(n, device="cuda", generator=g) * 2e-3 + 1e-3,
               bias=torch.randn(n, device="cuda", generator=g).to(torch.bfloat16),
               out_inv_scale=torch.rand(samples, device="cuda", generator=g) * 100 + 50)
    row_scale = ops["input_scale"].repeat_interleave(256)[:, None].contiguous()

    @torch.compile
    def gelu_to_fp8(h: torch.Tensor) -> torch.Tensor:
        per_sample = gelu_tanh(h.reshape(samples, 256, n)).float() * ops["out_inv_scale"].reshape(
            samples, 1, 1
        )
        return per_sample.clamp(-fp8_gemm.FP8_MAX, fp8_gemm.FP8_MAX).to(fp8_gemm.FP8).reshape(m, n)

    def unfused():
        h = torch._scaled_mm(
            ops["a"],
            ops["weight"].t(),
            scale_a=row_scale,
            scale_b=ops["weight_scale"][None, :],
            bias=ops["bias"],
            out_dtype=torch.bfloat16,
        )
        return gelu_to_fp8(h)

    def fused(config=None):
        if config is None:
            return torch.ops.tqdit.fp8_linear_gelu(**ops, rows_per_sample=256, model_dtype=torch.bfloat16)
        return fp8_gemm.launch(**ops, rows_per_sample=256, model_dtype=torch.bfloat16, config=config)

    reference = fp8_gemm.reference(**ops, rows_per_sample=256, model_dtype=torch.bfloat16).float()
    result = {}
    for label, codes in (("fused", fused()), ("unfused", unfused())):
        differ = codes.float() != reference
        result[f"{label}_codes_differing_from_reference"] = differ.float().mean().item()
        result[f"{label}_max_relative_difference"] = (
            ((codes.float() - reference).abs() / reference.abs().clamp(min=2**-6)).max().item()
        )
    flops = 2 * m * n * k
    for label, fn in (("unfused", unfused), ("fused", fused)):
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        result[label] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
    result["fused_config"] = {
        str(key): str(config) for key, config in getattr(fp8_gemm._autotuned_kernel, "cache", {}).items()
    }
    result["fused_per_config_ms"] = {
        str(c): round(do_bench(lambda c=c: fused(c), warmup=10, rep=100, return_mode="median"), 4)
        for c in fp8_gemm.GPU_CONFIGS
    }
    print("fc1_gelu_to_fp8", result, flush=True)
    return result


if __name__ == "__main__":
    main()
