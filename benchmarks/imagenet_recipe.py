"""The ImageNet recipe's cost on one GPU, with random weights of the real networks (one run).

    python benchmarks/imagenet_recipe.py --work /tmp/recipe [--samples 128] [--steps 250]
        [--eval-samples 10000] [--phase jobs|metrics|all] [--out recipe.json]

``jobs``: writes random DiT-XL/2 256 weights, a random sd-vae-ft AutoencoderKL and a random
Inception-v3 to files, then runs ``run.py`` exactly as the README's recipe does (model=dit_xl_2_256,
eval=imagenet256, 250 DDPM steps, cfg 1.5, bf16) for ``--samples`` images, FP and TQ-DiT W8A8
(fake quantization; its scales by the fast minmax search, since the sampling cost does not depend on
how the scales were chosen; the Hessian calibration cost is measured by benchmarks/calibration_cost.py).
Reads sampling and metric times from the jobs' results.json.

``metrics``: the evaluation at full size: Inception features of ``--eval-samples`` generated and as
many reference images (256×256), FID, sFID, IS, precision/recall; and VAE decoding alone.

Projections to 10k/50k samples scale the measured per-image sampling time linearly (batches are
independent and the same size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

def random_files(work: Path, reference_images: int) -> dict[str, Path]:
    from diffusers import AutoencoderKL

    from tqdit.metrics.inception import save_random_weights
    from tqdit.models import build_dit
    from tqdit.models.vae import SD_VAE_CONFIG

    work.mkdir(parents=True, exist_ok=True)
    files = {
        "dit": work / "dit_xl_2_256.safetensors",
        "vae": work / "vae",
        "inception": work / "inception.pth",
        "reference": work / "reference.npz",
    }
    if not files["dit"].exists():
        torch.manual_seed(0)
        model = build_dit("DiT-XL/2", input_size=32)
        for p in model.parameters():
            torch.nn.init.normal_(
                p, std=0.02
            )  # non-zero adaLN and final layer: a random model that does work
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files["dit"]))
    if not files["vae"].exists():
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(files["vae"])
    if not files["inception"].exists():
        save_random_weights(files["inception"])
    if not files["reference"].exists():
        rng = np.random.default_rng(0)
        np.savez(
            files["reference"], arr_0=rng.integers(0, 256, (reference_images, 256, 256, 3), dtype=np.uint8)
        )
    return files


def run_recipe_job(
    files: dict, work: Path, name: str, samples: int, steps: int, batch: int, *extra: str
) -> dict:
    job_dir = work / name
    command = [
        sys.executable,
        "run.py",
        f"hydra.run.dir={job_dir}",
        f"cache_dir={work / 'cache'}",
        "model=dit_xl_2_256",
        f"model.checkpoint={files['dit']}",
        f"model.vae.path={files['vae']}",
        "eval=imagenet256",
        f"eval.weights={files['inception']}",
        f"eval.reference={files['reference']}",
        f"num_samples={samples}",
        f"batch_size={batch}",
        f"sampler.steps={steps}",
        "dtype=bf16",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    results = json.loads((job_dir / "results.json").read_text())
    sampling = results["timings"]["sampling_s"]
    return {
        "job": name,
        "samples": samples,
        "steps": steps,
        "wall_s": round(wall, 1),
        "timings": results["timings"],
        "image_steps_per_s": results["image_steps_per_s"],
        "sampling_s_per_image": round(sampling / samples, 4),
        "projected_sampling_10k_min": round(sampling / samples * 10_000 / 60, 1),
        "projected_sampling_50k_min": round(sampling / samples * 50_000 / 60, 1),
        "quant": {
            k: v
            for k, v in results["quant"].items()
            if k in ("method", "w_bits", "a_bits", "groups", "calibration_s", "quantized_layers")
        },
        "gpu": results["environment"]["gpu"],
    }


def metrics_at_scale(files: dict, samples: int) -> dict:
    from omegaconf import OmegaConf

    from tqdit.models.vae import latent_decoder, load_vae
    from tqdit.pipeline.job import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(path=files["vae"], device=device)
    decode = latent_decoder(vae, 32)
    latents = torch.randn(256 if device.type == "cuda" else 8, 4, 32, 32, device=device)
    decode(latents[:32])
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    decode(latents)
    synchronize()
    decode_s = (time.perf_counter() - start) / len(latents)

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (samples, 256, 256, 3), dtype=np.uint8)
    eval_cfg = OmegaConf.create(
        {
            "feature_extractor": "tqdit-inception-v3",
            "weights": str(files["inception"]),
            "reference": str(files["reference"]),
            "batch_size": 200,
            "is_split_size": 5000,
            "pr_k": 3,
            "cache_dir": str(files["reference"].parent / "metrics-cache"),
        }
    )
    start = time.perf_counter()
    first = evaluate(images, eval_cfg, device)  # reference features computed and cached
    cold = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(images, eval_cfg, device)  # reference features from the cache, as every later job of a sweep
    warm = time.perf_counter() - start
    return {
        "eval_samples": samples,
        "metrics_first_job_s": round(cold, 1),
        "metrics_later_jobs_s": round(warm, 1),
        "vae_decode_ms_per_image": round(1000 * decode_s, 2),
        "metrics": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--phase", choices=("jobs", "metrics", "all"), default="all")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }

    def save(key: str, value) -> None:  # after every phase: a run cut short still reports what it measured
        report[key] = value
        print(json.dumps({key: value}, indent=2), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    start = time.perf_counter()
    files = random_files(args.work, args.eval_samples)
    save("setup_s", round(time.perf_counter() - start, 1))
    if args.phase in ("jobs", "all"):
        save("fp", run_recipe_job(files, args.work, "fp", args.samples, args.steps, args.batch, "quant=fp"))
        save(
            "w8a8",
            run_recipe_job(
                files,
                args.work,
                "w8a8",
                args.samples,
                args.steps,
                args.batch,
                "quant=mrq_tgq",
                "bits=8",
                "quant.search=minmax",
                "quant.num_inputs=32",
                "quant.calib.num_samples=4",
                f"groups={min(10, args.steps)}",
            ),
        )
    if args.phase in ("metrics", "all"):
        save("metrics_at_scale", metrics_at_scale(files, args.eval_samples))


if __name__ == "__main__":
    main()
