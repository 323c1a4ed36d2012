"""``uniform``: plain uniform PTQ — the baseline that TQ-DiT's components are measured against.

Weights: symmetric, per output channel. Activations: one asymmetric (symmetric for q, k, v)
per-tensor quantizer per operand, no time groups, no multi-region quantizers. The scale choice
is ``quant.search``: ``minmax``, ``percentile`` or ``lp`` (each tensor's own Lp error over the α
grid; p = ``quant.p``, 2 by default = MSE), and also accepts the output-level ``mse``/``hessian``.
"""

from dataclasses import replace

from tqdit.quant.calibrate import QuantConfig, calibrate


def quantize(model, calib, cfg: QuantConfig):
    return calibrate(model, calib, replace(cfg, multi_region=False, time_groups=1))
