"""Gaussian diffusion as the reference DiT uses it: linear betas, eps prediction, learned-range variance.

All schedule arithmetic is float64 numpy (as in the reference); per-step coefficients are applied as
float32 scalars, which gives the same numbers as the reference's per-sample gathers.
Respacing keeps a subset of the 1000 training steps (``space_timesteps``) and recomputes betas so
that the kept steps have the same cumulative alphas; the model always sees original timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def linear_betas(num_train_steps: int = 1000) -> np.ndarray:
    """Ho et al.'s linear schedule (1e-4 -> 0.02 at 1000 steps), scaled for other step counts."""
    scale = 1000 / num_train_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_train_steps, dtype=np.float64)


def space_timesteps(num_train_steps: int, spec: int | str) -> list[int]:
    """Original timesteps kept when respacing to ``spec``.

    ``spec`` is a step count (``250`` or ``"250"``), comma-separated counts for equal sections of the
    schedule (``"10,15,20"``), or ``"ddimN"`` for DDIM's fixed integer stride. Section i of size S
    with count k keeps ``round(j·(S−1)/(k−1))`` for j < k, so "250" of 1000 gives 0, 4, 8, …, 999.
    """
    text = str(spec).strip()
    if text.startswith("ddim"):
        wanted = int(text[4:])
        for stride in range(1, num_train_steps):
            kept = list(range(0, num_train_steps, stride))
            if len(kept) == wanted:
                return kept
        raise ValueError(
            f"sampler steps '{text}': no integer stride gives exactly {wanted} of {num_train_steps} steps"
        )
    counts = [int(part) for part in text.split(",")]
    if any(count < 1 for count in counts):
        raise ValueError(f"sampler steps '{text}': every step count must be at least 1")
    base, extra = divmod(num_train_steps, len(counts))
    kept, start = [], 0
    for index, count in enumerate(counts):
        size = base + (1 if index < extra else 0)
        if count > size:
            raise ValueError(f"sampler steps '{text}': cannot take {count} steps from a section of {size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(mean, e^(2·log_scale)), in nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclass
class GaussianDiffusion:
    """A (possibly respaced) diffusion process. Index i counts respaced steps; timesteps[i] is the
    original t."""

    betas: np.ndarray
    timesteps: np.ndarray = field(default=None)  # original timestep of each respaced index
    learn_sigma: bool = True

    def __post_init__(self):
        self.betas = np.asarray(self.betas, dtype=np.float64)
        if self.timesteps is None:
            self.timesteps = np.arange(len(self.betas))
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        if not ((self.betas > 0) & (self.betas <= 1)).all():
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at the first step; its log is clipped to the second step's value.
        if len(self.betas) > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(self.betas)
        self.posterior_mean_coef1 = (
            self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    # -- per-step coefficients (scalars for sampling, gathered tensors for training) --

    @staticmethod
    def _coef(array: np.ndarray, index) -> float | torch.Tensor:
        """array[index] rounded to float32, as a Python float (int index) or a broadcastable tensor."""
        if isinstance(index, torch.Tensor):
            return torch.from_numpy(array).to(index.device)[index].float().view(-1, 1, 1, 1)
        return float(np.float32(array[index]))

    def predict_x0(self, x: torch.Tensor, index, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._coef(self.sqrt_recip_alphas_cumprod, index) * x
            - self._coef(self.sqrt_recipm1_alphas_cumprod, index) * eps
        )

    def predict_eps(self, x: torch.Tensor, index, x0: torch.Tensor) -> torch.Tensor:
        return (self._coef(self.sqrt_recip_alphas_cumprod, index) * x - x0) / self._coef(
            self.sqrt_recipm1_alphas_cumprod, index
        )

    def q_sample(self, x0: torch.Tensor, index, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given standard-normal noise."""
        return (
            self._coef(self.sqrt_alphas_cumprod, index) * x0
            + self._coef(self.sqrt_one_minus_alphas_cumprod, index) * noise
        )

    def q_posterior(self, x0: torch.Tensor, x: torch.Tensor, index):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._coef(self.posterior_mean_coef1, index) * x0
            + self._coef(self.posterior_mean_coef2, index) * x
        )
        return mean, self._coef(self.posterior_log_variance_clipped, index)

    def p_mean_variance(
        self, model_output: torch.Tensor, x: torch.Tensor, index, clip_denoised: bool = False
    ):
        """Mean, log-variance and x_0 prediction of p(x_{t-1} | x_t) from the model's raw output.

        With learned-range variance the extra output channels v ∈ [-1, 1] interpolate the log-variance
        between the posterior variance (v = -1) and beta_t (v = +1); otherwise the variance is fixed
        to the reference's FIXED_LARGE (betas, first entry replaced by the posterior variance).
        """
        channels = x.shape[1]
        if self.learn_sigma:
            eps, var_values = model_output[:, :channels], model_output[:, channels:]
            min_log = self._coef(self.posterior_log_variance_clipped, index)
            max_log = self._coef(np.log(self.betas), index)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            fixed_large = np.append(self.posterior_variance[1], self.betas[1:])
            log_variance = torch.full_like(x, 0) + self._coef(np.log(fixed_large), index)
        x0 = self.predict_x0(x, index, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x, index)
        return mean, log_variance, x0

    # -- training --

    def training_losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        index: torch.Tensor,
        noise: torch.Tensor,
    ):
        """Per-sample loss of the reference: MSE on eps plus, for learned sigma, the VLB term.

        The VLB term (in bits per dim) sees the eps prediction detached, so it trains only the
        variance channels, as in Improved DDPM's hybrid loss.
        """
        channels = x0.shape[1]
        eps = model_output[:, :channels]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        if not self.learn_sigma:
            return mse
        frozen = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
        mean, log_variance, _ = self.p_mean_variance(frozen, x_t, index)
        true_mean, true_log_variance = self.q_posterior(x0, x_t, index)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=(1, 2, 3)) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).mean(dim=(1, 2, 3)) / np.log(
            2.0
        )
        vb = torch.where(index == 0, nll, kl)
        return mse + vb


def create_diffusion(
    steps: int | str | None = None, num_train_steps: int = 1000, learn_sigma: bool = True
) -> GaussianDiffusion:
    """The reference's ``create_diffusion``: linear schedule, respaced to ``steps`` (None = all)."""
    betas = linear_betas(num_train_steps)
    if steps is None or str(steps) == str(num_train_steps):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = space_timesteps(num_train_steps, steps)
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept_cumprod = alphas_cumprod[kept]
    new_betas = 1.0 - kept_cumprod / np.append(1.0, kept_cumprod[:-1])
    return GaussianDiffusion(new_betas, timesteps=np.array(kept), learn_sigma=learn_sigma)
