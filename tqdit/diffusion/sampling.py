"""Ancestral DDPM and DDIM sampling loops, classifier-free guidance and per-sample noise.

Sample i is a pure function of (seed, i): its starting noise and every step's noise come from its
own generator, seeded from (seed, i), so results do not depend on the batch size, on the order in
which batches run, or on how many GPUs share the work. Noise is drawn on the CPU (identical on
every machine) and moved to the sampling device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tqdit.diffusion.gaussian import GaussianDiffusion

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, original t) -> model output


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit generator seed for sample ``index`` of a run seeded with ``seed``."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class PerSampleNoise:
    """Standard-normal draws where row r always comes from sample ``indices[r]``'s own generator."""

    def __init__(
        self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
    ):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        self.shape = tuple(shape)
        self.device = torch.device(device)

    def __call__(self) -> torch.Tensor:
        draws = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return draws.to(self.device, non_blocking=True)


def guided_model(model, labels: torch.Tensor, cfg_scale: float, guided_channels: int | None = 3) -> ModelFn:
    """The denoiser for labelled samples, with classifier-free guidance when cfg_scale > 1.

    With guidance the model runs on [x, x] with [labels, null] (the reference's doubled batch) and
    the first half of the guided output is returned; ``guided_channels`` as in ``DiT.forward_with_cfg``.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    null = torch.full_like(labels, model.null_class)
    both_labels = torch.cat([labels, null])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), both_labels, cfg_scale, guided_channels
        )
        return out[: len(x)]

    return denoise


@torch.no_grad()
def sample_loop(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: Callable[[], torch.Tensor],
    method: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = False,
    model_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_T = noise() to x_0 and return x_0 (float32).

    ``method`` is ``ddpm`` (ancestral, no noise at the last step) or ``ddim`` (``eta`` = 0 is
    deterministic). The model runs in ``model_dtype``; the diffusion arithmetic stays float32.
    ``on_step(index, x_t, t)`` is called before each model evaluation (calibration capture uses it),
    ``after_step()`` after each step (a progress bar's tick).
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler method '{method}': use ddpm or ddim")
    x = noise()
    indices = range(diffusion.num_steps - 1, -1, -1)
    for index in tqdm(indices, desc=f"{method} steps", leave=False, disable=not progress):
        t = torch.full((x.shape[0],), int(diffusion.timesteps[index]), device=x.device, dtype=torch.long)
        if on_step is not None:
            on_step(index, x, t)
        out = model_fn(x.to(model_dtype), t).float()
        mean, log_variance, x0 = diffusion.p_mean_variance(out, x, index, clip_denoised)
        # One draw per step, the last included (as the reference does), so a sample's noise stream
        # is the same for DDPM and DDIM and for any eta.
        step_noise = noise()
        if method == "ddpm":
            x = mean + torch.exp(0.5 * log_variance) * step_noise if index > 0 else mean
        else:
            x = _ddim_step(diffusion, x, index, x0, eta, step_noise)
        if after_step is not None:
            after_step()
    return x


def _ddim_step(
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    index: int,
    x0: torch.Tensor,
    eta: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """DDIM update (Song et al., eq. 12) from the x_0 prediction; eps is re-derived from it."""
    eps = diffusion.predict_eps(x, index, x0)
    alpha_bar = diffusion._coef(diffusion.alphas_cumprod, index)
    alpha_bar_prev = diffusion._coef(diffusion.alphas_cumprod_prev, index)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5
    mean = x0 * alpha_bar_prev**0.5 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    return mean + sigma * noise if index > 0 and sigma > 0 else mean
