"""FP sampling throughput of DiT (random weights, latents, CFG) — tqdit vs the reference code, one run.

    python benchmarks/sampling_throughput.py --reference /path/to/facebookresearch-DiT [--model DiT-XL/2]
        [--image-size 256] [--batch 256] [--steps 25] [--out throughput.json]

Both samplers run DDPM with classifier-free guidance (scale 1.5, the reference's first-3-channel
guidance) over ``--steps`` respaced steps on ``--batch`` images (the model sees 2 × batch), with the
same random weights. The reference runs as its sample.py does plus bf16 autocast; tqdit runs its
model in bf16 eagerly and compiled (``torch.compile``). Throughput is image-steps/s =
batch × steps / seconds of the whole sampling loop (after a warm-up loop), median of --repeats.
The reference code is imported from --reference and never copied into this repository.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tqdit.diffusion import PerSampleNoise, create_diffusion, guided_model, sample_loop
from tqdit.models import build_dit
from tqdit.utils import atomic_write_json


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up (and compilation)
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference", help="checkout of facebookresearch/DiT (needs timm); omit to time tqdit only"
    )
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    latent = args.image_size // 8
    torch.manual_seed(0)
    model = build_dit(args.model, input_size=latent)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.02)
    state = model.state_dict()
    z = torch.randn(args.batch, 4, latent, latent, device="cuda")
    labels = torch.randint(0, 1000, (args.batch,), device="cuda")
    diffusion = create_diffusion(args.steps)
    results = {"model": args.model, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}

    def record(name: str, seconds: float, samples: torch.Tensor) -> None:
        rate = args.batch * args.steps / seconds
        results["runs"][name] = {"seconds": round(seconds, 3), "image_steps_per_s": round(rate, 1),
                                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(
            f"{name:28s} {rate:8.1f} image-steps/s  "
            f"({seconds:.2f} s, peak {results['runs'][name]['peak_gib']} GiB)",
            flush=True,
        )
        torch.cuda.reset_peak_memory_stats()

    reference_samples = None
    if args.reference:
        sys.path.insert(0, args.reference)
        from diffusion import create_diffusion as reference_diffusion  # the reference's own package
        from models import DiT_models

        reference = DiT_models[args.model](input_size=latent).cuda().eval()
        reference.load_state_dict(state)
        ref_diffusion = reference_diffusion(str(args.steps))
        kwargs = dict(y=torch.cat([labels, torch.full_like(labels, 1000)]), cfg_scale=1.5)

        def run_reference():
            torch.manual_seed(1)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = ref_diffusion.p_sample_loop(
                    reference.forward_with_cfg,
                    (2 * args.batch, 4, latent, latent),
                    torch.cat([z, z]),
                    clip_denoised=False,
                    model_kwargs=kwargs,
                    device="cuda",
                )
            return out[: args.batch]

        seconds, reference_samples = timed(run_reference, args.repeats)
        record("reference (bf16 autocast)", seconds, reference_samples)
        del reference

    ours = build_dit(args.model, input_size=latent)
    ours.load_state_dict(state)
    ours = ours.cuda().eval().to(torch.bfloat16)

    def run_ours():
        noise = PerSampleNoise(0, range(args.batch), (4, latent, latent), "cuda")
        return sample_loop(guided_model(ours, labels, 1.5, 3), diffusion, noise, model_dtype=torch.bfloat16)

    seconds, samples = timed(run_ours, args.repeats)
    record("tqdit (bf16)", seconds, samples)
    if not args.no_compile:
        ours.compile()
        seconds, samples = timed(run_ours, args.repeats)
        record("tqdit (bf16, torch.compile)", seconds, samples)
    if "reference (bf16 autocast)" in results["runs"]:
        base = results["runs"]["reference (bf16 autocast)"]["image_steps_per_s"]
        results["speedup_vs_reference"] = {
            k: round(v["image_steps_per_s"] / base, 3) for k, v in results["runs"].items()
        }
        print("speed-up vs reference:", results["speedup_vs_reference"])
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
