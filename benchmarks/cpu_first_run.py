"""Where the default job's time goes on the CPU: FP vs fake-quantized forward throughput and calibration,
in one run, so that a change to the first run can be judged by ratios rather than by a stopwatch.

    python benchmarks/cpu_first_run.py [--steps 5] [--out cpu.json] [--default-malloc] [Hydra overrides ...]

Composes the job's configuration (``conf/``, with the given overrides: by default the embedded DiT-MNIST,
mrq_tgq W8A8 G=10, DDPM-50, guidance 1.1), then on the CPU:

- the calibration set's capture (the FP model's trajectories; the job caches it across runs) and the
  method's calibration, timed as the job times them;
- ``--steps`` guided model evaluations of one sampling batch (``batch_size`` images, so 2 × batch_size
  model inputs) with the FP model and with the calibrated fake-quantized one, after one untimed warm-up
  step each: image-steps/s and their ratio;
- the projected sampling time of the job (num_samples × sampler steps ÷ the fake-quantized rate).

As the job does on the CPU, glibc is told to keep freed memory (``tqdit.utils.keep_freed_memory``);
``--default-malloc`` leaves glibc's defaults, to measure what that buys.

Prints one JSON object (also written to ``--out``) with the threads, CPU model and PyTorch version.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.diffusion.sampling import guided_model
from tqdit.models import load_model
from tqdit.pipeline.job import method_config
from tqdit.quant.methods import quantize
from tqdit.utils import atomic_write_json, keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def image_steps_per_s(model, diffusion, batch: int, cfg_scale: float, cfg_channels, steps: int) -> float:
    """Guided model evaluations of one batch at successive timesteps (what one sampling step costs)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, model.in_channels, model.input_size, model.input_size), generator=generator)
    labels = torch.arange(batch) % model.num_classes
    denoise = guided_model(model, labels, cfg_scale, cfg_channels)
    timesteps = [int(t) for t in diffusion.timesteps[::-1][: steps + 1]]
    with torch.no_grad():
        denoise(x, torch.full((batch,), timesteps[0], dtype=torch.long))  # warm-up, untimed
        start = time.perf_counter()
        for t in timesteps[1:]:
            denoise(x, torch.full((batch,), t, dtype=torch.long))
        seconds = time.perf_counter() - start
    return batch * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed sampling steps per model")
    parser.add_argument("--out")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator settings as they are")
    args, overrides = parser.parse_known_args()
    freed_memory_kept = False if args.default_malloc else keep_freed_memory()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model = load_model(cfg.model.arch, cfg.model.input_size, cfg.model.checkpoint).eval()
    diffusion = create_diffusion(cfg.sampler.steps, learn_sigma=model.learn_sigma)
    calib_cfg = cfg.quant.calib
    spec = CalibrationSpec(
        policy=calib_cfg.policy, num_samples=calib_cfg.num_samples, num_steps=calib_cfg.num_steps,
        seed=calib_cfg.seed, cfg_scale=cfg.sampler.cfg_scale, cfg_channels=cfg.sampler.cfg_channels,
        method=cfg.sampler.method, clip_denoised=cfg.sampler.clip_denoised,
    )
    start = time.perf_counter()
    calib = capture(model, diffusion, spec)
    capture_s = time.perf_counter() - start
    qcfg = method_config(cfg)
    quantized, cost = quantize(copy.deepcopy(model), calib, qcfg)
    sampling = (cfg.batch_size, cfg.sampler.cfg_scale, cfg.sampler.cfg_channels, args.steps)
    fp_rate = image_steps_per_s(model, diffusion, *sampling)
    quant_rate = image_steps_per_s(quantized, diffusion, *sampling)
    result = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "freed_memory_kept": freed_memory_kept,
        "method": cfg.quant.name, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "groups": getattr(qcfg, "time_groups", None),
        "calibration_capture_s": round(capture_s, 1), "calibration_s": round(cost["calibration_s"], 1),
        "fp_image_steps_per_s": round(fp_rate, 1), "fake_quant_image_steps_per_s": round(quant_rate, 1),
        "fake_quant_over_fp_time": round(fp_rate / quant_rate, 2),
        "projected_sampling_s": round(cfg.num_samples * diffusion.num_steps / quant_rate, 0),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
