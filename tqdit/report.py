"""Comparison tables from job directories: ``python -m tqdit.report DIR [DIR ...] [--csv F] [--latex F]``.

Reads every ``results.json`` below the given directories (several sweeps merge into one table),
groups jobs that differ only in the sampling seed, and prints mean ± std over seeds: FID, sFID,
IS, precision, recall, ΔFID vs the FP job of the same setting and seed (paired), calibration seconds and peak GB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

METRICS = ["fid", "sfid", "is", "precision", "recall"]
KEYS = ["model", "method", "w_bits", "a_bits", "groups", "steps", "num_samples"]
METHOD_ORDER = ["fp", "uniform", "ptq4dm", "qdiffusion", "ptq4dit", "mrq", "tgq", "mrq_tgq"]  # baselines, then TQ-DiT's parts


def load_results(directories: list[str | Path]) -> pd.DataFrame:
    rows = []
    for directory in directories:
        for path in sorted(Path(directory).rglob("results.json")):
            result = json.loads(path.read_text())
            if "duplicate_of" in result:  # a job its method did not need (see pipeline.job.identical_finished_job)
                continue
            quant, config = result.get("quant", {"method": "fp"}), result["config"]
            rows.append({
                "model": config["model"]["arch"], "method": quant["method"], "w_bits": quant.get("w_bits"),
                "a_bits": quant.get("a_bits"), "groups": quant.get("groups"), "steps": config["sampler"]["steps"],
                "num_samples": result["num_samples"], "seed": result["seed"], **result["metrics"],
                "calibration_s": quant.get("calibration_s"), "peak_gb": (quant.get("peak_memory_bytes") or 0) / 1e9 or None,
                "job_dir": str(path.parent),
            })
    if not rows:
        raise SystemExit(f"no results.json below {', '.join(map(str, directories))}")
    return pd.DataFrame(rows)


def paired_fid_change(frame: pd.DataFrame) -> pd.Series:
    """Per job: FID minus the FID of the FP job with the same model, steps, N and seed (NaN without one).

    Pairing by seed removes most of the seed-to-seed spread, which at small N is larger than the
    effect of 8-bit quantization (the same seed means the same noise and labels for every method).
    """
    pair = ["model", "steps", "num_samples", "seed"]
    fp = frame[frame["method"] == "fp"].drop_duplicates(pair).set_index(pair)["fid"]
    return pd.Series([row.fid - fp.get(tuple(getattr(row, k) for k in pair), float("nan")) for row in frame.itertuples()],
                     index=frame.index, dtype=float)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: mean and std over seeds, and ΔFID vs FP paired by seed (mean ± std)."""
    keys = [k for k in KEYS if k in frame]
    filled = frame.assign(**{k: frame[k].astype(object).where(frame[k].notna(), "–") for k in keys})
    filled["dfid"] = paired_fid_change(frame)
    grouped = filled.groupby(keys, sort=False, dropna=False)
    table = grouped[METRICS + ["dfid", "calibration_s", "peak_gb"]].mean()
    spread = grouped[METRICS + ["dfid"]].std(ddof=1).add_suffix("_std")
    table = table.join(spread).join(grouped.size().rename("seeds")).reset_index()
    return table.sort_values(by=["model", "steps", "num_samples", "w_bits", "a_bits", "method", "groups"],
                             key=_sort_key, ascending=[True, True, True, False, False, True, True], kind="stable",
                             ignore_index=True)


def _sort_key(column: pd.Series) -> pd.Series:
    """FP first, then widest bits first; methods in METHOD_ORDER; "–" (not applicable) sorts as +inf."""
    if column.name == "method":
        return column.map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    if column.name in ("w_bits", "a_bits", "groups"):
        return column.map(lambda v: float("inf") if v == "–" else float(v))
    return column


def to_markdown(table: pd.DataFrame) -> str:
    def cell(row, metric, digits):
        std = row.get(f"{metric}_std")
        return f"{row[metric]:.{digits}f}" + (f" ± {std:.{digits}f}" if pd.notna(std) and row["seeds"] > 1 else "")

    def signed(row, metric):
        if pd.isna(row[metric]):
            return "–"
        std = row.get(f"{metric}_std")
        return f"{row[metric]:+.2f}" + (f" ± {std:.2f}" if pd.notna(std) and row["seeds"] > 1 else "")

    def integer(value):
        return "–" if value == "–" or pd.isna(value) else str(int(value))

    def bits(row):
        return "FP" if row["method"] == "fp" else f"W{integer(row['w_bits'])}A{integer(row['a_bits'])}"

    lines = ["| method | bits | G | FID | ΔFID | sFID | IS | precision | recall | calib s | peak GB | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        calib = "–" if pd.isna(row["calibration_s"]) else f"{row['calibration_s']:.0f}"
        peak = "–" if pd.isna(row["peak_gb"]) else f"{row['peak_gb']:.2f}"
        lines.append(f"| {row['method']} | {bits(row)} | {integer(row['groups'])} | {cell(row, 'fid', 2)} | {signed(row, 'dfid')} | "
                     f"{cell(row, 'sfid', 1)} | {cell(row, 'is', 2)} | {cell(row, 'precision', 3)} | {cell(row, 'recall', 3)} | "
                     f"{calib} | {peak} | {row['seeds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+")
    parser.add_argument("--csv", help="also write the table as CSV")
    parser.add_argument("--latex", help="also write the table as LaTeX")
    args = parser.parse_args()
    table = summarize(load_results(args.directories))
    print(to_markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.latex:
        table.to_latex(args.latex, index=False, float_format="%.3f")


if __name__ == "__main__":
    main()
