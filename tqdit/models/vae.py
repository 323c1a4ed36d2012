"""The Stable Diffusion VAE that latent DiT models sample in (diffusers ``AutoencoderKL``; optional extra).

As the reference DiT samples: latents are divided by 0.18215 and decoded, ``vae.decode(z / 0.18215).sample``.
The variants are the reference's ``--vae`` choices: ``ema`` (its default) and ``mse`` (the one TQ-DiT's
code loads), both fine-tuned decoders of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tqdit.errors import TqditError

LATENT_SCALE = 0.18215
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# The architecture of both variants (their config.json), for random-weight tests and benchmarks.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
                     block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4)


class VaeError(TqditError, FileNotFoundError):
    """The VAE cannot be loaded: diffusers missing, weights absent and not downloadable, or a bad variant."""


def load_vae(
    variant: str = "ema",
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """An ``AutoencoderKL`` in eval mode from ``path`` (a diffusers folder) or the Hugging Face cache/hub."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise VaeError("latent models need diffusers for the VAE: pip install -e '.[latent]'") from None
    options = dict(torch_dtype=dtype, low_cpu_mem_usage=False)  # no accelerate needed
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise VaeError(
                f"model.vae.path={path}: no diffusers VAE there "
                "(config.json + diffusion_pytorch_model.safetensors); "
                f"save one with AutoencoderKL.from_pretrained('{VAE_REPOS.get(variant, VAE_REPOS['ema'])}')"
                ".save_pretrained(DIR)"
            )
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, **options)
    else:
        if variant not in VAE_REPOS:
            raise VaeError(f"model.vae.variant={variant} is unknown: use {' or '.join(VAE_REPOS)}")
        repo = VAE_REPOS[variant]
        try:
            vae = AutoencoderKL.from_pretrained(
                repo, local_files_only=True, **options
            )  # the cache first: no network wait
        except Exception:
            try:
                vae = AutoencoderKL.from_pretrained(repo, **options)
            except Exception as error:
                raise VaeError(
                    f"the VAE {repo} is not in the Hugging Face cache "
                    f"and could not be downloaded ({type(error).__name__}); "
                    f"run `huggingface-cli download {repo}` where there is internet and copy the cache, "
                    "or set model.vae.path=/dir/of/the/saved/vae"
                ) from None
    return vae.to(device).eval().requires_grad_(False)


def latent_decoder(vae, batch_size: int = 32):
    """latents (N, 4, h, w) -> pixels (N, 3, 8h, 8w) in about [-1, 1], decoded ``batch_size`` at a time."""
    dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        parts = [
            vae.decode(chunk.to(dtype) / LATENT_SCALE).sample.float() for chunk in latents.split(batch_size)
        ]
        return torch.cat(parts)

    return decode
