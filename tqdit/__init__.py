"""tqdit: post-training quantization of Diffusion Transformers, swept under one protocol.

As a library (no Hydra needed)::

    import tqdit
    calib = tqdit.capture(model, diffusion, tqdit.CalibrationSpec(num_samples=32))
    model, cost = tqdit.quantize(model, calib, tqdit.TQDiTConfig(w_bits=6, a_bits=6, time_groups=10))

Names are loaded on first use, so ``import tqdit.kernels`` (or any one module) stays light.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "quantize": "tqdit.quant.methods",
    "METHODS": "tqdit.quant.methods",
    "FPConfig": "tqdit.quant.methods",
    "NoiseConfig": "tqdit.quant.methods",
    "UniformConfig": "tqdit.quant.methods",
    "PTQ4DMConfig": "tqdit.quant.methods",
    "QDiffusionConfig": "tqdit.quant.methods",
    "PTQ4DiTConfig": "tqdit.quant.methods",
    "MRQConfig": "tqdit.quant.methods",
    "TGQConfig": "tqdit.quant.methods",
    "TQDiTConfig": "tqdit.quant.methods",
    "QDiTConfig": "tqdit.quant.methods",
    "DiTASConfig": "tqdit.quant.methods",
    "SearchConfig": "tqdit.quant.search",
    "ReconConfig": "tqdit.quant.reconstruct",
    "save_quant_state": "tqdit.quant.state",
    "load_quant_state": "tqdit.quant.state",
    "capture": "tqdit.data.calibration",
    "CalibrationSpec": "tqdit.data.calibration",
    "create_diffusion": "tqdit.diffusion",
    "load_model": "tqdit.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tqdit' has no attribute {name!r}")
