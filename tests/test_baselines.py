"""Baselines: PTQ4DM's NDTC, Q-Diffusion's reconstruction (AdaRound, LSQ), PTQ4DiT's CSB/SSC folding."""

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from tqdit.data.calibration import (CalibrationSpec, calibration_labels, capture, ndtc_steps, select_ndtc,
                                    select_uniform_steps)
from tqdit.diffusion import create_diffusion
from tqdit.models.adapters import family_of
from tqdit.quant.config import CalibrationConfig
from tqdit.quant.layers import quantization_disabled, quantizers, QuantLinear, QuantMatMul
from tqdit.quant.methods import config_from_settings, quantize
from tqdit.quant.search import SearchConfig
from tqdit.quant.state import load_quant_state, save_quant_state
from tqdit.quant.calibrate import calibrate
from tqdit.quant.methods import ptq4dit
from tqdit.quant.methods.ptq4dit import PTQ4DiTConfig, balancing_factors, fold_adaln, salience_balance
from tqdit.quant.reconstruct import AdaRoundWeight, ReconConfig, reconstruct_blocks

from test_quant import output_error, tiny_dit


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = tiny_dit()
    with torch.no_grad():  # weights of std 0.075: block outputs of order 1, as in a trained DiT
        for param in model.parameters():
            param.mul_(0.25)
    diffusion = create_diffusion(6)
    calib = capture(model, diffusion, CalibrationSpec(num_samples=6, cfg_scale=1.5))
    return model, calib


# ---------------------------------------------------------------- PTQ4DM: NDTC


def test_ndtc_steps_follow_the_configured_normal():
    steps, mean, std, count = 50, 0.4, 0.4, 40000
    drawn = ndtc_steps(steps, count, mean, std, np.random.default_rng(0))
    # independent expectation: P(step k) = P(k ≤ u·S < k+1) under N(mean, std), the tails folded into 0
    # and S−1
    edges = stats.norm.cdf(np.arange(1, steps) / steps, mean, std)
    probs = np.diff(np.concatenate([[0.0], edges, [1.0]]))
    observed = np.bincount(drawn, minlength=steps)
    assert stats.chisquare(observed, probs * count).pvalue > 1e-3
    assert drawn.min() == 0 and drawn.max() == steps - 1
    # skewed toward the clean end (step 0): more than half of the draws in the cleaner half
    assert (drawn < steps // 2).mean() > 0.55


def test_ndtc_selection_with_replacement_takes_trajectory_inputs_of_the_drawn_steps():
    step = np.repeat(np.arange(10), 8)  # 10 sampling steps, 8 inputs each
    index = select_ndtc(step, 10, 200, 0.4, 0.4, seed=3, replacement=True)
    expected = np.sort(ndtc_steps(10, 200, 0.4, 0.4, np.random.default_rng(3)))
    np.testing.assert_array_equal(np.sort(step[index]), expected)


def test_ndtc_selection_without_replacement_is_distinct_and_follows_the_normal():
    """The default draws distinct inputs; while no step runs out, the steps' frequencies follow NDTC's
    probabilities (chi-square against the normal's mass per step, computed here with scipy).
    Mutations caught: drawing with replacement, weighting inputs by the step probability without
    dividing by the step's number of inputs (uneven pools then skew the steps), or the tails not folded
    into the end steps."""
    steps, mean, std = 20, 0.4, 0.4
    per_step = np.where(np.arange(steps) % 2 == 0, 400, 200)  # uneven pools
    step = np.repeat(np.arange(steps), per_step)
    edges = stats.norm.cdf(np.arange(1, steps) / steps, mean, std)
    probs = np.diff(np.concatenate([[0.0], edges, [1.0]]))
    counts = np.zeros(steps)
    for seed in range(20):
        index = select_ndtc(step, steps, 150, mean, std, seed=seed)
        assert len(np.unique(index)) == len(index) == 150
        counts += np.bincount(step[index], minlength=steps)
    assert counts.max() < 0.5 * per_step.min() * 20  # far from exhausting any step: the law is NDTC's
    assert stats.chisquare(counts, probs * counts.sum()).pvalue > 1e-3
    with pytest.raises(ValueError, match="distinct calibration inputs"):
        select_ndtc(step, steps, len(step) + 1, mean, std, seed=0)


def test_calibration_labels_spread_over_all_classes():
    """``spread``: fewer trajectories than classes get distinct classes from the whole range, more get
    each class equally often (±1); ``first`` is i mod classes. Mutations caught: spread returning the
    first classes, or one permutation reused without reshuffling per round (still balanced: the seeded
    draws of two rounds are compared)."""
    few = calibration_labels(32, 1000, "spread", seed=0)
    assert len(np.unique(few)) == 32 and few.max() > 500
    many = calibration_labels(2500, 1000, "spread", seed=0)
    assert np.bincount(many, minlength=1000).min() == 2 and np.bincount(many).max() == 3
    assert not np.array_equal(many[:1000], many[1000:2000])
    np.testing.assert_array_equal(calibration_labels(12, 10, "first", seed=0), np.arange(12) % 10)
    assert not np.array_equal(calibration_labels(32, 1000, "spread", seed=1), few)


def test_uniform_stride_selection_covers_both_ends():
    step = np.repeat(np.arange(50), 4)
    index = select_uniform_steps(step, 50, 25, 3, seed=0)
    chosen = np.unique(step[index])
    assert len(chosen) == 25 and chosen[0] == 0 and chosen[-1] == 49
    assert np.all(np.bincount(step[index])[chosen] == 3)


# ---------------------------------------------------------------- PTQ4DiT: CSB, SSC, folding


def input_maxima(model, names, calib) -> dict:
    """max |input| per input channel over all calibration inputs, by forward hooks (independent of the
    method)."""
    result = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: result.__setitem__(
                n, torch.maximum(result.get(n, torch.zeros(a[0].shape[-1])), a[0].abs().amax(dim=(0, 1)))
            )
        )
        for n in names
    ]
    with torch.no_grad():
        model(calib.x, calib.t, calib.y)
    for h in hooks:
        h.remove()
    return result


