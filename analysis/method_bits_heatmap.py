# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Method × bit width heatmap
# FID (mean over seeds) for every setting and bit width of the sweep(s) in `TQDIT_SWEEP`: a heatmap row
# is the method plus every other setting that varies (G included), so no cell picks a best G on FID.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import figure_path, sweep_directories

from tqdit.report import bits_label, line_label, load_results, summarize, varying_columns

table = summarize(load_results(sweep_directories()))
quantized = table[(table["method"] != "fp") & (table["seeds"] > 0)].copy()
others = varying_columns(table, exclude=("method", "w_bits", "a_bits", "groups")) + ["groups"]
quantized["bits"] = [bits_label(row) for _, row in quantized.iterrows()]
quantized["setting"] = [line_label(row, others) for _, row in quantized.iterrows()]
# one setting per (row, column): pivot refuses duplicates instead of averaging or picking one
best = quantized.pivot(index="setting", columns="bits", values="fid")
best = best.reindex(list(dict.fromkeys(quantized["setting"])))
best

# %%
figure, axis = plt.subplots(figsize=(1.6 * best.shape[1] + 2, 0.5 * best.shape[0] + 1.5))
image = axis.imshow(np.log10(best.to_numpy(dtype=float)), cmap="viridis_r", aspect="auto")
axis.set_xticks(range(best.shape[1]), best.columns)
axis.set_yticks(range(best.shape[0]), best.index)
for (i, j), value in np.ndenumerate(best.to_numpy(dtype=float)):
    if np.isfinite(value):
        colour = "white" if value > np.nanmedian(best) else "black"
        axis.text(j, i, f"{value:.1f}", ha="center", va="center", color=colour)
figure.colorbar(image, label="log10 FID")
figure.tight_layout()
figure.savefig(figure_path("method_bits_heatmap"), dpi=120)
