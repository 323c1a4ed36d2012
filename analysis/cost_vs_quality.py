# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Calibration cost vs quality
# Calibration seconds against FID for every calibrated setting in `TQDIT_SWEEP`: what each
# method's quality costs (jobs that re-used saved parameters carry their calibration job's cost).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import figure_path, sweep_directories

from tqdit.report import load_results, summarize

table = summarize(load_results(sweep_directories()))
calibrated = table[table["calibration_s"].notna() & (table["seeds"] > 0)].copy()
calibrated["bits"] = [f"W{int(w)}A{int(a)}" for w, a in zip(calibrated["w_bits"], calibrated["a_bits"])]
calibrated[["method", "bits", "groups", "calibration_s", "peak_gb", "fid"]]

# %%
figure, axis = plt.subplots(figsize=(6, 4))
for method, rows in calibrated.groupby("method"):
    axis.scatter(rows["calibration_s"], rows["fid"], label=method)
    for _, row in rows.iterrows():
        axis.annotate(row["bits"], (row["calibration_s"], row["fid"]), fontsize=6)
axis.set_xscale("log")
axis.set_xlabel("calibration seconds")
axis.set_ylabel("FID")
axis.legend(fontsize=8)
figure.tight_layout()
figure.savefig(figure_path("cost_vs_quality"), dpi=120)
