"""Reliability: jobs killed mid-way resume to identical results, sweeps skip finished jobs, damage is
detected."""

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.models import load_model
from tqdit.pipeline.generate import generate
from tqdit.quant.methods import config_from_settings, quantize
from tqdit.quant.search import SearchConfig

from test_quant import tiny_dit

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["num_samples=40", "batch_size=10", "sampler.steps=10", "quant=fp"]


def job_command(job_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "run.py", f"hydra.run.dir={job_dir}", f"cache_dir={cache}", *SMALL, *overrides]


def kill_when(process: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the job ended before it could be killed"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_job_killed_mid_sampling_resumes_to_identical_samples_and_metrics(tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    subprocess.run(job_command(reference, cache), cwd=ROOT, check=True, capture_output=True, timeout=300)

    job = tmp_path / "job"
    process = subprocess.Popen(
        job_command(job, cache), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when(process, lambda: len(list((job / "shards").glob("samples_*.npz"))) >= 2)
    assert not (job / "results.json").exists()
    finished_before = sorted(p.name for p in (job / "shards").glob("samples_*.npz"))
    assert 2 <= len(finished_before) < 4

    result = subprocess.run(job_command(job, cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(reference / "samples.npz") as a, np.load(job / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    results = [json.loads((d / "results.json").read_text()) for d in (reference, job)]
    assert results[0]["metrics"] == results[1]["metrics"]
    # the rerun read back the batches the killed run finished, and counts them
    assert results[0]["resumed_batches"] == 0 and results[1]["resumed_batches"] == len(finished_before)
    assert not (job / "shards").exists()  # merged into samples.npz, then removed

    again = subprocess.run(job_command(job, cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "already complete, not run again" in again.stdout


QUANTIZED = ["quant=mrq_tgq", "groups=2", "quant.candidates=10", "quant.rounds=1", "quant.num_inputs=25",
             "quant.calib.num_samples=4"]


def quantized_job_command(job_dir: Path, cache: Path) -> list[str]:
    return [c for c in job_command(job_dir, cache) if c != "quant=fp"] + QUANTIZED


def test_quantized_job_killed_after_calibration_resumes_from_its_saved_calibration(tmp_path):
    """TQ-DiT (mrq_tgq) killed once quant_params.safetensors is written and the first shard sampled:
    the rerun loads the calibration instead of redoing it, and ends with the samples and metrics of an
    uninterrupted run.

    Mutations caught: quantize_model ignoring the saved file and calibrating again with another
    calibration seed (the file is rewritten, the remaining shards differ); ignoring it and calibrating
    again with the same seed (same samples, but the file is rewritten and no resumed_calibration);
    load_quant_state skipped on resume (the remaining shards are sampled by the FP model)."""
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    command = quantized_job_command(reference, cache)
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)

    job = tmp_path / "job"
    saved = job / "quant_params.safetensors"
    process = subprocess.Popen(quantized_job_command(job, cache), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    kill_when(process, lambda: len(list((job / "shards").glob("samples_*.npz"))) >= 1)
    assert saved.is_file() and not (job / "results.json").exists()
    assert 1 <= len(list((job / "shards").glob("samples_*.npz"))) < 4
    stamp, content = saved.stat().st_mtime_ns, saved.read_bytes()
    calibration = json.loads((job / "quant_record.json").read_text())

    command = quantized_job_command(job, cache)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    quant = json.loads((job / "results.json").read_text())["quant"]
    assert quant["resumed_calibration"] is True and quant["quantizers_loaded"] > 0
    assert quant["calibration_s"] == calibration["calibration_s"]  # the first run's cost, not a new one
    assert saved.stat().st_mtime_ns == stamp and saved.read_bytes() == content  # not calibrated again
    assert "calibrate" not in result.stderr  # no calibration progress bar either
    with np.load(reference / "samples.npz") as a, np.load(job / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    metrics = [json.loads((d / "results.json").read_text())["metrics"] for d in (reference, job)]
    assert metrics[0] == metrics[1]


RECONSTRUCTING = [
    "quant=qdiffusion",
    "quant/recon=quick",
    "quant.recon.iters=200",
    "quant.recon.act_iters=60",
    "quant.num_inputs=32",
    "quant.calib.num_samples=4",
]


@pytest.mark.slow  # three calibrations with reconstruction: 2.5 min on 2 cores
def test_calibration_killed_mid_reconstruction_resumes_after_its_last_finished_block(tmp_path):
    """Q-Diffusion killed (SIGKILL) once two of its reconstruction units are finished (with its published
    scope: the patch embedding and the timestep MLP's first Linear, of 16 units over two passes): the
    rerun loads those, fits the rest, and saves the calibration of an uninterrupted run, tensor for
    tensor; the per-block folder is removed once the calibration is saved.

    Mutations caught: the job not passing its checkpoint folder (nothing resumed); a resumed block's
    batch generator state not restored (blocks 2–3 differ from the uninterrupted run)."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    command = (
        lambda job: [c for c in job_command(job, cache) if c != "quant=fp"] + RECONSTRUCTING
    )  # noqa: E731
    reference = tmp_path / "reference"
    subprocess.run(command(reference), cwd=ROOT, check=True, capture_output=True, timeout=600)

    job = tmp_path / "job"
    blocks = job / "reconstruction"
    process = subprocess.Popen(command(job), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: (blocks / "block_001.safetensors").is_file())
    finished = sorted(p.name for p in blocks.glob("block_*.safetensors"))
    assert finished[:2] == ["block_000.safetensors", "block_001.safetensors"] and len(finished) < 4
    assert not (job / "quant_params.safetensors").exists()

    result = subprocess.run(command(job), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    quant = json.loads((job / "results.json").read_text())["quant"]
    assert quant["reconstruction"]["resumed_blocks"] == len(finished)
    assert not blocks.exists()
    saved, expected = load_file(job / "quant_params.safetensors"), load_file(
        reference / "quant_params.safetensors"
    )
    assert saved.keys() == expected.keys()
    for key in expected:
        assert torch.equal(saved[key], expected[key]), key


def test_killed_sweep_rerun_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "run.py",
        "-m",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={tmp_path / 'cache'}",
        *SMALL,
        "seed=0,1,2",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: len(list(sweep.rglob("results.json"))) >= 1)
    first = next(sweep.rglob("results.json"))
    stamp = first.stat().st_mtime_ns
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert first.stat().st_mtime_ns == stamp  # the finished job was not run again
    assert result.stdout.count("already complete, not run again") == 1
    table = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("|")]
    assert (
        len(table) == 3 and table[2].startswith("| fp | FP | – | 10 |") and table[2].endswith("| 3 |")
    )  # all three seeds


def test_job_directory_of_another_configuration_is_refused(tmp_path):
    job = tmp_path / "job"
    subprocess.run(
        job_command(job, tmp_path / "cache"), cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    result = subprocess.run(
        job_command(job, tmp_path / "cache", "seed=5"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("error: ")
        and "holds a job with a different configuration (differs in seed)" in result.stderr
    )


def test_damaged_shard_is_detected_and_sampled_again(tmp_path):
    model = load_model("DiT-MNIST", 32, None)
    diffusion = create_diffusion(4)
    clean = generate(model, diffusion, 8, 4, seed=0, progress=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    generate(model, diffusion, 8, 4, seed=0, progress=False, shard_dir=shards)
    (shards / "samples_0000000_0000004.npz").write_bytes(b"PK\x03\x04 truncated")  # damaged
    with np.load(shards / "samples_0000004_0000008.npz") as shard:  # another batch's content
        np.savez(
            shards / "samples_0000004_0000008.npz", images=shard["images"][:3], labels=shard["labels"][:3]
        )
    with pytest.warns(UserWarning) as caught:
        images, labels = generate(model, diffusion, 8, 4, seed=0, progress=False, shard_dir=shards)
    assert {"is damaged" in str(w.message) for w in caught} == {True, False}
    np.testing.assert_array_equal(images, clean[0])
    np.testing.assert_array_equal(labels, clean[1])


def test_nan_in_calibration_names_the_layer_and_time_group():
    torch.manual_seed(0)
    model = tiny_dit()
    diffusion = create_diffusion(6)
    calib = capture(model, diffusion, CalibrationSpec(num_samples=4, cfg_scale=1.5))
    poisoned = calib.step == 5  # the noisiest step: time group 1 of 2
    calib.x[poisoned] = float("nan")
    cfg = config_from_settings(
        "tgq",
        dict(time_groups=2, num_inputs=48, search=SearchConfig(criterion="mse", candidates=5, rounds=1)),
        {},
    )
    with pytest.raises(FloatingPointError, match=r"blocks\.0\.attn\.qkv sees NaN/Inf values \(time group 1"):
        quantize(copy.deepcopy(model), calib, cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "bits=9",
            "error: w_bits=9 must be an integer bit width from 2 to 8 (or 16 as a no-op check); "
            "set bits= or w_bits=",
        ),
        (
            "quant=mrq_tgq groups=0",
            "error: groups=0 must be an integer from 1 to the number of sampling steps (10)",
        ),
        (
            "quant=ptq4dm +quant.params.mu=0.3",
            "error: quant.params has unknown keys ['mu'] for quant=ptq4dm; "
            "known keys: mean, p, replacement, std",
        ),
        (
            "quant.backend=fp8 device=cpu",
            "error: quant.backend=fp8 needs a CUDA GPU that runs row-wise scaled FP8 matmuls "
            "(Hopper; Ada with a recent PyTorch); device=cpu does not: use quant.backend=simulated",
        ),
        (
            "quant=tgq bits=6 quant.backend=int8",
            "error: quant.backend=int8 runs W8A8 only, not W6A6: use bits=8 or quant.backend=simulated",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, override, message):
    command = [
        c for c in job_command(tmp_path / "job", tmp_path / "cache") if c != "quant=fp"
    ] + override.split()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == message
    assert not (tmp_path / "job" / "config.json").exists()  # refused before any work


def test_sampling_progress_ticks_per_denoising_step(tmp_path, capsys):
    """The sampling bar counts denoising steps of every batch (batches × steps) and ends on all the
    images, a resumed batch counting its steps at once. 5 images in 2 batches × 3 steps, so steps (6),
    images (5) and batches (2) are told apart. Mutations caught: one tick per batch (the bar of the first
    run sat at 0/2 for minutes) or per image, or a finished shard not counted."""
    model = load_model("DiT-MNIST", 32, None)
    diffusion = create_diffusion(3)
    generate(model, diffusion, 5, 4, seed=0, progress=True)
    first = capsys.readouterr().err
    assert "sampling: 100%" in first and "6/6 [" in first and "images=5/5" in first
    shards = tmp_path / "shards"
    shards.mkdir()
    generate(model, diffusion, 5, 4, seed=0, progress=False, shard_dir=shards)
    (shards / "samples_0000004_0000005.npz").unlink()  # the second batch is sampled again
    generate(model, diffusion, 5, 4, seed=0, progress=True, shard_dir=shards)
    resumed = capsys.readouterr().err
    assert "6/6 [" in resumed and "images=5/5" in resumed
