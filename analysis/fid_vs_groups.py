# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # FID vs number of time groups
# TGQ's ablation: how FID changes with G for every method and bit width of the sweep, with the
# FP level for reference. Reads `TQDIT_SWEEP` (default: the newest `outputs/sweep/*`).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import figure_path, sweep_directories

from tqdit.report import bits_label, line_label, load_results, summarize, varying_columns

table = summarize(load_results(sweep_directories()))
grouped = table[(table["groups"] != "–") & (table["seeds"] > 0)].copy()
grouped["G"] = grouped["groups"].astype(int)
# one line per other setting
others = varying_columns(table, exclude=("method", "w_bits", "a_bits", "groups"))
grouped["line"] = [f"{line_label(row, others)} {bits_label(row)}" for _, row in grouped.iterrows()]
grouped[["line", "G", "fid", "fid_std", "dfid", "seeds"]]

# %%
figure, axis = plt.subplots(figsize=(6, 4))
for line, rows in grouped.groupby("line", sort=False):
    rows = rows.sort_values("G")
    axis.errorbar(rows["G"], rows["fid"], yerr=rows["fid_std"].fillna(0), marker="o", capsize=3, label=line)
for _, fp in table[table["method"] == "fp"].iterrows():  # each FP setting its own level, never averaged
    axis.axhline(fp["fid"], color="black", linestyle="--", label=line_label(fp, others))
axis.set_xscale("log")
axis.set_xticks(sorted(grouped["G"].unique()), [str(g) for g in sorted(grouped["G"].unique())])
axis.minorticks_off()
axis.set_xlabel("time groups G")
axis.set_ylabel("FID")
axis.legend(fontsize=8)
figure.tight_layout()
figure.savefig(figure_path("fid_vs_groups"), dpi=120)
