"""Comparison tables from job directories:
``python -m tqdit.report DIR [DIR ...] [--out DIR] [--csv F] [--latex F]``.

Reads every ``results.json`` below the given directories (several sweeps merge into one table).

**A row is one setting**: the job's resolved configuration minus the sampling seed (and minus keys
that only change how work is batched or where it is written, ``NOT_SETTINGS``). Jobs of one
setting are seeds of it: their mean ± std is the row. Jobs that differ in anything else are
different rows, and every key that varies between the rows of a table is a column of it, so two
settings can never look like one. Keys that mean nothing to a method are blanked for it (bit widths
and every ``quant.*`` key for FP, ``groups`` for methods without time groups, ``quant.recon`` for
methods that do not reconstruct), as the job itself treats them (``pipeline.job.ignored_keys``).

ΔFID pairs each job with the FP job of the same **protocol** (every setting that is not a
quantization setting: model, sampler, steps, guidance, N, labels, dtype, evaluation, device type)
and the same seed. The time-group count G is whatever the job's configuration fixed before it ran;
nothing here selects G (or anything else) on an evaluation metric.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from tqdit.quant.methods import METHODS

METRICS = ["fid", "sfid", "is", "precision", "recall"]
# Columns every table has (the notebooks read them), then every other setting that varies.
NAMED = {"method": "quant.name", "w_bits": "w_bits", "a_bits": "a_bits", "groups": "groups",
         "steps": "sampler.steps", "num_samples": "num_samples", "model": "model.arch"}
# Keys that change neither what is computed nor its value beyond float round-off of batching:
# where results go, how work is batched, which GPU of a machine, how it is logged. ``bits`` is
# only the default of w_bits/a_bits, and the model's cfg_scale, cfg_channels, clip_denoised and
# search_inputs only the defaults of sampler.* and quant.num_inputs, which are the settings.
# ``quant.load`` reuses a calibration of the same setting (the job refuses a file calibrated under
# another one); its path is provenance, not a setting.
NOT_SETTINGS = (
    "seed",
    "bits",
    "batch_size",
    "device",
    "cache_dir",
    "gpu_slots",
    "eval.cache_dir",
    "eval.batch_size",
    "quant.load",
    "quant.search_batch",
    "quant.capture_batch",
    "model.vae.decode_batch",
    "model.cfg_scale",
    "model.cfg_channels",
    "model.clip_denoised",
    "model.search_inputs",
    "quant.recon.engine",
    "quant.recon.log_every",
)
NOT_SETTING_PREFIXES = ("logger.", "hydra.")
QUANT_KEYS = ("w_bits", "a_bits", "groups")  # with every quant.* key: the quantization side of a setting
METHOD_ORDER = [
    "fp",
    "noise",
    "uniform",
    "ptq4dm",
    "qdiffusion",
    "ptq4dit",
    "mrq",
    "tgq",
    "mrq_tgq",
]  # controls, baselines, TQ-DiT
BLANK = "–"  # a setting that does not apply to the row's method


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON text, so every value is hashable."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def is_setting(key: str) -> bool:
    return key not in NOT_SETTINGS and not key.startswith(NOT_SETTING_PREFIXES)


def canonical(value):
    """One form per value, so grouping and pairing agree: 8.0 and 8 are the same setting."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Settings added after results were recorded, with the value every earlier job ran under: a result or
# saved calibration without the key is that setting, not a new row (blank where its siblings are).
ADDED_LATER = {
    "quant.recon.precision": "fp32",
    "quant.recon.reduction": "all",  # the per-input sum over tokens x hidden, before BRECQ's dim-1 sum
    "quant.recon.act_p": None,  # the step phase used recon.p
    "quant.recon.outside_blocks": False,  # only the blocks were reconstructed
    # recorded from version 2 on (tqdit.quant.reconstruct.ALGORITHM_VERSION); 1: anything before, e.g.
    # Q-Diffusion's step pass on the quantized prefix, a later pass's targets from rounded weights
    "quant.recon.algorithm": 1,
}


