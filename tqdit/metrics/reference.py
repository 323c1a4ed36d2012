"""Reference features of real images, cached on disk keyed by content (never by name).

The key hashes the images' bytes, the feature network's name and weights, and the feature list, so
changing any of them recomputes; a stale cache cannot be picked up by accident.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from tqdit.metrics.features import FEATURES, extract_features
from tqdit.utils import atomic_write_bytes

CACHE_VERSION = 1


def reference_key(images: np.ndarray, extractor_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{extractor_id}|{','.join(FEATURES)}|{images.shape}|".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()[:24]


def reference_features(images: np.ndarray, extractor, extractor_id: str, cache_dir: str | Path | None, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Features of the real ``images`` (uint8 NHWC), read from or written to ``cache_dir``."""
    path = Path(cache_dir).expanduser() / f"reference-{reference_key(images, extractor_id)}.npz" if cache_dir else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as cached:
                return {name: cached[name] for name in FEATURES}
        except (OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)  # damaged cache entry: recompute below
    features = extract_features(images, extractor, batch_size, desc="reference features")
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **features)
        atomic_write_bytes(path, buffer.getvalue())
    return features
