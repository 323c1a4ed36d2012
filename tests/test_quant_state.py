"""Calibrated state lives in ``state_dict``: a reloaded model computes what the saved one did, never FP."""

import copy

import numpy as np
import pytest
import torch

from tqdit.errors import TqditError
from tqdit.quant.layers import quantizers
from tqdit.quant.state import load_quant_state, save_quant_state
from tqdit.quant.wrapping import wrap
from tqdit.quant.layers import QuantLinear, prepare_for_compile

from test_quant import calibrated


@pytest.fixture(scope="module")
def tgq_model():
    return calibrated("mrq_tgq", bits=6)


def inputs():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    return x, torch.tensor([999, 999, 0, 0]), torch.tensor([0, 1, 2, 0])


def test_state_dict_into_a_freshly_wrapped_model_reproduces_the_quantized_model(tgq_model):
    """Mutation caught: without the load hook (quantizers stay disabled after load_state_dict) the fresh
    model's output equals FP (the defect reproduced: it matched FP to 2e-7)."""
    fp, quantized, _, _, diffusion = tgq_model
    fresh = copy.deepcopy(fp)
    wrap(fresh, quantized.quant_config, diffusion.timesteps)
    assert not any(q.enabled for _, q in quantizers(fresh))
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        expected, reloaded, full_precision = quantized(x, t, y), fresh(x, t, y), fp(x, t, y)
    torch.testing.assert_close(reloaded, expected, atol=0, rtol=0)
    # and that output is not FP's: the quantization error is far above float rounding
    assert (expected - full_precision).abs().max() > 1e-3
    assert all(q.enabled and bool(q.calibrated) for _, q in quantizers(fresh))


def test_loading_new_weights_refreshes_the_frozen_weight(tgq_model):
    """Mutation caught: a frozen weight kept across load_state_dict (no re-freeze hook) computes with
    the weights the model had before the load."""
    _, quantized, _, _, _ = tgq_model
    model = copy.deepcopy(quantized)
    prepare_for_compile(model)  # freezes every QuantLinear's weight
    target = copy.deepcopy(quantized)
    with torch.no_grad():
        for module in target.modules():
            if isinstance(module, QuantLinear):
                module.weight.mul_(-1.0)  # a symmetric grid: the quantized weight flips sign exactly
                module.freeze()
    target_state = target.state_dict()
    model.load_state_dict(target_state)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert layers and all(m._frozen_weight is not None for _, m in layers)
    for name, module in layers:
        expected = target.get_submodule(name).quantized_weight()
        torch.testing.assert_close(module.quantized_weight(), expected, atol=0, rtol=0)
        assert (expected - quantized.get_submodule(name).quantized_weight()).abs().max() > 0.01


def test_wrapping_twice_changes_nothing_and_other_settings_are_refused(tgq_model):
    """Mutation caught: wrap without its already-wrapped check stacks a second timestep pre-hook and
    nests quantizers (the first of which is then found by no scope)."""
    fp, quantized, _, _, diffusion = tgq_model
    hooks = len(quantized._forward_pre_hooks)
    names = wrap(quantized, quantized.quant_config, diffusion.timesteps)
    assert len(quantized._forward_pre_hooks) == hooks == 1
    assert names == [
        n for n, m in quantized.named_modules() if type(m).__name__ in ("QuantLinear", "QuantMatMul")
    ]
    other = copy.deepcopy(quantized.quant_config)
    other.a_bits = 8
    with pytest.raises(ValueError, match="already quantized with other settings"):
        wrap(quantized, other, diffusion.timesteps)


def test_a_saved_file_lacking_a_quantizer_names_it_and_fails(tgq_model, tmp_path):
    """load_quant_state skipped quantizers missing from the file and raised only when none loaded, so a
    partial file left some layers silently in FP. Mutation caught: going back to skipping."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    fp, quantized, _, _, diffusion = tgq_model
    path = tmp_path / "quant_params.safetensors"
    save_quant_state(quantized, path, "mrq_tgq", diffusion.timesteps)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    dropped = "blocks.1.mlp.fc2.act.positive_scale"
    assert dropped in tensors
    del tensors[dropped]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), metadata=metadata)
    with pytest.raises(
        TqditError, match=r"lacks parameters of 1 quantizer buffers.*blocks\.1\.mlp\.fc2\.act\.positive_scale"
    ):
        load_quant_state(copy.deepcopy(fp), partial)
    fresh = copy.deepcopy(fp)
    _, _, info = load_quant_state(fresh, path)
    assert info["quantizers_loaded"] == len(quantizers(quantized))
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), quantized(x, t, y), atol=0, rtol=0)
        assert np.isfinite(float(fresh(x, t, y).sum()))
