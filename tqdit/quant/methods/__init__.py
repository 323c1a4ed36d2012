"""Quantization methods, one file each, registered by name: ``METHODS[name](model, calib, cfg) -> (model, cost)``."""

from tqdit.quant.methods import fp, mrq, mrq_tgq, noise, ptq4dit, ptq4dm, qdiffusion, tgq, uniform

METHODS = {
    "fp": fp.quantize,
    "noise": noise.quantize,  # a control: uniform's grids, noise instead of rounding
    "uniform": uniform.quantize,
    "ptq4dm": ptq4dm.quantize,
    "qdiffusion": qdiffusion.quantize,
    "ptq4dit": ptq4dit.quantize,
    "mrq": mrq.quantize,
    "tgq": tgq.quantize,
    "mrq_tgq": mrq_tgq.quantize,
}
USES_TIME_GROUPS = {"tgq", "mrq_tgq"}
RECONSTRUCTS = {"qdiffusion", "ptq4dit"}  # use quant.recon
# Methods whose own settings come from ``quant.params`` (validated before any work) ...
SETTINGS = {"ptq4dm": ptq4dm.Settings, "qdiffusion": qdiffusion.Settings, "ptq4dit": ptq4dit.Settings}
# ... and whose scale rule is part of the method (a different quant.search is an error, not ignored).
FIXED_SEARCH = {"ptq4dm": "lp", "qdiffusion": "lp", "ptq4dit": "lp"}
