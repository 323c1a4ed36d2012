"""``tgq``: TQ-DiT's time-grouping quantization alone (uniform quantizers), Hessian-guided search.

Paper: activation parameters per group of timesteps, reducing the error from the temporal
variation of activations. Here the S sampling steps are split into G = ``time_groups`` contiguous,
equal groups (step i of S, 0 = cleanest, is in group ⌊i·G/S⌋); each activation quantizer in
``grouped`` (default: all) holds G parameter sets fitted on that group's calibration inputs
and picked at inference from the timestep. Weights are shared by all groups.
Paper vs code: the released code groups only the post-softmax operand, uniformly over the 1000
original timesteps, and its inference path overwrites the group index (and crashes); we follow the
paper's wording (all activations, configurable) and group over the sampling steps. G = 10 by
default, as the released code runs.
"""

from dataclasses import dataclass

from tqdit.quant.calibrate import calibrate
from tqdit.quant.config import TimeGroupedConfig


@dataclass(frozen=True, kw_only=True)
class TGQConfig(TimeGroupedConfig):
    published_scope = "tq_dit_code"  # TQ-DiT's code: qkv, proj, fc1, fc2, both matmuls, final linear


def quantize(model, calib, config: TGQConfig):
    return calibrate(model, calib, config.calibration(multi_region=False))
