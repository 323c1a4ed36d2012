# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Activation range per time group
# What TGQ calibrates: the clipping range of each activation quantizer in each time group (group 0
# = the cleanest steps). Reads `activation_ranges.csv` of the time-grouped jobs in `TQDIT_SWEEP`.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from _common import figure_path, sweep_directories

frames = []
for directory in sweep_directories():
    for path in sorted(directory.rglob("activation_ranges.csv")):
        frame = pd.read_csv(path)
        if frame["group"].max() > 0:  # time-grouped jobs only
            frames.append(frame.assign(job=path.parent.name))
if not frames:
    raise SystemExit("no time-grouped job (quant=tgq or mrq_tgq) in the sweep")
ranges = pd.concat(frames, ignore_index=True)
job = ranges["job"].iloc[0]  # the first grouped job of the sweep
ranges = ranges[(ranges["job"] == job) & (ranges["kind"] == "uniform")]
ranges.groupby(["layer", "operand"])["high"].agg(["min", "max"]).head(10)

# %%
operands = ranges.groupby(["layer", "operand"]).size().index[:6]
figure, axes = plt.subplots(1, len(operands), figsize=(3 * len(operands), 3), squeeze=False)
for axis, (layer, operand) in zip(axes[0], operands):
    rows = ranges[(ranges["layer"] == layer) & (ranges["operand"] == operand)].sort_values("group")
    axis.fill_between(rows["group"], rows["low"], rows["high"], alpha=0.4)
    axis.plot(rows["group"], rows["high"], marker="o")
    axis.plot(rows["group"], rows["low"], marker="o")
    axis.set_title(f"{layer}.{operand}", fontsize=7)
    axis.set_xlabel("time group (0 = clean)")
axes[0][0].set_ylabel("quantizer range")
figure.suptitle(job, fontsize=7)
figure.tight_layout()
figure.savefig(figure_path("activation_ranges"), dpi=120)
