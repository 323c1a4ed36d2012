"""Comparison tables: one row per setting, seeds averaged, ΔFID paired by protocol and seed, CSV/LaTeX output.

Jobs are written with the resolved configuration Hydra composes for their overrides (as ``run.py``
would record it), so the report sees exactly the keys a real sweep gives it.
"""

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tqdit.pipeline.sweep import recorded_config
from tqdit.report import load_results, summarize, to_markdown

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def resolved_config(overrides: tuple[str, ...]) -> str:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return json.dumps(recorded_config(cfg))  # as a job records it


def write_job(
    root: Path, overrides: list[str], fid: float, device: str = "cuda:0", failed: bool = False
) -> Path:
    config = json.loads(resolved_config(tuple(overrides)))
    job = root / ",".join(overrides)
    job.mkdir(parents=True)
    method = config["quant"]["name"]
    if failed:
        result = {
            "status": "failed",
            "error": "RuntimeError: boom",
            "config": config,
            "environment": {"device": device},
        }
    else:
        quant = {"method": method}
        if method != "fp":
            quant.update(
                calibration_s=10.0 + config["seed"],
                peak_memory_bytes=2e9,
                peak_memory_kind="cuda_max_allocated",
            )
        result = {
            "config": config,
            "quant": quant,
            "num_samples": config["num_samples"],
            "seed": config["seed"],
            "environment": {"device": device},
            "metrics": {"fid": fid, "sfid": 2 * fid, "is": 9.0, "precision": 0.8, "recall": 0.7},
        }
    (job / "results.json").write_text(json.dumps(result))
    return job


FP = [14.0, 12.0, 16.0]
UNIFORM_6 = [20.0, 17.0, 23.5]
MRQ_TGQ_6 = [13.0, 11.5, 15.0]


def make_sweep(root: Path) -> None:
    for seed in range(3):
        write_job(root / "a", ["quant=fp", f"seed={seed}"], FP[seed])
        write_job(root / "b", ["quant=uniform", "bits=6", f"seed={seed}"], UNIFORM_6[seed])
        write_job(root / "b", ["quant=mrq_tgq", "bits=6", "groups=10", f"seed={seed}"], MRQ_TGQ_6[seed])
    write_job(
        root / "b", ["quant=mrq_tgq", "bits=8", "groups=10", "seed=0"], 14.5
    )  # one seed only: no spread


def test_summary_means_spreads_and_paired_delta(tmp_path):
    make_sweep(tmp_path)
    table = summarize(load_results([tmp_path / "a", tmp_path / "b"]))  # two directories merge into one table
    assert list(table["method"]) == ["fp", "mrq_tgq", "uniform", "mrq_tgq"]  # FP, then W8A8, then W6A6
    assert list(table["seeds"]) == [3, 1, 3, 3]
    assert list(table["seed_list"]) == ["0 1 2", "0", "0 1 2", "0 1 2"]
    row = table[(table["method"] == "uniform")].iloc[0]
    assert np.isclose(row["fid"], np.mean(UNIFORM_6)) and np.isclose(
        row["fid_std"], np.std(UNIFORM_6, ddof=1)
    )
    paired = np.subtract(UNIFORM_6, FP)
    assert np.isclose(row["dfid"], paired.mean()) and np.isclose(row["dfid_std"], paired.std(ddof=1))
    # the paired spread is smaller than the spread of either FID: that is the point of pairing
    assert row["dfid_std"] < row["fid_std"]
    single = table[(table["method"] == "mrq_tgq") & (table["w_bits"] == 8)].iloc[0]
    assert np.isclose(single["dfid"], 14.5 - FP[0]) and single["calibration_s"] == 10.0
    assert np.isclose(table.iloc[1:]["peak_gb"], 2.0).all()


