"""The table's controls: the noise control (uniform's grids, noise instead of rounding) and W16."""

import copy

import pytest
import torch

from tqdit.quant.layers import quantizers
from tqdit.quant.methods import config_from_settings, quantize
from tqdit.quant.quantizers import UniformQuantizer
from tqdit.quant.search import SearchConfig
from tqdit.quant.quantizers import hash_uniform

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion

from test_quant import calibrated, output_error, tiny_dit


def test_hash_noise_is_uniform_deterministic_and_unrelated_to_code_and_position():
    codes = torch.randint(-128, 128, (64, 3000), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(3000).expand(64, -1)
    u = hash_uniform(codes, positions)
    assert u.min() >= -0.5 and u.max() <= 0.5
    assert abs(float(u.mean())) < 3e-3 and abs(float(u.var()) - 1 / 12) < 2e-3
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), codes.flatten().float()]))[0, 1])) < 0.01
    # the neighbouring code, and the neighbouring position, get unrelated draws
    for other in (hash_uniform(codes + 1, positions), hash_uniform(codes, positions + 1)):
        assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1])) < 0.01
    torch.testing.assert_close(hash_uniform(codes.clone(), positions), u, atol=0, rtol=0)


@pytest.fixture(scope="module")
def noise_and_uniform():
    fp, uniform, _, calib, _ = calibrated("uniform", bits=6, search="lp")
    _, noise, _, _, _ = calibrated("noise", bits=6, search="lp")
    return fp, uniform, noise, calib


def test_noise_control_uses_uniforms_grids_and_adds_noise_of_the_step_size(noise_and_uniform):
    """Mutation caught: noise scaled by Δ/2 (or Δ²) instead of Δ, or rounding left in place."""
    fp, uniform, noise, calib = noise_and_uniform
    pairs = list(zip(quantizers(uniform), quantizers(noise)))
    assert pairs and all(
        type(n).__name__ == "UniformNoise" and type(u) is UniformQuantizer for (_, u), (_, n) in pairs
    )
    for (name, u), (_, n) in pairs:
        torch.testing.assert_close(n.scale, u.scale, atol=0, rtol=0)  # the Lp rule scores each tensor alone
    weight = noise.blocks[0].mlp.fc1.weight
    q = noise.blocks[0].mlp.fc1.weight_quant
    error = (q(weight) - weight) / q.scale[0][:, None]  # in units of each channel's step
    assert abs(float(error.mean())) < 0.02 and abs(float(error.var()) - 1 / 12) < 0.01
    assert float(error.abs().max()) <= 0.5 + 1e-6
    # not rounding: the noisy weights are (almost) never on the grid
    codes = q(weight) / q.scale[0][:, None]
    assert float(((codes - codes.round()).abs() < 1e-4).float().mean()) < 0.01


def test_noise_control_perturbs_the_model_about_as_much_as_rounding(noise_and_uniform):
    """The control is useful only at the quantization error's size: its output error is within a
    factor of three of uniform W6A6's (same operands, same steps; rounding's error also clips)."""
    fp, uniform, noise, calib = noise_and_uniform
    rounded, noisy = output_error(fp, uniform, calib), output_error(fp, noise, calib)
    assert 1e-4 < noisy and rounded / 3 < noisy < 3 * rounded
    x, t, y = calib.x[:6], calib.t[:6], calib.y[:6]
    with torch.no_grad():  # a pure function of the input: the same sample alone or in a batch
        batched, alone = noise(x, t, y)[2:3], noise(x[2:3], t[2:3], y[2:3])
        rounded_batched, rounded_alone = uniform(x, t, y)[2:3], uniform(x[2:3], t[2:3], y[2:3])
    # as far from batch-invariant as rounding is (round-off can move a value across a cell edge in both)
    assert (batched - alone).abs().max() <= 10 * max((rounded_batched - rounded_alone).abs().max(), 1e-5)


