"""Reference sets for the metrics: ADM reference batches, image folders, cached features.

Features of real images are cached on disk keyed by content (never by name): the key hashes the
images' bytes, the feature network's name and weights, and the feature list, so changing any of them
recomputes; a stale cache cannot be picked up by accident.

An ADM reference batch (``VIRTUAL_imagenet256_labeled.npz`` of openai/guided-diffusion) holds the
images (``arr_0``, uint8 NHWC) and their Inception statistics ``mu, sigma`` (pool3) and
``mu_s, sigma_s`` (spatial). Like the ADM evaluator, FID and sFID use those statistics; precision and
recall need features of the images themselves, computed here once and cached.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from tqdit.errors import TqditError
from tqdit.metrics.features import FEATURES, extract_features, extractor_identity
from tqdit.utils import atomic_write_bytes

CACHE_VERSION = 1


def reference_key(images: np.ndarray, extractor_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{extractor_id}|{','.join(FEATURES)}|{images.shape}|".encode())
    digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))  # no copy of a multi-GB batch
    return digest.hexdigest()[:24]


def reference_features(
    images: np.ndarray, extractor, extractor_id: str, cache_dir: str | Path | None, batch_size: int = 500
) -> dict[str, np.ndarray]:
    """Features of the real ``images`` (uint8 NHWC), read from or written to ``cache_dir``."""
    path = (
        Path(cache_dir).expanduser() / f"reference-{reference_key(images, extractor_id)}.npz"
        if cache_dir
        else None
    )
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


ADM_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{size}/{name}"
)
ADM_REFERENCE_NAMES = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}
ADM_STATISTICS = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def where_to_get(image_size: int) -> str:
    name = ADM_REFERENCE_NAMES.get(image_size)
    return (
        f"the ADM reference batch is {ADM_REFERENCE_URL.format(size=image_size, name=name)}"
        if name
        else "give an npz of real images (arr_0)"
    )


def read_image_folder(folder: Path) -> np.ndarray:
    """Every image in ``folder`` (sorted by name) as one uint8 NHWC RGB array; all must share a size."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TqditError(
            f"eval.reference={folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder"
        )
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise TqditError(
            f"eval.reference={folder}: images of several sizes {sorted(sizes)[:3]}; "
            "resize/crop them to one size first"
        )
    return np.stack(images)


def adm_statistics(batch, path: Path) -> dict:
    """{pool_stats, spatial_stats} of an ADM reference batch, checked to be Inception
    pool3/mixed_6 statistics."""
    if "mu" not in batch.files:
        return {}
    for key, shape in ADM_STATISTICS.items():
        if key not in batch.files or batch[key].shape != shape:
            found = batch[key].shape if key in batch.files else "missing"
            raise TqditError(
                f"{path}: '{key}' is {found}, not {shape}; "
                "these are not the ADM evaluator's Inception statistics "
                "(use an ADM reference batch, or an npz with only arr_0 images)"
            )
    return {
        "pool_stats": {"mu": batch["mu"], "sigma": batch["sigma"]},
        "spatial_stats": {"mu": batch["mu_s"], "sigma": batch["sigma_s"]},
    }


def load_reference(
    source: str | Path,
    extractor,
    image_shape: tuple[int, int, int],
    cache_dir: str | Path | None,
    batch_size: int = 500,
) -> dict:
    """The reference for :func:`tqdit.metrics.all_metrics` from an ADM reference batch (.npz) or an
    image folder.

    ``image_shape`` (H, W, C) of the generated samples: the reference images must have the same
    resolution, or the comparison would measure resizing rather than the model.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise TqditError(
            f"eval.reference={source}: not found; {where_to_get(image_shape[0])}; "
            "or give a folder of real images"
        )
    if path.is_dir():
        images, statistics = read_image_folder(path), {}
    else:
        try:
            with np.load(path, allow_pickle=False) as batch:
                images = batch["arr_0"] if "arr_0" in batch.files else None
                statistics = adm_statistics(batch, path)
        except (OSError, ValueError) as error:
            raise TqditError(
                f"eval.reference={source}: cannot read it as an npz ({error}); is the download complete?"
            ) from None
        if images is None and not statistics:
            raise TqditError(
                f"eval.reference={source}: holds neither images (arr_0) "
                "nor statistics (mu, sigma, mu_s, sigma_s)"
            )
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise TqditError(
                f"eval.reference={source}: images must be uint8 NHWC, got {images.dtype} {images.shape}"
            )
        if images.shape[1:3] != tuple(image_shape[:2]):
            raise TqditError(
                f"eval.reference={source}: reference images are {images.shape[1]}×{images.shape[2]} "
                f"but samples are {image_shape[0]}×{image_shape[1]}; "
                f"use the reference for this resolution ({where_to_get(image_shape[0])})"
            )
        features = reference_features(images, extractor, extractor_identity(extractor), cache_dir, batch_size)
    else:
        features = {}
    return {**features, **statistics}
