"""Saving and reloading calibrated quantizer parameters (safetensors), to re-sample without recalibrating."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from tqdit.errors import TqditError
from tqdit.quant.config import CalibrationConfig
from tqdit.quant.layers import QuantLinear, quantizers
from tqdit.quant.reconstruct import ReconConfig
from tqdit.quant.search import SearchConfig
from tqdit.quant.wrapping import wrap
from tqdit.utils import atomic_write_bytes


def save_quant_state(
    model, path: str | Path, method: str, timesteps: np.ndarray, extra: dict | None = None
) -> None:
    """Every quantizer's buffers, with the method, its effective config and the schedule in the metadata.

    Methods that change weights (AdaRound's rounding, PTQ4DiT's folded balancing) list them in
    ``model.quant_modified_parameters``; those are saved too, under ``param.<name>``. ``extra``:
    more metadata (text values), e.g. the pipeline's record of the setting it calibrated.
    """
    cfg = model.quant_config
    tensors = {f"{name}.{buffer}": value.detach().cpu().contiguous()
               for name, q in quantizers(model) for buffer, value in q.named_buffers()}
    for name in getattr(model, "quant_modified_parameters", []):
        tensors[f"param.{name}"] = model.get_parameter(name).detach().cpu().contiguous()
    metadata = {**(extra or {}), "method": method, "config": json.dumps(asdict(cfg)),
                "timesteps": json.dumps([int(t) for t in timesteps])}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_quant_state(model, path: str | Path) -> tuple[str, CalibrationConfig, dict]:
    """Wrap ``model`` as recorded in ``path`` and load its calibrated parameters; returns
    (method, config, info)."""
    path = Path(path)
    if not path.is_file():
        raise TqditError(f"quant.load={path}: file not found; point it at a job's quant_params.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata["config"])
    config["search"] = SearchConfig(**config["search"])
    config["recon"] = ReconConfig(**config.get("recon", {}))
    for key in ("eight_bit_roles", "runtime_scaled_roles"):  # JSON gave lists; the config holds tuples
        config[key] = tuple(config.get(key, ()))
    config.setdefault("softmax_bits", config.get("a_bits"))  # files saved before it existed: a_bits
    cfg = CalibrationConfig(**config)
    wrap(model, cfg, np.array(json.loads(metadata["timesteps"])))
    device = next(model.parameters()).device
    modified = sorted(key[len("param."):] for key in tensors if key.startswith("param."))
    for name in modified:
        with torch.no_grad():
            model.get_parameter(name).copy_(tensors[f"param.{name}"].to(device))
    model.quant_modified_parameters = modified
    missing = [
        f"{name}.{buffer}"
        for name, q in quantizers(model)
        for buffer, _ in q.named_buffers()
        if f"{name}.{buffer}" not in tensors
        and not (buffer == "calibrated" and _written_before_flag(name, tensors))
    ]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise TqditError(
            f"{path} lacks parameters of {len(missing)} quantizer buffers of this model ({shown}); "
            "it was saved from another model or scope: recalibrate, or load the file of this setting"
        )
    known = {f"{name}.{buffer}" for name, q in quantizers(model) for buffer, _ in q.named_buffers()}
    foreign = sorted(key for key in tensors if not key.startswith("param.") and key not in known)
    if foreign:
        raise TqditError(
            f"{path} holds {len(foreign)} quantizer buffers this model lacks (e.g. {foreign[0]}); "
            "it was saved from another model or scope: recalibrate, or load the file of this setting"
        )
    loaded = 0
    for name, q in quantizers(model):
        for buffer, value in q.named_buffers():
            key = f"{name}.{buffer}"
            value.copy_(tensors[key].to(device) if key in tensors else torch.ones((), dtype=torch.bool))
        if bool(q.calibrated):
            q.refresh()
            loaded += 1
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.freeze()
    return metadata["method"], cfg, {"quantizers_loaded": loaded, "parameters_loaded": len(modified)}


def saved_metadata(path: str | Path) -> dict:
    """The text metadata of a saved calibration (method, config, schedule and any ``extra``)."""
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def _written_before_flag(name: str, tensors: dict) -> bool:
    """Files saved before quantizers had a ``calibrated`` buffer held calibrated quantizers only."""
    return any(key.startswith(f"{name}.") for key in tensors)
