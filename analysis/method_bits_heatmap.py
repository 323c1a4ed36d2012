# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Method × bit width heatmap
# FID (mean over seeds; for methods with time groups, the best G) for every method and bit width
# of the sweep(s) in `TQDIT_SWEEP`.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import figure_path, sweep_directories

from tqdit.report import METHOD_ORDER, load_results, summarize

table = summarize(load_results(sweep_directories()))
quantized = table[(table["method"] != "fp") & (table["seeds"] > 0)].copy()
quantized["bits"] = [f"W{int(w)}A{int(a)}" for w, a in zip(quantized["w_bits"], quantized["a_bits"])]
best = quantized.groupby(["method", "bits"])["fid"].min().unstack("bits")
best = best.reindex([m for m in METHOD_ORDER if m in best.index])
best

# %%
figure, axis = plt.subplots(figsize=(1.6 * best.shape[1] + 2, 0.5 * best.shape[0] + 1.5))
image = axis.imshow(np.log10(best.to_numpy(dtype=float)), cmap="viridis_r", aspect="auto")
axis.set_xticks(range(best.shape[1]), best.columns)
axis.set_yticks(range(best.shape[0]), best.index)
for (i, j), value in np.ndenumerate(best.to_numpy(dtype=float)):
    if np.isfinite(value):
        axis.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if value > np.nanmedian(best) else "black")
figure.colorbar(image, label="log10 FID")
figure.tight_layout()
figure.savefig(figure_path("method_bits_heatmap"), dpi=120)
