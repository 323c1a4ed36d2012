"""tqdit entry point: ``python run.py [overrides]`` or ``python run.py -m sweep=...`` (Hydra)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tqdit.pipeline import run_job, summary_line


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    results = run_job(cfg, HydraConfig.get().runtime.output_dir)
    print(summary_line(results))
    print(f"results: {HydraConfig.get().runtime.output_dir}/results.json")
    return results["metrics"]["fid"]


if __name__ == "__main__":
    main()
