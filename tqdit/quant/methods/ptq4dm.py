"""``ptq4dm``: PTQ4DM (Shang et al., CVPR 2023) on DiT, under the shared protocol.

Follows the paper:
- **NDTC calibration**: calibration timesteps drawn from a normal distribution skewed toward the
  clean end — a fraction u ~ N(μ, σ) of the trajectory counted from x₀, step ⌊u·S⌋ clamped to the
  S sampling steps — and the input at each drawn step taken from the FP sampler's own trajectory
  (the released script labels its samples with the loop index, which runs noisiest-first, i.e. the
  timesteps are reversed; not reproduced). μ = 0.4, σ = 0.4 as in the released run scripts;
  1024 calibration inputs (``num_inputs``), all distinct (``replacement=False``): the paper runs the
  sampler afresh for every drawn timestep, so no input repeats; here inputs come from the captured
  trajectories, each weighted by its step's NDTC probability over the step's number of inputs.
  The released improved-diffusion script has NDTC (``generate_t``, t_mode ``normal``: t = int(u·T),
  one sampler trajectory per calibration sample, so its inputs are distinct too), but keeps sample i
  at the loop index, which runs noisiest-first (timesteps reversed), truncates toward zero (a negative
  draw matches no step and leaves a zero input) and labels every sample class 1 (marked TODO); its
  guided-diffusion script calibrates on noise at t = 1. The paper is followed where they differ.
- **Quantizers**: weights per output channel, symmetric; activations per tensor; every scale chosen
  by an Lp search with p = 2.4 over its code's grid (QDrop's ``perform_1D_search``: 1/100, …, 100/100
  of the observed range); no reconstruction. Deviation: its code's activation quantizers are
  symmetric (one-sided where the data are), searched in 2-D over range and zero point where a
  tensor has both signs; here activations are asymmetric on α·[min, max] like every method's.
- **Operands** (``protocol=published``, its code's QDrop-based wrapper): every Linear (blocks,
  timestep MLP, adaLN, final layer) and the patch-embedding convolution, attention in floating point
  (its UNet's attention matmuls are einsum calls it never wraps), weights symmetric; the first and the
  last layer (patch embedding, final Linear) at 8 bits below W8A8 (``--disable_8bit_head_stem`` off;
  W16 stays W16, the no-op check).
  ``protocol=shared``: scope ``blocks`` at the setting's widths, like every method.
"""

from dataclasses import dataclass, field, replace

from tqdit.data.calibration import select_ndtc
from tqdit.quant.calibrate import calibrate
from tqdit.quant.config import MethodConfig
from tqdit.quant.search import SearchConfig


def check_lp_exponent(config) -> None:
    """The method's own Lp exponent ``p`` is its scale rule; a different ``search.p`` is a conflict."""
    if config.search.p not in (SearchConfig.p, config.p):
        raise ValueError(f"{type(config).__name__}: search.p={config.search.p} conflicts with p={config.p}, "
                         "the method's Lp exponent; set p= instead")


@dataclass(frozen=True, kw_only=True)
class PTQ4DMConfig(MethodConfig):
    num_inputs: int = 1024  # the paper's calibration size
    # its code's (QDrop's) grid: 100 thresholds 1/100, ..., 100/100 of the observed range, never widened
    search: SearchConfig = field(
        default_factory=lambda: SearchConfig(criterion="lp", candidates=100, alpha_min=0.01, alpha_max=1.0))
    mean: float = 0.4  # μ of NDTC, as a fraction of the trajectory from the clean end
    std: float = 0.4   # σ of NDTC
    p: float = 2.4     # Lp exponent of the scale search
    replacement: bool = False  # False: distinct inputs (the paper's fresh trajectory per draw)
    fixed_search = "lp"
    # Its code wraps every Conv2d/Linear and never the attention (einsum), and keeps the first and the
    # last layer (here the patch embedding and the final Linear) at 8 bits.
    published_scope = "all_linears"
    published_softmax_bits = 8  # moot in its scope; PTQ4DiT's harness, which ran it on DiT, used 8
    published_eight_bit_roles = ("patch_embed", "final_linear")

    def __post_init__(self):
        super().__post_init__()
        check_lp_exponent(self)
        if not isinstance(self.replacement, bool):
            raise ValueError(f"PTQ4DMConfig: replacement={self.replacement!r} must be true or false")
        if not self.std > 0:
            raise ValueError(f"PTQ4DMConfig: std={self.std} must be positive")


def quantize(model, calib, config: PTQ4DMConfig):
    index = select_ndtc(calib.step.numpy(), len(calib.timesteps), config.num_inputs, config.mean, config.std,
                        config.seed, replacement=config.replacement)
    search = replace(config.search, criterion="lp", p=config.p)
    return calibrate(
        model,
        calib,
        config.calibration(multi_region=False, weight_symmetric=True, search=search),
        index=index,
    )
