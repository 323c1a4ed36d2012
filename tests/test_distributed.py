"""torchrun sampling on the CPU (gloo): the merged npz equals the single-process one, and resumes from
shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_pipeline import FAST_QUANT, ROOT

# 5 batches of 4 over 2 processes: uneven shares (3 + 2), and a calibrated method so rank 0 calibrates
# while rank 1 loads what it saved.
JOB = [
    "num_samples=20",
    "batch_size=4",
    "sampler.steps=4",
    "quant=uniform",
    "quant.search=minmax",
    *FAST_QUANT,
]


def torchrun(job_dir: Path, cache: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "run.py",
        f"hydra.run.dir={job_dir}",
        f"cache_dir={cache}",
        "device=cpu",
        *JOB,
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_give_the_single_process_npz(tmp_path):
    single = torchrun(tmp_path / "one", tmp_path / "cache", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(tmp_path / "two", tmp_path / "cache", 2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("results:") == 1  # rank 0 reports; rank 1 stays quiet
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert a["arr_0"].shape == (20, 32, 32, 1)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["metrics"] == two["metrics"]
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    assert not (tmp_path / "two" / "shards").exists()  # merged into samples.npz, then removed


@pytest.mark.slow  # 37 s on a 2-core CPU; the default suite keeps the plain two-process test
def test_two_processes_resume_from_shards_drawn_by_one(tmp_path):
    """A job started on one process and killed is finished by two: finished shards are not redrawn."""
    reference = torchrun(tmp_path / "reference", tmp_path / "cache", 1)
    assert reference.returncode == 0, reference.stderr[-3000:]
    job = tmp_path / "job"
    first = torchrun(job, tmp_path / "cache", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    # make it look interrupted after three batches: samples and results gone, three shards kept
    (job / "results.json").unlink()
    (job / "samples.npz").unlink()
    with np.load(tmp_path / "reference" / "samples.npz") as done:
        images, labels = done["arr_0"], done["arr_1"]
    (job / "shards").mkdir()
    for start in (0, 4, 8):
        np.savez(
            job / "shards" / f"samples_{start:07d}_{start + 4:07d}.npz",
            images=images[start : start + 4] // 2,
            labels=labels[start : start + 4],
        )  # marked (halved) so we can see they were read, not redrawn
    resumed = torchrun(job, tmp_path / "cache", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with np.load(job / "samples.npz") as merged:
        np.testing.assert_array_equal(merged["arr_0"][:12], images[:12] // 2)
        np.testing.assert_array_equal(merged["arr_0"][12:], images[12:])


@pytest.mark.slow  # 16 s on a 2-core CPU
def test_processes_share_one_default_output_directory(tmp_path):
    """Without hydra.run.dir, Hydra names the directory by the clock: all ranks must use rank 0's stamp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TQDIT_RUN_STAMP", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "run.py",
        f"hydra.run.dir={tmp_path}/run/${{oc.env:TQDIT_RUN_STAMP,unset}}",
        f"cache_dir={tmp_path / 'cache'}",
        "device=cpu",
        "quant=fp",
        "num_samples=10",
        "batch_size=5",
        "sampler.steps=2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    directories = list((tmp_path / "run").iterdir())
    assert len(directories) == 1 and directories[0].name != "unset", directories
    assert (directories[0] / "results.json").is_file()
