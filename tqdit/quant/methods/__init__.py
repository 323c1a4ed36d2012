"""Quantization methods, one file each, registered by name: ``METHODS[name](model, calib, cfg) -> (model, cost)``."""

from tqdit.quant.methods import fp, mrq, mrq_tgq, tgq, uniform

METHODS = {
    "fp": fp.quantize,
    "uniform": uniform.quantize,
    "mrq": mrq.quantize,
    "tgq": tgq.quantize,
    "mrq_tgq": mrq_tgq.quantize,
}
USES_TIME_GROUPS = {"tgq", "mrq_tgq"}
