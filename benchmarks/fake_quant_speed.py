"""Sampling cost of fake and real quantization vs full precision on DiT-XL/2 shapes, one run, one GPU.

    python benchmarks/fake_quant_speed.py [--batch 128] [--steps 20] [--groups 10] [--bits 8]
        [--skip RUN ...] [--profile DIR] [--out speed.json]

DiT-XL/2 256 with N(0, 0.02) random weights in bf16; DDPM over ``--steps`` respaced steps with
guidance 1.5 (the model sees 2 × batch inputs). Quantized models are calibrated on a small capture
with the minmax rule (the sampling cost does not depend on how the scales were chosen). Runs, in
this order (``--skip`` drops any):

- ``fp_eager``, ``fp_compiled``: the bf16 model, eager and ``torch.compile``;
- ``fake_quant_eager``, ``fake_quant_compiled``: TQ-DiT (mrq_tgq) W8A8 fake quantization with the
  explicit attention (score matrix materialised), compiled after ``prepare_for_compile``;
- ``fake_quant_fused_eager``, ``fake_quant_fused_compiled``: the same with the quantized attention
  in one Triton kernel (:mod:`tqdit.kernels.fused_attention`, what jobs use eagerly on CUDA);
- ``int8_compiled``, ``fp8_compiled``: real W8A8 of that TQ-DiT model
  (:func:`tqdit.kernels.lowbit.to_low_bit`: integer or FP8 matmuls where the input quantizer is
  uniform; fc2 behind the post-GELU MRQ keeps a simulated input, an int8-stored weight and a bf16
  matmul), compiled, with the explicit attention (what ``quant.attention=auto`` takes when
  compiled: inductor's kernels for it are the fastest measured);
- ``int8_tgq_compiled``, ``fp8_tgq_compiled``: real W8A8 of TGQ alone (uniform quantizers with time
  groups, no MRQ), where every linear of the blocks runs in 8 bits — the real speed when no operand
  lacks a fast kernel;
- ``fake_quant_tgq_linears_compiled``, ``int8_tgq_linears_compiled``, ``fp8_tgq_linears_compiled``:
  TGQ W8A8 with ``scope="linears"`` (every Linear of the blocks quantized, the attention matmuls
  left in bf16, so attention keeps PyTorch's fused SDPA kernel) — what real 8-bit GEMMs buy when
  the attention is not quantized;
- each ``fp8_tgq*`` run also as ``fp8_tgq*_unfused``: the same with ``to_low_bit(fuse_mlp=False)``, fc1 and
  fc2 as two :class:`~tqdit.kernels.lowbit.Fp8Linear` instead of one
  :class:`~tqdit.kernels.lowbit.Fp8Mlp` (whose fc1 GEMM writes fc2's FP8 input).

Each: one warm-up loop (compilation), then the median of ``--repeats`` timed loops; image-steps/s =
batch × steps / s. Numerics are compared on one forward pass with mixed timesteps, relative to the
size of the W8A8 quantization error itself (and, for the real low-bit runs, on one with a single
timestep, as every sampling call has). Results are written after every run (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import PerSampleNoise, create_diffusion, guided_model, sample_loop
from tqdit.models import build_dit
from tqdit.quant.methods import config_from_settings, quantize
from tqdit.quant.search import SearchConfig
from tqdit.kernels import fused_attention
from tqdit.kernels.fused_attention import use_fused_attention
from tqdit.quant.layers import prepare_for_compile
from tqdit.kernels.lowbit import to_low_bit, weight_bytes
from tqdit.utils import atomic_write_json

RUNS = [
    "fp_eager",
    "fp_compiled",
    "fake_quant_eager",
    "fake_quant_compiled",
    "fake_quant_fused_eager",
    "fake_quant_fused_compiled",
    "int8_compiled",
    "fp8_compiled",
    "int8_tgq_compiled",
    "fp8_tgq_compiled",
    "fp8_tgq_unfused_compiled",
    "fake_quant_tgq_linears_compiled",
    "int8_tgq_linears_compiled",
    "fp8_tgq_linears_compiled",
    "fp8_tgq_linears_unfused_compiled",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=RUNS, help="runs to leave out")
    parser.add_argument(
        "--profile", help="a folder: each compiled run's CUDA kernel times for one model call"
    )
    parser.add_argument(
        "--attention-config", help="fused_attention_speed.py's output: use its fastest kernel configuration"
    )
    parser.add_argument("--out")
    parser.add_argument(
        "--arch",
        default="DiT-XL/2",
        help="a smaller DiT (e.g. DiT-S/8) with --device cpu checks the script itself",
    )
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --device cpu --arch DiT-S/8 to check the script)")
    os.environ.setdefault("TQDM_DISABLE", "1")  # calibration progress bars would bury the results
    if args.attention_config:
        with open(args.attention_config) as handle:
            fastest = min(json.load(handle)["configs"], key=lambda c: c["ms"])
        fused_attention.KERNEL_CONFIG.update({key: fastest[key] for key in fused_attention.KERNEL_CONFIG})
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = build_dit(args.arch, input_size=32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    diffusion = create_diffusion(args.steps)
    labels = torch.arange(args.batch, device=device) % 1000
    indices = torch.arange(args.batch).numpy()
    results = {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "arch": args.arch,
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
        "groups": args.groups,
        "bits": args.bits,
        "attention_kernel": dict(fused_attention.KERNEL_CONFIG),
        "runs": {},
        "numerics": {},
    }

    def save() -> None:
        if args.out:
            atomic_write_json(args.out, results)

    def sample(net) -> torch.Tensor:
        noise = PerSampleNoise(0, indices, (4, 32, 32), device)
        with torch.no_grad():
            return sample_loop(
                guided_model(net, labels, 1.5, 3), diffusion, noise, model_dtype=torch.bfloat16
            )

    def timed(name: str, net) -> None:
        if name in args.skip:
            return
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        sample(net)  # warm-up (compiles)
        synchronize()
        warmup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sample(net)
            synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        results["runs"][name] = {
            "seconds": round(seconds, 3),
            "image_steps_per_s": round(args.batch * args.steps / seconds, 1),
            "warmup_s": round(warmup, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
        print(f"[{time.perf_counter() - started:.0f} s]", name, results["runs"][name], flush=True)
        profile(name, net)
        save()

    def profile(name: str, net) -> None:
        """The CUDA kernels of one guided model call (2 × batch inputs), by total time, to --profile."""
        if not args.profile or not name.endswith("compiled"):
            return
        x = torch.randn(2 * args.batch, 4, 32, 32, device=device, dtype=torch.bfloat16)
        t = torch.full((2 * args.batch,), 500, device=device)
        y = torch.cat([labels, torch.full_like(labels, 1000)])
        with (
            torch.no_grad(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        ):
            net(x, t, y)
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        with open(os.path.join(args.profile, f"{name}.tsv"), "w") as handle:
            handle.write("kernel\tms\tcalls\n")
            for event in rows[:30]:
                handle.write(f"{event.key[:120]}\t{event.self_device_time_total / 1000:.3f}\t{event.count}\n")

    # one forward pass on fixed inputs (mixed timesteps), to compare numerics without the
    # amplification of many sampling steps through a random network
    probe = (
        torch.randn(32, 4, 32, 32, device=device, dtype=torch.bfloat16),
        torch.randint(0, 1000, (32,), device=device),
        torch.arange(32, device=device) % 1000,
    )

    # and one with every sample at one timestep, as every sampling call has
    probe_one_t = (probe[0], torch.full((32,), 500, device=device), probe[2])

    def forward(net, inputs=probe) -> torch.Tensor:
        with torch.no_grad():
            return net(*inputs).float()

    def compiled(net):
        net.compile()  # in place: forward_with_cfg's self(...) then runs compiled, as in a job
        return net

    def uncompile(net) -> None:  # back to eager before swapping modules
        net._compiled_call_impl = None
        torch._dynamo.reset()

    started = time.perf_counter()
    fp = model.to(device=device, dtype=torch.bfloat16).eval()
    fp_out, fp_out_one_t = forward(fp), forward(fp, probe_one_t)
    fp_weight_bytes = weight_bytes(fp)
    timed("fp_eager", fp)
    compiled_fp = compiled(copy.deepcopy(fp))
    timed("fp_compiled", compiled_fp)
    def asked(*names: str) -> bool:
        return any(name not in args.skip for name in names)

    run_tq_dit = asked(
        "fake_quant_eager",
        "fake_quant_compiled",
        "fake_quant_fused_eager",
        "fake_quant_fused_compiled",
        "int8_compiled",
        "fp8_compiled",
    )
    # (a batch of 32 recompiles the graph: only when the comparison is made)
    fp_compiled_out = forward(compiled_fp) if run_tq_dit and asked("fp_compiled") else None
    del compiled_fp
    torch._dynamo.reset()

    calib = capture(fp, create_diffusion(250), CalibrationSpec(num_samples=4, cfg_scale=1.5, cfg_channels=3))
    print(f"[{time.perf_counter() - started:.0f} s] calibration data captured", flush=True)

    def calibrate(method: str, scope: str = "blocks"):
        cfg = config_from_settings(method, dict(
            w_bits=args.bits,
            a_bits=args.bits,
            time_groups=args.groups,
            num_inputs=64,
            scope=scope,
            search=SearchConfig(criterion="minmax", batch=32),
        ), {})
        quantized, cost = quantize(copy.deepcopy(fp), calib, cfg)
        results[f"calibration_s_{method}_{scope}"] = cost["calibration_s"]
        return quantized

    results["weight_bytes"] = {"fp_bf16": fp_weight_bytes}
    results["lowbit"] = {}

    def real_low_bit(net, label: str, fake: torch.Tensor) -> None:
        """int8 and FP8 copies of a calibrated model: numerics against its fake quantization (``fake``:
        on the mixed-timestep probe; the one-timestep probe is run here), then timed."""
        fake_one_t = forward(net, probe_one_t)
        for backend, fuse_mlp, name in (
            ("int8", True, f"int8{label}_compiled"),
            ("fp8", True, f"fp8{label}_compiled"),
            ("fp8", False, f"fp8{label}_unfused_compiled"),
        ):
            if (
                name in args.skip or name not in RUNS
            ):  # (no unfused run for TQ-DiT, whose fc2 input is MRQ: nothing fuses)
                continue
            real = copy.deepcopy(net)
            results["lowbit"][name] = to_low_bit(real, backend, fuse_mlp=fuse_mlp)
            results["weight_bytes"][name] = weight_bytes(real)
            results["numerics"][f"{name}_vs_fake_quant_over_its_error"] = round(
                ((forward(real) - fake).norm() / (fake - fp_out).norm()).item(), 4)
            results["numerics"][f"{name}_vs_fake_quant_over_its_error_one_timestep"] = round(
                (
                    (forward(real, probe_one_t) - fake_one_t).norm() / (fake_one_t - fp_out_one_t).norm()
                ).item(),
                4,
            )
            timed(name, compiled(real))
            uncompile(real)
            del real

    def tq_dit_section() -> None:
        """TQ-DiT (mrq_tgq): fake quantization eager/compiled/fused, then its int8/FP8 copies."""
        quantized = calibrate("mrq_tgq")
        fake_out = forward(quantized)

        def compare(name: str, out: torch.Tensor, reference: torch.Tensor) -> None:
            """‖out − reference‖ over ‖W8A8 fake quantization − FP‖ (how far apart, in quantization
            errors)."""
            results["numerics"][name] = round(
                ((out - reference).norm() / (fake_out - fp_out).norm()).item(), 4
            )
            save()

        results["numerics"]["w8a8_error_relative_to_fp"] = round(
            ((fake_out - fp_out).norm() / fp_out.norm()).item(), 4
        )
        if fp_compiled_out is not None:
            compare("fp_compiled_vs_fp_eager", fp_compiled_out, fp_out)
        timed("fake_quant_eager", quantized)
        timed("fake_quant_compiled", compiled(prepare_for_compile(quantized)))
        compare("fake_quant_compiled_vs_eager", forward(quantized), fake_out)
        uncompile(quantized)

        results["fused_attention_blocks"] = use_fused_attention(quantized)
        compare("fused_attention_vs_explicit", forward(quantized), fake_out)
        timed("fake_quant_fused_eager", quantized)
        timed("fake_quant_fused_compiled", compiled(quantized))
        compare("fused_compiled_vs_explicit_eager", forward(quantized), fake_out)
        uncompile(quantized)

        for (
            block
        ) in quantized.blocks:  # compiled, the explicit attention is the faster (quant.attention=auto)
            block.attn.kernel = None
        real_low_bit(quantized, "", fake_out)
        del quantized

    # (groups were assigned on the 250-step schedule; the --steps timesteps map to the nearest ones)
    if run_tq_dit:
        tq_dit_section()
    for scope, label, names in (
        ("blocks", "_tgq", ["int8_tgq_compiled", "fp8_tgq_compiled", "fp8_tgq_unfused_compiled"]),
        (
            "linears",
            "_tgq_linears",
            [
                "fake_quant_tgq_linears_compiled",
                "int8_tgq_linears_compiled",
                "fp8_tgq_linears_compiled",
                "fp8_tgq_linears_unfused_compiled",
            ],
        ),
    ):
        if not asked(*names):
            continue
        tgq = prepare_for_compile(calibrate("tgq", scope))
        tgq_fake_out = forward(tgq)
        results["numerics"][f"{label[1:]}_w8a8_error_relative_to_fp"] = round(
            ((tgq_fake_out - fp_out).norm() / fp_out.norm()).item(), 4
        )
        if scope == "linears":
            timed(f"fake_quant{label}_compiled", compiled(tgq))
            uncompile(tgq)
        real_low_bit(tgq, label, tgq_fake_out)
        del tgq

    runs = results["runs"]
    speed = {name: run["image_steps_per_s"] for name, run in runs.items()}
    ratios = {}
    for slow, fast in [("fake_quant_eager", "fp_eager"), ("fake_quant_compiled", "fp_compiled"),
                       ("fake_quant_fused_eager", "fp_eager"), ("fake_quant_fused_compiled", "fp_compiled"),
                       ("fake_quant_tgq_linears_compiled", "fp_compiled")]:
        if slow in speed and fast in speed:
            ratios[f"{slow}_time_over_{fast}"] = round(speed[fast] / speed[slow], 2)
    for real in [run for run in RUNS if run.startswith(("int8", "fp8"))]:
        for base in ("fp_compiled", "fp_eager"):
            if real in speed and base in speed:
                ratios[f"{real}_speedup_over_{base}"] = round(speed[real] / speed[base], 2)
    results["ratios"] = ratios
    save()
    print(json.dumps({"runs": runs, "ratios": ratios, "numerics": results["numerics"]}, indent=1))


if __name__ == "__main__":
    main()
