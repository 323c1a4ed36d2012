"""Block reconstruction's eager vs fast engine, on the embedded model and on DiT-XL/2 shapes, in one run.

    python benchmarks/reconstruction_speed.py [--device cuda] [--methods qdiffusion ptq4dit]
        [--xl-blocks 2] [--eager-iters 300] [--fast-iters 2000] [--precisions fp32 bf16] [--skip-xl]
        [--out speed.json]

For each model and method: the method's initialisation, then reconstruction of the scoped blocks
with each engine; iterations/s = iterations run / reconstruction seconds (per-block fixed work, such
as the FP targets and the block errors, included). The embedded model (committed weights, its
calibration set of 32 trajectories × 50 steps with guidance 1.1) is reconstructed whole at the
papers' iteration counts by the fast engine (``--paper``), and for ``--eager-iters`` per block by the
eager one. DiT-XL/2 (N(0, 0.02) random weights, 32×32×4 latents, 32 trajectories × 250 steps, guidance
1.5) runs ``--xl-blocks`` blocks with both engines and projects the whole model at the papers'
iterations: seconds per iteration × (iterations per block) × 28. Peak memory: CUDA's allocator peak.
The fast engine runs once per ``--precisions`` entry (quant.recon.precision); a bf16 row also says
which fraction of the fitted layers' rounded weights equal the fp32 row's (same inputs, same batches).
"""

from __future__ import annotations

import argparse
import copy

import torch

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.models import build_dit, load_model
from tqdit.quant.layers import QuantLinear
from tqdit.quant.methods import config_from_settings, quantize
from tqdit.quant.search import SearchConfig
from tqdit.quant.reconstruct import ReconConfig
from tqdit.utils import atomic_write_json

PAPER = ReconConfig()


def iterations_per_block(recon: ReconConfig, joint: bool) -> int:
    return recon.iters if joint else recon.iters + recon.act_iters


def fitted_units(rec: dict) -> list[str]:
    """The units (blocks, layers outside them) that reconstruction changed, in order."""
    changed = [u for u, e, a in zip(rec["units"], rec["error_nearest"], rec["error_after"]) if e != a]
    return list(dict.fromkeys(changed))


def rounded_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().cpu() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def agreement(a: dict, b: dict) -> float:
    """Fraction of the weights of the fitted layers (those that moved) that two runs rounded alike."""
    same = total = 0
    for name in a:
        same += int((a[name] == b[name]).sum())
        total += a[name].numel()
    return round(same / max(total, 1), 5)


def measure(model, calib, method: str, recon: ReconConfig, scope, device, keep: dict | None = None) -> dict:
    cfg = config_from_settings(method, dict(
        w_bits=8,
        a_bits=8,
        scope=scope,
        num_inputs=800,
        capture_batch=32,
        search=SearchConfig(criterion="lp", batch=32),
        recon=recon,
    ), {})
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quantized, cost = quantize(copy.deepcopy(model), calib, cfg)
    rec = cost["reconstruction"]
    fitted = len(fitted_units(rec)) or 1
    iterations = iterations_per_block(recon, rec["order"] == "joint") * fitted
    row = {
        "method": method,
        "engine": recon.engine,
        "precision": recon.precision,
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
    if keep is not None:
        keep[recon.precision] = rounded_weights(quantized)
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
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], help="quant.recon.precision of the fast rows"
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

    def short(iters: int, engine: str, precision: str = "fp32") -> ReconConfig:
        return ReconConfig(iters=iters, act_iters=iters // 4, engine=engine, lr=1e-2, precision=precision)

    def compare(rows: list, kept: dict) -> None:  # bf16's rounding decisions against fp32's, same run
        if "fp32" in kept and "bf16" in kept and rows[-1]["precision"] == "bf16":
            rows[-1]["decisions_equal_to_fp32"] = agreement(kept["fp32"], kept["bf16"])
            print(f"  bf16 vs fp32: {rows[-1]['decisions_equal_to_fp32']:.2%} of roundings equal", flush=True)

    if not args.skip_embedded:
        model = load_model("DiT-MNIST", 32).to(device).eval()
        calib = capture(model, create_diffusion(50), CalibrationSpec(num_samples=32, cfg_scale=1.1))
        for method in args.methods:
            result["embedded"].append(
                measure(model, calib, method, short(args.eager_iters, "eager"), "blocks", device)
            )
            save()
            kept = {}
            for precision in args.precisions:
                if args.embedded_iters:
                    fast = short(args.embedded_iters, "fast", precision)
                else:
                    fast = ReconConfig(engine="fast", precision=precision)
                result["embedded"].append(measure(model, calib, method, fast, "blocks", device, kept))
                compare(result["embedded"], kept)
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
            kept = {}
            runs = [("eager", args.eager_iters, "fp32")]
            runs += [("fast", args.fast_iters, precision) for precision in args.precisions]
            for engine, iters, precision in runs:
                keep = kept if engine == "fast" else None
                row = measure(model, calib, method, short(iters, engine, precision), scope, device, keep)
                per_block = iterations_per_block(PAPER, method == "ptq4dit")
                row["projected_whole_model_paper_s"] = round(per_block * blocks / row["iterations_per_s"], 0)
                result["xl"].append(row)
                compare(result["xl"], kept)
                print(
                    f"  {method} {engine}: whole model at the papers' iterations ≈ "
                    f"{row['projected_whole_model_paper_s'] / 60:.1f} min",
                    flush=True,
                )
                save()
    save()


if __name__ == "__main__":
    main()
