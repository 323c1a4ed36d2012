"""``noise``: a control, not a method — full precision plus noise of the quantization error's size.

It calibrates exactly as ``uniform`` does (same scope, grids, scale rule, hence the same steps Δ
under any ``search``: the search runs with rounding), then every operand that ``uniform``
would round gets x + Δ·u instead, u uniform in [−½, ½]: the
textbook model of rounding error (variance Δ²/12, per weight channel and per activation tensor),
without its structure (no clipping; an error that does not depend on where x sits in its grid
cell). ``quantizers.hash_uniform`` draws u from each value's grid index and position in its sample,
so sample i stays a pure function of (seed, i), as a rounded model's is.

What it is for: if quantized methods move a metric the way this control does, the metric is
responding to perturbations of that size (e.g. extra sample diversity past the guidance optimum),
not to what a method preserved or lost. Simulated backend only (the real 8-bit paths would round).
"""

from dataclasses import dataclass

from tqdit.quant.calibrate import calibrate
from tqdit.quant.methods.uniform import UniformConfig
from tqdit.quant.wrapping import add_noise_instead_of_rounding


@dataclass(frozen=True, kw_only=True)
class NoiseConfig(UniformConfig):
    """uniform's settings: the grids whose step sizes the noise takes."""


def quantize(model, calib, config: NoiseConfig):
    model, cost = calibrate(model, calib, config.calibration(multi_region=False))
    add_noise_instead_of_rounding(model)
    return model, cost
