"""The job end to end through the Hydra entry point, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_job(tmp_path: Path, name: str, *overrides: str) -> Path:
    job_dir = tmp_path / name
    command = [sys.executable, "run.py", f"hydra.run.dir={job_dir}", f"eval.cache_dir={tmp_path / 'cache'}",
               "num_samples=20", "batch_size=8", "sampler.steps=4", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FID" in result.stdout and "results:" in result.stdout
    return job_dir


def test_job_writes_results_samples_and_grid(tmp_path):
    job_dir = run_job(tmp_path, "a")
    results = json.loads((job_dir / "results.json").read_text())
    assert set(results["metrics"]) == {"fid", "sfid", "is", "precision", "recall"}
    assert all(np.isfinite(v) for v in results["metrics"].values())
    assert results["seed"] == 0 and results["num_samples"] == 20
    assert results["config"]["sampler"]["steps"] == 4 and results["config"]["model"]["arch"] == "DiT-MNIST"
    assert results["timings"]["sampling_s"] > 0
    with np.load(job_dir / "samples.npz") as samples:
        assert samples["arr_0"].shape == (20, 32, 32, 1) and samples["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(samples["arr_1"], np.arange(20) % 10)
        assert samples["arr_0"].std() > 10  # digits, not a blank canvas
    assert Image.open(job_dir / "grid.png").size == (320, 64)


def test_job_is_deterministic_and_independent_of_batch_size(tmp_path):
    first = run_job(tmp_path, "first")
    second = run_job(tmp_path, "second", "batch_size=20")
    with np.load(first / "samples.npz") as a, np.load(second / "samples.npz") as b:
        # float round-off can differ with the batch shape; uint8 pixels almost never do
        assert (a["arr_0"] != b["arr_0"]).mean() < 1e-3
    again = run_job(tmp_path, "again")
    with np.load(first / "samples.npz") as a, np.load(again / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    metrics = [json.loads((d / "results.json").read_text())["metrics"] for d in (first, again)]
    assert metrics[0] == metrics[1]


def test_missing_checkpoint_fails_with_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}", "model.checkpoint=/nonexistent/dit.pt"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model.checkpoint=/nonexistent/dit.pt: file not found; give the path of the weights file"


@pytest.mark.parametrize("override,message", [
    ("sampler.steps=ddim600", "no integer stride gives exactly 600"),
    ("num_samples=5", "num_samples=5 must be an integer of at least eval.is_splits=10"),
    ("model.arch=DiT-XXL/2", "model.arch=DiT-XXL/2 is unknown"),
    ("dtype=fp64", "unknown dtype 'fp64'"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    result = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}", override],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "samples.npz").exists()
