"""Quantization numbers against independent computations, each test built so that a wrong number fails.

Every test names, in its docstring, the deliberate source mutation it was checked against
("Mutation caught: ..."): applied temporarily, the test fails; without it, it passes. Expectations
are computed here from the definitions (a uniform grid's step and zero point, the min/max of a time
group's own inputs, brute-force argmins over the same α grid), not by calling the code under test.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F

from test_quant import tiny_dit
from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.quant.config import CalibrationConfig
from tqdit.quant.layers import QuantLinear, QuantMatMul
from tqdit.quant.methods import config_from_settings, quantize
from tqdit.quant.quantizers import SoftmaxMRQ, TimeGroupContext, UniformQuantizer
from tqdit.quant.search import SearchConfig
from tqdit.quant.wrapping import group_table, wrap
from tqdit.models.adapters import TQDIT
from tqdit.quant.capture import capture_unit
from tqdit.quant.search import linear_problem, matmul_problem, search_layer

STEPS, GROUPS, BITS = 6, 3, 8


def step_group(step, groups: int, steps: int):
    """TGQ's rule, written out: sampling step i of S (0 = cleanest) lies in group ⌊i·G/S⌋."""
    return step * groups // steps


def grid_params(low: float, high: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """(step, zero point) of a b-bit grid covering [low, high], from the definitions: symmetric
    Δ = max|x| / (2^(b-1) − 1), z = 0; asymmetric Δ = (max(high, 0) − min(low, 0)) / (2^b − 1),
    z = round(−min(low, 0) / Δ)."""
    if symmetric:
        return max(abs(low), abs(high)) / (2 ** (bits - 1) - 1), 0
    low, high = min(low, 0.0), max(high, 0.0)
    step = (high - low) / (2**bits - 1)
    return step, int(round(-low / step))


def fake_quant_ref(x: torch.Tensor, step, zero, bits: int, symmetric: bool) -> torch.Tensor:
    """x̂ = (clamp(round(x · (1/Δ)) + z, qmin, qmax) − z) · Δ in float32 (``step``, ``zero`` may be
    per-sample tensors shaped to broadcast)."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    step = torch.as_tensor(step, dtype=torch.float32)
    zero = torch.as_tensor(zero, dtype=torch.float32)
    codes = torch.clamp(torch.round(x.float() * (1.0 / step)) + zero, qmin, qmax)
    return (codes - zero) * step


# ---------------------------------------------------------------------------------------------
# 1. Time groups: calibration fits each group on its own steps' inputs; inference reads group ⌊i·G/S⌋
# ---------------------------------------------------------------------------------------------


def grouped_calibration():
    """A tiny DiT calibrated by ``tgq`` with min-max ranges (G = 3 over 6 steps) on every input of
    its calibration set (each group's pool is exactly ⌈num_inputs / G⌉: the default takes all)."""
    torch.manual_seed(0)
    fp = tiny_dit()
    calib = capture(fp, create_diffusion(STEPS), CalibrationSpec(num_samples=4, cfg_scale=1.5))
    cfg = config_from_settings(
        "tgq",
        dict(
            w_bits=BITS,
            a_bits=BITS,
            scope="blocks",  # the 14 Linears and matmuls of the two blocks
            time_groups=GROUPS,
            num_inputs=len(calib),
            capture_batch=16,
            search=SearchConfig(criterion="minmax"),
        ),
        {},
    )
    quantized, cost = quantize(copy.deepcopy(fp), calib, cfg)
    assert cost["calibration_inputs"] == len(calib)
    return fp, quantized, calib


def activation_operands(quantized) -> dict[str, tuple[str, int, UniformQuantizer]]:
    """quantizer name -> (layer name, operand index of the layer's call, quantizer)."""
    out = {}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            out[f"{name}.act"] = (name, 0, module.act)
        elif isinstance(module, QuantMatMul):
            out[f"{name}.a_quant"] = (name, 0, module.a_quant)
            out[f"{name}.b_quant"] = (name, 1, module.b_quant)
    return out


def fp_operands(fp, layers: set[str], x, t, y) -> dict[tuple[str, int], torch.Tensor]:
    """Every operand of the named layers in the floating-point model (explicit attention path)."""
    fp = copy.deepcopy(fp)
    for block in fp.blocks:
        block.attn.fused = False  # the FP model's matmuls are called only on the explicit path
    seen, handles = {}, []
    for name in layers:
        def hook(module, args, output, name=name):
            for i, a in enumerate(args):
                seen[(name, i)] = a.detach().clone()
        handles.append(fp.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        fp(x, t, y)
    for handle in handles:
        handle.remove()
    return seen


def test_each_time_group_is_fitted_on_the_inputs_of_its_own_steps():
    """With min-max ranges, group g's step and zero point are exactly those of the min/max of the FP
    operands of the calibration inputs whose step i has ⌊i·G/S⌋ = g — recomputed here from a separate
    FP forward pass, for every activation quantizer of the model.

    Mutation caught: calibrate.py ``groups_of_step = ((np.arange(steps) * cfg.time_groups) // steps)[::-1]``
    (a calibration input of step i fitted into the mirrored group).
    """
    fp, quantized, calib = grouped_calibration()
    operands = activation_operands(quantized)
    assert len(operands) == 18 and all(q.groups == GROUPS for _, _, q in operands.values())
    data = fp_operands(fp, {layer for layer, _, _ in operands.values()}, calib.x, calib.t, calib.y)
    group_of_input = step_group(calib.step, GROUPS, STEPS)
    assert torch.bincount(group_of_input).tolist() == [len(calib) // GROUPS] * GROUPS
    differ = 0
    for name, (layer, slot, q) in operands.items():
        values = data[(layer, slot)]
        own = [values[group_of_input == g] for g in range(GROUPS)]
        expected = [grid_params(float(v.min()), float(v.max()), BITS, q.symmetric) for v in own]
        steps = torch.tensor([s for s, _ in expected], dtype=torch.float32)
        torch.testing.assert_close(q.scale[:, 0], steps, rtol=1e-5, atol=0, msg=name)
        assert q.zero_point[:, 0].tolist() == [z for _, z in expected], name
        differ += abs(steps[0] / steps[-1] - 1) > 0.05
    # the clean and the noisy group differ in most layers, so a mirrored assignment is visible
    assert differ >= len(operands) // 2, differ


def record_calls(quantizer_modules: dict) -> tuple[list, list]:
    """Forward hooks recording (name, input, output) of every call of the given quantizers."""
    calls, handles = [], []
    for name, q in quantizer_modules.items():
        def hook(module, args, output, name=name):
            calls.append((name, args[0].detach(), output.detach()))
        handles.append(q.register_forward_hook(hook))
    return calls, handles


def test_inference_reads_the_parameters_of_the_group_of_its_step():
    """At inference an input of sampling step i is quantized, in every activation quantizer, with the
    step and zero point of group ⌊i·G/S⌋ (0 = cleanest): once per step (one group per batch, the
    sampling path) and all steps in one batch (per-sample gather). The output is recomputed here from
    the stored parameters of the expected group; the other groups' parameters give other outputs.

    Mutation caught: calibrate.group_table returning ``step_groups[::-1][nearest]`` (a timestep reads
    the mirrored group's parameters); also UniformQuantizer.forward reading ``self._scalars[-1 - group]``.
    """
    _, quantized, calib = grouped_calibration()
    operands = {name: q for name, (_, _, q) in activation_operands(quantized).items()}
    calls, handles = record_calls(operands)
    expected_group = step_group(calib.step, GROUPS, STEPS)
    wrong_group_differs = []
    try:
        with torch.no_grad():
            for i in range(STEPS):
                pick = calib.step == i
                calls.clear()
                quantized(calib.x[pick], calib.t[pick], calib.y[pick])
                assert len(calls) == len(operands)
                g = i * GROUPS // STEPS
                for name, x, out in calls:
                    q = operands[name]
                    ref = fake_quant_ref(x, q.scale[g, 0], q.zero_point[g, 0], BITS, q.symmetric)
                    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=f"{name}, step {i}")
                    for other in set(range(GROUPS)) - {g}:
                        wrong = fake_quant_ref(x, q.scale[other, 0], q.zero_point[other, 0], BITS,
                                               q.symmetric)
                        wrong_group_differs.append(not torch.allclose(out, wrong, rtol=0, atol=1e-6))
            calls.clear()
            quantized(calib.x, calib.t, calib.y)  # every step in one batch: parameters gathered per sample
            for name, x, out in calls:
                q = operands[name]
                shape = (-1,) + (1,) * (x.dim() - 1)
                step = q.scale[expected_group, 0].reshape(shape)
                zero = q.zero_point[expected_group, 0].reshape(shape)
                ref = fake_quant_ref(x, step, zero, BITS, q.symmetric)
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=name)
    finally:
        for handle in handles:
            handle.remove()
    assert np.mean(wrong_group_differs) > 0.9  # a wrong group would be seen in almost every quantizer


# ---------------------------------------------------------------------------------------------
# 2. The Hessian search: each captured gradient belongs to its own input, and is used with it
# ---------------------------------------------------------------------------------------------


def test_captured_gradients_belong_to_their_own_inputs():
    """capture_unit's ∂L/∂O of input n (L = ⟨r_n, f(x_n)⟩, captured in batches of 3 over 7 inputs)
    equals that of a separate backward pass through the FP model on input n alone, at every scoped
    layer of both blocks; neighbouring inputs' gradients differ, so a shifted pairing is visible.

    Mutation caught: calibrate.capture_unit returning each layer's ``grads`` rolled by one
    (``grads[1:] + grads[:1]``); also the gradients of one batch reversed (``unbind(0)[::-1]``).
    """
    torch.manual_seed(0)
    fp = tiny_dit()
    quantized = copy.deepcopy(fp).requires_grad_(False)
    names = wrap(quantized, CalibrationConfig(), create_diffusion(STEPS).timesteps)
    n = 7
    x, t, y = torch.randn(n, 1, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 4, (n,))
    probes = torch.randn(n, fp.out_channels, 8, 8)
    for block in fp.blocks:
        block.attn.fused = False
    for unit in ("blocks.0", "blocks.1"):
        members = [name for name in names if TQDIT.unit_of(name) == unit]
        records = capture_unit(quantized, unit, members, x, t, y, probes, need_grads=True, batch=3)
        for i in range(n):  # independent: one input, one backward, the layer outputs' own .grad
            outputs, handles = {}, []
            for name in members:
                def hook(module, args, output, name=name):
                    output.retain_grad()
                    outputs[name] = (args[0].detach(), output)
                handles.append(fp.get_submodule(name).register_forward_hook(hook))
            (fp(x[i:i + 1], t[i:i + 1], y[i:i + 1]) * probes[i:i + 1]).sum().backward()
            for handle in handles:
                handle.remove()
            for name in members:
                record, (inp, out) = records[name], outputs[name]
                assert len(record["grads"]) == n
                atol = 1e-4 * inp.abs().max()
                torch.testing.assert_close(record["inputs"][0][i], inp[0], rtol=0, atol=atol, msg=name)
                scale = out.grad.abs().max()  # batched vs single float32 rounding: up to 7e-4 of it
                torch.testing.assert_close(record["grads"][i], out.grad[0], rtol=0, atol=2e-3 * scale,
                                           msg=name)
                if i + 1 < n:
                    gap = (record["grads"][i + 1] - out.grad[0]).abs().max()
                    assert gap > 0.1 * scale, (name, i)


ALPHAS = torch.linspace(0.01, 1.2, 100)  # PTQ4ViT's range multipliers (SearchConfig's defaults)


@torch.no_grad()
def input_grid_scores(inputs, w_hat, linear, grads, bits: int) -> torch.Tensor:
    """Σ (g ⊙ (Ô − O))² in float64 for each α of ALPHAS: the layer's input on an asymmetric b-bit
    grid over α · [min, max] of all calibration inputs, its weight fixed at ``w_hat``; ``grads`` None:
    plain MSE."""
    x = torch.stack(inputs)
    reference = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    low, high = float(x.min()), float(x.max())
    scores = []
    for alpha in ALPHAS.tolist():
        step, zero = grid_params(alpha * low, alpha * high, bits, symmetric=False)
        x_hat = fake_quant_ref(x, step, zero, bits, False)
        scores.append(output_score(x_hat, w_hat, linear, reference, grads))
    return torch.tensor(scores, dtype=torch.float64)


@torch.no_grad()
def output_score(x_hat, w_hat, linear, reference, grads) -> float:
    error = F.linear(x_hat.double(), w_hat.double(), linear.bias.double()) - reference
    if grads is not None:
        error = error * torch.stack(grads).double()
    return float(error.square().sum())


@torch.no_grad()
def committed_input_score(q: QuantLinear, inputs, linear, grads, bits: int) -> float:
    """The same score for the input grid the search committed (its stored step and zero point)."""
    x = torch.stack(inputs)
    reference = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    x_hat = fake_quant_ref(x, q.act.scale[0, 0], q.act.zero_point[0, 0], bits, False)
    return output_score(x_hat, q.weight_quant(linear.weight).detach(), linear, reference, grads)


def searched_linear(linear, inputs, grads, criterion: str, a_bits: int = 4, rounds: int = 1) -> QuantLinear:
    q = QuantLinear(linear, UniformQuantizer(a_bits, symmetric=False),
                    UniformQuantizer(8, True, channels=linear.out_features, axis=0))
    groups = torch.zeros(len(inputs), dtype=torch.long)
    search_layer(linear_problem(q, inputs, grads, groups), SearchConfig(criterion=criterion, rounds=rounds))
    return q


def test_hessian_search_weights_each_input_by_its_own_gradient():
    """Even inputs are 8× wider than odd ones, but the loss barely sees them (∂L/∂O = 1e-3 against
    0.5..1.5): the Hessian-weighted optimum clips them. The committed input grid scores exactly the
    brute-force minimum of Σ (g ⊙ (O − Ô))² over the 100 α (the search's last round, with the weight
    it committed), and so do the weight's per-channel grids (first round, input in FP). Pairing each
    input with its neighbour's gradient would choose an α that scores > 2× the minimum.

    Mutation caught: search.search_layer using ``_stack(problem.grads[::-1], part)`` (gradients of
    the mirrored inputs); also ``torch.roll`` of the stacked chunk by one input.
    """
    torch.manual_seed(0)
    n, tokens = 16, 8
    loud = [i % 2 == 0 for i in range(n)]
    inputs = [torch.randn(tokens, 12) * (8.0 if loud[i] else 1.0) for i in range(n)]
    grads = [torch.full((tokens, 6), 1e-3) if loud[i] else 0.5 + torch.rand(tokens, 6) for i in range(n)]
    linear = torch.nn.Linear(12, 6)
    q = searched_linear(linear, inputs, grads, "hessian")
    w_hat = q.weight_quant(linear.weight).detach()
    scores = input_grid_scores(inputs, w_hat, linear, grads, bits=4)
    assert committed_input_score(q, inputs, linear, grads, bits=4) <= scores.min() * (1 + 1e-6)
    shifted = input_grid_scores(inputs, w_hat, linear, grads[1:] + grads[:1], bits=4)
    assert scores[shifted.argmin()] > 2 * scores.min(), (ALPHAS[scores.argmin()], ALPHAS[shifted.argmin()])
    # weight grids, per output channel: symmetric 8 bits over α · max|W_c|, input unquantized (round 1)
    x, g = torch.stack(inputs).double(), torch.stack(grads).double()
    w = linear.weight.detach()
    maxabs = w.abs().amax(dim=1)
    per_channel = []
    for alpha in ALPHAS.tolist():
        w_k = fake_quant_ref(w, (alpha * maxabs / 127)[:, None], 0, 8, True)
        per_channel.append(((x @ (w_k - w).double().T) * g).square().sum(dim=(0, 1)))
    per_channel = torch.stack(per_channel)  # (alphas, channels)
    committed = ((x @ (w_hat - w).double().T) * g).square().sum(dim=(0, 1))
    assert (committed <= per_channel.min(dim=0).values * (1 + 1e-6)).all()


def test_hessian_criterion_beats_mse_where_output_sensitivity_is_unequal():
    """Outputs 0–3 matter (∂L/∂O = 1) and read input channels 0–11 (unit range); outputs 4–7 do
    not (1e-3) and read channels 12–15, 12× wider. Plain output MSE keeps the wide channels and spends
    the 4-bit input range on them; the Hessian criterion clips them. Each search commits the
    brute-force argmin of its own criterion over the α grid; the Hessian's input step is 7× finer
    (≈ 50× in squared error; 28× measured with the clipping), and its gradient-weighted error is
    below a tenth of the MSE-chosen layer's.

    Mutation caught: search.search_layer ignoring the gradient (``if grad is not None:
    error.mul_(grad)`` removed).
    """
    torch.manual_seed(0)
    n, tokens = 16, 8
    inputs = [torch.cat([torch.randn(tokens, 12), 12 * torch.randn(tokens, 4)], dim=1) for _ in range(n)]
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[:4, 12:] = 0.0  # important outputs do not read the wide channels
        linear.weight[4:, 12:] *= 4.0
    importance = torch.tensor([1.0] * 4 + [1e-3] * 4)
    grads = [importance.expand(tokens, 8).clone() for _ in range(n)]
    hessian = searched_linear(linear, inputs, grads, "hessian", rounds=2)
    mse = searched_linear(linear, inputs, grads, "mse", rounds=2)
    for q, weighting in ((hessian, grads), (mse, None)):
        scores = input_grid_scores(inputs, q.weight_quant(linear.weight).detach(), linear, weighting, bits=4)
        assert committed_input_score(q, inputs, linear, weighting, bits=4) <= scores.min() * (1 + 1e-6)
    weighted_hessian = committed_input_score(hessian, inputs, linear, grads, bits=4)
    weighted_mse = committed_input_score(mse, inputs, linear, grads, bits=4)
    assert weighted_mse > 10 * weighted_hessian, (weighted_mse, weighted_hessian)


# ---------------------------------------------------------------------------------------------
# 4. Cases built so that each TQ-DiT component must win (4c, the Hessian criterion, is above)
# ---------------------------------------------------------------------------------------------


def softmax_mrq_ref(x: torch.Tensor, exponent: int, bits: int) -> torch.Tensor:
    """MRQ from its definition: below s = 2^-i the step s / (2^(b-1) − 1), at or above it
    1 / (2^(b-1) − 1); codes 0 .. 2^(b-1) − 1 in each region, no offset between the regions."""
    levels, split = 2 ** (bits - 1) - 1, 2.0**-exponent
    step = torch.where(x < split, torch.tensor(split / levels), torch.tensor(1.0 / levels))
    return torch.clamp(torch.round(x / step), 0, levels) * step


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean())


def test_mrq_beats_a_uniform_grid_on_post_softmax_values():
    """Softmax of N(0, 2²) logits over 64 tokens: most values near 1/64, a few near 1. The search's
    split (tensor MSE, 6 bits) reaches the brute-force best of the 20 splits computed from MRQ's
    definition, and that is below half the best unsigned uniform 6-bit grid's MSE over the α grid.
    Brute force: 2.8× (2.6–3.0× over 5 seeds); the Δ²/12 model gives 3.7×: the fine step 2^-3/31
    covers 97.5 % of the values and the coarse 1/31 the rest, against a uniform 0.78/63 for all.

    Mutation caught: SoftmaxMRQ.quantize using the coarse step in both regions
    (``two_region_quant(x, split, 1.0 / self.levels, 1.0 / self.levels, ...)``), and the released
    code's sum of both branches (values ≥ s offset by s: ``torch.where(x >= split, out + split,
    out)``).
    """
    torch.manual_seed(0)
    bits = 6
    probs = torch.softmax(torch.randn(4, 2, 64, 64) * 2.0, dim=-1)
    values = torch.randn(4, 2, 64, 16)
    cfg = SearchConfig(criterion="lp", p=2.0)
    mrq = QuantMatMul(SoftmaxMRQ(bits), UniformQuantizer(16, True))
    uniform = QuantMatMul(UniformQuantizer(bits, False), UniformQuantizer(16, True))
    for module in (mrq, uniform):
        problem = matmul_problem(module, list(probs), list(values), None, torch.zeros(4, dtype=torch.long))
        search_layer(problem, cfg)
    with torch.no_grad():
        mrq_error, uniform_error = mse(mrq.a_quant(probs), probs), mse(uniform.a_quant(probs), probs)
    best_mrq = min(mse(softmax_mrq_ref(probs, k, bits), probs) for k in range(20))
    top = float(probs.max())
    best_uniform = min(mse(fake_quant_ref(probs, *grid_params(0.0, a * top, bits, False), bits, False), probs)
                       for a in ALPHAS.tolist())
    assert abs(mrq_error - best_mrq) <= 1e-6 * best_mrq, (mrq_error, best_mrq)
    assert abs(uniform_error - best_uniform) <= 1e-6 * best_uniform, (uniform_error, best_uniform)
    assert uniform_error > 2 * mrq_error, (uniform_error, mrq_error)


def test_time_groups_beat_one_group_when_ranges_change_tenfold_over_time():
    """A linear layer whose input range grows 10× from the cleanest to the noisiest of 10 steps
    (amplitude 10^(i/9)), 6-bit input, G = 5 groups of 2 steps against G = 1, output-MSE search.
    Each group's committed input grid is a candidate of the α grid over *its own* inputs' range and
    scores the brute-force minimum there (with the committed weight). On held-out inputs, read at
    inference through the timestep, the mean relative output error over the steps is below a
    quarter of G = 1's (8.6× measured; in the Δ² model the per-step ratios are (Δ₁ / Δ_g)² ≈ 48,
    22, 5.4, 2.7, 0.8 for the five groups, less where G = 1 clips the loud steps).

    Mutation caught: UniformQuantizer.forward reading group 0 for every batch (``group = 0``), and
    UniformQuantizer.set_range storing one parameter set for all groups (``scale.max()``).
    """
    steps, groups, per_step, bits = 10, 5, 4, 6
    timesteps = np.arange(steps) * 100
    amplitude = 10 ** (np.arange(steps) / (steps - 1))
    torch.manual_seed(0)

    def draw():
        return [torch.randn(8, 16) * float(amplitude[i]) for i in range(steps) for _ in range(per_step)]

    calib, held_out = draw(), draw()
    step_of_input = torch.arange(steps).repeat_interleave(per_step)
    linear = torch.nn.Linear(16, 8).requires_grad_(False)
    errors = {}
    for g in (groups, 1):
        context = TimeGroupContext(group_table(timesteps, g)) if g > 1 else None
        q = QuantLinear(linear, UniformQuantizer(bits, False, groups=g, context=context),
                        UniformQuantizer(8, True, channels=8, axis=0))
        group_of_input = step_group(step_of_input, g, steps)
        problem = linear_problem(q, calib, None, group_of_input)
        search_layer(problem, SearchConfig(criterion="mse", rounds=2), context)
        q.freeze()
        w_hat = q.quantized_weight()
        for k in range(g):  # each group: a candidate of its own range's α grid, and the best one
            own = [x for x, h in zip(calib, group_of_input.tolist()) if h == k]
            scores = input_grid_scores(own, w_hat, linear, None, bits)
            x = torch.stack(own)
            low, high = float(x.min()), float(x.max())
            candidates = [grid_params(a * low, a * high, bits, False) for a in ALPHAS.tolist()]
            step, zero = float(q.act.scale[k, 0]), int(q.act.zero_point[k, 0])
            match = [i for i, (s, z) in enumerate(candidates) if abs(s - step) <= 1e-6 * s and z == zero]
            assert match and scores[match[0]] <= scores.min() * (1 + 1e-6), (g, k, match)
        relative = []
        with torch.no_grad():
            for i in range(steps):
                x = torch.stack(held_out[i * per_step:(i + 1) * per_step])
                if context is not None:
                    context.set_timesteps(torch.full((per_step,), int(timesteps[i])))
                reference = linear(x)
                relative.append(mse(q(x), reference) / float(reference.double().square().mean()))
        errors[g] = float(np.mean(relative))
    assert errors[1] > 4 * errors[groups], errors


def two_region_ref(x: torch.Tensor, threshold, step_below, step_above, qmin: int, qmax: int) -> torch.Tensor:
    """Each value on its own region's grid, from the definition, one where over whole tensors. Steps
    as the quantizers hold them: Python numbers rounded to float32 after the reciprocal, per-sample
    tensors in float32 with a float32 reciprocal."""
    below = x.float() < threshold
    if isinstance(step_below, torch.Tensor) or isinstance(step_above, torch.Tensor):
        low, high = torch.as_tensor(step_below).float(), torch.as_tensor(step_above).float()
        low_inv, high_inv = 1.0 / low, 1.0 / high
    else:
        low, high = torch.tensor(step_below), torch.tensor(step_above)
        low_inv, high_inv = torch.tensor(1.0 / step_below), torch.tensor(1.0 / step_above)
    step, inv = torch.where(below, low, high), torch.where(below, low_inv, high_inv)
    return torch.clamp(torch.round(x.float() * inv), qmin, qmax) * step


def test_cpu_two_region_path_equals_the_definition_across_chunks():
    """The CPU path of both MRQ quantizers (chunks of whole samples, about ``CPU_CHUNK`` elements,
    each split into its two regions and added back) gives the definition's values exactly —
    post-softmax at 8, 6 and 4 bits over several splits, post-GELU with several positive steps, one
    setting for all samples or one per sample (the time-grouped search) — on tensors of 2.3 chunks;
    in bf16 too (rounded to bf16 like the reference's).

    Mutations caught: the chunk loop advancing two chunks at a time (``range(0, n, 2 * samples)``),
    both regions quantized with the step above (``low.mul_(rows(above[1], part))``), per-sample
    parameters not sliced with their chunk (``rows`` returning ``value``: a shape error), and the
    region split taken at ``<=`` (``torch.le``) — values equal to the split (exactly representable,
    planted below) then land on the fine grid.
    """
    from tqdit.quant.quantizers import CPU_CHUNK, GeluMRQ, two_region_quant

    torch.manual_seed(0)
    samples = int(2.3 * CPU_CHUNK) // (2 * 64 * 64)
    probs = torch.softmax(torch.randn(samples, 2, 64, 64) * 3.0, dim=-1)
    probs[:, :, ::7, 5] = 2.0**-4  # values exactly at a split: the upper region's (x < s is the rule)
    probs[:, :, ::5, 7] = 2.0**-6
    gelu = F.gelu(torch.randn(samples, 64, 128) * 2.0, approximate="tanh")
    per_sample = torch.randint(0, 12, (samples,))
    for bits in (8, 6, 4):
        levels = 2 ** (bits - 1) - 1
        for exponent in (0, 4, 6, 11):
            split = 2.0**-exponent
            args = (split, split / levels, 1.0 / levels, 0, levels)
            got = SoftmaxMRQ(bits).quantize(probs, exponent)
            assert torch.equal(got, two_region_ref(probs, *args)), (bits, exponent)
        split = torch.pow(2.0, -per_sample.float()).reshape(-1, 1, 1, 1)
        args = (split, split / levels, 1.0 / levels, 0, levels)
        assert torch.equal(SoftmaxMRQ(bits).quantize(probs, per_sample), two_region_ref(probs, *args))
        negative = GeluMRQ(bits).negative_scale
        steps = [0.003, 0.021, 0.4, torch.rand(samples, 1, 1) * 0.05 + 0.001]
        for positive in steps:
            args = (0.0, negative, positive, -(2 ** (bits - 1)), levels)
            assert torch.equal(two_region_quant(gelu, *args), two_region_ref(gelu, *args)), (bits, positive)
            half = gelu.bfloat16()
            assert torch.equal(two_region_quant(half, *args), two_region_ref(half, *args).bfloat16())
