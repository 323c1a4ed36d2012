"""Quantized attention alone at DiT-XL/2 shapes: FP SDPA vs the explicit fake-quantized path vs the
fused Triton kernel (tqdit/kernels/fused_attention.py) at several tile configurations, and the kernel
with its operands left unquantized (where its time goes).

    python benchmarks/fused_attention_speed.py [--batch 256] [--out attention.json]

One DiT-XL/2 attention (16 heads × 72 dims, 256 tokens, bf16) on ``--batch`` inputs (2 × 128 with
guidance); q, k, v are the strided views of the qkv projection's output, as in the model. TQ-DiT's
quantizers (uniform q, k, v; post-softmax MRQ) with 10 time groups, the batch spread over them
(and, for ``*_one_step``, the whole batch at one step, as while sampling). Median times from
``triton.testing.do_bench``. The explicit path is timed eager and compiled.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from tqdit.models.dit import Attention
from tqdit.kernels import fused_attention
from tqdit.quant.layers import QuantMatMul
from tqdit.quant.quantizers import SoftmaxMRQ, TimeGroupContext, UniformQuantizer
from tqdit.utils import atomic_write_json

CONFIGS = [  # the fastest four of an earlier sweep of nine tilings
    {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 1},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 1},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1},
    {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    from triton.testing import do_bench

    torch.manual_seed(0)
    heads, dim, tokens, groups = 16, 1152, 256, 10
    context = TimeGroupContext(torch.arange(1000) * groups // 1000)
    context.tensor_only = True
    attn = Attention(dim, heads).cuda().to(torch.bfloat16)

    def uniform(bound: float) -> UniformQuantizer:
        quantizer = UniformQuantizer(8, symmetric=True, groups=groups, context=context).cuda()
        quantizer.set_range(-bound * torch.ones(groups, 1), bound * torch.ones(groups, 1))
        return quantizer

    post_softmax = SoftmaxMRQ(8, groups=groups, context=context).cuda()
    post_softmax.set_split(torch.arange(groups) % 6 + 2)
    attn.qk_matmul = QuantMatMul(uniform(1.0), uniform(3.0))
    attn.av_matmul = QuantMatMul(post_softmax, uniform(3.0))
    attn.fused = False
    qkv = torch.randn(args.batch, tokens, 3, heads, dim // heads, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    context.set_timesteps(torch.randint(0, 1000, (args.batch,), device="cuda"))

    def explicit():
        return attn.av_matmul((attn.qk_matmul(q * attn.scale, k.transpose(-2, -1))).softmax(dim=-1), v)

    def fused():
        return fused_attention.fused_quantized_attention(attn, q, k, v)

    results = {"gpu": torch.cuda.get_device_name(), "batch": args.batch, "ms": {}}

    def bench(name, fn):
        with torch.no_grad():
            results["ms"][name] = round(do_bench(fn, warmup=25, rep=200, return_mode="median"), 4)
        print(name, results["ms"][name], flush=True)

    with torch.no_grad():
        reference = explicit().float()
        quantization_error = (reference - F.scaled_dot_product_attention(q, k, v).float()).norm()
    bench("sdpa_fp", lambda: F.scaled_dot_product_attention(q, k, v))
    bench("explicit_eager", explicit)
    bench("explicit_compiled", torch.compile(explicit))
    # while sampling, every sample shares one step: the eager explicit path then uses scalar parameters
    context.tensor_only = False
    context.set_timesteps(torch.full((args.batch,), 500, device="cuda"))
    bench("explicit_eager_one_step", explicit)
    bench("fused_one_step", fused)
    context.tensor_only = True
    context.set_timesteps(torch.randint(0, 1000, (args.batch,), device="cuda"))
    # where the kernel's time goes, at the default tiling: the same kernel with operands left unquantized
    params, modes, qkv_range, p_range = fused_attention.kernel_arguments(attn, args.batch, q.device)
    for name, variant in [
        ("fused_no_qkv_quantization", [0, 0, 0, modes[3]]),
        ("fused_no_quantization", [0, 0, 0, 0]),
    ]:
        bench(
            name,
            lambda: torch.ops.tqdit.quant_attention(q, k, v, params, attn.scale, variant, qkv_range, p_range),
        )
    results["configs"] = []
    for config in CONFIGS:
        fused_attention.KERNEL_CONFIG.update(config)
        name = "fused_{block_m}x{block_n}_w{num_warps}_s{num_stages}".format(**config)
        try:
            with torch.no_grad():
                diff = ((fused().float() - reference).norm() / quantization_error).item()
            bench(name, fused)
            results["configs"].append(
                {**config, "ms": results["ms"][name], "diff_over_quantization_error": round(diff, 4)}
            )
        except Exception as error:  # a configuration that does not fit (shared memory, registers)
            print(name, "failed:", str(error).splitlines()[0][:200], flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
