"""Sampling cost of fake quantization vs full precision on DiT-XL/2 shapes, eager and compiled, one run.

    python benchmarks/fake_quant_speed.py [--batch 128] [--steps 20] [--groups 10] [--bits 8] [--out speed.json]

DiT-XL/2 256 with N(0, 0.02) random weights in bf16 on one GPU; DDPM over ``--steps`` respaced steps
with guidance 1.5 (the model sees 2 × batch inputs). TQ-DiT (mrq_tgq) W8A8 with G time groups is
calibrated on a small capture with the minmax rule (the sampling cost does not depend on how the
scales were chosen). Four runs, in this order: FP eager, FP ``torch.compile``, fake-quant eager,
fake-quant compiled (after :func:`tqdit.quant.layers.prepare_for_compile`), then the real W8A8 path
(:func:`tqdit.quant.lowbit.to_low_bit`: FP8 matmuls, int8 weights) eager and compiled. Each: one warm-up loop
(compilation), then the median of ``--repeats`` timed loops; image-steps/s = batch × steps / s.
The compiled fake-quant samples are compared with the eager ones (same noise) to show the compiled
path computes the same thing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import PerSampleNoise, create_diffusion, guided_model, sample_loop
from tqdit.models import build_dit
from tqdit.quant import METHODS, QuantConfig, SearchConfig
from tqdit.quant.layers import prepare_for_compile
from tqdit.quant.lowbit import to_low_bit, weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_dit("DiT-XL/2", input_size=32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    diffusion = create_diffusion(args.steps)
    labels = torch.arange(args.batch, device=device) % 1000
    indices = torch.arange(args.batch).numpy()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "steps": args.steps,
               "groups": args.groups, "bits": args.bits, "runs": {}}

    def sample(net) -> torch.Tensor:
        noise = PerSampleNoise(0, indices, (4, 32, 32), device)
        with torch.no_grad():
            return sample_loop(guided_model(net, labels, 1.5, 3), diffusion, noise, model_dtype=torch.bfloat16)

    def timed(name: str, net) -> torch.Tensor:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = sample(net)  # warm-up (compiles)
        torch.cuda.synchronize()
        warmup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = sample(net)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        results["runs"][name] = {"seconds": round(seconds, 3), "image_steps_per_s": round(args.batch * args.steps / seconds, 1),
                                 "warmup_s": round(warmup, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(name, results["runs"][name], flush=True)
        return out

    fp = model.to(device=device, dtype=torch.bfloat16).eval()
    # one forward pass on fixed inputs (mixed timesteps), to compare compiled with eager without the
    # amplification of many sampling steps through a random network
    probe = (torch.randn(32, 4, 32, 32, device=device, dtype=torch.bfloat16), torch.randint(0, 1000, (32,), device=device),
             torch.arange(32, device=device) % 1000)

    def forward(net) -> torch.Tensor:
        with torch.no_grad():
            return net(*probe).float()

    def relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
        return round(((a - b).norm() / scale.norm()).item(), 5)

    fp_out = forward(fp)
    fp_weight_bytes = weight_bytes(fp)
    fp_samples = timed("fp_eager", fp)
    # Module.compile() compiles in place, so forward_with_cfg's self(...) runs compiled, as in the job
    # (a torch.compile(model) wrapper would be bypassed by forward_with_cfg)
    compiled_fp = copy.deepcopy(fp)
    compiled_fp.compile()
    fp_compiled_samples = timed("fp_compiled", compiled_fp)
    results["fp_compiled_vs_eager"] = {"forward_relative_diff": relative(forward(compiled_fp), fp_out, fp_out),
                                      "samples_relative_diff": relative(fp_compiled_samples.float(), fp_samples.float(), fp_samples.float())}
    del compiled_fp
    torch._dynamo.reset()

    calib_diffusion = create_diffusion(250)
    calib = capture(fp, calib_diffusion, CalibrationSpec(num_samples=4, cfg_scale=1.5, cfg_channels=3))
    cfg = QuantConfig(w_bits=args.bits, a_bits=args.bits, time_groups=args.groups, num_inputs=64,
                      search=SearchConfig(criterion="minmax", batch=32))
    quantized, cost = METHODS["mrq_tgq"](fp, calib, cfg)
    results["calibration_s"] = cost["calibration_s"]
    # (groups were assigned on the 250-step schedule; the --steps timesteps map to the nearest ones)
    eager = timed("fake_quant_eager", quantized)
    q_out = forward(quantized)
    prepare_for_compile(quantized).compile()
    same = timed("fake_quant_compiled", quantized)
    # the compiled fake quantization vs the eager one, in units of what quantization itself changes
    results["fake_quant_compiled_vs_eager"] = {
        "forward_diff_over_quantization_error": relative(forward(quantized), q_out, q_out - fp_out),
        "forward_quantization_error_relative": relative(q_out, fp_out, fp_out),
        "samples_relative_diff": relative(same.float(), eager.float(), eager.float()),
        "samples_quantized_vs_fp_relative": relative(eager.float(), fp_samples.float(), fp_samples.float()),
    }
    # real W8A8: FP8 tensor-core matmuls where the input quantizer is uniform, int8 weights elsewhere
    quantized._compiled_call_impl = None  # back to eager before swapping modules (Module.compile is in place)
    torch._dynamo.reset()
    results["lowbit"] = to_low_bit(quantized)
    results["weight_bytes"] = {"fp_bf16": fp_weight_bytes, "w8a8_lowbit": weight_bytes(quantized),
                               "ratio": round(fp_weight_bytes / weight_bytes(quantized), 2)}
    real_eager = timed("fp8_eager", quantized)
    fp8_out = forward(quantized)
    quantized.compile()
    timed("fp8_compiled", quantized)
    results["fp8_vs_fake_quant_eager"] = {
        "forward_diff_over_quantization_error": relative(fp8_out, q_out, q_out - fp_out),
        "forward_fp8_error_relative_to_fp": relative(fp8_out, fp_out, fp_out),
        "samples_relative_diff": relative(real_eager.float(), eager.float(), eager.float()),
    }
    runs = results["runs"]
    results["ratios"] = {
        "fake_quant_eager_over_fp_eager": round(runs["fp_eager"]["image_steps_per_s"] / runs["fake_quant_eager"]["image_steps_per_s"], 2),
        "fake_quant_compiled_over_fp_compiled": round(runs["fp_compiled"]["image_steps_per_s"] / runs["fake_quant_compiled"]["image_steps_per_s"], 2),
        "fake_quant_compiled_over_fp_eager": round(runs["fp_eager"]["image_steps_per_s"] / runs["fake_quant_compiled"]["image_steps_per_s"], 2),
        "fp8_compiled_speedup_over_fp_compiled": round(runs["fp8_compiled"]["image_steps_per_s"] / runs["fp_compiled"]["image_steps_per_s"], 2),
        "fp8_compiled_speedup_over_fp_eager": round(runs["fp8_compiled"]["image_steps_per_s"] / runs["fp_eager"]["image_steps_per_s"], 2),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
