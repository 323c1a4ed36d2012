"""Loading DiT weights safely: safetensors or ``torch.load(weights_only=True)``, never arbitrary pickles."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tqdit.errors import TqditError
from tqdit.models.dit import DiT


class CheckpointError(TqditError, ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, or of another architecture."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a PyTorch checkpoint (bare state_dict or train.py's dict).

    PyTorch files are read with ``weights_only=True``, which refuses pickled code. A training
    checkpoint holding ``ema`` (or ``model``) weights yields those, EMA first, like the reference.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises several types for damaged files
            raise CheckpointError(
                f"cannot read {path} as safetensors ({error}); is the file complete?"
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {str(error).splitlines()[0]} "
            "(truncated download, or a pickle with objects other than tensors; re-save its state_dict)"
        ) from error
    if isinstance(state, dict) and "ema" in state:
        state = state["ema"]
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return state


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A short guess of the architecture a DiT state_dict was saved from, for error messages."""
    try:
        weight = state["x_embedder.proj.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        tokens = state["pos_embed"].shape[1] if "pos_embed" in state else None
        return (
            f"hidden {weight.shape[0]}, depth {depth}, patch {weight.shape[-1]}, "
            f"in_channels {weight.shape[1]}, tokens {tokens}"
        )
    except (KeyError, ValueError, IndexError):
        return "not a DiT state_dict"


def load_dit_weights(model: DiT, path: str | Path) -> DiT:
    """Load a checkpoint into ``model`` exactly (no key conversion); explain any mismatch."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def listing(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {listing(unexpected)}")
        if wrong_shape:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]
            parts.append(f"{len(wrong_shape)} shape mismatches: {listing(shapes)}")
        raise CheckpointError(
            f"{path} does not fit the configured model ({describe_state_dict(expected)}); the checkpoint has "
            f"{describe_state_dict(state)}. "
            + "; ".join(parts)
            + ". Choose the model config that matches the checkpoint."
        )
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {key} contains NaN or Inf; the checkpoint is damaged")
    model.load_state_dict(state, strict=True)
    return model


EMBEDDED_WEIGHTS = {"DiT-MNIST": "dit_mnist.safetensors"}
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"


def official_checkpoint_name(arch: str, input_size: int) -> str | None:
    """File name of the released checkpoint for this configuration, if one was released."""
    if arch == "DiT-XL/2" and input_size in (32, 64):
        return f"DiT-XL-2-{input_size * 8}x{input_size * 8}.pt"
    return None


def load_model(arch: str, input_size: int, checkpoint: str | Path | None = None) -> DiT:
    """A DiT of configuration ``arch`` with weights from ``checkpoint`` (or the shipped ones), in eval
    mode."""
    from tqdit.assets import asset_path
    from tqdit.models.registry import build_dit

    model = build_dit(arch, input_size=input_size)
    if checkpoint is None:
        require_checkpoint(arch, input_size, checkpoint)
        checkpoint = asset_path(EMBEDDED_WEIGHTS[arch])
    return load_dit_weights(model, checkpoint).eval()


def require_checkpoint(arch: str, input_size: int, checkpoint: str | Path | None) -> None:
    """Raise unless weights are given or shipped; the error names the official file and its address."""
    if checkpoint is None and arch not in EMBEDDED_WEIGHTS:
        official = official_checkpoint_name(arch, input_size)
        where = (
            f"; the official weights are {official}, from {OFFICIAL_URL.format(official)}" if official else ""
        )
        raise CheckpointError(
            f"model {arch} has no shipped weights: set model.checkpoint=/path/to/weights{where}"
        )
