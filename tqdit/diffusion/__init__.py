"""Diffusion schedules, respacing, DDPM/DDIM sampling and classifier-free guidance."""

from tqdit.diffusion.gaussian import GaussianDiffusion, create_diffusion, linear_betas, space_timesteps
from tqdit.diffusion.sampling import PerSampleNoise, guided_model, sample_loop, sample_seed

__all__ = [
    "GaussianDiffusion",
    "PerSampleNoise",
    "create_diffusion",
    "guided_model",
    "linear_betas",
    "sample_loop",
    "sample_seed",
    "space_timesteps",
]
