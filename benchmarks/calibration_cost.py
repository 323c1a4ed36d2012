"""Calibration time and peak memory of each method on DiT-XL/2 shapes (random weights), one run.

    python benchmarks/calibration_cost.py [--methods mrq_tgq ...] [--steps 250] [--groups 10] [--bits 8]
        [--num-inputs 256] [--trajectories 32] [--recon-iters N] [--recon-act-iters N] [--blocks N]
        [--out cost.json]

Steps: build DiT-XL/2 (256×256, latent 32×32×4) with N(0, 0.02) weights on the GPU, capture the
calibration set from FP DDPM trajectories with guidance 1.5 (policy ``all``), then calibrate a fresh
copy of the FP model with each of ``--methods`` in turn (``all``: every method). Reports the capture
and each calibration's seconds and peak memory (GPU: ``torch.cuda`` peak of that phase; CPU: what
the method reports). Q-Diffusion's and PTQ4DiT's block reconstruction runs their papers' iteration
counts unless ``--recon-iters`` / ``--recon-act-iters`` shorten it (the result records which); on
DiT-XL/2 the papers' counts take hours. ``--blocks N`` calibrates the first N DiT blocks only and
projects the whole model's time as time × blocks / N (every block does the same work: on DiT-XL/2 the
per-block time of TQ-DiT's search was flat to 12 %, docs/performance.md); peak memory is a block's.

Q-DiT's cost is its search: every candidate is scored by the FID of ``fitness_samples`` samples. The
benchmark quantizes with the starting group sizes (no search), times one fitness evaluation's sampling
(``--fitness-samples`` samples, ``--fitness-steps`` DDIM steps as Q-DiT's code, guidance 1.5; feature
extraction and VAE decoding not included, so a lower bound) and projects the search as evaluations ×
that time, with the code's settings at most 50 + 10 × 50 evaluations (duplicates are skipped).
DiTAS runs as configured (low-rank alternations and the smoothing search on ``--num-inputs`` inputs).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.models import build_dit
from tqdit.quant.methods import config_from_settings, METHODS, quantize
from tqdit.quant.search import SearchConfig
from tqdit.quant.reconstruct import ReconConfig
from tqdit.utils import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument(
        "--methods", nargs="+", default=["mrq_tgq"], help=f"any of {', '.join(METHODS)}, or all"
    )
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--num-inputs", type=int, default=256)
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--capture-batch", type=int, default=8)
    parser.add_argument("--search-batch", type=int, default=32)
    parser.add_argument(
        "--recon-iters", type=int, help="rounding iterations per block (default: the papers' 20,000)"
    )
    parser.add_argument(
        "--recon-act-iters",
        type=int,
        help="activation-step iterations per block (default: the papers' 5,000)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        help="calibrate only the first N DiT blocks (scope blocks.0-N-1) and project "
        "the whole model's time from them (a method's work is per block); default: every block",
    )
    parser.add_argument("--fitness-samples", type=int, default=800, help="Q-DiT: samples per fitness")
    parser.add_argument("--fitness-steps", type=int, default=50, help="Q-DiT: DDIM steps per fitness")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_dit(args.model, input_size=32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model = model.to(device).eval()
    diffusion = create_diffusion(args.steps)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    calib = capture(
        model, diffusion, CalibrationSpec(num_samples=args.trajectories, cfg_scale=1.5, cfg_channels=3)
    )
    capture_s = time.perf_counter() - start
    capture_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(
        f"\ncaptured {len(calib)} inputs from {args.trajectories} trajectories × {args.steps} steps "
        f"in {capture_s:.1f} s (peak {capture_peak:.2f} GiB)",
        flush=True,
    )

    methods = [m for m in METHODS if m != "fp"] if args.methods == ["all"] else args.methods
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)} or all")
    recon = ReconConfig(
        **{
            key: value
            for key, value in (("iters", args.recon_iters), ("act_iters", args.recon_act_iters))
            if value is not None
        }
    )
    total_blocks = len(model.blocks)
    blocks = min(args.blocks or total_blocks, total_blocks)
    scope = "blocks" if blocks == total_blocks else [f"blocks.{index}.*" for index in range(blocks)]
    result = {
        "model": args.model,
        "blocks_calibrated": blocks,
        "blocks_in_model": total_blocks,
        "steps": args.steps,
        "groups": args.groups,
        "bits": args.bits,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "capture_s": round(capture_s, 1),
        "capture_peak_gib": round(capture_peak, 2),
        "recon_iters": recon.iters,
        "recon_act_iters": recon.act_iters,
        "methods": {},
    }
    for method in methods:
        # each method's own choices (search rule, calibration steps) stand; only the shared settings are
        # set here
        search = SearchConfig(batch=args.search_batch, criterion=METHODS[method].fixed_search or "hessian")
        settings = dict(
            w_bits=args.bits,
            a_bits=args.bits,
            scope=scope,
            time_groups=args.groups,
            num_inputs=args.num_inputs,
            capture_batch=args.capture_batch,
            search=search,
            recon=recon,
        )
        if cuda:
            torch.cuda.empty_cache()
        own = {"generations": 0} if method == "qdit" else {}  # Q-DiT's search is projected, below
        cfg = config_from_settings(method, settings, own)  # the method's defaults for its own settings
        quantized, cost = quantize(copy.deepcopy(model), calib, cfg)
        if method == "qdit":
            result["methods"]["qdit_search"] = qdit_search_cost(quantized, args, cfg)
        del quantized  # before the next method: its peak memory must not include this model
        peak = cost["peak_memory_bytes"] / 2**30
        projected = cost["calibration_s"] * total_blocks / blocks
        print(
            f"{method} W{args.bits}A{args.bits} G={args.groups}: calibration {cost['calibration_s']:.1f} s "
            f"for {blocks} of {total_blocks} blocks (whole model ≈ {projected:.0f} s), peak {peak:.2f} GiB "
            f"({cost['peak_memory_kind']}), {cost['quantized_layers']} layers, "
            f"{cost['calibration_inputs']} inputs",
            flush=True,
        )
        result["methods"][method] = {
            "calibration_s": cost["calibration_s"],
            "calibration_peak_gib": round(peak, 2),
            "projected_whole_model_s": round(projected, 1),
            "peak_memory_kind": cost["peak_memory_kind"],
            "quantized_layers": cost["quantized_layers"],
            "calibration_inputs": cost["calibration_inputs"],
        }
        if (
            "reconstruction" in cost
        ):  # Q-Diffusion, PTQ4DiT: the reconstruction's share, and at the papers' iteration counts
            recon_s, joint = cost["reconstruction"]["seconds"], cost["reconstruction"]["order"] == "joint"
            paper = (
                ReconConfig()
            )  # joint (PTQ4DiT): rounding and steps together for iters; else iters, then act_iters
            ran = recon.iters if joint else recon.iters + recon.act_iters
            factor = (paper.iters if joint else paper.iters + paper.act_iters) / max(1, ran)
            result["methods"][method].update(
                reconstruction_s=recon_s,
                projected_whole_model_paper_iterations_s=round(
                    projected + recon_s * (factor - 1) * total_blocks / blocks, 1
                ),
            )
            print(
                f"  of which reconstruction {recon_s:.1f} s ({ran} iterations per block); at the papers' "
                f"{paper.iters if joint else paper.iters + paper.act_iters}: whole model ≈ "
                f"{result['methods'][method]['projected_whole_model_paper_iterations_s']:.0f} s",
                flush=True,
            )
        if args.out:  # after every method: a long run that is stopped keeps what it measured
            atomic_write_json(args.out, result)


def qdit_search_cost(model, args, cfg) -> dict:
    """One Q-DiT fitness evaluation's sampling time on ``model`` and the search it projects to."""
    from tqdit.pipeline.generate import generate

    diffusion = create_diffusion(f"ddim{args.fitness_steps}")
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, diffusion, args.fitness_samples, min(args.fitness_samples, 256), cfg.fitness_seed,
             cfg_scale=1.5, cfg_channels=3, method="ddim", progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    evaluations = cfg.population + 10 * cfg.population  # the code's 10 generations, at most
    total_blocks = len(model.blocks)
    blocks = args.blocks or total_blocks
    print(f"qdit search: one fitness evaluation ({args.fitness_samples} samples × {args.fitness_steps} "
          f"DDIM steps, {blocks} of {total_blocks} blocks quantized) {seconds:.1f} s; the code's search "
          f"(≤ {evaluations} evaluations) ≈ {evaluations * seconds / 3600:.1f} h of sampling alone",
          flush=True)
    return {"fitness_sampling_s": round(seconds, 1), "fitness_samples": args.fitness_samples,
            "fitness_steps": args.fitness_steps, "evaluations_at_most": evaluations,
            "projected_search_s": round(evaluations * seconds, 1)}


if __name__ == "__main__":
    main()
