"""Shared by the analysis notebooks: which sweep to read and where figures go."""

import os
from pathlib import Path


def sweep_directories() -> list[Path]:
    """TQDIT_SWEEP (one or more directories, separated by ':'), else the newest outputs/sweep/* ."""
    if os.environ.get("TQDIT_SWEEP"):
        return [Path(p) for p in os.environ["TQDIT_SWEEP"].split(":")]
    sweeps = sorted(Path("outputs/sweep").glob("*"))
    if not sweeps:
        raise SystemExit("no sweep found: run `python run.py -m ...` first or set TQDIT_SWEEP=<sweep dir>")
    return [sweeps[-1]]


def figure_path(name: str) -> Path:
    """Figures go to <first sweep>/analysis/<name>.png."""
    out = sweep_directories()[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}.png"
