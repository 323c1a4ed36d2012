"""DiT models: the official configurations, the embedded MNIST model, safe checkpoint loading."""

from tqdit.models.checkpoint import CheckpointError, load_dit_weights, load_model, read_state_dict
from tqdit.models.dit import DiT, MatMul
from tqdit.models.registry import DIT_CONFIGS, build_dit

__all__ = [
    "DIT_CONFIGS",
    "CheckpointError",
    "DiT",
    "MatMul",
    "build_dit",
    "load_dit_weights",
    "load_model",
    "read_state_dict",
]
