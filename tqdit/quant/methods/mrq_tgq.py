"""``mrq_tgq``: TQ-DiT — multi-region quantization + time-grouping quantization + Hessian-guided search.

The combination of ``mrq`` and ``tgq`` (see their docstrings for the paper/code choices): the
post-softmax and post-GELU operands use multi-region quantizers, every grouped activation
quantizer (MRQ ones included) holds one parameter set per time group, and scales are chosen by
the Hessian-guided criterion (PTQ4ViT metric, 100 candidates 0.01..1.2, 3 alternating W/A rounds,
calibration inputs split evenly over the groups) with a non-degenerate loss (``search.py``).
Operands (``protocol=published``, the released code's set, scope ``tq_dit_code``): qkv, proj, fc1,
fc2, both attention matmuls (probabilities at a_bits) and the final Linear; adaLN, the timestep MLP
and the label table in floating point. The code's weight-only quantization of the patch embedding is
left out (tqdit quantizes the patch embedding with its input, ``PatchLinear``, not weights alone).
``protocol=shared``: scope ``blocks`` (adaLN quantized too), like every method. The same holds for
``mrq`` and ``tgq``, its parts.
"""

from dataclasses import dataclass

from tqdit.quant.calibrate import calibrate
from tqdit.quant.config import TimeGroupedConfig
from tqdit.quant.methods.mrq import check_multi_region_bits


@dataclass(frozen=True, kw_only=True)
class TQDiTConfig(TimeGroupedConfig):
    published_scope = "tq_dit_code"  # TQ-DiT's code: qkv, proj, fc1, fc2, both matmuls, final linear

    def __post_init__(self):
        super().__post_init__()
        check_multi_region_bits(self)


def quantize(model, calib, config: TQDiTConfig):
    return calibrate(model, calib, config.calibration(multi_region=True))
