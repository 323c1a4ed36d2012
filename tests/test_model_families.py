"""One method, two DiT implementations: tqdit's DiT and diffusers' DiTTransformer2DModel with the same
weights give the same quantized model (the engine finds operands through tqdit/models/adapters.py), and a
job runs on a diffusers model folder.
"""

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import tqdit
from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.models import build_dit, load_dit_weights
from tqdit.models.adapters import DIFFUSERS, TQDIT, DiffusersDiT, family_of
from tqdit.quant.layers import quantizers
from tqdit.quant.search import SearchConfig
from tqdit.quant.wrapping import resolve_scope

diffusers = pytest.importorskip("diffusers")
from tqdit.models.diffusers_dit import to_diffusers  # noqa: E402  (needs diffusers)

from test_latent import files  # noqa: E402, F401  (a module fixture: the latent job's files)
from test_pipeline import ROOT  # noqa: E402

SEARCH = SearchConfig(criterion="hessian", candidates=12, rounds=1)
RECON = tqdit.ReconConfig(iters=40, act_iters=20, batch=8)
NO_RECON = tqdit.ReconConfig(iters=0, act_iters=0, batch=8)  # PTQ4DiT's folding and initial grids only
CONFIGS = {
    "noise": tqdit.NoiseConfig(w_bits=6, a_bits=6, num_inputs=24, capture_batch=8),
    "uniform": tqdit.UniformConfig(w_bits=6, a_bits=6, num_inputs=24, capture_batch=8),
    "mrq_tgq": tqdit.TQDiTConfig(
        w_bits=6, a_bits=6, time_groups=2, num_inputs=24, capture_batch=8, search=SEARCH
    ),
    "ptq4dit": tqdit.PTQ4DiTConfig(
        w_bits=6, a_bits=6, num_inputs=24, capture_batch=8, calib_steps=6, recon=NO_RECON,
        scope="blocks",  # diffusers' DiT has no shared timestep MLP, which its published "all" includes
    ),
}


def random_dit():
    """A small DiT with every parameter random (the reference init zeroes adaLN and the final layer)."""
    torch.manual_seed(0)
    dit = build_dit("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn_like(param) * 0.1)
    return dit


@pytest.fixture(scope="module")
def pair():
    dit = random_dit()
    calib = capture(dit, create_diffusion(6), CalibrationSpec(num_samples=4, cfg_scale=1.5))
    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 100, 400, 600, 900, 999])
    y = torch.tensor([0, 3, 9, 10, 5, 10])  # 10: the null class
    return dit, to_diffusers(dit).eval(), calib, (x, t, y)


def test_families_are_found_and_name_the_same_roles(pair):
    dit, transformer, _, _ = pair
    assert family_of(dit) is TQDIT and family_of(transformer) is DIFFUSERS
    assert family_of(DiffusersDiT(transformer)).name.startswith("diffusers-dit")
    for role in ("qkv", "proj", "fc1", "fc2", "adaln", "final_adaln", "final_linear", "patch_embed"):
        assert TQDIT.role_patterns(role) and DIFFUSERS.role_patterns(role), role
    # "all" means every such layer there is: diffusers' DiT has no shared timestep MLP (each block embeds
    # the timestep itself), so it gets the blocks' layers and the final adaLN and Linear
    assert set(resolve_scope(transformer, "all")) == set(resolve_scope(transformer, "blocks")) | {
        "pos_embed.proj", "proj_out_1", "proj_out_2"}


def output(model, inputs):
    with torch.no_grad():
        return family_of(model).predict(model, *inputs)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_same_method_on_both_implementations_gives_the_same_quantized_model(pair, method):
    """Both quantized models compute the same function and hold the same calibrated grids.

    Measured (2-core CPU, float32, W6A6): the quantized outputs of the two implementations are bitwise
    equal for all four methods (PTQ4DiT's folding and initial grids; its reconstruction is the next
    test: gradients summed in another order make it differ in float rounding), while quantization moves
    the output by 3.6-5.4 % of its scale; the tolerance, 1e-6 of the scale, leaves room for a BLAS that
    rounds differently, far below that effect. The grids agree to 1e-5.
    Mutations caught: the diffusers processor scaling k instead of q (``k * scale`` before the matmul:
    the q·kᵀ operands are quantized differently); the adapter's qkv role pointing at ``attn1.to_q``."""
    dit, transformer, calib, inputs = pair
    config = CONFIGS[method]
    quantized_dit, cost_dit = tqdit.quantize(copy.deepcopy(dit), calib, config)
    quantized_hf, cost_hf = tqdit.quantize(copy.deepcopy(transformer), calib, config)
    assert cost_dit["quantized_layers"] == cost_hf["quantized_layers"] > 0

    reference, fp = output(quantized_dit, inputs), output(dit, inputs)
    scale = fp.abs().max()
    quantization_error = (reference - fp).abs().max() / scale
    difference = (output(quantized_hf, inputs) - reference).abs().max() / scale
    assert quantization_error > 1e-2, quantization_error  # the effect the tolerance must stay below
    assert difference <= 1e-6, (difference, quantization_error)

    # the calibrated grids, quantizer by quantizer, matched through the roles
    grids_dit = {rename(n, TQDIT): q for n, q in quantizers(quantized_dit)}
    grids_hf = {rename(n, DIFFUSERS): q for n, q in quantizers(quantized_hf)}
    assert grids_dit.keys() == grids_hf.keys()
    for name, q in grids_dit.items():
        for buffer, value in q.named_buffers():
            other = dict(grids_hf[name].named_buffers())[buffer]
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-7, msg=f"{name}.{buffer}")


