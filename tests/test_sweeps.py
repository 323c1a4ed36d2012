"""Sweeps as users run them: the mission command, the end-of-sweep table, failures, launchers, W&B,
notebooks."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tqdit.pipeline.sweep import claimed_gpu, takes_gpu_slot

ROOT = Path(__file__).resolve().parents[1]
TINY = ["num_samples=20", "batch_size=20", "sampler.steps=25", "quant.candidates=10", "quant.rounds=1",
        "quant.num_inputs=25", "quant.calib.num_samples=4"]


def sweep(tmp: Path, *arguments: str, expect: int = 0) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "run.py",
        "-m",
        *arguments,
        f"hydra.sweep.dir={tmp}",
        f"cache_dir={tmp.parent / 'cache'}",
        *TINY,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def mission(tmp_path_factory):
    """The README's command, verbatim, plus overrides that only make it small."""
    directory = tmp_path_factory.mktemp("mission") / "sweep"
    result = sweep(directory, "quant=mrq_tgq", "bits=6,8", "groups=5,10,25")
    return directory, result


def test_mission_command_makes_six_jobs_and_a_six_row_table(mission):
    directory, result = mission
    jobs = sorted(p.parent for p in directory.rglob("results.json"))
    assert len(jobs) == 6
    names = {p.name for p in jobs}
    assert any(
        {"bits=6", "groups=25", "quant=mrq_tgq"} <= set(n.split(",")) for n in names
    )  # named by the overrides
    table = [line for line in (directory / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 6  # header, rule, one row per setting (a caption follows)
    assert "\n".join(table) in result.stdout  # printed at the end of the sweep
    csv = pd.read_csv(directory / "report.csv")
    assert sorted(zip(csv["w_bits"], csv["groups"])) == [(6, 5), (6, 10), (6, 25), (8, 5), (8, 10), (8, 25)]
    fid = {(r["w_bits"], r["groups"]): r["fid"] for _, r in csv.iterrows()}
    for job in jobs:  # every row is the job's own number
        result_json = json.loads((job / "results.json").read_text())
        assert fid[(result_json["quant"]["w_bits"], result_json["quant"]["groups"])] == pytest.approx(
            result_json["metrics"]["fid"]
        )
    assert "\\begin{tabular}" in (directory / "report.tex").read_text()
    for plot in ("fid_vs_bits.png", "fid_vs_groups.png"):
        assert (directory / plot).stat().st_size > 10_000


@pytest.mark.parametrize(
    "notebook", ["fid_vs_groups", "method_bits_heatmap", "activation_ranges", "cost_vs_quality"]
)
def test_analysis_notebooks_run_top_to_bottom(mission, notebook, monkeypatch):
    directory, _ = mission
    monkeypatch.setenv("TQDIT_SWEEP", str(directory))
    monkeypatch.chdir(ROOT / "analysis")
    monkeypatch.syspath_prepend(str(ROOT / "analysis"))
    runpy.run_path(str(ROOT / "analysis" / f"{notebook}.py"), run_name="__main__")
    assert (directory / "analysis" / f"{notebook}.png").stat().st_size > 5_000


def test_activation_ranges_differ_between_time_groups(mission):
    directory, _ = mission
    ranges = pd.read_csv(next(p for p in directory.rglob("activation_ranges.csv") if "groups=5," in str(p)))
    qkv = ranges[(ranges["layer"] == "blocks.0.attn.qkv") & (ranges["operand"] == "act")]
    assert sorted(qkv["group"]) == [0, 1, 2, 3, 4] and qkv["high"].nunique() > 1


def test_failed_job_is_shown_as_failed_without_hiding_the_others(tmp_path):
    result = sweep(tmp_path / "sweep", "quant=fp,mrq", "bits=2", expect=1)  # mrq needs ≥ 3 activation bits
    table = (tmp_path / "sweep" / "report.md").read_text()
    assert "| fp | FP |" in table
    assert (
        "| mrq | W2A2 |" in table
        and "**failed**: TqditError: a_bits=2: multi-region quantization needs at least 3 bits" in table
    )
    assert "1 job(s) failed" in result.stderr
    failed = next(p for p in (tmp_path / "sweep").rglob("results.json") if "quant=mrq" in str(p))
    assert json.loads(failed.read_text())["status"] == "failed" and (failed.parent / "error.log").is_file()


@pytest.mark.slow  # 27 s on a 2-core CPU; the sweeps through the basic launcher stay in the default suite
def test_submitit_local_launcher_runs_the_sweep(tmp_path):
    sweep(tmp_path / "sweep", "launcher=submitit_local", "quant=fp", "seed=0,1")
    csv = pd.read_csv(tmp_path / "sweep" / "report.csv")
    assert len(csv) == 1 and csv["seeds"].iloc[0] == 2
    assert len(list((tmp_path / "sweep").rglob("*_submitted.pkl"))) == 2  # really submitted through submitit


def test_local_gpus_launcher_runs_one_job_per_gpu():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["launcher=local_gpus", "gpu_slots=4"], return_hydra_config=True
        )
    assert cfg.gpu_slots == 4 and cfg.hydra.launcher.n_jobs == 4 and "Joblib" in cfg.hydra.launcher._target_


def test_local_gpus_launcher_runs_cpu_jobs_in_separate_joblib_workers(tmp_path):
    """launcher=local_gpus run for real on the CPU: two jobs, each in its own joblib (loky) worker process.

    device=cpu takes no GPU slot (run.py, takes_gpu_slot): gpu_slots=2 only makes joblib run two jobs at a
    time. Mutations caught: the GPU slot taken whatever the device (both jobs fail: cuda:0 without CUDA);
    n_jobs: 1 in conf/launcher/local_gpus.yaml (joblib then runs the jobs in the parent process); the
    launcher override removed from it (the basic launcher, in-process)."""
    directory = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "launcher=local_gpus", "gpu_slots=2", "device=cpu",
               "quant=uniform,fp", f"hydra.sweep.dir={directory}", f"cache_dir={tmp_path / 'cache'}", *TINY]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    results = [json.loads(path.read_text()) for path in directory.rglob("results.json")]
    jobs = {r["quant"]["method"]: r for r in results}
    assert len(results) == 2 and set(jobs) == {"uniform", "fp"} and all("metrics" in r for r in results)
    assert all(r["environment"]["device"] == "cpu" for r in jobs.values())
    pids = {r["environment"]["pid"] for r in jobs.values()}
    assert len(pids) == 2 and process.pid not in pids  # two worker processes, neither the sweep's own
    assert "Joblib.Parallel(n_jobs=2," in stdout + stderr  # Hydra's joblib launcher, two at a time
    assert not (directory / ".gpu_locks").exists()  # no GPU was claimed
    table = [line for line in (directory / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and "failed" not in "\n".join(table)
    assert any(row.startswith("| fp | FP | – | 25 |") for row in table)
    assert any(row.startswith("| uniform | W8A8 | – | 25 |") for row in table)
    assert "\n".join(table) in stdout  # printed at the end of the sweep
    assert not takes_gpu_slot("cpu") and takes_gpu_slot("cuda:1")


def test_gpu_slots_are_exclusive(tmp_path):
    with (
        claimed_gpu(3, tmp_path) as first,
        claimed_gpu(3, tmp_path) as second,
        claimed_gpu(3, tmp_path) as third,
    ):
        assert sorted([first, second, third]) == [0, 1, 2]
    with claimed_gpu(3, tmp_path) as again:
        assert again == 0  # released when the jobs ended


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    job = tmp_path / "job"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [sys.executable, "run.py", "logger=wandb", "quant=tgq", "groups=2", f"hydra.run.dir={job}",
               f"cache_dir={tmp_path / 'cache'}", *TINY[:2], "sampler.steps=4", *TINY[3:]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((job / "results.json").read_text())
    run_dir = next((job / "wandb").glob("offline-run-*"))
    data = next(run_dir.glob("*.wandb")).read_bytes()
    for value in (results["metrics"]["fid"], results["metrics"]["is"], results["quant"]["calibration_s"]):
        assert json.dumps(value).encode() in data  # the summary as W&B stores it
    assert b"tgq" in data  # job_type = method
    assert list(run_dir.glob("files/media/images/samples_*.png")) and list(
        run_dir.glob("files/media/table/activation_ranges_*.json")
    )


def test_wandb_failure_never_loses_local_results(tmp_path):
    job = tmp_path / "job"
    env = {**os.environ, "WANDB_MODE": "not-a-mode"}
    command = [
        sys.executable,
        "run.py",
        "logger=wandb",
        "quant=fp",
        f"hydra.run.dir={job}",
        f"cache_dir={tmp_path / 'cache'}",
        *TINY[:2],
        "sampler.steps=4",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: W&B logging failed" in result.stdout
    assert "metrics" in json.loads((job / "results.json").read_text())


@pytest.mark.parametrize(
    "name, arch_size, samples",
    [
        ("imagenet_main", 32, 10000),
        ("imagenet_ablation", 32, 10000),
        ("imagenet_groups", 32, 10000),
        ("imagenet_steps", 32, 10000),
        ("imagenet512_main", 64, 5000),
    ],
)
def test_imagenet_experiments_compose_the_paper_setting(name, arch_size, samples):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
        mrq_tgq = compose("config", overrides=[f"experiment={name}", "quant=mrq_tgq"])
        ptq4dm = compose("config", overrides=[f"experiment={name}", "quant=ptq4dm"])
    assert cfg.model.arch == "DiT-XL/2" and cfg.model.input_size == arch_size and cfg.model.latent
    assert cfg.eval.feature_extractor == "tqdit-inception-v3" and cfg.eval.is_split_size == 5000
    assert (
        cfg.num_samples == samples
        and cfg.sampler.steps == 250
        and cfg.sampler.cfg_scale == 1.5
        and cfg.dtype == "bf16"
        and cfg.compile
    )
    assert "bits" in cfg.hydra.sweeper.params
    assert (
        mrq_tgq.quant.num_inputs == 256 and ptq4dm.quant.num_inputs == 1024
    )  # the search size per model; papers' own sizes kept
