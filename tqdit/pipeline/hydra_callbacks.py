"""Hydra callbacks: the comparison table at the end of every sweep."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tqdit.pipeline import distributed
from tqdit.report import write_report


class ReportCallback(Callback):
    """After ``python run.py -m ...``: table (markdown, CSV, LaTeX) and plots in the sweep directory.

    Failed jobs appear in the table as failed; if any failed, the sweep exits with status 1 after
    the table is written, so scripts notice.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if distributed.rank() != 0:  # under torchrun, one table
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table, failed = write_report([sweep_dir], sweep_dir)
        except FileNotFoundError as error:  # no results at all (every job crashed before writing one)
            print(f"report: {error}", file=sys.stderr)
            sys.exit(1)
        print(
            f"\n{table}\n\ntables and plots: {sweep_dir}/report.md, report.csv, report.tex, "
            "fid_vs_bits.png, fid_vs_groups.png"
        )
        if failed:
            print(f"{failed} job(s) failed; see error.log in their directories", file=sys.stderr)
            sys.exit(1)