def test_reconstruction_on_both_implementations_makes_the_same_rounding_decisions(pair):
    """PTQ4DiT with its block reconstruction (AdaRound + activation steps) on both implementations.

    Both forward passes are bitwise equal, but the two blocks' autograd graphs sum gradients in different
    orders, so the Adam steps differ in float rounding from the tenth iteration on (measured: output
    difference 0 at 5 iterations, 2.6e-7 at 10) and a few rounding variables near ½ go the other way. The
    bar is the one the GPU path meets against the eager one: ≥ 99.9 % equal rounding decisions (measured
    99.97 %, 147,456 weights, 2-core CPU). Mutation caught: the adapter's qkv role pointing at
    ``attn1.to_q`` (decisions then agree at chance level)."""
    from tqdit.quant.layers import QuantLinear

    dit, transformer, calib, _ = pair
    config = dataclasses.replace(CONFIGS["ptq4dit"], recon=RECON)
    codes = []
    for model, family in ((dit, TQDIT), (transformer, DIFFUSERS)):
        quantized, _ = tqdit.quantize(copy.deepcopy(model), calib, config)
        codes.append({rename(f"{n}.weight", family):
                      torch.round(m.quantized_weight() / m.weight_quant.scale[0][:, None])
                      for n, m in quantized.named_modules() if isinstance(m, QuantLinear)})
    assert codes[0].keys() == codes[1].keys()
    equal = sum(int((codes[0][k] == codes[1][k]).sum()) for k in codes[0])
    total = sum(v.numel() for v in codes[0].values())
    assert equal / total >= 0.999, (equal, total)


def rename(name: str, family) -> str:
    """``blocks.0.attn.qkv.act`` / ``transformer_blocks.0.attn1.to_qkv.act`` -> ``0.qkv.act``."""
    for role, local in family.block_roles.items():
        prefix = f"{family.block_list}."
        if name.startswith(prefix) and f".{local}." in name:
            number, _, rest = name[len(prefix) :].partition(".")
            if rest.startswith(local + "."):
                return f"{number}.{role}.{rest[len(local) + 1:]}"
    for role, full in family.model_roles.items():
        if name.startswith(full + "."):
            return f"{role}.{name[len(full) + 1:]}"
    return name


@pytest.fixture(scope="module")
def diffusers_folder(files):
    """test_latent's random DiT-S/2 (input 4), VAE, Inception and reference files, plus the same DiT
    saved as a diffusers pipeline folder (transformer/)."""
    dit = load_dit_weights(build_dit("DiT-S/2", input_size=4), files / "dit.safetensors")
    to_diffusers(dit).save_pretrained(files / "pipeline" / "transformer")
    return files


def job(root, job_dir, *model):
    command = [
        sys.executable,
        "run.py",
        f"hydra.run.dir={job_dir}",
        f"cache_dir={root / 'cache'}",
        *model,
        "model.arch=DiT-S/2",
        "model.input_size=4",
        f"model.vae.path={root / 'vae'}",
        "eval=imagenet256",
        f"eval.weights={root / 'inception.pth'}",
        f"eval.reference={root / 'VIRTUAL_tiny.npz'}",
        "eval.batch_size=8",
        "num_samples=10",
        "batch_size=5",
        "sampler.steps=3",
        "device=cpu",
        "quant=mrq_tgq",
        "groups=3",
        "quant.num_inputs=12",
        "quant.candidates=10",
        "quant.rounds=1",
        "quant.calib.num_samples=2",
    ]
    return subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def test_a_job_runs_on_a_diffusers_folder_as_on_the_converted_checkpoint(diffusers_folder, tmp_path):
    """``model=dit_xl_2_256_diffusers model.diffusers=<folder>`` quantizes and samples diffusers' model;
    the same weights as a tqdit checkpoint give the same calibration and samples (latents through the
    random VAE: pixel values agree to ±1 where float rounding moves a value across a rounding edge)."""
    hf = job(
        diffusers_folder,
        tmp_path / "hf",
        "model=dit_xl_2_256_diffusers",
        f"model.diffusers={diffusers_folder / 'pipeline'}",
    )
    assert hf.returncode == 0, hf.stderr[-3000:]
    ours = job(
        diffusers_folder,
        tmp_path / "ours",
        "model=dit_xl_2_256",
        f"model.checkpoint={diffusers_folder / 'dit.safetensors'}",
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("hf", "ours")}
    assert results["hf"]["quant"]["model_family"].startswith("diffusers-dit")
    assert results["ours"]["quant"]["model_family"] == "tqdit-dit"
    layers = 12 * 6 + 1  # TQ-DiT's published set: 6 per block and the final Linear
    assert results["hf"]["quant"]["quantized_layers"] == layers
    assert results["ours"]["quant"]["quantized_layers"] == layers
    import numpy as np

    images = {name: np.load(tmp_path / name / "samples.npz")["arr_0"].astype(int) for name in ("hf", "ours")}
    assert np.abs(images["hf"] - images["ours"]).max() <= 1


def test_a_missing_diffusers_model_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            f"hydra.run.dir={tmp_path / 'job'}",
            "model=dit_xl_2_256_diffusers",
            "model.diffusers=nobody/no-such-dit",
            "quant=fp",
            "device=cpu",
            f"eval.reference={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-dit" in lines[0], result.stderr[-2000:]
