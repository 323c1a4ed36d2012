"""One job on several GPUs: ``torchrun --nproc_per_node=N run.py ...`` (one process per GPU).

Rank 0 does everything that must happen once (checks, calibration, the merge, metrics, results.json);
every rank samples its share of the batches (batch b goes to rank b mod N) and writes each batch as a
shard the moment it is finished. Because sample i is a pure function of (seed, i), the merged npz is
the one a single process would write, and a restarted job only samples the batches whose shards are
missing — whatever the number of processes then.

Without ``torchrun`` (no WORLD_SIZE > 1 in the environment) every function here is a no-op for one
process. NCCL is used on GPUs, gloo on the CPU (the tests).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

# The other ranks wait in a collective while rank 0 calibrates (Q-Diffusion's and PTQ4DiT's paper
# reconstruction of DiT-XL/2 takes hours) and evaluates: allow two days, not NCCL's 10 minutes.
TIMEOUT = timedelta(hours=float(os.environ.get("TQDIT_DIST_TIMEOUT_H", "48")))
RUN_STAMP_ENV = "TQDIT_RUN_STAMP"


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes, and agree on one run directory time stamp.

    Hydra names its output directories by the clock; processes started a second apart would write to
    different ones, so rank 0's stamp is shared through ``TQDIT_RUN_STAMP`` (read by conf/config.yaml).
    A restarted torchrun draws a new stamp: to resume a job, give its directory (``hydra.run.dir=``).
    """
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    os.environ[RUN_STAMP_ENV] = broadcast(time.strftime("%Y-%m-%d_%H-%M-%S"))


def close() -> None:
    """Leave the process group (at exit; NCCL complains about, or hangs on, groups left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device_name(configured: str) -> str:
    """Each process takes its own GPU (LOCAL_RANK); a configured ``cpu`` stays ``cpu``."""
    if not dist.is_initialized() or configured == "cpu" or not torch.cuda.is_available():
        return configured
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(function, *args, **kwargs):
    """Run ``function`` on rank 0 only and give its result to every rank; an error there is raised on all."""
    outcome = None
    if rank() == 0:
        try:
            outcome = ("ok", function(*args, **kwargs))
        except BaseException as error:
            if not dist.is_initialized():
                raise
            outcome = ("error", error)
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        if rank() == 0:
            raise outcome[1]
        raise RuntimeError(f"rank 0 failed: {type(outcome[1]).__name__}: {outcome[1]}")
    return outcome[1]


def all_succeed(function, *args, **kwargs):
    """Run ``function`` on every rank; if any rank fails, every rank raises (no one waits forever)."""
    try:
        result, failure = function(*args, **kwargs), None
    except BaseException as error:
        if not dist.is_initialized():
            raise
        result, failure = None, f"{type(error).__name__}: {error}"
        own_error = error
    if not dist.is_initialized():
        return result
    failures = [None] * world_size()
    dist.all_gather_object(failures, failure)
    if failure is not None:
        raise own_error
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result
