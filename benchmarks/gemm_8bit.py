"""Matmul throughput at DiT-XL/2's linear shapes: bf16 vs FP8 (e4m3) with row-wise or tensor-wise scales.

    python benchmarks/fp8_gemm.py [--tokens 65536] [--out gemm.json]

Tokens = 2 × batch 128 (guidance) × 256 patches. For each layer shape (qkv, proj, fc1, fc2) on
random data: ``torch.mm`` in bf16; ``torch._scaled_mm`` with a (tokens, 1) × (1, out) scale pair
(row-wise: one scale per sample's row and per output channel, what :class:`tqdit.quant.lowbit.Fp8Linear`
needs); and with unit scalar scales (tensor-wise), the per-row and per-channel scales then applied to
the bf16 output by one elementwise pass. Median of ``triton.testing.do_bench``; TFLOP/s = 2·M·N·K / s.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tqdit.utils import atomic_write_json

SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    from triton.testing import do_bench

    fp8 = torch.float8_e4m3fn
    m = args.tokens
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": m, "layers": {}}
    for name, (k, n) in SHAPES.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, w8 = a.to(fp8), w.to(fp8)
        row = torch.rand(m, 1, device="cuda") + 0.5
        col = torch.rand(1, n, device="cuda") + 0.5
        one = torch.ones((), device="cuda")
        flops = 2 * m * n * k

        def rowwise():
            return torch._scaled_mm(a8, w8.t(), scale_a=row, scale_b=col, out_dtype=torch.bfloat16)

        def tensorwise():
            out = torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            return (out * row * col).to(torch.bfloat16)

        runs = {"bf16": lambda: a @ w.t(), "fp8_rowwise": rowwise, "fp8_tensorwise_plus_scaling": tensorwise,
                "fp8_tensorwise_gemm_only": lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)}
        torch.testing.assert_close(rowwise(), tensorwise(), rtol=2e-2, atol=1e-1)
        layer = {}
        for label, fn in runs.items():
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            layer[label] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        results["layers"][name] = layer
        print(name, {label: v["tflops"] for label, v in layer.items()}, flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
