"""``mrq_tgq``: TQ-DiT — multi-region quantization + time-grouping quantization + Hessian-guided search.

The combination of ``mrq`` and ``tgq`` (see their docstrings for the paper/code choices): the
post-softmax and post-GELU operands use multi-region quantizers, every grouped activation
quantizer (MRQ ones included) holds one parameter set per time group, and scales are chosen by
the Hessian-guided criterion (PTQ4ViT metric, 100 candidates 0.01..1.2, 3 alternating W/A rounds,
calibration inputs split evenly over the groups) with a non-degenerate loss (``search.py``).
"""

from dataclasses import replace

from tqdit.quant.calibrate import QuantConfig, calibrate


def quantize(model, calib, cfg: QuantConfig):
    return calibrate(model, calib, replace(cfg, multi_region=True))
