"""Quantizers, MRQ, TGQ and the Hessian-guided search, checked against independent computations."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import PerSampleNoise, create_diffusion, guided_model, sample_loop
from tqdit.models import DiT
from tqdit.quant.config import CalibrationConfig
from tqdit.quant.layers import quantizers, QuantLinear, QuantMatMul
from tqdit.quant.methods import config_from_settings, METHODS, quantize
from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ, UniformQuantizer
from tqdit.quant.search import SearchConfig
from tqdit.quant.state import load_quant_state, save_quant_state
from tqdit.quant.wrapping import group_table, resolve_scope, wrap
from tqdit.quant.layers import quantization_disabled
from tqdit.quant.search import linear_problem, search_layer


@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_values_on_grid_and_error_within_half_step(bits, symmetric):
    x = torch.randn(4000) * 2 + (0 if symmetric else 1.5)
    low, high = torch.tensor(-1.5), torch.tensor(2.5)
    q = UniformQuantizer(bits, symmetric)
    q.set_range(low, high)
    out = q(x)
    scale, zero = q.scale.item(), q.zero_point.item()
    codes = out / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the grid
    assert codes.min() >= q.qmin - 1e-3 and codes.max() <= q.qmax + 1e-3  # inside the code range
    lo_edge, hi_edge = (q.qmin - zero) * scale, (q.qmax - zero) * scale
    inside = (x >= lo_edge) & (x <= hi_edge)
    assert (out[inside] - x[inside]).abs().max() <= scale / 2 + 1e-6  # round-to-nearest inside the range
    assert torch.allclose(out[x > hi_edge], torch.tensor(hi_edge)) and torch.allclose(
        out[x < lo_edge], torch.tensor(lo_edge)
    )
    expected = (high - low) / (2**bits - 1) if not symmetric else high.abs() / (2 ** (bits - 1) - 1)
    assert scale == pytest.approx(expected.item(), rel=1e-6)


def test_per_channel_weight_scales():
    w = torch.randn(6, 10) * torch.tensor([0.1, 1, 5, 0.01, 2, 3])[:, None]
    q = UniformQuantizer(4, symmetric=True, channels=6, axis=0)
    maxabs = w.abs().amax(dim=1)
    q.set_range(-maxabs, maxabs)
    assert torch.allclose(q.scale[0], maxabs / 7)
    out = q(w)
    for c in range(6):  # each output channel on its own grid, never clipped
        codes = out[c] / (maxabs[c] / 7)
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
        assert (out[c] - w[c]).abs().max() <= maxabs[c] / 14 + 1e-6


def test_straight_through_gradient_inside_range():
    q = UniformQuantizer(4, symmetric=True)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.tensor([-3.0, -0.52, 0.1, 0.49, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_softmax_mrq_quantizes_each_region_with_its_own_step_and_no_offset():
    bits, exponent = 6, 4
    split, levels = 2.0**-exponent, 2 ** (bits - 1) - 1
    x = torch.softmax(torch.randn(8, 64, 64) * 3, dim=-1)
    q = SoftmaxMRQ(bits)
    q.set_split(torch.tensor([exponent]))
    out = q(x)
    below = x < split
    step_lo, step_hi = split / levels, 1.0 / levels
    assert torch.allclose(out[below], torch.round(x[below] / step_lo) * step_lo)
    assert torch.allclose(out[~below], torch.round(x[~below] / step_hi) * step_hi)
    assert step_hi / step_lo == 2**exponent  # power-of-two ratio
    assert (
        out[~below] - x[~below]
    ).abs().max() <= step_hi / 2 + 1e-6  # no +s offset (the released code's bug)
    assert (out[below] - x[below]).abs().max() <= step_lo / 2 + 1e-7
    assert (out != x).any() and below.any() and (~below).any()


def test_gelu_mrq_negative_region_fixed_positive_searched():
    bits, positive = 8, 0.02
    x = F.gelu(torch.randn(20000) * 2, approximate="tanh")
    q = GeluMRQ(bits)
    q.set_positive_scale(torch.tensor([positive]))
    out = q(x)
    negative_step = 0.16997124254703522 / 2 ** (bits - 1)  # TQ-DiT's code's constant
    neg = x < 0
    assert torch.allclose(out[neg], torch.round(x[neg] / negative_step) * negative_step)
    assert (out[neg] - x[neg]).abs().max() <= negative_step / 2 + 1e-7
    top = (2 ** (bits - 1) - 1) * positive
    assert torch.allclose(out[~neg], torch.clamp(torch.round(x[~neg] / positive), 0, 127) * positive)
    assert out.max() == pytest.approx(top) and out.min() >= -0.17


def tiny_dit(depth=2):
    model = DiT(
        input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=3
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


@pytest.mark.parametrize("steps", [50, 100, 250])
def test_time_groups_follow_the_sampling_steps(steps):
    diffusion = create_diffusion(steps)
    for groups in sorted({1, 5, 10, 25, steps}):
        cfg = CalibrationConfig(w_bits=8, a_bits=8, time_groups=groups)
        quantized = tiny_dit(depth=1)
        wrap(quantized, cfg, diffusion.timesteps)
        seen = {}
        labels = torch.tensor([0, 1])

        def record(index, x, t):
            seen[index] = t[0].item()

        model_fn = guided_model(quantized, labels, 1.5, None)

        def observed(x, t):
            out = model_fn(x, t)
            context = quantized.quant_context  # None when G = 1: every step is in group 0
            observed.groups.append(0 if context is None else context.single)
            return out

        observed.groups = []
        sample_loop(observed, diffusion, PerSampleNoise(0, [0, 1], (1, 8, 8)), on_step=record)
        order = sorted(seen, reverse=True)  # the sampler visits respaced indices S-1 .. 0
        expected = [i * groups // steps for i in order]  # independent: step i of S lies in group ⌊i·G/S⌋
        assert observed.groups == expected
        assert sorted(set(observed.groups)) == list(range(groups))
        assert observed.groups == sorted(observed.groups, reverse=True)  # contiguous groups, noisiest last
        sizes = np.bincount(observed.groups)
        assert sizes.max() - sizes.min() <= 1  # equal groups (to one step)


def test_a_copy_of_a_time_grouped_model_follows_its_own_timesteps():
    torch.manual_seed(0)
    fp = tiny_dit()
    calib = capture(fp, create_diffusion(6), CalibrationSpec(num_samples=4, cfg_scale=1.5))
    cfg = config_from_settings(
        "tgq",
        dict(time_groups=2, num_inputs=12, capture_batch=8, search=SearchConfig(criterion="minmax")),
        {},
    )
    quantized, _ = quantize(copy.deepcopy(fp), calib, cfg)
    clean, noisy = calib.step == 0, calib.step == 5  # time groups 0 and 1
    x, t, y = calib.x, calib.t, calib.y
    with torch.no_grad():
        quantized(x[noisy], t[noisy], y[noisy])  # the original's groups now say 1
        copied = copy.deepcopy(quantized)
        assert copied.quant_context is not quantized.quant_context
        for pick in (clean, noisy, clean | noisy):
            torch.testing.assert_close(
                copied(x[pick], t[pick], y[pick]), quantized(x[pick], t[pick], y[pick]), rtol=0, atol=0
            )
    grouped = [q for _, q in quantizers(quantized) if isinstance(q, UniformQuantizer) and q.groups == 2]
    assert any(q.scale[0, 0] != q.scale[1, 0] for q in grouped)  # so a wrong group would change outputs


def test_groups_outside_the_schedule_are_refused():
    with pytest.raises(
        ValueError, match="groups=51 must be between 1 and the number of sampling steps \\(50\\)"
    ):
        group_table(create_diffusion(50).timesteps, 51)


def test_hessian_search_beats_minmax_on_a_constructed_layer():
    """Input channel 3 carries outliers that only unimportant outputs read; the loss sees outputs 2 and 7.

    Min-max spends the 4-bit range on the outliers; the Hessian-guided score knows that clipping
    them costs the loss nothing and picks a much finer step.
    """
    torch.manual_seed(0)
    inputs = torch.randn(64, 16, 24)
    inputs[:, :4, 3] = 40.0
    linear = torch.nn.Linear(24, 12)
    with torch.no_grad():
        linear.weight[[2, 7], 3] = 0.0
    importance = torch.zeros(12)
    importance[[2, 7]] = 1.0
    grads = [importance.expand(16, 12).clone() for _ in range(64)]
    groups = torch.zeros(64, dtype=torch.long)

    def weighted_error(search: str) -> float:
        q = QuantLinear(
            linear, UniformQuantizer(4, symmetric=False), UniformQuantizer(8, True, channels=12, axis=0)
        )
        search_layer(linear_problem(q, list(inputs), grads, groups), SearchConfig(criterion=search, rounds=2))
        with torch.no_grad():
            error = q(inputs) - linear(inputs)
        return float((error * importance).square().mean())

    hessian, mse, minmax = weighted_error("hessian"), weighted_error("mse"), weighted_error("minmax")
    assert hessian < 0.25 * minmax, (hessian, minmax)
    assert hessian < mse < minmax, (hessian, mse, minmax)  # the output MSE does not know which outputs matter


def calibrated(method: str, bits: int = 8, groups: int = 2, search: str = "hessian",
               protocol: str = "shared"):
    """``method`` calibrated on a tiny DiT; the shared protocol by default (scope ``blocks``: 14 modules)."""
    torch.manual_seed(0)
    model = tiny_dit()
    diffusion = create_diffusion(6)
    calib = capture(model, diffusion, CalibrationSpec(num_samples=4, cfg_scale=1.5))
    cfg = config_from_settings(
        method,
        dict(
            w_bits=bits,
            a_bits=bits,
            protocol=protocol,
            time_groups=groups,
            num_inputs=12,
            capture_batch=8,
            search=SearchConfig(criterion=search, candidates=20, rounds=2),
        ),
        {},
    )
    quantized, cost = quantize(copy.deepcopy(model), calib, cfg)
    return model, quantized, cost, calib, diffusion


def output_error(fp, quantized, calib) -> float:
    """Relative output error on trajectory inputs (the distribution calibration saw), all steps."""
    with torch.no_grad():
        ref = fp(calib.x, calib.t, calib.y)
        return float((quantized(calib.x, calib.t, calib.y) - ref).square().mean() / ref.square().mean())


def test_sixteen_bits_is_a_near_no_op():
    fp, quantized, cost, calib, _ = calibrated("mrq_tgq", bits=16)
    assert cost["quantized_layers"] == 14  # 7 per block: qkv, proj, fc1, fc2, adaLN, two matmuls
    assert output_error(fp, quantized, calib) < 1e-4


def distinct_values(quantized, calib) -> list[int]:
    """How many distinct values each activation quantizer outputs per call (one sampling step per
    call, so one time group) and each quantized weight row holds."""
    counts, handles = [], []
    for name, q in quantizers(quantized):
        if not name.endswith("weight_quant"):
            handles.append(q.register_forward_hook(lambda m, args, out: counts.append(out.unique().numel())))
    try:
        with torch.no_grad():
            for step in calib.step.unique():
                pick = calib.step == step
                quantized(calib.x[pick], calib.t[pick], calib.y[pick])
    finally:
        for handle in handles:
            handle.remove()
    linears = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    rows = [row.unique().numel() for m in linears for row in m.quantized_weight()]
    return counts + rows


def check_layers_use_their_quantizers(quantized, calib) -> None:
    """Each quantized layer's output is its FP function of its quantized operands, which differ
    from the FP operands (one call per sampling step, so per time group)."""
    calls, handles = [], []
    for module in quantized.modules():
        if isinstance(module, (QuantLinear, QuantMatMul)):
            handles.append(module.register_forward_hook(lambda m, args, out: calls.append((m, args, out))))
    try:
        with torch.no_grad():
            for step in calib.step.unique():
                pick = calib.step == step
                quantized(calib.x[pick], calib.t[pick], calib.y[pick])
                for m, args, out in calls:
                    if isinstance(m, QuantLinear):
                        operands = [m.act(args[0]), m.weight_quant(m.weight)]
                        fp_operands = [args[0], m.weight]
                        expected = F.linear(*operands, m.bias)
                    else:
                        operands, fp_operands = [m.a_quant(args[0]), m.b_quant(args[1])], list(args)
                        expected = operands[0] @ operands[1]
                    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
                    assert all(not torch.equal(q, x) for q, x in zip(operands, fp_operands))
                assert len(calls) == 14
                calls.clear()
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("method", ["uniform", "mrq", "tgq", "mrq_tgq"])
def test_methods_quantize_every_scoped_layer(method):
    """Every scoped layer quantized, at the bit width asked for, activations included.

    W6A6 against W8A8 of the same method: two bits fewer make every step 4× coarser, so the error
    16× larger without clipping (7–11× measured with the searched clipping): the ratio lies in
    [4, 32]. The activation quantizers carry most of the W6A6 error (3.4–5× the weights-only error,
    measured): at least 2×. A 6-bit grid has 2^6 codes: every quantizer's output (per call, one
    time group) and every quantized weight row takes at most 64 values, and some take more than 32.

    Mutation caught: a method calibrating at 8 bits when asked for 6 (mrq.py ``replace(cfg,
    multi_region=True, time_groups=1, w_bits=8, a_bits=8)``); activations at 8 bits
    (``_activation_quantizer`` building every quantizer with 8 bits); activation quantizers skipped
    (``QuantLinear.forward`` computing ``F.linear(x, ...)``, or ``QuantMatMul.forward`` not quantizing
    ``b``: the layer check); SoftmaxMRQ alone at 8 bits; weights alone at 8 bits (the value counts).
    """
    fp, quantized, cost, calib, _ = calibrated(method, bits=6)
    assert all(q.enabled for _, q in quantizers(quantized))
    assert len(quantizers(quantized)) == 2 * 14
    error6 = output_error(fp, quantized, calib)
    error8 = output_error(fp, calibrated(method, bits=8)[1], calib)
    assert 4 < error6 / error8 < 32, (error6, error8)
    with quantization_disabled(quantized, activations_only=True):
        weights_only = output_error(fp, quantized, calib)
    assert error6 > 2 * weights_only, (error6, weights_only)
    counts = distinct_values(quantized, calib)
    assert max(counts) <= 2**6 and max(counts) > 2**5, max(counts)
    check_layers_use_their_quantizers(quantized, calib)
    kinds = {type(q).__name__ for _, q in quantizers(quantized)}
    assert ("SoftmaxMRQ" in kinds and "GeluMRQ" in kinds) == method.startswith("mrq")
    grouped = {
        q.groups
        for _, q in quantizers(quantized)
        if not (isinstance(q, UniformQuantizer) and q.scale.shape[1] > 1)
    }
    assert grouped == ({2} if "tgq" in method else {1})


def test_fewer_bits_more_error():
    errors = []
    for bits in (8, 6, 4):
        fp, quantized, _, calib, _ = calibrated("uniform", bits=bits)
        errors.append(output_error(fp, quantized, calib))
    assert errors[0] < errors[1] < errors[2]


def test_saved_parameters_reload_to_the_same_model(tmp_path):
    fp, quantized, _, _, diffusion = calibrated("mrq_tgq", bits=6)
    path = tmp_path / "quant_params.safetensors"
    save_quant_state(quantized, path, "mrq_tgq", diffusion.timesteps)
    fresh = copy.deepcopy(fp)
    method, loaded_cfg, info = load_quant_state(fresh, path)
    assert method == "mrq_tgq" and loaded_cfg.time_groups == 2 and info["quantizers_loaded"] == 28
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([999, 999, 0, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), quantized(x, t, y), atol=0, rtol=0)
        # both halves of the schedule really use different parameters
        assert not torch.equal(fresh(x[:2], t[2:], y[:2]), fresh(x[:2], t[:2], y[:2]))


def test_patch_embedding_is_quantized_as_the_linear_over_patches_it_is(tmp_path):
    """``PatchLinear`` computes the patch-embedding convolution (to float summation order); wrapped, its
    input is quantized per tensor and its weight per output channel like any Linear, and a saved model
    reloads to the same function. Mutations caught: patches unfolded in another order (a transposed
    kernel), or the output reshaped row-for-column."""
    from tqdit.quant.layers import PatchLinear

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=2, stride=2)
    x = torch.randn(4, 3, 6, 10)
    torch.testing.assert_close(PatchLinear(conv)(x), conv(x), rtol=1e-5, atol=1e-6)
    fp = tiny_dit()
    diffusion = create_diffusion(6)
    calib = capture(fp, diffusion, CalibrationSpec(num_samples=4, cfg_scale=1.5))
    cfg = config_from_settings("uniform", dict(w_bits=6, a_bits=6, scope=["x_embedder.proj", "blocks.0.*"],
                                              num_inputs=12, capture_batch=8), {})
    quantized, cost = quantize(copy.deepcopy(fp), calib, cfg)
    patch = quantized.x_embedder.proj
    assert isinstance(patch, PatchLinear) and patch.linear.act.bits == patch.linear.weight_quant.bits == 6
    assert patch.linear.weight_quant.scale.numel() == fp.x_embedder.proj.out_channels  # per output channel
    assert cost["quantized_layers"] == 8 and output_error(fp, quantized, calib) > 0
    seen = []
    hook = patch.linear.act.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        quantized(calib.x[:4], calib.t[:4], calib.y[:4])
    hook.remove()
    patches = F.unfold(calib.x[:4], 2, stride=2).transpose(1, 2)
    torch.testing.assert_close(seen[0], patches)  # the quantizer sees the patches
    path = tmp_path / "quant_params.safetensors"
    save_quant_state(quantized, path, "uniform", diffusion.timesteps)
    fresh = copy.deepcopy(fp)
    load_quant_state(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(calib.x[:4], calib.t[:4], calib.y[:4]),
                                   quantized(calib.x[:4], calib.t[:4], calib.y[:4]), atol=0, rtol=0)


def test_scope_is_shared_and_resolvable():
    model = tiny_dit()
    assert len(resolve_scope(model, "blocks")) == 14
    assert len(resolve_scope(model, "all")) == 19 and resolve_scope(model, "all")[0] == "x_embedder.proj"
    assert resolve_scope(model, "linears") == [n for n in resolve_scope(model, "blocks") if "matmul" not in n]
    assert resolve_scope(model, ["blocks.0.mlp.*"]) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with pytest.raises(ValueError, match="matches no Linear"):
        resolve_scope(model, ["nothing.*"])


# Q-DiT and DiTAS at small sizes: a short output-MSE search; a low rank and two alternations
RUNTIME_GRID_SETTINGS = {
    "qdit": dict(group_size=16, group_sizes=[8, 16, 32], generations=1, population=4, parents=2, mutations=2,
                 crossovers=2, fitness="output_mse"),
    "ditas": dict(rank=4, alternations=2, group_elements=8),
}


# ~17 s each on a 2-core CPU: the default suite keeps TQ-DiT and PTQ4DiT (its folded weights), the rest
# run with -m slow
@pytest.mark.parametrize(
    "method",
    [
        pytest.param("uniform", marks=pytest.mark.slow),
        "mrq_tgq",
        pytest.param("ptq4dm", marks=pytest.mark.slow),
        pytest.param("qdiffusion", marks=pytest.mark.slow),
        "ptq4dit",
        "qdit",
        "ditas",
    ],
)
def test_compile_ready_quantization_computes_the_same_outputs(method):
    """prepare_for_compile: per-sample device gathers instead of Python group lookups — same numbers,
    eagerly and under torch.compile (whole graph, every method); single-group batches (sampling) and
    mixed ones (calibration)."""
    from tqdit.quant.layers import prepare_for_compile
    from tqdit.quant.reconstruct import ReconConfig

    torch.manual_seed(0)
    fp = tiny_dit()
    calib = capture(fp, create_diffusion(6), CalibrationSpec(num_samples=4, cfg_scale=1.5))
    cfg = config_from_settings(
        method,
        dict(
            w_bits=6,
            a_bits=6,
            time_groups=2,
            num_inputs=12,
            capture_batch=8,
            recon=ReconConfig(iters=20, act_iters=10, batch=8),
            search=SearchConfig(criterion=METHODS[method].fixed_search or "hessian", candidates=20, rounds=1),
        ),
        RUNTIME_GRID_SETTINGS.get(method, {}),
    )
    quantized, _ = quantize(copy.deepcopy(fp), calib, cfg)
    one_step = calib.t == calib.t[0]
    with torch.no_grad():
        python_lookup_single = quantized(calib.x[one_step], calib.t[one_step], calib.y[one_step])
        python_lookup_mixed = quantized(calib.x, calib.t, calib.y)
        prepare_for_compile(quantized)
        context = quantized.quant_context  # None for methods without time groups
        assert context is None or context.tensor_only
        gathered_single = quantized(calib.x[one_step], calib.t[one_step], calib.y[one_step])
        assert context is None or context.single is None  # no read-back to Python
        torch.testing.assert_close(gathered_single, python_lookup_single, rtol=0, atol=0)
        torch.testing.assert_close(quantized(calib.x, calib.t, calib.y), python_lookup_mixed, rtol=0, atol=0)
        compiled = torch.compile(quantized, fullgraph=True)  # fullgraph: a graph break would raise
        compile_error = (compiled(calib.x, calib.t, calib.y) - python_lookup_mixed).norm()
        quantization_error = (fp(calib.x, calib.t, calib.y) - python_lookup_mixed).norm()
    # fused kernels round in another order; a value that lands on a rounding boundary moves one step,
    # and attention and adaLN spread that over the sample: small next to what quantization itself
    # changes (a wrong group or a skipped quantizer would differ by the whole quantization error)
    assert compile_error < 0.25 * quantization_error, (compile_error, quantization_error)