def with_added_keys(flat: dict) -> dict:
    """``flat`` with each ADDED_LATER key it lacks filled in (where it has that key's section)."""
    flat = dict(flat)
    for key, value in ADDED_LATER.items():
        siblings = [v for k, v in flat.items() if k.startswith(key.rpartition(".")[0] + ".")]
        if key not in flat and siblings:
            flat[key] = BLANK if all(v == BLANK for v in siblings) else value
    return flat


def setting_of(config: dict, device_type: str | None) -> dict:
    """The job's setting: its flattened resolved config minus the seed and NOT_SETTINGS, with the
    keys its method ignores blanked, plus the device type it ran on (CPU and GPU round differently)."""
    flat = {key: canonical(value) for key, value in flatten(config).items() if is_setting(key)}
    flat = with_added_keys(flat)
    method = flat.get("quant.name")
    record = METHODS.get(method)
    for key in flat:
        quant_side = key in QUANT_KEYS or key.startswith("quant.")
        if method == "fp" and quant_side and key != "quant.name":
            flat[key] = BLANK
        elif not (record and record.uses_time_groups) and (key == "groups" or key == "quant.grouped"):
            flat[key] = BLANK
        elif not (record and record.reconstructs) and key.startswith("quant.recon."):
            flat[key] = BLANK
    flat["device"] = device_type or BLANK
    return flat


def is_protocol(key: str) -> bool:
    """Settings the FP reference shares with a quantized job (everything but the quantization side)."""
    return not (key in QUANT_KEYS or key.startswith("quant.") or key == "method")


def _device_type(result: dict, config: dict) -> str:
    device = (result.get("environment") or {}).get("device") or str(config.get("device", ""))
    return "cuda" if device.startswith("cuda") else device


def _row(result: dict, path: Path) -> dict:
    config = result["config"]
    setting = setting_of(config, _device_type(result, config))
    row = {column: setting.pop(key, BLANK) for column, key in NAMED.items()}
    failed = result.get("status") == "failed"
    quant = {} if failed else result.get("quant", {})
    metrics = {m: float("nan") for m in METRICS} if failed else result["metrics"]
    peak = quant.get("peak_memory_bytes")
    device = setting.get("device")
    return {
        **row,
        **setting,
        "seed": config.get("seed", result.get("seed")),
        **metrics,
        "calibration_s": quant.get("calibration_s"),
        "peak_gb": peak / 1e9 if peak else None,
        "peak_kind": quant.get("peak_memory_kind")
        or (("cuda_max_allocated" if device == "cuda" else "process_max_rss") if peak else None),
        "status": result.get("status", "ok"),
        "error": result.get("error"),
        "job_dir": str(path.parent),
    }


def load_results(directories: list[str | Path]) -> pd.DataFrame:
    """One row per job below ``directories``; failed jobs included (``status`` = failed, metrics NaN).

    Columns: the NAMED ones, every other setting key (dotted config names), ``seed``, the metrics,
    the calibration cost and the job's status and directory.
    """
    rows = []
    for directory in directories:
        for path in sorted(Path(directory).rglob("results.json")):
            result = json.loads(path.read_text())
            if (
                "duplicate_of" in result
            ):  # a job its method did not need (see pipeline.job.identical_finished_job)
                continue
            rows.append(_row(result, path))
    if not rows:
        raise FileNotFoundError(f"no results.json below {', '.join(map(str, directories))}")
    frame = pd.DataFrame(rows)
    settings = setting_columns(frame)
    frame[settings] = (
        frame[settings].astype(object).where(frame[settings].notna(), BLANK)
    )  # a key a job lacks
    return frame


