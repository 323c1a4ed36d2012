"""What a job needs to live inside a sweep: failure records and one GPU per concurrent job.

Hydra-free: ``run.py`` and the Hydra callback pass paths and configs in.
"""

from __future__ import annotations

import fcntl
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tqdit.quant.reconstruct import ALGORITHM_VERSION
from tqdit.utils import atomic_write_json, resolve_device


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as config.json, results.json and saved calibrations record it, with
    ``quant.recon.algorithm``: the version of the reconstruction code that fitted it (no override sets it).
    Results of another version form rows of their own and quant.load refuses their calibrations; results
    recorded before the key existed read as version 1 (tqdit.report.ADDED_LATER)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    recon = (config.get("quant") or {}).get("recon")
    if isinstance(recon, dict):
        recon["algorithm"] = ALGORITHM_VERSION
    return config


def record_failure(cfg: DictConfig, job_dir: Path, error: BaseException) -> dict:
    """results.json for a job that failed, so the sweep goes on and its table shows the failure.

    The one-line reason goes in results.json; the full traceback in error.log beside it.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "error.log").write_text("".join(traceback.format_exception(error)))
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    result = {"status": "failed", "error": message, "config": recorded_config(cfg)}
    try:  # the device is part of a table row's setting (CPU and GPU round differently)
        result["environment"] = {"device": str(resolve_device(cfg.device))}
    except (ValueError, RuntimeError):  # an unparseable device: the job failed on it
        pass
    atomic_write_json(job_dir / "results.json", result)
    return result


def takes_gpu_slot(device: str) -> bool:
    """Whether a job of the local multi-GPU launcher holds one of the ``gpu_slots`` GPUs.

    Not a job on the CPU (``device=cpu``, or ``auto`` where CUDA is missing): such a sweep runs
    ``gpu_slots`` jobs at a time (joblib's ``n_jobs``), each on the CPU, with no GPU lock.
    """
    device = str(device)
    return not device.startswith("cpu") and (device != "auto" or torch.cuda.is_available())


@contextmanager
def claimed_gpu(count: int, lock_dir: str | Path, poll_s: float = 2.0):
    """Hold one of ``count`` GPUs for the duration of a job: yields its index.

    Concurrent jobs of a sweep (the local multi-GPU launcher) each take a free index by an exclusive
    lock on ``lock_dir/gpu<i>.lock``; the lock goes with the process, so a killed job frees its GPU.
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            handle = open(lock_dir / f"gpu{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0), handle.truncate(), handle.write(f"{os.getpid()}\n"), handle.flush()
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)
