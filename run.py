"""tqdit entry point: ``python run.py [overrides]`` or ``python run.py -m sweep=...`` (Hydra)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tqdit.errors import TqditError
from tqdit.pipeline import run_job, summary_line


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        results = run_job(cfg, job_dir, sweep_dir)
    except TqditError as error:  # bad input: one line that names the fix, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(results))
    print(f"results: {job_dir}/results.json")
    return results["metrics"]["fid"] if "metrics" in results else None


if __name__ == "__main__":
    main()