RESULT_COLUMNS = (
    "seed",
    *METRICS,
    "calibration_s",
    "peak_gb",
    "peak_kind",
    "status",
    "error",
    "job_dir",
    "dfid",
    "dfid_pairs",
    "seeds",
    "seed_list",
    "failed",
    "label",
)
SHOWN = ("method", "w_bits", "a_bits", "groups", "steps")  # columns of every markdown table


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that define a row: everything that is not a seed, a metric or a job record."""
    return [c for c in frame.columns if c not in RESULT_COLUMNS and not c.endswith("_std")]


def varying_columns(table: pd.DataFrame, exclude: tuple[str, ...] = SHOWN) -> list[str]:
    """Setting columns (apart from ``exclude``) that tell rows apart beyond their method: protocol keys
    with more than one value in ``table``, quantization keys with more than one value among the rows
    of one method. A quantization key that differs only *between* methods (PTQ4DM's Lp search vs
    TQ-DiT's Hessian one) is part of what the method label names; ``method_specific`` lists those."""
    def varies(column: str) -> bool:
        values = table[column].astype(str)
        if is_protocol(column) and column not in QUANT_KEYS:
            return values.nunique() > 1
        return bool((values.groupby(table["method"]).nunique() > 1).any())

    return [c for c in setting_columns(table) if c not in exclude and varies(c)]


def method_specific(table: pd.DataFrame) -> list[str]:
    """Quantization keys constant within each method but not across methods (the method label's settings)."""
    shown = set(varying_columns(table, exclude=()))
    return [c for c in setting_columns(table) if c not in shown and c != "method" and not is_protocol(c)
            and table.loc[table[c] != BLANK, c].astype(str).nunique() > 1]  # FP's blanks are no difference


def shared_settings(table: pd.DataFrame) -> dict:
    """Setting columns with one value in the whole table (what every row shares)."""
    return {c: table[c].iloc[0] for c in setting_columns(table) if table[c].astype(str).nunique() == 1}


def paired_fid_change(frame: pd.DataFrame) -> pd.Series:
    """Per job: FID minus the FID of the FP job with the same protocol settings and seed (NaN without one).

    Pairing by seed removes most of the seed-to-seed spread, which at small N is larger than the
    effect of 8-bit quantization (the same seed means the same noise and labels for every method);
    pairing on every protocol key means a job is never compared with FP sampled another way.
    """
    if frame.empty:
        return pd.Series(dtype=float)
    protocol = [c for c in setting_columns(frame) if is_protocol(c)] + ["seed"]
    keys = frame[protocol].astype(str).agg("\x1f".join, axis=1)
    reference = {}
    for key, method, fid in zip(keys, frame["method"], frame["fid"]):
        if method == "fp":
            reference.setdefault(key, fid)
    return pd.Series([fid - reference.get(key, float("nan")) for fid, key in zip(frame["fid"], keys)],
                     index=frame.index, dtype=float)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: mean and std over its seeds, and ΔFID vs FP paired by protocol and seed.

    Failed jobs do not enter the means; ``failed`` counts them per setting, and a setting whose
    jobs all failed is a row of its own with NaN metrics. ``seed_list`` names the seeds averaged;
    ``dfid_pairs`` counts the seeds that have an FP partner (ΔFID averages over those only).
    """
    keys = setting_columns(frame)
    filled = frame.copy()
    filled["dfid"] = paired_fid_change(frame[frame["status"] == "ok"]).reindex(frame.index)
    filled["failed"] = (filled["status"] == "failed").astype(int)
    filled["seed_list"] = filled["seed"].where(filled["status"] == "ok")
    grouped = filled.groupby(keys, sort=False, dropna=False)
    table = grouped[METRICS + ["dfid", "calibration_s", "peak_gb"]].mean()
    spread = grouped[METRICS + ["dfid"]].std(ddof=1).add_suffix("_std")
    seeds = grouped["status"].apply(lambda s: int((s == "ok").sum())).rename("seeds")
    pairs = grouped["dfid"].count().rename("dfid_pairs")
    seed_list = grouped["seed_list"].apply(lambda s: " ".join(str(int(v)) for v in sorted(s.dropna())))
    errors = (
        grouped["error"].apply(lambda e: next((x for x in e if isinstance(x, str)), None)).rename("error")
    )
    kind = grouped["peak_kind"].first().rename("peak_kind")
    table = (
        table.join(spread)
        .join(seeds)
        .join(pairs)
        .join(seed_list)
        .join(grouped["failed"].sum())
        .join(errors)
        .join(kind)
        .reset_index()
    )
    order = ["model", "steps", "num_samples", "w_bits", "a_bits", "method", "groups"]
    order += [c for c in varying_columns(table, exclude=tuple(order))]
    return table.sort_values(
        by=order,
        key=_sort_key,
        ascending=[c not in ("w_bits", "a_bits") for c in order],
        kind="stable",
        ignore_index=True,
    )


def _sort_key(column: pd.Series) -> pd.Series:
    """FP first, then widest bits first; methods in METHOD_ORDER; numbers by value (50 before 100);
    "–" (not applicable) last."""
    if column.name == "method":
        return column.map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    numbers = pd.to_numeric(column.where(column != BLANK), errors="coerce")
    if numbers[column != BLANK].notna().all():
        return numbers.fillna(float("inf"))
    return column.astype(str)


def _integer(value) -> str:
    return BLANK if value == BLANK or pd.isna(value) else str(int(value))


def bits_label(row) -> str:
    return "FP" if row["method"] == "fp" else f"W{_integer(row['w_bits'])}A{_integer(row['a_bits'])}"


def to_markdown(table: pd.DataFrame) -> str:
    """The table, then one line with what every row shares and how rows and G were formed."""
    def cell(row, metric, digits, sign=""):
        if pd.isna(row[metric]):
            return BLANK
        std = row.get(f"{metric}_std")
        text = f"{row[metric]:{sign}.{digits}f}" + (
            f" ± {std:.{digits}f}" if pd.notna(std) and row["seeds"] > 1 else ""
        )
        if (
            metric == "dfid" and row["dfid_pairs"] < row["seeds"]
        ):  # never let a partial pairing pass as the row's
            text += f" ({int(row['dfid_pairs'])} of {row['seeds']} seeds paired)"
        return text

    extra = varying_columns(table)
    header = [
        "method",
        "bits",
        "G",
        "steps",
        *extra,
        "FID",
        "ΔFID",
        "sFID",
        "IS",
        "precision",
        "recall",
        "calib s",
        "peak GB",
        "seeds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        calib = BLANK if pd.isna(row["calibration_s"]) else f"{row['calibration_s']:.0f}"
        peak = (
            BLANK
            if pd.isna(row["peak_gb"])
            else f"{row['peak_gb']:.2f}" + (" RSS" if row["peak_kind"] == "process_max_rss" else "")
        )
        seeds = str(row["seeds"]) + (f" (+{row['failed']} failed)" if row["failed"] else "")
        fid = cell(row, "fid", 2) if row["seeds"] else f"**failed**: {row['error']}"
        cells = [
            row["method"],
            bits_label(row),
            _integer(row["groups"]),
            str(row["steps"]),
            *(str(row[c]) for c in extra),
            fid,
            cell(row, "dfid", 2, "+"),
            cell(row, "sfid", 1),
            cell(row, "is", 2),
            cell(row, "precision", 3),
            cell(row, "recall", 3),
            calib,
            peak,
            seeds,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + caption(table)


# Settings worth naming under a table (the full list of shared settings is in report.csv).
CAPTION_KEYS = (
    "model",
    "sampler.method",
    "steps",
    "sampler.cfg_scale",
    "num_samples",
    "labels",
    "dtype",
    "device",
    "eval.feature_extractor",
    "quant.search",
    "quant.protocol",
    "quant.scope",
    "quant.softmax_bits",
    "quant.backend",
    "quant.calib.num_samples",
    "quant.calib.labels",
    "quant.num_inputs",
)


def caption(table: pd.DataFrame) -> str:
    shared = shared_settings(table)
    named = ", ".join(f"{k}={shared[k]}" for k in CAPTION_KEYS
                      if k in shared and shared[k] not in (BLANK, None, "None"))
    by_method = method_specific(table)
    per_method = (f" Settings that differ only between methods (each method's own; values in report.csv): "
                  f"{', '.join(by_method)}." if by_method else "")
    return (
        f"One row per setting (resolved configuration minus the seed; mean ± std over the seeds listed in "
        f"report.csv); shared by every row: {named}.{per_method} ΔFID: minus the FP job of the same protocol "
        "and seed. G is fixed by each job's configuration, never chosen on an evaluation metric."
        + metric_selection_note(table)
    )


def metric_selection_note(table: pd.DataFrame) -> str:
    """Rows whose method chose settings by the evaluation metric itself (Q-DiT's FID-fitness search) say
    so."""
    fitness, generations = "quant.params.fitness", "quant.params.generations"
    if fitness not in table or generations not in table:
        return ""
    searched = (table[fitness] == "fid") & (pd.to_numeric(table[generations], errors="coerce") > 0)
    if not searched.any():
        return ""
    return (" Q-DiT rows with quant.params.fitness=fid chose their per-layer group sizes by FID against the "
            "evaluation reference (other samples: quant.params.fitness_seed), as Q-DiT's code does: a "
            "selection on the evaluation metric that no other row makes.")


def line_label(row, varying: list[str]) -> str:
    """A plot line's name: the method and every varying setting but the plotted one."""
    return " ".join([row["method"], *(f"{c}={row[c]}" for c in varying if row[c] != BLANK)])


def plot(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """fid_vs_bits.png (one line per setting apart from the bits) and fid_vs_groups.png (one line per
    setting apart from G, methods with time groups), mean ± std over seeds. No line picks a best G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["seeds"] > 0].copy()
    ok["label"] = [bits_label(row) for _, row in ok.iterrows()]
    fp = ok[ok["method"] == "fp"]
    paths = []
    figure, axis = plt.subplots(figsize=(7, 4))
    quantized = ok[ok["method"] != "fp"]
    order = list(dict.fromkeys(quantized["label"]))
    others = varying_columns(ok, exclude=("method", "w_bits", "a_bits", "groups")) + ["groups"]
    lines = pd.Series([line_label(row, others) for _, row in quantized.iterrows()], index=quantized.index)
    for line, rows in quantized.groupby(lines, sort=False):
        rows = rows.set_index("label").reindex(order).dropna(subset=["fid"])
        axis.errorbar(
            [order.index(b) for b in rows.index],
            rows["fid"],
            yerr=rows["fid_std"].fillna(0),
            marker="o",
            capsize=3,
            label=line,
        )
    for _, row in fp.iterrows():
        axis.axhline(row["fid"], color="black", linestyle="--", linewidth=1, label=line_label(row, others))
    axis.set_xticks(range(len(order)), order)
    axis.set_xlabel("bit width"), axis.set_ylabel("FID"), axis.legend(fontsize=7), axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "fid_vs_bits.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    grouped = ok[ok["groups"] != BLANK]
    others = varying_columns(ok, exclude=("method", "w_bits", "a_bits", "groups"))
    figure, axis = plt.subplots(figsize=(7, 4))
    lines = pd.Series(
        [f"{line_label(row, others)} {row['label']}" for _, row in grouped.iterrows()], index=grouped.index
    )
    for line, rows in grouped.groupby(lines, sort=False):
        rows = rows.assign(g=rows["groups"].astype(int)).sort_values("g")
        axis.errorbar(
            rows["g"], rows["fid"], yerr=rows["fid_std"].fillna(0), marker="o", capsize=3, label=line
        )
    for _, row in fp.iterrows():
        axis.axhline(row["fid"], color="black", linestyle="--", linewidth=1, label=line_label(row, others))
    axis.set_xlabel("time groups G"), axis.set_ylabel("FID"), axis.grid(alpha=0.3)
    if len(grouped):
        ticks = sorted(grouped["groups"].astype(int).unique())
        axis.set_xscale("log"), axis.set_xticks(
            ticks, [str(t) for t in ticks]
        ), axis.minorticks_off(), axis.legend(fontsize=7)
    figure.tight_layout()
    paths.append(out_dir / "fid_vs_groups.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def write_tables(table: pd.DataFrame, csv: str | Path | None = None, latex: str | Path | None = None) -> None:
    if csv:
        table.to_csv(csv, index=False)
    if latex:
        columns = [
            "method",
            "w_bits",
            "a_bits",
            "groups",
            "steps",
            *varying_columns(table),
            *METRICS,
            "dfid",
            "seeds",
        ]
        table[columns].to_latex(latex, index=False, float_format="%.3f", na_rep="--")


def write_report(directories: list[str | Path], out_dir: str | Path) -> tuple[str, int]:
    """report.md / .csv / .tex and the plots in ``out_dir``; returns (markdown table, failed job count)."""
    out_dir = Path(out_dir)
    frame = load_results(directories)
    table = summarize(frame)
    markdown = to_markdown(table)
    (out_dir / "report.md").write_text(markdown + "\n")
    write_tables(table, out_dir / "report.csv", out_dir / "report.tex")
    plot(table, out_dir)
    return markdown, int((frame["status"] == "failed").sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    write_tables(table, args.csv, args.latex)


if __name__ == "__main__":
    main()