def sixteen_and_eight_bits():
    """uniform at W16 and W8, each calibrated on every input of the calibration set."""
    torch.manual_seed(0)
    fp = tiny_dit()
    calib = capture(fp, create_diffusion(6), CalibrationSpec(num_samples=4, cfg_scale=1.5))
    models = []
    for bits in (16, 8):
        cfg = config_from_settings(
            "uniform",
            dict(
                w_bits=bits,
                a_bits=bits,
                num_inputs=len(calib.t),
                capture_batch=16,
                search=SearchConfig(criterion="lp", candidates=20),
            ),
            {},
        )
        models.append(quantize(copy.deepcopy(fp), calib, cfg))
    return fp, calib, models


def test_sixteen_bit_uniform_is_fp_up_to_its_sixteen_bit_grid():
    """The W16 control row runs the whole quantization path; on the inputs it was calibrated on its
    output is FP's up to the 16-bit grid's rounding (relative squared error 5e-9 here: 2^-16 of each
    range over 26 operands; 8 bits give 2^16 times more). On other inputs a calibrated range can
    clip values calibration never saw: that, not rounding, is what a W16 row's distance from FP
    measures. Mutation caught: 16 bits mapped to an 8-bit grid (or any rounding coarser than 2^-16
    of the range)."""
    fp, calib, ((w16, cost), (w8, _)) = sixteen_and_eight_bits()
    # TQ-DiT's published operands (uniform is its ablation's first row): 6 per block and the final Linear
    assert cost["quantized_layers"] == 13 and all(q.enabled for _, q in quantizers(w16))
    assert {q.bits for _, q in quantizers(w16)} == {16}
    error16, error8 = output_error(fp, w16, calib), output_error(fp, w8, calib)
    assert error16 < 2e-8 and error16 < 1e-3 * error8


def test_noise_control_keeps_uniforms_grids_under_an_output_criterion_and_reloads(tmp_path):
    """The search runs with rounding, then the quantizers add noise: under the Hessian criterion too
    the steps are uniform's. Mutation caught: building the noise quantizers before the search (it then
    scores candidates beside the other operand's noise: 19 of 28 steps differed at W6)."""
    from tqdit.quant.state import load_quant_state, save_quant_state

    fp, uniform, _, _, diffusion = calibrated("uniform", bits=6, search="hessian")
    _, noise, _, calib, _ = calibrated("noise", bits=6, search="hessian")
    for (_, u), (_, n) in zip(quantizers(uniform), quantizers(noise)):
        torch.testing.assert_close(n.scale, u.scale, atol=0, rtol=0)
    path = tmp_path / "noise.safetensors"
    save_quant_state(noise, path, "noise", diffusion.timesteps)
    fresh = copy.deepcopy(fp)
    load_quant_state(fresh, path)
    assert {type(q).__name__ for _, q in quantizers(fresh)} == {"UniformNoise"}
    x, t, y = calib.x[:4], calib.t[:4], calib.y[:4]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), noise(x, t, y), atol=0, rtol=0)


def test_each_quantizer_draws_its_own_noise(noise_and_uniform):
    """Two operands whose values share grid cells must not share their draws (a salt per quantizer).
    Mutation caught: a salt of 0 for every quantizer (the draws then correlate exactly)."""
    _, _, noise, _ = noise_and_uniform
    first, second = noise.blocks[0].attn.qkv.act, noise.blocks[1].attn.qkv.act
    assert first.salt != second.salt
    x = torch.full((1, 4096), 1e-4)  # every value in the cell around zero, at every position
    with torch.no_grad():
        a = (first(x) - x) / first.scale[0, 0]
        b = (second(x) - x) / second.scale[0, 0]
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.1


def test_noise_control_refuses_low_bit_kernels(noise_and_uniform):
    from tqdit.kernels import fused_attention
    from tqdit.kernels.lowbit import to_low_bit

    _, _, noise, _ = noise_and_uniform
    with pytest.raises(ValueError, match="no low-bit form"):
        to_low_bit(copy.deepcopy(noise), "int8")
    assert not any(fused_attention.supports(block.attn) for block in noise.blocks)
