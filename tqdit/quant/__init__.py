"""Post-training quantization: quantizers, quantized layers, the calibration engine and the methods.

Nothing here knows about Hydra, W&B or files other than the explicit save/load helpers.
"""

from tqdit.quant.calibrate import QuantConfig, calibrate, group_table, wrap
from tqdit.quant.layers import SCOPES, QuantLinear, QuantMatMul, quantizers, resolve_scope
from tqdit.quant.methods import METHODS, USES_TIME_GROUPS
from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ, TimeGroupContext, UniformQuantizer
from tqdit.quant.search import SearchConfig
from tqdit.quant.state import load_quant_state, save_quant_state

__all__ = [
    "METHODS", "SCOPES", "USES_TIME_GROUPS", "GeluMRQ", "QuantConfig", "QuantLinear", "QuantMatMul", "SearchConfig",
    "SoftmaxMRQ", "TimeGroupContext", "UniformQuantizer", "calibrate", "group_table", "load_quant_state",
    "quantizers", "resolve_scope", "save_quant_state", "wrap",
]
