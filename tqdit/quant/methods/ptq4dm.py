"""``ptq4dm``: PTQ4DM (Shang et al., CVPR 2023) on DiT, under the shared protocol.

Follows the paper:
- **NDTC calibration**: calibration timesteps drawn from a normal distribution skewed toward the
  clean end — a fraction u ~ N(μ, σ) of the trajectory counted from x₀, step ⌊u·S⌋ clamped to the
  S sampling steps — and the input at each drawn step taken from the FP sampler's own trajectory
  (the released script labels its samples with the loop index, which runs noisiest-first, i.e. the
  timesteps are reversed; not reproduced). μ = 0.4, σ = 0.4 as in the released run scripts;
  1024 calibration inputs (``quant.num_inputs``).
- **Quantizers**: weights per output channel, symmetric; activations per tensor; every scale chosen
  by an Lp search with p = 2.4 over the range-multiplier grid; no reconstruction.
Protocol choices (the same for every method): the layer scope ``quant.scope`` and the bit widths
apply to every scoped layer — the paper's "first and last layer at 8 bits" concerns UNet layers that
the default DiT scope does not quantize (patch embedding, final layer).
"""

from dataclasses import dataclass, replace

from tqdit.data.calibration import select_ndtc
from tqdit.quant.calibrate import QuantConfig, calibrate, method_settings


@dataclass
class Settings:
    mean: float = 0.4  # μ of NDTC, as a fraction of the trajectory from the clean end
    std: float = 0.4   # σ of NDTC
    p: float = 2.4     # Lp exponent of the scale search


def quantize(model, calib, cfg: QuantConfig):
    settings = method_settings(Settings, cfg.params, "ptq4dm")
    index = select_ndtc(calib.step.numpy(), len(calib.timesteps), cfg.num_inputs, settings.mean, settings.std, cfg.seed)
    search = replace(cfg.search, criterion="lp", p=settings.p)
    return calibrate(model, calib, replace(cfg, multi_region=False, time_groups=1, weight_symmetric=True, search=search), index=index)
