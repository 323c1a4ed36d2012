"""Experiment tracking: one W&B run per job (``logger=wandb``); the local results never depend on it."""

from __future__ import annotations

import csv
from pathlib import Path


def log_to_wandb(results: dict, settings: dict, job_dir: Path, sweep_dir: Path | None) -> str | None:
    """Log a finished job: config, summary (metrics + calibration cost), the sample grid, activation ranges.

    Runs are grouped by sweep (the sweep directory's name; single runs by "single"), ``job_type`` is
    the method. Returns None, or a one-line warning if W&B failed — it never raises.
    """
    try:
        import wandb

        quant = results.get("quant", {})
        run = wandb.init(
            project=settings.get("project") or "tqdit",
            entity=settings.get("entity"),
            mode=settings.get("mode", "offline"),
            dir=str(job_dir),
            group=sweep_dir.name if sweep_dir else "single",
            job_type=quant.get("method", "fp"),
            name=job_dir.name,
            tags=list(settings.get("tags") or []),
            config=results["config"],
            reinit="finish_previous",
        )
        summary = dict(results["metrics"])
        summary.update(
            {
                key: quant[key]
                for key in ("calibration_s", "peak_memory_bytes", "quantized_layers")
                if key in quant
            }
        )
        summary.update(
            sampling_s=results["timings"]["sampling_s"], image_steps_per_s=results["image_steps_per_s"]
        )
        run.summary.update(summary)
        if (job_dir / "grid.png").is_file():
            run.log({"samples": wandb.Image(str(job_dir / "grid.png"))})
        ranges = job_dir / "activation_ranges.csv"
        if ranges.is_file():
            with ranges.open() as handle:
                rows = list(csv.reader(handle))
            run.log({"activation_ranges": wandb.Table(columns=rows[0], data=rows[1:])})
        run.finish()
        return None
    except Exception as error:  # tracking is a convenience; the job's files are the record
        return (
            f"W&B logging failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); local results are complete"
        )