def test_jobs_that_differ_in_any_setting_are_separate_rows_with_that_setting_as_a_column(tmp_path):
    """The defect this guards: rows keyed by (model, method, bits, G, steps, N) only, so a sweep of
    ``quant.search=hessian,mse`` (experiment=embedded_ablation) averaged both rules as "6 seeds".
    Mutation caught: grouping by the NAMED columns only (the old KEYS) merges the rows below."""
    for seed, (hessian, mse) in enumerate([(13.0, 15.0), (12.0, 14.5), (14.0, 16.0)]):
        write_job(tmp_path, ["quant=mrq_tgq", "bits=6", "quant.search=hessian", f"seed={seed}"], hessian)
        write_job(tmp_path, ["quant=mrq_tgq", "bits=6", "quant.search=mse", f"seed={seed}"], mse)
        write_job(
            tmp_path,
            ["quant=mrq_tgq", "bits=6", "quant.search=mse", "sampler.cfg_scale=1.25", f"seed={seed}"],
            30.0,
        )
    table = summarize(load_results([tmp_path]))
    assert len(table) == 3 and list(table["seeds"]) == [3, 3, 3]
    by_setting = {(r["quant.search"], r["sampler.cfg_scale"]): r["fid"] for _, r in table.iterrows()}
    assert by_setting == pytest.approx({("hessian", 1.1): 13.0, ("mse", 1.1): np.mean([15.0, 14.5, 16.0]),
                                        ("mse", 1.25): 30.0})
    header = to_markdown(table).splitlines()[0]
    assert "quant.search" in header and "sampler.cfg_scale" in header  # the varying keys are columns
    assert "quant.scope" not in header  # a key every row shares is not


def test_fp_pairing_uses_every_protocol_key(tmp_path):
    """ΔFID compares with FP sampled the same way: an FP job at another guidance scale, or on
    another device type, is not a pair. Mutation caught: pairing by (model, steps, N, seed) only
    subtracts the cfg 1.25 FP job (FID 50) from the cfg 1.5 job."""
    write_job(tmp_path, ["quant=fp", "sampler.cfg_scale=1.25", "seed=0"], 50.0)
    write_job(tmp_path, ["quant=fp", "seed=0"], 14.0, device="cpu")
    write_job(tmp_path, ["quant=mrq_tgq", "seed=0"], 13.0)
    table = summarize(load_results([tmp_path]))
    quantized = table[table["method"] == "mrq_tgq"].iloc[0]
    assert np.isnan(quantized["dfid"])  # no FP job with the default cfg (1.1) on a GPU
    write_job(tmp_path, ["quant=fp", "seed=0", "num_samples=501"], 99.0)  # another N: not a pair either
    write_job(tmp_path / "gpu", ["quant=fp", "seed=0"], 14.5)
    table = summarize(load_results([tmp_path]))
    assert np.isclose(table[table["method"] == "mrq_tgq"].iloc[0]["dfid"], 13.0 - 14.5)


def test_results_recorded_before_a_setting_existed_join_its_default_row(tmp_path):
    """A reconstruction result written before ``quant.recon.precision`` existed ran in fp32: it joins
    the fp32 row, not a row of its own; bf16 is another row. Mutation caught: dropping the fill-in of
    ADDED_LATER keys (three rows, the old one with precision blank)."""
    old = write_job(tmp_path, ["quant=qdiffusion", "quant/recon=quick", "seed=0"], 14.0)
    result = json.loads((old / "results.json").read_text())
    del result["config"]["quant"]["recon"]["precision"]
    (old / "results.json").write_text(json.dumps(result))
    write_job(tmp_path, ["quant=qdiffusion", "quant/recon=quick", "seed=1"], 12.0)
    bf16 = ["quant=qdiffusion", "quant/recon=quick", "quant.recon.precision=bf16", "seed=0"]
    write_job(tmp_path, bf16, 13.0)
    table = summarize(load_results([tmp_path]))
    assert sorted(zip(table["quant.recon.precision"], table["seeds"])) == [("bf16", 1), ("fp32", 2)]


