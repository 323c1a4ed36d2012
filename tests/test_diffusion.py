"""The sampler reproduces the reference sampler and is deterministic per sample index."""

import numpy as np
import pytest
import torch

from tqdit.diffusion import PerSampleNoise, create_diffusion, guided_model, sample_loop, space_timesteps
from tqdit.models import DiT


def test_respacing_matches_reference(reference):
    for spec, expected in reference["spacings"].items():
        assert space_timesteps(1000, spec) == expected, spec
    assert space_timesteps(1000, 250)[:4] == [0, 4, 8, 12] and space_timesteps(1000, 250)[-1] == 999
    with pytest.raises(ValueError, match="cannot take 300 steps"):
        space_timesteps(1000, "300,300,300,300")
    with pytest.raises(ValueError, match="no integer stride"):
        space_timesteps(1000, "ddim600")


def test_respaced_schedule_keeps_cumulative_alphas():
    full, spaced = create_diffusion(None), create_diffusion(50)
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timesteps], rtol=1e-12)
    assert full.betas[0] == pytest.approx(1e-4) and full.betas[-1] == pytest.approx(0.02)


class QueueNoise:
    """Feeds the reference's pre-drawn noise: x_T first, then the first half of each step's draw."""

    def __init__(self, z, step_noise):
        self.items = [z] + [step[: len(z)] for step in step_noise]

    def __call__(self):
        return self.items.pop(0)


@pytest.mark.parametrize("method,steps,eta", [("ddpm", "12", 0.0), ("ddim", "ddim10", 0.5)])
def test_sampler_reproduces_reference_samples(reference, method, steps, eta):
    model = DiT(**reference["config"]).eval()
    model.load_state_dict(reference["state"])
    noise = QueueNoise(reference["z"], reference[f"{method}_step_noise"])
    denoise = guided_model(model, reference["labels"], cfg_scale=4.0, guided_channels=3)
    out = sample_loop(denoise, create_diffusion(steps), noise, method=method, eta=eta)
    assert not noise.items  # consumed exactly as many draws as the reference
    # Compared per (sample, channel) image in norm, not element by element: on this random model
    # without clipping the DDPM samples grow to |x| ≈ 5.6e10 (images' norms range 4e3..6.5e10), so
    # each step amplifies float32 round-off, which differs between CPUs' kernels (AVX2 vs AVX-512).
    # Measured on an AVX2 machine, worst image: 5.1e-5 (DDPM), 2.7e-6 (DDIM) from the reference; a
    # guidance scale off by 0.1 % gives 1.7e-2 / 1.2e-3, guiding every channel instead of the first 3 more.
    expected = reference[f"{method}_samples"]
    error = (out - expected).flatten(2).norm(dim=2) / expected.flatten(2).norm(dim=2)
    assert error.max() < 5e-4, error.max()


def tiny_model():
    model = DiT(
        input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model


def run(model, indices, seed=0, steps=6, method="ddpm"):
    labels = torch.as_tensor(np.asarray(indices) % 3)
    noise = PerSampleNoise(seed, indices, (1, 8, 8))
    return sample_loop(
        guided_model(model, labels, 1.5, None),
        create_diffusion(steps),
        noise,
        method=method,
        clip_denoised=True,
    )


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samples_do_not_depend_on_batching(method):
    model = tiny_model()
    together = run(model, list(range(6)), method=method)
    apart = torch.cat([run(model, [0, 1], method=method), run(model, [2, 3, 4, 5], method=method)])
    # equal up to float32 rounding: some CPUs' matmul kernels (AVX-512 oneDNN) block by batch size, which
    # moves the sums' last bits; over the steps that reaches ~8e-6 on samples in [-1, 1]. A sample that
    # took another's noise or label would differ by O(1).
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=0)
    reordered = run(model, [5, 4, 3, 2, 1, 0], method=method)
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-4, rtol=0)
    assert torch.equal(run(model, list(range(6)), method=method), together)  # run to run: bit-identical
    assert not torch.allclose(run(model, list(range(6)), seed=1, method=method), together)


def test_per_sample_noise_is_standard_normal():
    draws = torch.cat([PerSampleNoise(3, range(100), (50,))() for _ in range(4)]).flatten()
    assert abs(draws.mean().item()) < 0.03 and abs(draws.std().item() - 1) < 0.03
    first, second = PerSampleNoise(3, [7], (4,)), PerSampleNoise(3, [7], (4,))
    assert torch.equal(first(), second()) and not torch.equal(first(), PerSampleNoise(3, [8], (4,))())


def test_guidance_scale_one_skips_the_unconditional_pass():
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 20]), torch.tensor([0, 1])
    with torch.no_grad():
        unguided = guided_model(model, y, 1.0)(x, t)
        guided = guided_model(model, y, 3.0, None)(x, t)
    assert calls == [2, 4]
    torch.testing.assert_close(unguided, model(x, t, y))
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(guided[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(guided[:, 1:], cond[:, 1:])  # the variance channel is not guided


def test_training_loss_is_mse_plus_vlb():
    diffusion = create_diffusion(None)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    perfect = torch.cat([noise, torch.zeros_like(noise)], dim=1)
    loss = diffusion.training_losses(perfect, x0, x_t, t, noise)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    # With the exact noise the MSE vanishes; what is left is the VLB term, non-negative for t > 0.
    assert (loss[1:] >= 0).all()
    worse = diffusion.training_losses(
        perfect + torch.cat([torch.ones_like(noise), torch.zeros_like(noise)], 1), x0, x_t, t, noise
    )
    assert (worse[1:] > loss[1:] + 0.99).all()
