"""Sweeps on a real SLURM cluster: hydra-submitit-launcher → sbatch → the job on a node → the table.

``.ci/run`` starts a one-node cluster on the CI machine and runs these (``-m slurm``, with
``TQDIT_REQUIRE_SLURM=1`` so that a cluster that does not answer fails them); by hand:

    eval "$(bash tests/slurm/start.sh)" && python -m pytest -m slurm; bash tests/slurm/stop.sh

Where no cluster answers ``sinfo``, every test here is skipped with that command as the reason. The
cluster of ``start.sh`` has no accounting database (no ``sacct``): submitit then learns that a job
finished from its result file, which is all a finished, failed or requeued job needs; only a job
cancelled outright is never reported, so that test stops the waiting launcher itself, as a user
would stop a sweep whose job was cancelled.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM = ["launcher=slurm", "device=cpu", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=15"]
TINY = ["num_samples=20", "batch_size=20", "sampler.steps=25", "quant.candidates=10", "quant.rounds=1",
        "quant.num_inputs=25", "quant.calib.num_samples=4"]
# A job long enough to outlast the time-limit test's first window (signal at most 120 s in): 60 batches of
# 20 images × 50 steps (about 150 s on 2 cores) after a short TQ-DiT calibration (a few seconds).
LONG = ["quant=mrq_tgq", "bits=8", "num_samples=1200", "batch_size=20", "sampler.steps=50",
        "quant.candidates=10", "quant.rounds=1", "quant.num_inputs=25", "quant.calib.num_samples=4"]
BATCHES = 60


def cluster_state() -> str | None:
    """The node states ``sinfo`` reports, or None if no cluster answers."""
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer.stdout.strip() if answer.returncode == 0 and answer.stdout.strip() else None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    state = cluster_state()
    if state is None:
        reason = ('no SLURM cluster answers `sinfo`: start one with eval "$(bash tests/slurm/start.sh)" '
                  "(as root; it installs slurm-wlm and munge if needed) and run python -m pytest -m slurm")
        if os.environ.get("TQDIT_REQUIRE_SLURM"):  # .ci/run: these tests must run, not skip
            pytest.fail(reason)
        pytest.skip(reason)
    return state


def command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "run.py", "-m", *SLURM, *overrides, f"hydra.sweep.dir={sweep_dir}",
            f"cache_dir={sweep_dir.parent / 'cache'}"]


def run_sweep(sweep_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command(sweep_dir, *overrides), cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def job_results(sweep_dir: Path) -> dict[Path, dict]:
    """results.json of every job of a sweep, by its directory (relative: a group override such as
    ``quant/recon=quick`` nests it one level deeper)."""
    return {p.parent.relative_to(sweep_dir): json.loads(p.read_text())
            for p in sweep_dir.rglob("results.json")}


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def shards(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.rglob("shards/samples_*.npz"))


def slurm_job(sweep_dir: Path) -> str | None:
    """The SLURM id of the sweep's first job, from submitit's folder: ``<array>_0`` where the sweep has
    several jobs (one array), the plain id where it has one."""
    folders = sorted(p.name for p in (sweep_dir / ".submitit").glob("*") if p.is_dir())
    return next((f for f in folders if f.endswith("_0")), folders[0] if folders else None)


def squeue_state(job_id: str) -> str:
    """RUNNING, PENDING, ... or '' once SLURM no longer lists the job."""
    answer = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                            timeout=15)
    return answer.stdout.strip()


def stop(launcher: subprocess.Popen, job_id: str | None) -> None:
    """Stop a sweep's launcher process (and its SLURM job, if given) so nothing outlives the test."""
    if job_id:
        subprocess.run(["scancel", job_id], timeout=15)
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
    launcher.wait(timeout=30)


def requeued_job_results(launcher: subprocess.Popen, output: str, sweep_dir: Path) -> tuple[Path, dict]:
    """The one job of a sweep that must have ended normally after at least one requeue."""
    assert launcher.returncode == 0, output[-3000:]
    (name, results), = job_results(sweep_dir).items()
    assert results["environment"]["slurm_restarts"] >= 1, "the job was never requeued"
    return name, results