def test_results_from_before_the_reconstruction_keys_keep_their_rows(tmp_path):
    """Results written before ``quant.recon.reduction``, ``act_p`` and ``outside_blocks`` existed: a method
    that does not reconstruct joins today's row (its quant.recon keys mean nothing to it), a reconstructing
    method's old result is its own setting (it ran the per-input sum, blocks only). Mutation caught:
    ``outside_blocks`` missing from ADDED_LATER (the old TQ-DiT job becomes a row of its own)."""
    for method, seed in (("mrq_tgq", 0), ("qdiffusion", 0)):
        old = write_job(tmp_path, [f"quant={method}", "quant/recon=quick", f"seed={seed}"], 14.0)
        result = json.loads((old / "results.json").read_text())
        for key in ("reduction", "act_p", "outside_blocks"):
            del result["config"]["quant"]["recon"][key]
        (old / "results.json").write_text(json.dumps(result))
        write_job(tmp_path, [f"quant={method}", "quant/recon=quick", f"seed={seed + 1}"], 12.0)
    table = summarize(load_results([tmp_path]))
    rows = sorted(zip(table["method"], table["quant.recon.outside_blocks"].astype(str), table["seeds"]))
    assert rows == [("mrq_tgq", "–", 2), ("qdiffusion", "False", 1), ("qdiffusion", "True", 1)]


def test_results_of_another_reconstruction_algorithm_keep_their_rows(tmp_path):
    """A job records the version of the reconstruction code that fitted it (quant.recon.algorithm);
    results from before it was recorded read as version 1. A reconstructing method's old and new results
    are two rows, a method that does not reconstruct keeps one. Mutations caught: the version not
    recorded (recorded_config), or missing from ADDED_LATER (the old Q-Diffusion row's key is blank)."""
    for method in ("mrq_tgq", "qdiffusion"):
        old = write_job(tmp_path, [f"quant={method}", "seed=0"], 14.0)
        result = json.loads((old / "results.json").read_text())
        del result["config"]["quant"]["recon"]["algorithm"]
        (old / "results.json").write_text(json.dumps(result))
        write_job(tmp_path, [f"quant={method}", "seed=1"], 12.0)
    table = summarize(load_results([tmp_path]))
    rows = sorted(zip(table["method"], table["quant.recon.algorithm"].astype(str), table["seeds"]))
    assert rows == [("mrq_tgq", "–", 2), ("qdiffusion", "1", 1), ("qdiffusion", "2", 1)]


def test_settings_a_method_ignores_do_not_split_its_rows(tmp_path):
    """FP's rows do not split by bit width or quantizer settings, nor a method without time groups by G
    (the job runs those once; an old sweep holding both must still give one row)."""
    write_job(tmp_path, ["quant=fp", "bits=6", "seed=0"], 14.0)
    write_job(tmp_path, ["quant=fp", "bits=8", "quant.search=mse", "seed=1"], 12.0)
    write_job(tmp_path, ["quant=uniform", "groups=5", "seed=0"], 15.0)
    write_job(tmp_path, ["quant=uniform", "groups=25", "seed=1"], 13.0)
    table = summarize(load_results([tmp_path]))
    assert list(table["method"]) == ["fp", "uniform"] and list(table["seeds"]) == [2, 2]
    assert np.allclose(table["dfid"], [0.0, 1.0])


def test_markdown_marks_missing_fp_pair_and_failed_settings(tmp_path):
    write_job(tmp_path, ["quant=uniform", "seed=5"], 20.0)  # no FP job of seed 5
    write_job(tmp_path, ["quant=ptq4dm", "seed=5"], 0.0, failed=True)
    text = to_markdown(summarize(load_results([tmp_path])))
    rows = [line.split("|") for line in text.splitlines()[2:4]]
    uniform = next(r for r in rows if r[1].strip() == "uniform")
    assert uniform[2].strip() == "W8A8" and uniform[6].strip() == "–"
    failed = next(r for r in rows if r[1].strip() == "ptq4dm")
    assert "**failed**: RuntimeError: boom" in failed[5]
    assert "never chosen on an evaluation metric" in text and "sampler.cfg_scale=1.1" in text


