"""``mrq``: TQ-DiT's multi-region quantization alone (no time groups), with Hessian-guided search.

Paper (TQ-DiT, arXiv 2502.04056): two scaling parameters for the sub-regions of the asymmetric
post-softmax and post-GELU distributions. Following the released code's construction, corrected:
- post-softmax: split s = 2^-i (i = 0..19, searched), Δ_lo = s/(2^(b-1)−1) below s,
  Δ_hi = 1/(2^(b-1)−1) above; each value is quantized in its own region (the released code adds
  both branches, which shifts values ≥ s by s — not reproduced);
- post-GELU (fc2 input): negative region with the fixed Δ₋ = 0.16997/2^(b-1), positive Δ₊ searched.
Every other operand uses the uniform quantizers of ``uniform``. Search: ``search``
(default ``hessian``, the paper's HO; ``mse``/``minmax`` for the ablation).
"""

from dataclasses import dataclass

from tqdit.quant.calibrate import calibrate
from tqdit.quant.config import MethodConfig


def check_multi_region_bits(config) -> None:
    if config.a_bits < 3:
        raise ValueError(f"{type(config).__name__}: a_bits={config.a_bits}: multi-region quantization needs "
                         "at least 3 bits (one selects the region); use a_bits >= 3")
    if config.operand_softmax_bits() < 3:
        raise ValueError(f"{type(config).__name__}: softmax_bits={config.operand_softmax_bits()}: "
                         "multi-region quantization needs at least 3 bits (one selects the region); "
                         "use softmax_bits >= 3")


@dataclass(frozen=True, kw_only=True)
class MRQConfig(MethodConfig):
    published_scope = "tq_dit_code"  # TQ-DiT's code: qkv, proj, fc1, fc2, both matmuls, final linear

    def __post_init__(self):
        super().__post_init__()
        check_multi_region_bits(self)


def quantize(model, calib, config: MRQConfig):
    return calibrate(model, calib, config.calibration(multi_region=True))
