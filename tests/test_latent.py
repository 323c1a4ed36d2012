"""The ImageNet-scale path end to end on the CPU: latent DiT + diffusers VAE + Inception + ADM
reference batch.

Random weights of the real architectures (DiT-S/2 with the official latent layout, the sd-vae-ft
AutoencoderKL, torch-fidelity's Inception-v3) are saved to files and loaded through the configs a
user sets; only the spatial size is tiny (4×4 latents, 32×32 images).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_pipeline import ROOT
from tqdit.data import to_uint8
from tqdit.diffusion import PerSampleNoise, create_diffusion, guided_model, sample_loop
from tqdit.models import build_dit
from tqdit.metrics.inception import save_random_weights
from tqdit.models.vae import LATENT_SCALE, SD_VAE_CONFIG

diffusers = pytest.importorskip("diffusers")

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    dit = build_dit("DiT-S/2", input_size=4)
    for block in dit.blocks:  # the official init zeroes adaLN: give the random model something to do
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.02)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "dit.safetensors"))
    diffusers.AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(root / "vae")
    save_random_weights(root / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(root / "VIRTUAL_tiny.npz", arr_0=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    return root


def job(files, job_dir, *extra, env=None, tiny=True):
    model = (
        ["model.arch=DiT-S/2", "model.input_size=4", f"model.checkpoint={files / 'dit.safetensors'}"]
        if tiny
        else []
    )
    command = [
        sys.executable,
        "run.py",
        f"hydra.run.dir={job_dir}",
        f"cache_dir={files / 'cache'}",
        "model=dit_xl_2_256",
        *model,
        f"model.vae.path={files / 'vae'}",
        "model.vae.decode_batch=3",
        "eval=imagenet256",
        f"eval.weights={files / 'inception.pth'}",
        f"eval.reference={files / 'VIRTUAL_tiny.npz'}",
        "eval.batch_size=8",
        "num_samples=10",
        "batch_size=5",
        "sampler.steps=3",
        "quant=fp",
        "device=cpu",
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_latent_job_decodes_with_the_vae_and_evaluates_with_inception(files, tmp_path):
    result = job(files, tmp_path / "job")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "job" / "results.json").read_text())
    assert all(np.isfinite(results["metrics"][k]) for k in ("fid", "sfid", "is", "precision", "recall"))
    # the end of the output says where the files are and how to make a sweep of the job's setting
    sweep = result.stdout.strip().splitlines()[-1]
    assert sweep.startswith("as a sweep over seeds: python run.py -m ")
    assert sweep.endswith(" quant=fp device=cpu seed=0,1,2")
    assert "hydra.run.dir" not in sweep and "model=dit_xl_2_256" in sweep
    assert f"results: {tmp_path / 'job'}/results.json" in result.stdout
    with np.load(tmp_path / "job" / "samples.npz") as samples:
        images, labels = samples["arr_0"], samples["arr_1"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(10))  # class-balanced: label i mod 1000

    # the same samples by hand: reference-style sampling of the latents, then vae.decode(z / 0.18215)
    model = build_dit("DiT-S/2", input_size=4)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(files / "dit.safetensors")))
    model.eval()
    vae = diffusers.AutoencoderKL.from_pretrained(files / "vae").eval()
    diffusion = create_diffusion(3, learn_sigma=True)
    with torch.no_grad():
        indices = np.arange(10)
        noise = PerSampleNoise(0, indices, (4, 4, 4), torch.device("cpu"))
        latents = sample_loop(
            guided_model(model, torch.as_tensor(labels), 1.5, 3),
            diffusion,
            noise,
            method="ddpm",
            clip_denoised=False,
        )
        pixels = vae.decode(latents / LATENT_SCALE).sample
    expected = to_uint8(pixels).numpy()
    assert (
        np.abs(expected.astype(int) - images.astype(int)) > 1
    ).mean() < 1e-3  # batch shapes differ: round-off only
    assert images.std() > 1  # the random decoder drew something


def test_missing_latent_files_fail_with_one_line_naming_them(files, tmp_path):
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = job(files, tmp_path / "a", tiny=False)  # the real DiT-XL/2 config without its checkpoint
    assert result.returncode == 2
    assert (
        "DiT-XL-2-256x256.pt" in result.stderr
        and "dl.fbaipublicfiles.com" in result.stderr
        and "Traceback" not in result.stderr
    )
    result = job(files, tmp_path / "b", "eval.reference=null", tiny=False)
    assert (
        result.returncode == 2
        and "eval.reference is not set" in result.stderr
        and "VIRTUAL_imagenet256_labeled.npz" in result.stderr
        and "Traceback" not in result.stderr
    )
    result = job(files, tmp_path / "c", "model.vae.path=null", env=offline)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "stabilityai/sd-vae-ft-ema" in result.stderr
        and "model.vae.path=" in result.stderr
        and "Traceback" not in result.stderr
    )
