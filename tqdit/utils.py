"""Small shared helpers: device/dtype resolution, atomic writes, hashing."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu; anything else as given (with a clear error for
    missing CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name} was requested but CUDA is not available here; use device=cpu or device=auto"
        )
    return device


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the OS; True if applied.

    By default glibc serves every allocation of 128 KiB or more (most activations of a sampling batch)
    with fresh pages from ``mmap`` and unmaps them on free, so each op writing a large tensor pays one
    page fault per 4 KiB of its output; on 2 CPU cores that costs more than the arithmetic. Measured on
    a 2-core AMD EPYC VM (PyTorch 2.14.1, ``benchmarks/cpu_first_run.py``, 2026-12-04): the embedded FP
    model 434 → 586 image-steps/s, fake-quantized TQ-DiT 309 → 438. The price: the resident memory stays
    at the process's peak (the default job's peak RSS 2.2 GB instead of 1.8 GB). Changes allocation
    only, never values. Linux with glibc only; elsewhere (musl, macOS) nothing happens and False is
    returned.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> parameter numbers
    # no mmap-served blocks (large frees stay in the heap), and never trim the heap's free top
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, payload) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
