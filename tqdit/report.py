"""Comparison tables from job directories: ``python -m tqdit.report DIR [DIR ...] [--out DIR] [--csv F] [--latex F]``.

Reads every ``results.json`` below the given directories (several sweeps merge into one table),
groups jobs that differ only in the sampling seed, and prints mean ± std over seeds: FID, sFID,
IS, precision, recall, ΔFID vs the FP job of the same setting and seed (paired), calibration seconds and peak GB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from tqdit.quant.methods import USES_TIME_GROUPS

METRICS = ["fid", "sfid", "is", "precision", "recall"]
KEYS = ["model", "method", "w_bits", "a_bits", "groups", "steps", "num_samples"]
METHOD_ORDER = ["fp", "uniform", "ptq4dm", "qdiffusion", "ptq4dit", "mrq", "tgq", "mrq_tgq"]  # baselines, then TQ-DiT's parts


def _row(result: dict, path: Path) -> dict:
    config = result["config"]
    if result.get("status") == "failed":  # no quant record: the setting comes from the config
        method = config["quant"]["name"]
        quant = {"method": method, "w_bits": None if method == "fp" else config.get("w_bits"),
                 "a_bits": None if method == "fp" else config.get("a_bits"),
                 "groups": config.get("groups") if method in USES_TIME_GROUPS else None}
        metrics, num_samples, seed = {m: float("nan") for m in METRICS}, config.get("num_samples"), config.get("seed")
    else:
        quant, metrics, num_samples, seed = result.get("quant", {"method": "fp"}), result["metrics"], result["num_samples"], result["seed"]
    return {
        "model": config["model"]["arch"], "method": quant["method"], "w_bits": quant.get("w_bits"),
        "a_bits": quant.get("a_bits"), "groups": quant.get("groups"), "steps": config["sampler"]["steps"],
        "num_samples": num_samples, "seed": seed, **metrics,
        "calibration_s": quant.get("calibration_s"), "peak_gb": (quant.get("peak_memory_bytes") or 0) / 1e9 or None,
        "status": result.get("status", "ok"), "error": result.get("error"), "job_dir": str(path.parent),
    }


def load_results(directories: list[str | Path]) -> pd.DataFrame:
    """One row per job below ``directories``; failed jobs included (``status`` = failed, metrics NaN)."""
    rows = []
    for directory in directories:
        for path in sorted(Path(directory).rglob("results.json")):
            result = json.loads(path.read_text())
            if "duplicate_of" in result:  # a job its method did not need (see pipeline.job.identical_finished_job)
                continue
            rows.append(_row(result, path))
    if not rows:
        raise FileNotFoundError(f"no results.json below {', '.join(map(str, directories))}")
    return pd.DataFrame(rows)


def paired_fid_change(frame: pd.DataFrame) -> pd.Series:
    """Per job: FID minus the FID of the FP job with the same model, steps, N and seed (NaN without one).

    Pairing by seed removes most of the seed-to-seed spread, which at small N is larger than the
    effect of 8-bit quantization (the same seed means the same noise and labels for every method).
    """
    pair = ["model", "steps", "num_samples", "seed"]
    if frame.empty:
        return pd.Series(dtype=float)
    fp = frame[frame["method"] == "fp"].drop_duplicates(pair).set_index(pair)["fid"]
    return pd.Series([row.fid - fp.get(tuple(getattr(row, k) for k in pair), float("nan")) for row in frame.itertuples()],
                     index=frame.index, dtype=float)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: mean and std over seeds, and ΔFID vs FP paired by seed (mean ± std).

    Failed jobs do not enter the means; ``failed`` counts them per setting, and a setting whose
    jobs all failed is a row of its own with NaN metrics.
    """
    keys = [k for k in KEYS if k in frame]
    filled = frame.assign(**{k: frame[k].astype(object).where(frame[k].notna(), "–") for k in keys})
    filled["dfid"] = paired_fid_change(frame[frame["status"] == "ok"]).reindex(frame.index)
    filled["failed"] = (filled["status"] == "failed").astype(int)
    grouped = filled.groupby(keys, sort=False, dropna=False)
    table = grouped[METRICS + ["dfid", "calibration_s", "peak_gb"]].mean()
    spread = grouped[METRICS + ["dfid"]].std(ddof=1).add_suffix("_std")
    seeds = (grouped["status"].apply(lambda s: int((s == "ok").sum()))).rename("seeds")
    errors = grouped["error"].apply(lambda e: next((x for x in e if isinstance(x, str)), None)).rename("error")
    table = table.join(spread).join(seeds).join(grouped["failed"].sum()).join(errors).reset_index()
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
        if pd.isna(row[metric]):
            return "–"
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

    lines = ["| method | bits | G | steps | FID | ΔFID | sFID | IS | precision | recall | calib s | peak GB | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        calib = "–" if pd.isna(row["calibration_s"]) else f"{row['calibration_s']:.0f}"
        peak = "–" if pd.isna(row["peak_gb"]) else f"{row['peak_gb']:.2f}"
        seeds = str(row["seeds"]) + (f" (+{row['failed']} failed)" if row["failed"] else "")
        fid = cell(row, "fid", 2) if row["seeds"] else f"**failed**: {row['error']}"
        lines.append(f"| {row['method']} | {bits(row)} | {integer(row['groups'])} | {row['steps']} | {fid} | {signed(row, 'dfid')} | "
                     f"{cell(row, 'sfid', 1)} | {cell(row, 'is', 2)} | {cell(row, 'precision', 3)} | {cell(row, 'recall', 3)} | "
                     f"{calib} | {peak} | {seeds} |")
    return "\n".join(lines)


def plot(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """fid_vs_bits.png (one line per method) and fid_vs_groups.png (methods with time groups), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["seeds"] > 0].copy()
    ok["label"] = ["FP" if m == "fp" else f"W{int(w)}A{int(a)}" for m, w, a in zip(ok["method"], ok["w_bits"], ok["a_bits"])]
    paths = []
    figure, axis = plt.subplots(figsize=(6, 4))
    order = list(dict.fromkeys(ok.loc[ok["method"] != "fp", "label"]))
    fp = ok[ok["method"] == "fp"]
    for method, rows in ok[ok["method"] != "fp"].groupby("method", sort=False):
        best = rows.sort_values("fid").drop_duplicates("label")  # with several G: the best group count per bit width
        best = best.set_index("label").reindex(order).dropna(subset=["fid"])
        axis.errorbar([order.index(b) for b in best.index], best["fid"], yerr=best["fid_std"].fillna(0), marker="o", capsize=3, label=method)
    if len(fp):
        axis.axhline(fp["fid"].mean(), color="black", linestyle="--", linewidth=1, label="FP")
    axis.set_xticks(range(len(order)), order)
    axis.set_xlabel("bit width (best G per method)"), axis.set_ylabel("FID"), axis.legend(fontsize=8), axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "fid_vs_bits.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    grouped = ok[ok["groups"] != "–"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for (method, label), rows in grouped.groupby(["method", "label"], sort=False):
        rows = rows.assign(g=rows["groups"].astype(int)).sort_values("g")
        axis.errorbar(rows["g"], rows["fid"], yerr=rows["fid_std"].fillna(0), marker="o", capsize=3, label=f"{method} {label}")
    if len(fp):
        axis.axhline(fp["fid"].mean(), color="black", linestyle="--", linewidth=1, label="FP")
    axis.set_xlabel("time groups G"), axis.set_ylabel("FID"), axis.grid(alpha=0.3)
    if len(grouped):
        ticks = sorted(grouped["groups"].astype(int).unique())
        axis.set_xscale("log"), axis.set_xticks(ticks, [str(t) for t in ticks]), axis.minorticks_off(), axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out_dir / "fid_vs_groups.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def write_report(directories: list[str | Path], out_dir: str | Path) -> tuple[str, int]:
    """report.md / .csv / .tex and the plots in ``out_dir``; returns (markdown table, failed job count)."""
    out_dir = Path(out_dir)
    frame = load_results(directories)
    table = summarize(frame)
    markdown = to_markdown(table)
    (out_dir / "report.md").write_text(markdown + "\n")
    table.to_csv(out_dir / "report.csv", index=False)
    table.drop(columns=["error"]).to_latex(out_dir / "report.tex", index=False, float_format="%.3f", na_rep="--")
    plot(table, out_dir)
    return markdown, int((frame["status"] == "failed").sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+")
    parser.add_argument("--out", help="also write report.md/.csv/.tex and the plots into this directory")
    parser.add_argument("--csv", help="also write the table as CSV")
    parser.add_argument("--latex", help="also write the table as LaTeX")
    args = parser.parse_args()
    try:
        report(args)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None


def report(args: argparse.Namespace) -> None:
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        markdown, _ = write_report(args.directories, args.out)
        print(markdown)
        return
    table = summarize(load_results(args.directories))
    print(to_markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.latex:
        table.drop(columns=["error"]).to_latex(args.latex, index=False, float_format="%.3f", na_rep="--")


if __name__ == "__main__":
    main()
