"""Block reconstruction's eager vs fast engine, on the embedded model and on DiT-XL/2 shapes, in one run.

    python benchmarks/reconstruction_speed.py [--device cuda] [--methods qdiffusion ptq4dit]
        [--xl-blocks 2] [--eager-iters 300] [--fast-iters 2000] [--skip-xl] [--out speed.json]

For each model and method: the method's initialisation, then reconstruction of the scoped blocks
with each engine; iterations/s = iterations run / reconstruction seconds (per-block fixed work, such
as the FP targets and the block errors, included). The embedded model (committed weights, its
calibration set of 32 trajectories × 50 steps with guidance 1.1) is reconstructed whole at the
papers' iteration counts by the fast engine (``--paper``), and for ``--eager-iters`` per block by the
eager one. DiT-XL/2 (N(0, 0.02) random weights, 32×32×4 latents, 32 trajectories × 250 steps, guidance
1.5) runs ``--xl-blocks`` blocks with both engines and projects the whole model at the papers'
iterations: seconds per iteration × (iterations per block) × 28. Peak memory: CUDA's allocator peak.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.models import build_dit, load_model
from tqdit.quant import METHODS, QuantConfig, SearchConfig
from tqdit.quant.reconstruct import ReconConfig
from tqdit.utils import atomic_write_json

PAPER = ReconConfig()


def iterations_per_block(recon: ReconConfig, joint: bool) -> int:
    return recon.iters if joint else recon.iters + recon.act_iters


def measure(model, calib, method: str, recon: ReconConfig, scope, device) -> dict:
    cfg = QuantConfig(
        w_bits=8,
        a_bits=8,
        scope=scope,
        num_inputs=800,
        capture_batch=32,
        search=SearchConfig(criterion="lp", batch=32),
        recon=recon,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quantized, cost = METHODS[method](copy.deepcopy(model), calib, cfg)
    rec = cost["reconstruction"]
    fitted = sum(1 for e, a in zip(rec["error_nearest"], rec["error_after"]) if e != a) or 1
    iterations = iterations_per_block(recon, rec["joint"]) * fitted
    row = {
        "method": method,
        "engine": recon.engine,
        "blocks_fitted": fitted,
        "iterations": iterations,
        "reconstruction_s": rec["seconds"],
        "iterations_per_s": round(iterations / rec["seconds"], 1),
        "calibration_s": cost["calibration_s"],
        "error_nearest": rec["error_nearest"][:fitted],
        "error_after": rec["error_after"][:fitted],
        "undecided_rounding": rec["undecided_rounding"],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    del quantized
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=["qdiffusion", "ptq4dit"])
    parser.add_argument(
        "--eager-iters", type=int, default=300, help="rounding iterations per block, eager engine"
    )
    parser.add_argument(
        "--fast-iters", type=int, default=2000, help="rounding iterations per block, fast engine (XL/2)"
    )
    parser.add_argument("--xl-blocks", type=int, default=2)
    parser.add_argument(
        "--embedded-iters",
        type=int,
        help="fast engine on the embedded model: this many rounding "
        "iterations per block instead of the papers' (a smoke test)",
    )
    parser.add_argument("--skip-xl", action="store_true")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    result = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "embedded": [],
        "xl": [],
    }

    def save():
        if args.out:
            atomic_write_json(args.out, result)

    def short(iters: int, engine: str) -> ReconConfig:
        return ReconConfig(iters=iters, act_iters=iters // 4, engine=engine, lr=1e-2)
    if not args.skip_embedded:
        model = load_model("DiT-MNIST", 32).to(device).eval()
        calib = capture(model, create_diffusion(50), CalibrationSpec(num_samples=32, cfg_scale=1.1))
        for method in args.methods:
            result["embedded"].append(
                measure(model, calib, method, short(args.eager_iters, "eager"), "blocks", device)
            )
            save()
            fast = short(args.embedded_iters, "fast") if args.embedded_iters else ReconConfig(engine="fast")
            result["embedded"].append(measure(model, calib, method, fast, "blocks", device))
            save()
    if not args.skip_xl:
        torch.manual_seed(0)
        model = build_dit("DiT-XL/2", input_size=32)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
        model = model.to(device).eval()
        calib = capture(
            model, create_diffusion(250), CalibrationSpec(num_samples=32, cfg_scale=1.5, cfg_channels=3)
        )
        scope = [f"blocks.{i}.*" for i in range(args.xl_blocks)]
        blocks = len(model.blocks)
        for method in args.methods:
            for engine, iters in (("eager", args.eager_iters), ("fast", args.fast_iters)):
                row = measure(model, calib, method, short(iters, engine), scope, device)
                per_block = iterations_per_block(PAPER, method == "ptq4dit")
                row["projected_whole_model_paper_s"] = round(per_block * blocks / row["iterations_per_s"], 0)
                result["xl"].append(row)
                print(
                    f"  {method} {engine}: whole model at the papers' iterations ≈ "
                    f"{row['projected_whole_model_paper_s'] / 60:.1f} min",
                    flush=True,
                )
                save()
    save()


if __name__ == "__main__":
    main()