def test_cpu_peak_is_marked_as_process_rss(tmp_path):
    """The peak column mixed the CPU's process RSS with the CUDA allocator peak; a CPU row says RSS."""
    job = write_job(tmp_path, ["quant=uniform", "seed=0"], 20.0, device="cpu")
    result = json.loads((job / "results.json").read_text())
    result["quant"]["peak_memory_kind"] = "process_max_rss"
    (job / "results.json").write_text(json.dumps(result))
    text = to_markdown(summarize(load_results([tmp_path])))
    assert "2.00 RSS" in text


def test_command_line_writes_csv_and_latex(tmp_path):
    make_sweep(tmp_path / "sweep")
    csv, latex = tmp_path / "t.csv", tmp_path / "t.tex"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tqdit.report",
            str(tmp_path / "sweep"),
            "--csv",
            str(csv),
            "--latex",
            str(latex),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| uniform | W6A6 | – | 50 | 20.17 ± 3.25 | +6.17 ± 1.26 |" in result.stdout
    assert len(pd.read_csv(csv)) == 4 and "\\begin{tabular}" in latex.read_text()


def test_delta_fid_says_when_only_some_seeds_have_an_fp_partner(tmp_path):
    """ΔFID averaged over the paired seeds alone must not pass for the row's: FP has seed 0 only."""
    write_job(tmp_path, ["quant=fp", "seed=0"], 10.0)
    for seed, fid in enumerate([11.0, 30.0, 30.0]):
        write_job(tmp_path, ["quant=uniform", f"seed={seed}"], fid)
    table = summarize(load_results([tmp_path]))
    row = table[table["method"] == "uniform"].iloc[0]
    assert row["seeds"] == 3 and row["dfid_pairs"] == 1 and np.isclose(row["dfid"], 1.0)
    assert "+1.00 (1 of 3 seeds paired)" in to_markdown(table)


def test_defaults_that_only_feed_other_keys_do_not_split_rows_and_numbers_sort_by_value(tmp_path):
    """``model.cfg_scale`` only supplies ``sampler.cfg_scale``'s default: the same guidance reached
    either way is one setting. Steps sort 50, 100, 250 (not as text)."""
    write_job(tmp_path, ["quant=fp", "sampler.cfg_scale=1.5", "seed=0"], 14.0)
    write_job(tmp_path, ["quant=fp", "model.cfg_scale=1.5", "seed=1"], 12.0)
    for steps in (250, 50, 100):
        write_job(tmp_path, ["quant=fp", f"sampler.steps={steps}", "seed=0"], float(steps))
    table = summarize(load_results([tmp_path]))
    guided = table[table["sampler.cfg_scale"] == 1.5]
    assert len(guided) == 1 and guided.iloc[0]["seeds"] == 2
    assert list(table.loc[table["sampler.cfg_scale"] == 1.1, "steps"]) == [50, 100, 250]


def test_a_search_on_the_evaluation_metric_is_named_under_the_table(tmp_path):
    """Q-DiT's FID-fitness search picks settings by the metric the table reports; the caption says so, and
    only then. Mutation caught: the note keyed on the method name (an output_mse Q-DiT row gets it too)."""
    write_job(tmp_path / "fid", ["quant=qdit", "w_bits=4", "seed=0"], 8.0)
    write_job(tmp_path / "fid", ["quant=fp", "seed=0"], 7.0)
    write_job(tmp_path / "mse", ["quant=qdit", "w_bits=4", "quant.params.fitness=output_mse", "seed=0"], 9.0)
    write_job(tmp_path / "mse", ["quant=ditas", "w_bits=4", "seed=0"], 9.0)
    note = "chose their per-layer group sizes by FID against the evaluation reference"
    assert note in to_markdown(summarize(load_results([tmp_path / "fid"])))
    assert note not in to_markdown(summarize(load_results([tmp_path / "mse"])))
