"""``fp``: no quantization — the full-precision reference row of every table."""

from dataclasses import dataclass

from tqdit.quant.config import MethodConfig


@dataclass(frozen=True, kw_only=True)
class FPConfig(MethodConfig):
    """No settings are used: the model stays as it is."""


def quantize(model, calib, config: FPConfig):
    """Return the model unchanged; calibration costs nothing."""
    return model, {"calibration_s": 0.0, "peak_memory_bytes": 0, "peak_memory_kind": None,
                   "quantized_layers": 0, "calibration_inputs": 0}
