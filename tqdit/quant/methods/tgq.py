"""``tgq``: TQ-DiT's time-grouping quantization alone (uniform quantizers), Hessian-guided search.

Paper: activation parameters per group of timesteps, reducing the error from the temporal
variation of activations. Here the S sampling steps are split into G = ``groups`` contiguous,
equal groups (step i of S, 0 = cleanest, is in group ⌊i·G/S⌋); each activation quantizer in
``quant.grouped`` (default: all) holds G parameter sets fitted on that group's calibration inputs
and picked at inference from the timestep. Weights are shared by all groups.
Paper vs code: the released code groups only the post-softmax operand, uniformly over the 1000
original timesteps, and its inference path overwrites the group index (and crashes); we follow the
paper's wording (all activations, configurable) and group over the sampling steps.
"""

from dataclasses import replace

from tqdit.quant.calibrate import QuantConfig, calibrate


def quantize(model, calib, cfg: QuantConfig):
    return calibrate(model, calib, replace(cfg, multi_region=False))
