"""tqdit entry point: ``python run.py [overrides]`` or ``python run.py -m sweep=...`` (Hydra)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tqdit.errors import TqditError
from tqdit.pipeline import run_job, summary_line


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    job_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run_job(cfg, job_dir)
    except TqditError as error:  # bad input: one line that names the fix, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(results))
    print(f"results: {job_dir}/results.json")
    return results["metrics"]["fid"]


if __name__ == "__main__":
    main()
