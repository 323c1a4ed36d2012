"""Real low-bit inference (tqdit/quant/lowbit.py): int8 weight storage on the CPU, FP8 matmuls on a GPU."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from test_pipeline import ROOT
from test_quant import tiny_dit
from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.quant import METHODS, QuantConfig, SearchConfig
from tqdit.quant.layers import QuantLinear
from tqdit.quant.lowbit import Fp8Linear, Int8WeightLinear, fp8_supported, to_low_bit, weight_bytes
from tqdit.quant.reconstruct import ReconConfig

def needs_fp8(test):
    """A GPU test (marker ``gpu``), skipped without FP8 tensor cores."""
    return pytest.mark.gpu(pytest.mark.skipif(not fp8_supported(), reason="needs a CUDA GPU with FP8 tensor cores")(test))


def calibrated(method: str, device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(0)
    fp = tiny_dit().to(device=device, dtype=dtype)
    calib = capture(fp, create_diffusion(6), CalibrationSpec(num_samples=4, cfg_scale=1.5))
    search = "lp" if method in ("ptq4dit", "qdiffusion") else "mse"
    cfg = QuantConfig(w_bits=8, a_bits=8, time_groups=2, num_inputs=12, capture_batch=8, recon=ReconConfig(iters=20, act_iters=10, batch=8),
                      search=SearchConfig(criterion=search, candidates=20, rounds=1))
    quantized, _ = METHODS[method](copy.deepcopy(fp), calib, cfg)
    return fp, quantized, calib


@pytest.mark.parametrize("method", ["mrq_tgq", "ptq4dit"])  # symmetric int8 weights; asymmetric uint8 weights
def test_int8_weight_storage_reproduces_the_calibrated_layer(method):
    _, quantized, calib = calibrated(method)
    layers = [(name, m) for name, m in quantized.named_modules() if isinstance(m, QuantLinear)]
    assert layers
    if quantized.quant_context is not None:  # time-grouped inputs: samples from both groups
        quantized.quant_context.set_groups(torch.tensor([0, 1, 1, 0, 1]))
    for name, layer in layers:
        stored = Int8WeightLinear(layer)
        assert stored.codes.dtype == (torch.uint8 if method == "ptq4dit" else torch.int8)
        torch.testing.assert_close(stored.weight(), layer.quantized_weight(), rtol=0, atol=1e-6)
        x = torch.randn(5, 7, layer.weight.shape[1])
        torch.testing.assert_close(stored(x), layer(x), rtol=0, atol=1e-5)
        assert stored.codes.element_size() * stored.codes.numel() * 4 == layer.weight.numel() * layer.weight.element_size()


@needs_fp8
def test_fp8_linear_follows_the_fake_quantized_layer():
    _, quantized, calib = calibrated("mrq_tgq", device="cuda", dtype=torch.bfloat16)
    layer = quantized.blocks[0].mlp.fc1
    fp8 = Fp8Linear(layer)
    inputs = []  # fc1's real inputs, from a forward pass of the model on samples of both time groups
    handle = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    pick = torch.cat([torch.nonzero(calib.step == step)[:4, 0] for step in (0, 5)])  # cleanest and noisiest steps
    with torch.no_grad():
        quantized(calib.x[pick].to("cuda", torch.bfloat16), calib.t[pick].cuda(), calib.y[pick].cuda())
        handle.remove()
        groups = quantized.quant_context.groups
        assert set(groups.tolist()) == {0, 1}
        scales = fp8.row_scales(inputs[0])  # each row takes its own sample's calibrated group scale
        expected = fp8.act_scale[groups].repeat_interleave(inputs[0].shape[1])
        torch.testing.assert_close(scales[:, 0], expected)
        low, high = layer.act.scale[:, 0] * (layer.act.qmin - layer.act.zero_point[:, 0]), layer.act.scale[:, 0] * (layer.act.qmax - layer.act.zero_point[:, 0])
        torch.testing.assert_close(fp8.act_scale, torch.maximum(low.abs(), high.abs()).float() / 448)
        reference, ours = layer(inputs[0]).float(), fp8(inputs[0]).float()
    # e4m3 keeps 3 mantissa bits: ≈ 3.6 % RMS rounding per operand, so ≈ 5 % on a product
    assert (ours - reference).norm() / reference.norm() < 0.08


@needs_fp8
def test_fp8_model_weights_shrink_and_outputs_follow():
    fp, quantized, calib = calibrated("mrq_tgq", device="cuda", dtype=torch.bfloat16)
    x, t, y = calib.x[:16].to("cuda", torch.bfloat16), calib.t[:16].cuda(), calib.y[:16].cuda()
    with torch.no_grad():
        reference, simulated = fp(x, t, y).float(), quantized(x, t, y).float()
        before = weight_bytes(fp)
        counts = to_low_bit(quantized)
        real = quantized(x, t, y).float()
    assert counts["fp8_linear"] == 2 * 4 and counts["int8_weight_linear"] == 2  # qkv, proj, fc1, adaLN; fc2 behind MRQ
    # FP8 rounds differently from the int8 grid; its error is of the same order as the int8 one
    assert (real - reference).norm() < 4 * (simulated - reference).norm() and (real - reference).norm() < 0.2 * reference.norm()
    assert weight_bytes(quantized) < before


@needs_fp8
def test_fp8_samples_of_the_embedded_model_match_fake_quantization_in_fid(tmp_path):
    """Same calibration (quant.load), same seed: FID of the real FP8 path within seed noise of the fake path."""
    common = ["num_samples=2000", "batch_size=1000", "quant=mrq_tgq", "bits=8", "device=cuda", "dtype=bf16", f"cache_dir={tmp_path / 'cache'}"]
    fake = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'fake'}", *common], cwd=ROOT, capture_output=True, text=True)
    assert fake.returncode == 0, fake.stderr[-2000:]
    real = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'fp8'}", *common, "quant.backend=fp8",
                           f"quant.load={tmp_path / 'fake' / 'quant_params.safetensors'}"], cwd=ROOT, capture_output=True, text=True)
    assert real.returncode == 0, real.stderr[-2000:]
    fid = {name: json.loads((tmp_path / name / "results.json").read_text())["metrics"]["fid"] for name in ("fake", "fp8")}
    record = json.loads((tmp_path / "fp8" / "results.json").read_text())["quant"]
    print(f"FID fake-quant {fid['fake']:.3f}, FP8 {fid['fp8']:.3f}; {record['lowbit']}")
    assert record["lowbit"]["fp8_linear"] == 16
    assert abs(fid["fp8"] - fid["fake"]) < 0.99  # the seed-to-seed std of FID at N = 2000 (README)
