"""Weights shipped with tqdit (safetensors), verified by sha256 before use. Cards: ``*.md`` beside them."""

from __future__ import annotations

import json
from pathlib import Path

from tqdit.utils import sha256_file

ASSET_DIR = Path(__file__).parent
_MANIFEST = ASSET_DIR / "manifest.json"


def asset_path(name: str) -> Path:
    """Path of a shipped asset after checking its sha256 against ``manifest.json``."""
    manifest = json.loads(_MANIFEST.read_text()) if _MANIFEST.exists() else {}
    path = ASSET_DIR / name
    if name not in manifest or not path.is_file():
        raise FileNotFoundError(
            f"shipped asset {name} is missing from {ASSET_DIR}; "
            "reinstall tqdit or retrain it (see its model card)"
        )
    actual = sha256_file(path)
    if actual != manifest[name]:
        raise ValueError(
            f"shipped asset {name} is damaged (sha256 {actual[:12]}…, expected {manifest[name][:12]}…); "
            "reinstall tqdit"
        )
    return path


def register_asset(name: str) -> str:
    """Record the sha256 of a freshly trained asset in the manifest (used by the training entry points)."""
    manifest = json.loads(_MANIFEST.read_text()) if _MANIFEST.exists() else {}
    manifest[name] = sha256_file(ASSET_DIR / name)
    _MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return manifest[name]
