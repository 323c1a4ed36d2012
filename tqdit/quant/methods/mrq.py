"""``mrq``: TQ-DiT's multi-region quantization alone (no time groups), with Hessian-guided search.

Paper (TQ-DiT, arXiv 2502.04056): two scaling parameters for the sub-regions of the asymmetric
post-softmax and post-GELU distributions. Following the released code's construction, corrected:
- post-softmax: split s = 2^-i (i = 0..19, searched), Δ_lo = s/(2^(b-1)−1) below s,
  Δ_hi = 1/(2^(b-1)−1) above; each value is quantized in its own region (the released code adds
  both branches, which shifts values ≥ s by s — not reproduced);
- post-GELU (fc2 input): negative region with the fixed Δ₋ = 0.16997/2^(b-1), positive Δ₊ searched.
Every other operand uses the uniform quantizers of ``uniform``. Search: ``quant.search``
(default ``hessian``, the paper's HO; ``mse``/``minmax`` for the ablation).
"""

from dataclasses import replace

from tqdit.quant.calibrate import QuantConfig, calibrate


def quantize(model, calib, cfg: QuantConfig):
    return calibrate(model, calib, replace(cfg, multi_region=True, time_groups=1))