def assert_same_samples_and_metrics(job: dict, job_dir: Path, reference: dict, reference_dir: Path):
    with np.load(reference_dir / "samples.npz") as a, np.load(job_dir / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert job["metrics"] == reference["metrics"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The long job run through to the end on SLURM: what an interrupted run must reproduce."""
    sweep_dir = tmp_path_factory.mktemp("uninterrupted") / "sweep"
    run_sweep(sweep_dir, *LONG)
    (name, results), = job_results(sweep_dir).items()
    return results, sweep_dir / name


def test_sweep_submits_one_slurm_job_per_setting_and_tables_them(tmp_path):
    """The README's sweep shape on SLURM: two methods, two SLURM jobs (distinct ids, run on the node),
    both finish, the end-of-sweep table has one row each with the job's own FID."""
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(sweep_dir, "quant=uniform,mrq_tgq", "bits=8", *TINY)
    jobs = job_results(sweep_dir)
    assert len(jobs) == 2
    ids = {r["environment"]["slurm_job_id"] for r in jobs.values()}
    assert len(ids) == 2 and None not in ids, ids  # each ran inside its own SLURM job
    table = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and "\n".join(table) in result.stdout  # header, rule, a row per job; printed
    csv = pd.read_csv(sweep_dir / "report.csv")
    fid = dict(zip(csv["method"], csv["fid"]))
    assert set(fid) == {"uniform", "mrq_tgq"}
    for results in jobs.values():
        assert fid[results["config"]["quant"]["name"]] == pytest.approx(results["metrics"]["fid"])


def test_failed_job_shows_as_failed_and_the_others_complete(tmp_path):
    """MRQ at 2 bits fails validation inside its SLURM job; FP beside it completes. The table shows
    the failure with its one-line reason and the sweep exits 1."""
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(sweep_dir, "quant=fp,mrq", "bits=2", *TINY, expect=1)
    table = (sweep_dir / "report.md").read_text()
    assert "| fp | FP |" in table
    assert "**failed**: TqditError: a_bits=2: multi-region quantization needs at least 3 bits" in table
    assert "1 job(s) failed" in result.stderr
    failed = next(r for r in job_results(sweep_dir).values() if r.get("status") == "failed")
    assert failed["environment"]["device"] == "cpu"


def test_cancelled_job_resumes_from_its_shards(tmp_path, uninterrupted):
    """``scancel`` after the job has written at least two batches; the same sweep command run again
    reads the finished batches back (``resumed_batches``), reuses the saved calibration, and ends
    with the uninterrupted run's samples and metrics."""
    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen(command(sweep_dir, *LONG), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    job_id = None
    try:
        wait_for(lambda: len(shards(sweep_dir)) >= 2, 300, "two finished batches")
        job_id = slurm_job(sweep_dir)
        subprocess.run(["scancel", job_id], check=True, timeout=15)
        wait_for(lambda: squeue_state(job_id) == "", 60, f"job {job_id} to leave the queue")
    finally:  # without accounting the launcher never learns of the cancellation: stop it as a user would
        stop(launcher, job_id)
    finished = shards(sweep_dir)
    assert 2 <= len(finished) < BATCHES and not list(sweep_dir.rglob("results.json"))

    run_sweep(sweep_dir, *LONG)
    (name, results), = job_results(sweep_dir).items()
    assert results["resumed_batches"] == len(finished)
    assert results["quant"]["resumed_calibration"] is True
    assert_same_samples_and_metrics(results, sweep_dir / name, *uninterrupted)


def test_job_at_its_time_limit_is_requeued_and_completes(tmp_path, uninterrupted):
    """A 4-minute time limit with the warning signal 180 s before it: slurmctld checks time limits once a
    minute, so SLURM signals the job between 60 and 120 s after its start — mid-sampling (the job
    needs about 150 s) — submitit checkpoints it through the launcher and requeues it, and the
    requeued job resumes: every batch finished before the signal is read back (at most the batch in
    flight is lost). Each run gets such a window, so the job completes after one or more requeues
    (the test allows 10); the sweep command itself ends normally, with the uninterrupted run's samples
    and metrics.

    Mutation caught (checked on this test's earlier 3-minute version, which took the config's requeue
    limit): the job's shards removed at the start of each run (every run starts over, the requeues
    run out, the sweep fails)."""
    sweep_dir = tmp_path / "sweep"
    limits = ["hydra.launcher.timeout_min=4", "hydra.launcher.signal_delay_s=180",
              "hydra.launcher.max_num_timeout=10"]
    launcher = subprocess.Popen(command(sweep_dir, *LONG, *limits), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    job_id = None
    try:
        job_id = wait_for(lambda: slurm_job(sweep_dir), 60, "the SLURM job")
        wait_for(lambda: squeue_state(job_id) == "RUNNING", 120, f"job {job_id} to run")
        seen = []  # batches finished while the first run was running
        while squeue_state(job_id) == "RUNNING" and launcher.poll() is None:
            seen = shards(sweep_dir)
            time.sleep(0.5)
        output, _ = launcher.communicate(timeout=600)
    finally:
        stop(launcher, job_id if launcher.poll() is None else None)
    name, results = requeued_job_results(launcher, output, sweep_dir)
    assert 1 <= len(seen) < BATCHES, seen  # the signal came mid-sampling
    assert results["resumed_batches"] >= len(seen)
    assert results["quant"]["resumed_calibration"] is True
    assert_same_samples_and_metrics(results, sweep_dir / name, *uninterrupted)


# Q-Diffusion with a short reconstruction (4 blocks), few samples: the job's time is its calibration.
RECONSTRUCTING = ["quant=qdiffusion", "bits=8", "quant/recon=quick", "quant.recon.iters=200",
                  "quant.recon.act_iters=60", "quant.num_inputs=32", "quant.calib.num_samples=4",
                  "num_samples=20", "batch_size=20", "sampler.steps=25"]


def test_reconstruction_signalled_like_a_time_limit_resumes_after_its_last_finished_block(tmp_path):
    """Q-Diffusion on SLURM, signalled once two of its four blocks are reconstructed with the signal
    SLURM sends before a time limit or a preemption (``scancel --signal=USR2``: sent by hand, because
    the controller's once-a-minute check makes the moment of a real time-limit signal too coarse for a
    one-minute reconstruction; the time-limit test above covers that path; submitit counts this one
    as a preemption, the job having run less than its time limit): submitit requeues the job, which
    loads every block finished before the signal (``reconstruction.resumed_blocks``; at most the
    block in flight is lost), completes, and ends with the uninterrupted run's calibration, tensor for
    tensor, and its samples and metrics."""
    from safetensors.torch import load_file

    reference_dir = tmp_path / "uninterrupted"
    run_sweep(reference_dir, *RECONSTRUCTING)
    (reference_name, reference), = job_results(reference_dir).items()

    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen(command(sweep_dir, *RECONSTRUCTING), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    job_id = None

    def blocks() -> list[str]:
        return sorted(p.name for p in sweep_dir.rglob("reconstruction/block_*.safetensors"))

    try:
        seen = wait_for(lambda: len(blocks()) >= 2 and blocks(), 300, "two reconstructed blocks", poll_s=0.2)
        job_id = slurm_job(sweep_dir)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=15)
        output, _ = launcher.communicate(timeout=600)
    finally:
        stop(launcher, job_id if launcher.poll() is None else None)
    name, results = requeued_job_results(launcher, output, sweep_dir)
    assert len(seen) < 4, seen  # signalled mid-reconstruction
    assert results["quant"]["reconstruction"]["resumed_blocks"] >= len(seen)
    saved = [load_file(d / "quant_params.safetensors")
             for d in (reference_dir / reference_name, sweep_dir / name)]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key
    assert_same_samples_and_metrics(results, sweep_dir / name, reference, reference_dir / reference_name)