def test_balancing_leaves_the_fp_model_unchanged(setting):
    model, calib = setting
    balanced = copy.deepcopy(model)
    changed = salience_balance(balanced, calib.x, calib.t, calib.y, calib.step.numpy())
    assert "blocks.0.adaLN_modulation.1.bias" in changed and "blocks.1.attn.qkv.weight" in changed
    with torch.no_grad():
        reference = model(calib.x, calib.t, calib.y)
        out = balanced(calib.x, calib.t, calib.y)
    assert (out - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())
    assert not torch.equal(balanced.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("layer", ["attn.qkv", "attn.proj", "mlp.fc1"])
def test_csb_gives_both_operands_the_geometric_mean_salience(setting, layer):
    model, calib = setting
    only_last_step = calib.step == 0  # one step: SSC reduces to plain CSB with s(X) = max|X|
    x, t, y = calib.x[only_last_step], calib.t[only_last_step], calib.y[only_last_step]
    one_step = type(calib)(x, t, y, calib.step[only_last_step], calib.timesteps)
    names = [f"blocks.{i}.{layer}" for i in range(len(model.blocks))]
    before_x = input_maxima(model, names, one_step)
    before_w = {n: model.get_submodule(n).weight.abs().amax(dim=0) for n in names}
    balanced = copy.deepcopy(model)
    salience_balance(balanced, x, t, y, one_step.step.numpy(), layers=[layer])
    after_x = input_maxima(balanced, names, one_step)
    for n in names:
        target = torch.sqrt(before_x[n] * before_w[n])
        torch.testing.assert_close(after_x[n], target, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            balanced.get_submodule(n).weight.abs().amax(dim=0), target, rtol=1e-4, atol=1e-6
        )


def test_ssc_weights_steps_by_softmax_of_minus_spearman():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    s_w = weight.abs().amax(dim=0)
    order = s_w.argsort()
    aligned = torch.empty(16)
    aligned[order] = torch.linspace(1, 2, 16)  # same ranking as s(W): ρ = 1
    opposite = torch.empty(16)
    opposite[order] = torch.linspace(3, 1, 16)  # reversed ranking: ρ = −1
    partial = torch.rand(16, generator=generator) + 0.5
    per_step = torch.stack([aligned, opposite, partial])
    rho = np.array([stats.spearmanr(s.numpy(), s_w.numpy()).statistic for s in per_step])
    eta = np.exp(-rho) / np.exp(-rho).sum()
    s_x = (eta[:, None] * per_step.numpy()).sum(axis=0)
    expected = np.sqrt(s_x * s_w.numpy()) / s_x
    np.testing.assert_allclose(balancing_factors(weight, per_step, ssc=True).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        balancing_factors(weight, per_step, ssc=False).numpy(),
        np.sqrt(per_step.amax(0).numpy() * s_w.numpy()) / per_step.amax(0).numpy(),
        rtol=1e-5,
    )


def test_folded_adaln_equals_runtime_scaling(setting):
    model, calib = setting
    b = torch.rand(32) + 0.5
    runtime, folded = copy.deepcopy(model), copy.deepcopy(model)
    seen = {}
    # runtime form (what the released code does): multiply the qkv input by b, divide the weight columns
    runtime.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: (a[0] * b,))
    runtime.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.__setitem__("runtime", a[0]))
    with torch.no_grad():
        runtime.blocks[0].attn.qkv.weight /= b
        fold_adaln(folded.blocks[0].adaLN_modulation[1], 0, 1, b)
        folded.blocks[0].attn.qkv.weight /= b
    folded.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.__setitem__("folded", a[0]))
    with torch.no_grad():
        out_runtime, out_folded = runtime(calib.x, calib.t, calib.y), folded(calib.x, calib.t, calib.y)
    torch.testing.assert_close(seen["folded"], seen["runtime"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_folded, out_runtime, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reconstruction


def test_adaround_starts_at_the_fp_weight():
    from tqdit.quant.quantizers import UniformQuantizer
    weight = torch.randn(6, 10)
    q = UniformQuantizer(4, symmetric=False, channels=6)
    q.set_range(weight.amin(dim=1), weight.amax(dim=1))
    rounding = AdaRoundWeight(weight, q)
    # the soft weight is W itself, up to the clipping of the code range (the zero point is an integer)
    scale, zero = q.scale[0][:, None], q.zero_point[0][:, None]
    expected = torch.minimum(torch.maximum(weight, (q.qmin - zero) * scale), (q.qmax - zero) * scale)
    torch.testing.assert_close(rounding(weight), expected, atol=1e-3 * weight.abs().max().item(), rtol=0)
    rounding.hard = True  # hard rounding = nearest rounding at the start (h = fractional part)
    torch.testing.assert_close(rounding(weight), q(weight), atol=1e-6, rtol=0)


def test_reconstruction_rounds_to_floor_or_ceil_and_lowers_block_error(setting):
    model, calib = setting
    quantized = copy.deepcopy(model)
    cfg = CalibrationConfig(
        w_bits=4,
        a_bits=8,
        weight_symmetric=False,
        num_inputs=36,
        search=SearchConfig(criterion="lp", candidates=20),
    )
    index = np.arange(len(calib))[::2]
    calibrate(quantized, calib, cfg, progress=False, index=index)
    start = {
        name: (
            m.weight.detach().clone(),
            m.weight_quant.scale[0].clone(),
            m.weight_quant.zero_point[0].clone(),
        )
        for name, m in quantized.named_modules()
        if isinstance(m, QuantLinear)
    }
    recon = ReconConfig(iters=300, act_iters=50, batch=16, lr=2e-2)  # few iterations: a larger step
    reports = reconstruct_blocks(
        quantized, calib.x[index], calib.t[index], calib.y[index], recon, order="per_block", progress=False
    )
    for report in reports:
        assert report["error_after"] < report["error_nearest"]
    for name, (weight, scale, zero) in start.items():
        codes = quantized.get_submodule(name).weight / scale[:, None] + zero[:, None]
        torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)  # on the grid
        floor = torch.floor(weight / scale[:, None]) + zero[:, None]
        offset = codes.round() - floor
        inside = (floor > 0) & (floor < 15)  # away from the clamp at the code range's ends
        assert set(offset[inside].unique().tolist()) <= {0.0, 1.0}  # floor or ceil, nothing else
    # with 300 iterations the annealed regulariser has pushed nearly every h(V) to 0 or 1
    assert max(r["undecided_rounding"] for r in reports) < 0.05


# ---------------------------------------------------------------- the methods end to end


def baseline(method, setting, bits=8, protocol="published", **params):
    model, calib = setting
    cfg = config_from_settings(
        method,
        dict(
            w_bits=bits,
            a_bits=bits,
            protocol=protocol,
            num_inputs=24,
            capture_batch=8,
            search=SearchConfig(criterion="lp", candidates=20),
            recon=ReconConfig(iters=60, act_iters=20, batch=8),
        ),
        params,
    )
    quantized, cost = quantize(copy.deepcopy(model), calib, cfg)
    return model, quantized, cost, calib


@pytest.mark.parametrize("method", ["ptq4dm", "qdiffusion", "ptq4dit"])
def test_baselines_quantize_every_scoped_layer(method, setting):
    """The shared protocol: every method quantizes the blocks' 14 modules at the setting's widths."""
    fp, quantized, cost, calib = baseline(method, setting, bits=6, protocol="shared")
    uniform = [(n, q) for n, q in quantizers(quantized) if type(q).__name__ == "UniformQuantizer"]
    assert len(uniform) == 2 * 14 and all(q.enabled for _, q in quantizers(quantized))
    assert {q.bits for _, q in uniform} == {6}
    others = {type(q).__name__ for _, q in quantizers(quantized)} - {"UniformQuantizer"}
    assert others == ({"InputScale"} if method == "ptq4dit" else set())  # PTQ4DiT's run-time factors
    weight_symmetric = {q.symmetric for n, q in quantizers(quantized) if n.endswith("weight_quant")}
    assert weight_symmetric == ({True} if method == "ptq4dm" else {False})
    assert 0 < output_error(fp, quantized, calib) < 0.1
    assert cost["calibration_s"] > 0 and ("reconstruction" in cost) == (method != "ptq4dm")


@pytest.mark.parametrize("method,linears,matmuls,input_scales",
                         [("ptq4dm", 15, 0, 0), ("qdiffusion", 15, 4, 0), ("ptq4dit", 15, 4, 6)])
def test_published_protocol_quantizes_what_each_code_quantizes(method, linears, matmuls, input_scales,
                                                               setting):
    """``protocol=published`` (default): PTQ4DM every Linear (blocks, timestep MLP, final adaLN and
    Linear, the patch embedding as a Linear over patches) and no attention, its first and last layer at
    8 bits; Q-Diffusion and PTQ4DiT every Linear and both
    matmuls with attention probabilities at 8 bits whatever a_bits; PTQ4DiT's balancing factors at run
    time on qkv, proj, fc1. Mutations caught: PTQ4DM wrapping the attention matmuls, the post-softmax
    operand at a_bits, PTQ4DM's last layer at the setting's bits, PTQ4DiT folding by default."""
    fp, quantized, cost, calib = baseline(method, setting, bits=6)
    modules = dict(quantized.named_modules())
    assert sum(isinstance(m, QuantLinear) for m in modules.values()) == linears
    assert sum(isinstance(m, QuantMatMul) for m in modules.values()) == matmuls
    assert sum(type(q).__name__ == "InputScale" for _, q in quantizers(quantized)) == input_scales
    final = quantized.final_layer.linear
    first = quantized.x_embedder.proj.linear
    for layer in (first, final):
        assert (layer.weight_quant.bits, layer.act.bits) == ((8, 8) if method == "ptq4dm" else (6, 6))
    assert quantized.blocks[0].attn.qkv.act.bits == 6 and quantized.t_embedder.mlp[2].act.bits == 6
    for block in quantized.blocks if matmuls else []:
        assert block.attn.av_matmul.a_quant.bits == 8 and block.attn.av_matmul.b_quant.bits == 6
    assert 0 < output_error(fp, quantized, calib) < 0.1


def operand_of(model, module_name, slot, calib, prepend=False):
    """What ``module_name`` receives as argument ``slot`` on the calibration inputs, by a forward pre-hook
    (``prepend``: before the module's own pre-hooks)."""
    seen = []
    hook = model.get_submodule(module_name).register_forward_pre_hook(
        lambda module, args: seen.append(args[slot].detach().clone()), prepend=prepend)
    with torch.no_grad():
        model(calib.x[:16], calib.t[:16], calib.y[:16])
    hook.remove()
    return torch.cat(seen)


def test_ptq4dit_runtime_balancing_as_its_code_and_fold_as_its_paper(setting):
    """``balance=runtime`` (its code): with quantization off the model is the FP model; the factor b
    multiplies the layer's input ahead of its quantizer, the weight holds W/b; v (the second operand
    of softmax·V) and adaLN are the FP model's. ``balance=fold`` (its paper): v's quantizer sees v·b of
    proj and adaLN's weights change. Mutations caught: the factor applied after the activation
    quantizer or not at all, the weight left undivided, runtime also folding proj's b into v."""
    fp, calib = setting
    index = np.arange(len(calib))[::4]
    x, t, y = calib.x[index], calib.t[index], calib.y[index]
    fp = copy.deepcopy(fp)
    family_of(fp).set_explicit_attention(fp, [True] * len(fp.blocks))  # its matmuls called, as quantized
    runtime, folded = copy.deepcopy(fp), copy.deepcopy(fp)
    ptq4dit.balance(runtime, x, t, y, calib, index, PTQ4DiTConfig())
    ptq4dit.balance(folded, x, t, y, calib, index, PTQ4DiTConfig(balance="fold"))
    v_fp = operand_of(fp, "blocks.0.attn.av_matmul", 1, calib)
    for model in (runtime, folded):
        with quantization_disabled(model), torch.no_grad():
            reference, out = fp(calib.x[:16], calib.t[:16], calib.y[:16]), model(calib.x[:16], calib.t[:16],
                                                                               calib.y[:16])
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
            v = operand_of(model, "blocks.0.attn.av_matmul", 1, calib)
        if model is runtime:
            torch.testing.assert_close(v, v_fp, rtol=0, atol=1e-6)
        else:
            assert (v - v_fp).abs().max() > 1e-3
    proj = runtime.blocks[0].attn.proj
    factor = proj.input_scale.factor
    assert (factor - 1).abs().max() > 1e-2  # not vacuous
    torch.testing.assert_close(proj.weight * factor, fp.blocks[0].attn.proj.weight, rtol=1e-5, atol=1e-7)
    raw = operand_of(runtime, "blocks.0.attn.proj", 0, calib, prepend=True)
    quantizer_input = operand_of(runtime, "blocks.0.attn.proj.act", 0, calib)
    torch.testing.assert_close(quantizer_input, raw * factor, rtol=1e-6, atol=1e-7)
    adaln = "blocks.0.adaLN_modulation.1.weight"
    assert torch.equal(runtime.get_parameter(adaln), fp.get_parameter(adaln))
    assert not torch.equal(folded.get_parameter(adaln), fp.get_parameter(adaln))


@pytest.mark.parametrize("method", ["qdiffusion", "ptq4dit"])
def test_reconstruction_leaves_blocks_outside_the_scope_alone(method, setting):
    # a scope of one block's layers: the other block has nothing to reconstruct and stays FP
    model, calib = setting
    cfg = config_from_settings(
        method,
        dict(
            w_bits=6,
            a_bits=6,
            scope=["blocks.0.*"],
            num_inputs=24,
            capture_batch=8,
            search=SearchConfig(criterion="lp", candidates=20),
            recon=ReconConfig(iters=20, act_iters=10, batch=8),
        ),
        {},
    )
    quantized, cost = quantize(copy.deepcopy(model), calib, cfg)
    names = [name for name, _ in quantizers(quantized)]
    assert names and all(name.startswith("blocks.0.") for name in names)
    recon = cost["reconstruction"]
    assert recon["blocks"] == len(model.blocks)
    assert recon["error_after"][1] == recon["error_nearest"][1]  # nothing was fitted there
    for name, param in model.blocks[1].named_parameters():  # not reconstructed, and (PTQ4DiT) not balanced
        torch.testing.assert_close(quantized.blocks[1].get_parameter(name), param, rtol=0, atol=0)


def test_unknown_method_parameter_is_refused(setting):
    with pytest.raises(ValueError, match=r"unknown keys \['mu'\] for quant=ptq4dm"):
        baseline("ptq4dm", setting, mu=0.3)


def test_ptq4dit_state_reloads_folded_and_rounded_weights(setting, tmp_path):
    fp, quantized, _, _ = baseline("ptq4dit", setting)
    path = tmp_path / "quant_params.safetensors"
    save_quant_state(quantized, path, "ptq4dit", create_diffusion(6).timesteps)
    fresh = copy.deepcopy(fp)
    method, _, info = load_quant_state(fresh, path)
    assert method == "ptq4dit" and info["parameters_loaded"] > 0
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([999, 500, 0, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), quantized(x, t, y), atol=0, rtol=0)


def test_zero_activation_iterations_keep_the_initial_steps(setting):
    """``quant.recon.act_iters=0`` passed validation and then divided by zero in the cosine schedule.
    Zero iterations now mean the step phase is off: every activation step stays at its Lp initialisation
    while the rounding is still learned (the weights move to their reconstructed grid points)."""
    model, calib = setting
    cfg = CalibrationConfig(w_bits=6, a_bits=6, weight_symmetric=False, num_inputs=24, capture_batch=8,
                      search=SearchConfig(criterion="lp", candidates=20))
    index = np.arange(len(calib))[::3]
    quantized = copy.deepcopy(model)
    calibrate(quantized, calib, cfg, progress=False, index=index)
    initial = {n: q.scale.clone() for n, q in quantizers(quantized) if not n.endswith("weight_quant")}
    weights = {
        n: m.weight.detach().clone() for n, m in quantized.named_modules() if isinstance(m, QuantLinear)
    }
    recon = ReconConfig(iters=30, act_iters=0, batch=8)
    reconstruct_blocks(
        quantized, calib.x[index], calib.t[index], calib.y[index], recon, order="per_block", progress=False
    )
    for name, q in quantizers(quantized):
        if name in initial:
            torch.testing.assert_close(q.scale, initial[name], atol=0, rtol=0)
    assert any(not torch.equal(quantized.get_submodule(n).weight, w) for n, w in weights.items())
