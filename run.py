"""tqdit entry point: ``python run.py [overrides]`` or ``python run.py -m key=a,b ...`` (Hydra).

On several GPUs: ``torchrun --nproc_per_node=N run.py [overrides]`` (see tqdit/pipeline/distributed.py).
"""

import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tqdit.errors import TqditError
from tqdit.pipeline import distributed, run_job, summary_line
from tqdit.pipeline.sweep import claimed_gpu, record_failure, takes_gpu_slot


def seed_sweep_command(overrides) -> str:
    """The command that runs this job's setting for seeds 0, 1, 2 (one table row with its spread)."""
    kept = [o for o in overrides if not o.startswith(("seed=", "hydra."))]
    return " ".join(["python run.py -m", *map(shlex.quote, kept), "seed=0,1,2"])  # quoted for the shell


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    cfg.device = distributed.device_name(cfg.device)  # under torchrun: this process's GPU
    try:
        # local multi-GPU launcher: a free GPU of the machine
        if cfg.gpu_slots and takes_gpu_slot(cfg.device):
            with claimed_gpu(cfg.gpu_slots, (sweep_dir or job_dir) / ".gpu_locks") as gpu:
                cfg.device = f"cuda:{gpu}"
                results = run_job(cfg, job_dir, sweep_dir)
        else:
            results = run_job(cfg, job_dir, sweep_dir)
    except Exception as error:
        if sweep_dir is None and isinstance(error, TqditError):  # bad input: one line that names the fix
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if sweep_dir is None:
            raise
        # in a sweep, a failed job is recorded and the others go on; the table shows it as failed
        if distributed.rank() == 0:
            failure = record_failure(cfg, job_dir, error)
            print(f"failed: {failure['error']} ({job_dir})", file=sys.stderr)
        return None
    if distributed.rank() != 0:
        return None
    if results.get("resumed") == "complete":
        print(f"already complete, not run again: {job_dir}")
    print(summary_line(results))
    print(f"results: {job_dir}/results.json (samples.npz, grid.png and the calibration beside it)")
    if sweep_dir is None:
        print(f"as a sweep over seeds: {seed_sweep_command(hydra_cfg.overrides.task)}")
    return results.get("metrics", {}).get("fid")


if __name__ == "__main__":
    distributed.init()  # before Hydra: the processes agree on one output directory
    try:
        main()
    finally:
        distributed.close()
