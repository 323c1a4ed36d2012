"""Comparison tables: grouping over seeds, paired ΔFID, ordering, CSV/LaTeX output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tqdit.report import load_results, summarize, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def write_job(root: Path, method: str, bits: int | None, seed: int, fid: float, groups: int | None = None) -> None:
    job = root / f"{method}-{bits}-{seed}"
    job.mkdir(parents=True)
    quant = {"method": method, "w_bits": bits, "a_bits": bits, "groups": groups}
    if method != "fp":
        quant.update(calibration_s=10.0 + seed, peak_memory_bytes=2e9)
    result = {"config": {"model": {"arch": "DiT-MNIST"}, "sampler": {"steps": 50}}, "quant": quant, "num_samples": 100,
              "seed": seed, "metrics": {"fid": fid, "sfid": 2 * fid, "is": 9.0, "precision": 0.8, "recall": 0.7}}
    (job / "results.json").write_text(json.dumps(result))


FP = [14.0, 12.0, 16.0]
UNIFORM_6 = [20.0, 17.0, 23.5]
MRQ_TGQ_6 = [13.0, 11.5, 15.0]


def make_sweep(root: Path) -> None:
    for seed in range(3):
        write_job(root / "a", "fp", None, seed, FP[seed])
        write_job(root / "b", "uniform", 6, seed, UNIFORM_6[seed])
        write_job(root / "b", "mrq_tgq", 6, seed, MRQ_TGQ_6[seed], groups=10)
    write_job(root / "b", "mrq_tgq", 8, 0, 14.5, groups=10)  # one seed only: no spread


def test_summary_means_spreads_and_paired_delta(tmp_path):
    make_sweep(tmp_path)
    table = summarize(load_results([tmp_path / "a", tmp_path / "b"]))  # two directories merge into one table
    assert list(table["method"]) == ["fp", "mrq_tgq", "uniform", "mrq_tgq"]  # FP, then W8A8, then W6A6
    assert list(table["seeds"]) == [3, 1, 3, 3]
    row = table[(table["method"] == "uniform")].iloc[0]
    assert np.isclose(row["fid"], np.mean(UNIFORM_6)) and np.isclose(row["fid_std"], np.std(UNIFORM_6, ddof=1))
    paired = np.subtract(UNIFORM_6, FP)
    assert np.isclose(row["dfid"], paired.mean()) and np.isclose(row["dfid_std"], paired.std(ddof=1))
    # the paired spread is smaller than the spread of either FID: that is the point of pairing
    assert row["dfid_std"] < row["fid_std"]
    single = table[(table["method"] == "mrq_tgq") & (table["w_bits"] == 8)].iloc[0]
    assert np.isclose(single["dfid"], 14.5 - FP[0]) and single["calibration_s"] == 10.0
    assert np.isclose(table.iloc[1:]["peak_gb"], 2.0).all()


def test_markdown_marks_missing_fp_pair(tmp_path):
    write_job(tmp_path, "uniform", 8, 5, 20.0)  # no FP job of seed 5
    text = to_markdown(summarize(load_results([tmp_path])))
    row = text.splitlines()[2].split("|")
    assert row[1].strip() == "uniform" and row[2].strip() == "W8A8" and row[6].strip() == "–"


def test_command_line_writes_csv_and_latex(tmp_path):
    make_sweep(tmp_path / "sweep")
    csv, latex = tmp_path / "t.csv", tmp_path / "t.tex"
    result = subprocess.run([sys.executable, "-m", "tqdit.report", str(tmp_path / "sweep"), "--csv", str(csv), "--latex", str(latex)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| uniform | W6A6 | – | 50 | 20.17 ± 3.25 | +6.17 ± 1.26 |" in result.stdout
    assert len(pd.read_csv(csv)) == 4 and "\\begin{tabular}" in latex.read_text()
