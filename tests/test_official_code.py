"""tqdit's functions against the OFFICIAL released code of the methods it reimplements (issue 23).

The official outputs are in ``fixtures/official_reference.safetensors``, recorded by
``fixtures/make_official_reference.py`` from PTQ4DiT, Q-Diffusion, TQ-DiT and PTQ4DM as released (how
each was imported, and what was adapted, is in that script's docstring and in the fixture's metadata);
these tests need only the fixture. Tolerances: float32 results within 1e-6 relative (the two sides
compute the same formulas in a different order: a division by a step vs a multiplication by its
reciprocal, a sum in float64 vs float32), unless a test says why not. Where tqdit differs from the
code, the test asserts the code's behaviour and is marked ``xfail(strict=True)``; its reason says how
the two differ. One is left: PTQ4DiT's range initialisation, a deviation ptq4dit.py documents. Five
more were xfails until 2026-12-06, when tqdit was changed to match the code (qkv balanced before proj,
AdaRound's V without a clamp, β at count = iteration + 1, Q-Diffusion's and PTQ4DM's search grids,
GELU_MIN); their docstrings keep how tqdit differed.

Each test of tqdit names a deliberate mutation of tqdit that makes it fail, and the xfail test what
it would take to pass; every mutation was applied to a copy of the working tree, seen to make its
test fail, and removed.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.stats import norm

from tqdit.data.calibration import ndtc_step_probabilities, ndtc_steps, select_ndtc
from tqdit.models.dit import DiT
from tqdit.quant.methods import ptq4dit
from tqdit.quant.methods.ptq4dit import PTQ4DiTConfig, balancing_factors, salience_balance, spearman
from tqdit.quant.methods.qdiffusion import QDiffusionConfig
from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ, UniformQuantizer
from tqdit.quant.reconstruct import AdaRoundWeight, LearnedStep, ReconConfig, _beta, lp_loss, lsq_fake_quant
from tqdit.quant.search import Operand, SearchConfig, _fit_tensor, make_grid

FIXTURE = Path(__file__).parent / "fixtures" / "official_reference.safetensors"
RTOL = 1e-6
LAYERS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1"}
# The Q-Diffusion code's Lp init grid: range × (1 − 0.01 i), i = 0..79, i.e. 0.21, 0.22, ..., 1.00
# (QDiffusionConfig's default search since 2026-12-06; test_lp_init_default_grid_matches_code)
OFFICIAL_GRID = SearchConfig(criterion="lp", p=2.4, candidates=80, alpha_min=0.21, alpha_max=1.0)


@pytest.fixture(scope="module")
def official():
    tensors = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as handle:
        metadata = json.loads(handle.metadata()["reference"])  # config, schedules, ndtc, provenance
    return tensors, metadata


def close(actual, expected, rtol=RTOL, atol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def weight(f, layer: str) -> torch.Tensor:
    return f[f"dit.state.blocks.0.{LAYERS[layer]}.weight"]


def test_fixture_records_its_provenance(official):
    """The metadata lists every official file used (with its hash) and every adaptation."""
    _, metadata = official
    provenance = metadata["provenance"]
    assert {"ptq4dit", "qdiffusion", "qdiffusion.lsq", "tqdit_code", "tqdit_code.fixed_quant_input_A",
            "ptq4dm.generate_t"} <= set(provenance["adaptations"])
    assert {"PTQ4DiT:models.py", "q-diffusion:qdiff/block_recon.py"} <= set(provenance["files"])
    assert provenance["ast_equal_to_ptq4dit"]["qdiff/block_recon.py:LinearTempDecay.__call__"]


# ---------------------------------------------------------------------------------------------
# PTQ4DiT: channel-wise salience balancing (CSB) and Spearman-guided salience calibration (SSC)
# ---------------------------------------------------------------------------------------------


def test_spearman_matches_scipy(official):
    """``spearman`` equals scipy's spearmanr (which PTQ4DiT's code calls) on the salience rows its block
    passed it (no ties), to 1e-12. Mutation caught: ranks from one argsort (``a.argsort().double()``)."""
    f, _ = official
    for layer in LAYERS:
        rho = torch.stack([spearman(row, f[f"csb.{layer}.w_salience"]) for row in f[f"csb.{layer}.rows"]])
        close(rho, f[f"csb.{layer}.spearman"], rtol=0, atol=1e-12)


def test_csb_without_ssc_matches_code(official):
    """CSB: b = s̃/s(X) = √(s(W)/s(X)) equals 1/scale of PTQ4DiT's ``Mlp`` (the code divides X by
    scale = √(s(X)/(s(W) + 1e-8))) run on one sample, where its SSC softmax is over one row, i.e. plain
    CSB; tqdit with ssc=False (and ssc=True: one row) on that sample's salience, to 1e-6.
    Mutation caught: b = s̃/s(W) (the reciprocal)."""
    f, _ = official
    rows = f["csb.single.fc1_input"].abs().amax(dim=1)
    for ssc in (False, True):
        close(balancing_factors(weight(f, "fc1"), rows, ssc=ssc), 1 / f["csb.single.fc1.scale"])


def test_ssc_matches_code_on_per_sample_rows(official):
    """SSC: η = softmax(−ρ) over rows, s(X) = Σ η s(X_row). The paper's rows are timesteps (tqdit's
    ``salience_per_step``), the code's are the samples of its first batch; fed the code's own per-sample
    rows (recorded from PTQ4DiT's ``DiTBlock`` wrapped by its ``QuantModel``) and the unbalanced weight,
    tqdit's factors equal the code's for qkv, proj and fc1, to 1e-6. Mutation caught: softmax(+ρ)."""
    f, _ = official
    for layer in LAYERS:
        assert torch.equal(weight(f, layer).abs().amax(dim=0), f[f"csb.{layer}.w_salience"])
        factors = balancing_factors(weight(f, layer), f[f"csb.{layer}.rows"], ssc=True)
        close(factors, 1 / f[f"csb.{layer}.scale"])


def balanced_dit(f, metadata):
    """tqdit's DiT with the fixture's weights, balanced by ``salience_balance`` (one sample per step, so
    its per-step rows are the code's per-sample rows); returns {layer: (weight used, rows, b)}."""
    model = DiT(**metadata["config"]).eval()
    state = {k.removeprefix("dit.state."): v for k, v in f.items() if k.startswith("dit.state.")}
    model.load_state_dict(state)
    layer_of = {id(model.blocks[0].get_submodule(name).weight): layer for layer, name in LAYERS.items()}
    applied = {}

    def recording(weight_, salience, ssc):
        factors = ptq4dit_balancing(weight_, salience, ssc)
        applied[layer_of[id(weight_)]] = (weight_.detach().clone(), salience.clone(), factors)
        return factors

    ptq4dit_balancing = ptq4dit.balancing_factors
    ptq4dit.balancing_factors = recording
    try:
        salience_balance(model, f["dit.x"], f["dit.t"], f["dit.y"], np.arange(len(f["dit.t"])), ssc=True)
    finally:
        ptq4dit.balancing_factors = ptq4dit_balancing
    return applied


def test_block_salience_and_factors_match_code_for_proj_and_fc1(official):
    """The whole path on a small random DiT: tqdit's hooks capture per-step input salience (max |x| over
    tokens) and ``salience_balance`` balances; the rows and the proj/fc1 factors equal those PTQ4DiT's
    block computes in its forward on the same tokens, to 1e-5 (not 1e-6: tqdit runs attention through
    SDPA and the earlier folds in its weights, the code an explicit softmax and run-time divisions, so the
    inputs themselves differ by float rounding, ~1e-7). Mutation caught: salience as the mean of |x| over
    tokens instead of the max."""
    f, metadata = official
    applied = balanced_dit(f, metadata)
    for layer in ("proj", "fc1"):
        _, rows, factors = applied[layer]
        close(rows, f[f"csb.{layer}.rows"], rtol=1e-5)
        close(factors, 1 / f[f"csb.{layer}.scale"], rtol=1e-5)


def test_block_qkv_factors_match_code(official):
    """qkv's rows and factors from tqdit's whole path equal the code's, to 1e-5 (as for proj and fc1).
    tqdit differed until 2026-12-06: it balanced proj first and folded its b into qkv's v rows before
    measuring qkv's weight salience (ptq4dit.py: 'proj first: its fold changes qkv's rows'); the code
    divides at run time and computes qkv's s(W) on the unbalanced weight, so qkv's factors differed (up
    to 16% here). The two folds commute (column scaling of qkv, row scaling of its v rows): balancing
    qkv before proj, BALANCED = ("attn.qkv", "attn.proj", "mlp.fc1"), reproduces the code.
    Mutation caught: proj balanced before qkv (BALANCED = ("attn.proj", "attn.qkv", "mlp.fc1"))."""
    f, metadata = official
    _, rows, factors = balanced_dit(f, metadata)["qkv"]
    close(rows, f["csb.qkv.rows"], rtol=1e-5)
    close(factors, 1 / f["csb.qkv.scale"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# AdaRound (Q-Diffusion's adaptive_rounding.py; PTQ4DiT's copy has the same AST)
# ---------------------------------------------------------------------------------------------


def adaround(f, weight_, rows=None):
    rows = len(weight_) if rows is None else rows
    quantizer = UniformQuantizer(4, symmetric=False, channels=rows)
    quantizer.scale.copy_(f["adaround.delta"][:rows].reshape(1, -1))
    quantizer.zero_point.copy_(f["adaround.zero_point"][:rows].reshape(1, -1).round().int())
    quantizer.refresh()
    return AdaRoundWeight(weight_, quantizer)


def test_adaround_init_matches_code(official):
    """V is initialised so that h(V) is the fractional part of W/s: equal to the code's α (from its
    4-bit ``mse``-initialised quantizer on fc1's weight) to 1e-6, and on the edge-case weights wherever
    the fraction lies in [1e-4, 1 − 1e-4] (the next test: the rest, near grid points).
    Mutation caught: ζ = 1.2 instead of 1.1."""
    f, _ = official
    close(adaround(f, weight(f, "fc1")).v.detach(), f["adaround.alpha_init"])
    rest = f["adaround.edge_rest"]
    inner = (rest >= 1e-4) & (rest <= 1 - 1e-4)
    edge = adaround(f, f["adaround.edge_weight"], rows=8).v.detach()
    close(edge[inner], f["adaround.edge_alpha_init"][inner])


def test_adaround_init_matches_code_near_grid_points(official):
    """V on weights at and within 1e-4 steps of grid points equals the code's α, to 1e-6. tqdit differed
    until 2026-12-06: AdaRoundWeight clamped the fractional part to [1e-4, 1 − 1e-4] before inverting h;
    the code does not (h's stretched sigmoid reaches 0 and 1, so α is finite for any fraction in
    [0, 1]): for weights within 1e-4 steps of a grid point V differed by up to 1.1e-3 and h(V) by up to
    1e-4. Mutation caught: clamp(1e-4, 1 − 1e-4) back in AdaRoundWeight
    (``rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)``)."""
    f, _ = official
    close(adaround(f, f["adaround.edge_weight"], rows=8).v.detach(), f["adaround.edge_alpha_init"])


def test_adaround_rectified_sigmoid_soft_and_hard_weights(official):
    """With V set to the code's (perturbed) α: h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1), the soft weight
    s·(⌊W/s⌋ + h − z)… and the hard weight (V ≥ 0 rounds up) equal the code's ``get_soft_targets`` and
    its forward with soft targets on and off, to 1e-6 (h within 1e-7 absolute where it is near 0).
    Mutation caught: γ = −0.2 instead of −0.1."""
    f, _ = official
    module = adaround(f, weight(f, "fc1"))
    with torch.no_grad():
        module.v.copy_(f["adaround.alpha"])
        close(module.h(), f["adaround.h"], atol=1e-7)
        close(module(weight(f, "fc1")), f["adaround.soft_weight"], atol=1e-7)
        module.hard = True
        close(module(weight(f, "fc1")), f["adaround.hard_weight"])


def test_loss_function_total_matches_code(official):
    """Q-Diffusion's ``LossFunction`` (rec = lp_loss p = 2.4, + λ Σ(1 − |2h − 1|^β) once past the warm-up,
    λ = 0.01) at every iteration of two schedules equals tqdit's lp_loss(reduction="dim1") +
    λ·rounding_loss(β), given the code's β and on/off at that iteration (which β tqdit uses when is the β
    tests' subject), to 1e-6. Mutation caught: rounding loss 1 − |h − 0.5|^β."""
    f, metadata = official
    module = adaround(f, weight(f, "fc1"))
    with torch.no_grad():
        module.v.copy_(f["adaround.alpha"])
    rec = lp_loss(f["loss.prediction"], f["loss.target"], 2.4, reduction="dim1")
    for key in metadata["schedules"]:
        totals = []
        for beta, active in zip(f[f"beta.{key}.beta_used"], f[f"beta.{key}.round_loss_active"]):
            with torch.no_grad():
                term = 0.01 * module.rounding_loss(beta.float()) if active else 0.0
            totals.append(float(rec + term))
        close(torch.tensor(totals), f[f"beta.{key}.loss_total"])


def test_beta_schedule_formula_matches_linear_temp_decay(official):
    """β(t) with warm-up: ``_beta(t)`` is None exactly where the code's LossFunction has no rounding loss
    (count < warmup·iters) and equals ``LinearTempDecay(count)`` elsewhere, for count = t + k with one
    offset k ∈ {0, 1} for all t of two schedules (warm-up 0.2 of 50 and 0.3 of 23 iterations), to 1e-12.
    Today k = 1, the code's per-iteration convention (the next test); k = 0 (the formula at the same
    argument) was tqdit's until 2026-12-06. Mutation caught: no warm-up (warm = 0)."""
    f, metadata = official

    def matches(key, cfg, offset):
        start, decay = float(f[f"beta.{key}.loss_start"]), f[f"beta.{key}.linear_temp_decay"]
        for t in range(cfg.iters + 1 - offset):
            beta, count = _beta(t, cfg), t + offset
            if (beta is None) != (count < start):
                return False
            if beta is not None and abs(beta - float(decay[count])) > 1e-12:
                return False
        return True

    for key, schedule in metadata["schedules"].items():
        cfg = ReconConfig(**schedule)
        assert matches(key, cfg, 0) or matches(key, cfg, 1), key


def test_beta_per_iteration_matches_code(official):
    """At each 0-based iteration i, as tqdit's reconstruction loops call ``_beta(i, cfg)``, β and
    whether the rounding loss is on equal the code's at that iteration. tqdit differed until 2026-12-06,
    by one iteration: the code's LossFunction increments its count before use, so iteration i runs with
    count i + 1, while ``_beta(i)`` used count i; tqdit started the rounding loss one iteration later
    and never reached b_end (last β 2.45 of 50 iterations here, 2 + 18/16000 at 20k), where the code's
    last iteration has β = b_end exactly. Fixed inside ``_beta`` (count = iteration + 1); a fix at the
    loops' call sites would need this test to follow them. Mutation caught: ``_beta(i)`` without the +1
    (count = iteration)."""
    f, metadata = official
    for key, schedule in metadata["schedules"].items():
        cfg = ReconConfig(**schedule)
        for i in range(cfg.iters):
            beta = _beta(i, cfg)
            assert (beta is not None) == bool(f[f"beta.{key}.round_loss_active"][i]), (key, i)
            if beta is not None:
                assert beta == pytest.approx(float(f[f"beta.{key}.beta_used"][i]), abs=1e-12), (key, i)


def test_block_reconstruction_loss_matches_code(official):
    """The block-reconstruction loss on a (batch, tokens, hidden) block output: tqdit's
    lp_loss(reduction="dim1") equals the code's ``(pred − tgt).abs().pow(p).sum(1).mean()`` (sum over
    tokens, mean over inputs and hidden channels) for p = 2 and 2.4, to 1e-6; ``reduction="all"`` (tqdit's
    former loss) is D = hidden times it. Mutation caught: "dim1" summing over dim 2."""
    f, metadata = official
    for p in (2.0, 2.4):
        expected = f[f"loss.lp.p{p}"][0]
        close(lp_loss(f["loss.prediction"], f["loss.target"], p, reduction="dim1"), expected)
        close(lp_loss(f["loss.prediction"], f["loss.target"], p, reduction="all"),
              expected * metadata["config"]["hidden_size"])


# ---------------------------------------------------------------------------------------------
# LSQ: the activation step learned as Q-Diffusion's / PTQ4DiT's UniformAffineQuantizer.delta
# ---------------------------------------------------------------------------------------------


def lsq_quantizer(f) -> UniformQuantizer:
    quantizer = UniformQuantizer(4, symmetric=False)
    quantizer.scale.fill_(float(f["lsq.delta_init"]))
    quantizer.zero_point.fill_(int(f["lsq.zero_point"]))
    quantizer.refresh()
    return quantizer


def test_lsq_values_and_gradients_match_code(official):
    """The code's delta is an nn.Parameter with round_ste and a clamp; with upstream gradient g on a 4-bit
    tensor with values beyond both ends of the code range and codes exactly on both bounds:
    ``lsq_fake_quant`` with grad_factor 1 gives the code's output, ∂/∂x and ∂/∂Δ, to 1e-6, and so does
    LearnedStep (until 2026-12-06 it scaled ∂/∂Δ by LSQ's 1/√(numel·qmax), absent from the code; mutation
    caught: that factor back in LearnedStep). The code's gradient is
    recorded with PyTorch 1.13's clamp backward (subgradient 1 at the bounds; PTQ4DiT pins 1.13.1):
    recent PyTorch gives 0 there, which moves the code's ∂/∂Δ of codes on the bounds to (q − z) (kept as
    lsq.installed_torch.* in the fixture). Mutation caught: the straight-through term dropped inside the
    range (∂/∂Δ = round(x/Δ), ∂/∂x = 0 there)."""
    f, _ = official
    x = f["lsq.x"].clone().requires_grad_(True)
    step = f["lsq.delta_init"].clone().requires_grad_(True)
    out = lsq_fake_quant(x, step, f["lsq.zero_point"], 0, 15, 1.0)
    (out * f["lsq.upstream"]).sum().backward()
    close(out.detach(), f["lsq.output"])
    close(x.grad, f["lsq.grad_x"])
    close(step.grad, f["lsq.grad_delta"])
    learned = LearnedStep(lsq_quantizer(f))
    (learned(f["lsq.x"]) * f["lsq.upstream"]).sum().backward()
    close(learned.step.grad, f["lsq.grad_delta"])


def test_lsq_adam_steps_match_code(official):
    """One and five Adam steps (lr 4e-5, PTQ4DiT's activation rate) from the same Δ: LearnedStep's Δ equals
    the code's to 1e-6 (LearnedStep has the code's gradient: the previous LSQ factor f = 1/√(numel·qmax)
    cancelled in Adam's m̂/(√v̂ + ε) only while |f·g| ≫ ε, not at DiT-XL/2 sizes, f ≈ 1.2e-4).
    Mutation caught: the straight-through term dropped inside the range."""
    f, _ = official
    for steps in (1, 5):
        learned = LearnedStep(lsq_quantizer(f))
        optimizer = torch.optim.Adam([learned.step], lr=4e-5)
        for _ in range(steps):
            optimizer.zero_grad()
            (learned(f["lsq.x"]) * f["lsq.upstream"]).sum().backward()
            optimizer.step()
        close(learned.step.detach(), f[f"lsq.delta_after_{steps}_adam"])


# ---------------------------------------------------------------------------------------------
# Lp initialisation search (Q-Diffusion's UniformAffineQuantizer.init_quantization_scale, 'mse')
# ---------------------------------------------------------------------------------------------


def fit_weight(w: torch.Tensor, bits: int, cfg: SearchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """tqdit's search on one weight: a per-channel asymmetric UniformQuantizer, ``make_grid`` and
    ``_fit_tensor`` (what ``search_layer`` does for a weight operand under a tensor criterion)."""
    quantizer = UniformQuantizer(bits, symmetric=False, channels=w.shape[0])
    groups = torch.zeros(1, dtype=torch.long)
    _fit_tensor(Operand(quantizer, w, is_weight=True), make_grid(quantizer, w, groups, cfg), groups, cfg)
    return quantizer.scale[0], quantizer.zero_point[0]


def fit_activation(samples: list[torch.Tensor], bits: int, cfg: SearchConfig):
    quantizer = UniformQuantizer(bits, symmetric=False)
    groups = torch.zeros(len(samples), dtype=torch.long)
    _fit_tensor(Operand(quantizer, samples), make_grid(quantizer, samples, groups, cfg), groups, cfg)
    return quantizer.scale[0], quantizer.zero_point[0]


def test_lp_init_matches_code_on_its_grid(official):
    """With the code's candidates (80 shrink factors 1.00, 0.99, ..., 0.21 of [min, max]) and its
    criterion (p = 2.4; the code's mean per channel ranks as tqdit's sum), tqdit's search picks the
    code's Δ (to 1e-6) and zero point (exactly) on every channel of fc1's weight at 4 and 8 bits, and on
    the per-tensor block input. Mutation caught: the Lp error computed with p = 2 whatever cfg.p."""
    f, _ = official
    for bits in (4, 8):
        scale, zero_point = fit_weight(weight(f, "fc1"), bits, OFFICIAL_GRID)
        close(scale, f[f"lpinit.qdiff.w{bits}.delta"])
        assert torch.equal(zero_point.float(), f[f"lpinit.qdiff.w{bits}.zero_point"])
        scale, zero_point = fit_activation(list(f["dit.tokens"]), bits, OFFICIAL_GRID)
        close(scale.reshape(1), f[f"lpinit.qdiff.a{bits}.delta"])
        assert float(zero_point) == float(f[f"lpinit.qdiff.a{bits}.zero_point"])


def test_lp_init_default_grid_matches_code(official):
    """The Lp search Q-Diffusion's config runs (its ``search`` with its p = 2.4, as
    ``initialise_and_reconstruct`` sets them) picks the code's Δ on every channel of fc1's weight, at 4
    and 8 bits, to 1e-6. tqdit differed until 2026-12-06: its default grid (Q-Diffusion's and PTQ4DM's)
    was 100 multipliers linspace(0.01, 1.2) (step 0.01202, up to 1.2: it could widen the range), the
    code's 80 shrink factors 0.21..1.00 (step 0.01, never wider); same criterion and zero-point
    rounding. On fc1's 64 channels every chosen Δ differed (by up to 21%): tqdit picked α > 1 on 32/64
    channels at 4 bits and 64/64 at 8 bits, where the code picks α ≤ 1 (1.00 on all 64 at 8 bits);
    tqdit's Lp error was 0.94x (4 bit) / 0.71x (8 bit) the code's on average, up to 1.01x / 1.28x on a
    channel (rows of 16 weights). (PTQ4DM's default is now its code's QDrop grid, 100 thresholds
    0.01..1.00, which this fixture does not record.) Mutation caught: QDiffusionConfig's search back to
    linspace(0.01, 1.2, 100) (``SearchConfig(criterion="lp")``, the engine's default grid)."""
    f, _ = official
    config = QDiffusionConfig()
    search = replace(config.search, criterion="lp", p=config.p)
    for bits in (4, 8):
        scale, zero_point = fit_weight(weight(f, "fc1"), bits, search)
        close(scale, f[f"lpinit.qdiff.w{bits}.delta"])


def lp_error(x: torch.Tensor, scale, zero_point, bits: int, p: float) -> torch.Tensor:
    """Per-row Σ |x − Q(x)|^p (x rows = channels; a scalar scale for a per-tensor grid)."""
    scale = torch.as_tensor(scale).reshape(-1, 1).double()
    zero_point = torch.as_tensor(zero_point).reshape(-1, 1).double()
    x = x.double()
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (x - (codes - zero_point) * scale).abs().pow(p).sum(dim=1)


@pytest.mark.xfail(strict=True, reason=(
    "a deviation ptq4dit.py documents ('Not a superset', with these numbers): the code initialises every "
    "range (weights per output channel, activations per tensor) by choosing among the percentile ranges "
    "{0.999, 0.9999, 0.99999} by L2 error; tqdit's L2 search over 100 multipliers 0.01-1.2 of [min, max] "
    "does not contain those ranges: on fc1's weight its L2 error is higher than the code's choice on "
    "8/64 channels at 4 bits and 9/64 at 8 bits (up to 1.01x / 1.28x), and on the per-tensor block input "
    "at 8 bits (1.0008x; 0.93x at 4 bits)"))
def test_ptq4dit_init_at_least_as_good_as_its_percentile_choice(official):
    """PTQ4DiT's code picks each range among three percentile ranges by L2 error; tqdit's L2 search over
    range multipliers (PTQ4DiTConfig's search, p = 2) has an L2 error ≤ the code's choice on every channel
    of fc1's weight and on the per-tensor block input, at 4 and 8 bits. (No small change makes it pass:
    it would take the code's percentile candidates. Should it XPASS, ptq4dit.py's Deviation paragraph
    and its numbers are out of date.)"""
    f, _ = official
    tokens = f["dit.tokens"].reshape(1, -1)
    config = PTQ4DiTConfig()
    search = replace(config.search, criterion="lp", p=config.p)  # as initialise_and_reconstruct sets it
    for bits in (4, 8):
        scale, zero_point = fit_weight(weight(f, "fc1"), bits, search)
        ours = lp_error(weight(f, "fc1"), scale, zero_point, bits, 2.0)
        theirs = lp_error(weight(f, "fc1"), f[f"lpinit.ptq4dit.w{bits}.delta"],
                          f[f"lpinit.ptq4dit.w{bits}.zero_point"], bits, 2.0)
        assert bool((ours <= theirs * (1 + 1e-9)).all())
        scale, zero_point = fit_activation(list(f["dit.tokens"]), bits, search)
        ours = lp_error(tokens, scale, zero_point, bits, 2.0)
        theirs = lp_error(tokens, f[f"lpinit.ptq4dit.a{bits}.delta"], f[f"lpinit.ptq4dit.a{bits}.zero_point"],
                          bits, 2.0)
        assert float(ours) <= float(theirs) * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# TQ-DiT (PTQ4ViT's) twin-uniform post-softmax quantizer and post-GELU quantizer
# ---------------------------------------------------------------------------------------------


def exact_ties(x: torch.Tensor, split: float, levels: int) -> torch.Tensor:
    """Values whose exact code ratio (x·L/s below the split, x·L above) is a half-integer: rounding there
    depends on whether the step is divided (the code) or its reciprocal multiplied (tqdit)."""
    ratio = torch.where(x.double() < split, x.double() * levels / split, x.double() * levels)
    return ratio - ratio.floor() == 0.5


def twin_cases(x: torch.Tensor):
    """(bits, levels L, split s = 2^-i, i, tqdit's output, its exact ties) for the fixture's 8 and 4 bits
    and all 20 splits."""
    for bits in (8, 4):
        levels = 2 ** (bits - 1) - 1
        quantizer = SoftmaxMRQ(bits)
        for i in range(20):
            split = 2.0**-i
            yield bits, levels, split, i, quantizer.quantize(x, i), exact_ties(x, split, levels)


def test_twin_uniform_matches_code_with_branch_sum_fixed(official):
    """SoftmaxMRQ equals TQ-DiT's ``TimewiseSoSPTQSLBatchingQuantMatMul.quant_input_A`` WITH ITS
    DOCUMENTED BUG FIXED: the code adds its two branches; the fixture's fixed version (made by the
    generator, by rewriting the function's return) takes each value from its own region (x < s: step
    s/(2^(b−1) − 1) on [0, s]; x ≥ s: step 1/(2^(b−1) − 1) on [0, 1]). All 20 splits 2^-i, 8 and 4 bits,
    softmax outputs plus 0, 1, every split and the float below it: equal to 1e-6 except on exact ties
    (x·L/s or x·L a half-integer, e.g. x = s/2 at 4 bits), where tqdit's code is round-half-even of the
    exact ratio and the code's depends on the float32 step's rounding: one code apart at most.
    Mutation caught: the threshold x ≤ s instead of x < s (values at the split in the low region)."""
    f, _ = official
    x = f["twin.x"]
    for bits, levels, split, i, ours, ties in twin_cases(x):
        fixed = f[f"twin.b{bits}.fixed"][i]
        close(ours[~ties], fixed[~ties])
        step = torch.where(x < split, split / levels, 1.0 / levels).double()
        assert bool(((ours[ties] - fixed[ties]).double().abs() <= step[ties] * (1 + 1e-6)).all())


def test_twin_uniform_code_offsets_values_by_the_split(official):
    """The official (unfixed) quantizer differs from tqdit by its branch sum: values x ≥ s come out +s
    too large (the low branch of a value above s is s), and values x < s come out round(s·L)/L too large
    (the high branch clamps x up to s), which is 0 once s < 1/(2L); to 1e-6 away from exact ties.
    Mutation caught: SoftmaxMRQ adding both regions as the code does."""
    f, _ = official
    x = f["twin.x"]
    for bits, levels, split, i, ours, ties in twin_cases(x):
        offset = f[f"twin.b{bits}.official"][i] - ours
        expected = torch.where(x >= split, split, round(split * levels) / levels)
        close(offset[~ties], expected[~ties].float(), atol=1e-7)
        if i >= int(math.log2(2 * levels)) + 1:
            assert bool((offset[(x < split) & ~ties] == 0).all())


def test_post_gelu_codes_match_code(official):
    """GeluMRQ vs TQ-DiT's ``PostGeluPTQSLBatchingQuantLinear.quant_input`` (sym=True, as its TQ-DiT config
    sets; the code's branch sum is correct here, each branch clamps the other region to 0) at 8 and 4
    bits: every value gets the code's integer code and the code's value, to 1e-6 (the next test checks
    the negative step itself). Mutation caught: negative codes clamped at −2^(b−1) + 1."""
    f, _ = official
    x = f["gelu.x"]
    for bits in (8, 4):
        quantizer, positive = GeluMRQ(bits), float(f[f"gelu.b{bits}.positive_step"])
        ours, theirs = quantizer.quantize(x, positive), f[f"gelu.b{bits}.official"]
        code_step = torch.where(x < 0, f[f"gelu.b{bits}.negative_step"].float(), torch.tensor(positive))
        assert torch.equal(torch.round(ours / torch.where(x < 0, quantizer.negative_scale, positive)),
                           torch.round(theirs / code_step))
        close(ours, theirs)


def test_post_gelu_negative_step_matches_code(official):
    """The negative-region step and outputs equal the code's to 1e-6. tqdit differed until 2026-12-06:
    GELU_MIN was 0.16997 in tqdit/quant/quantizers.py ('as TQ-DiT's released code sets it'); the code's
    constant is 0.16997124254703522 (float32 of the erf GELU's minimum −0.1699712075): the negative step
    and every negative output differed by 7.3e-6 relative (1.2e-6 absolute at the lowest code).
    Mutation caught: GELU_MIN = 0.16997."""
    f, _ = official
    for bits in (8, 4):
        quantizer = GeluMRQ(bits)
        assert quantizer.negative_scale == pytest.approx(float(f[f"gelu.b{bits}.negative_step"]), rel=RTOL)
        x = f["gelu.x"]
        ours = quantizer.quantize(x, float(f[f"gelu.b{bits}.positive_step"]))
        close(ours[x < 0], f[f"gelu.b{bits}.official"][x < 0])


# ---------------------------------------------------------------------------------------------
# PTQ4DM: normally distributed time-step calibration (NDTC)
# ---------------------------------------------------------------------------------------------


class FixedDraws:
    """A stand-in for numpy's Generator that returns mean + std·z for given standard-normal draws z."""

    def __init__(self, z: np.ndarray):
        self.z = z

    def normal(self, mean, std, size):
        assert size == len(self.z)
        return mean + std * self.z


def test_ndtc_mapping_matches_code(official):
    """PTQ4DM's ``generate_t(t_mode="normal")`` maps a draw u ~ N(0.4, 0.4) to int(u·N) clamped to
    [0, N − 1]; fed the same 512 standard-normal draws, tqdit's ``ndtc_steps`` gives the same step for
    every draw, for N = 250 and 100 (exactly). tqdit's step s counts from the clean end (0 = cleanest),
    as the code's timestep label does; the code pairs that label with the sample of loop index s, which
    counts from the noisy end (ptq4dm.py documents this and does not reproduce it).
    Mutation caught: round(u·N) instead of ⌊u·N⌋."""
    f, metadata = official
    z = f["ndtc.z"].numpy()
    setting = metadata["ndtc"]
    for steps in setting["num_steps"]:
        ours = ndtc_steps(steps, setting["count"], setting["mean"], setting["std"], FixedDraws(z))
        np.testing.assert_array_equal(ours, f[f"ndtc.n{steps}.t"].numpy())


def test_ndtc_selection_with_replacement_draws_the_code_steps(official):
    """``select_ndtc(replacement=True)`` with seed 0 draws z = default_rng(0).standard_normal(count),
    the fixture's draws, so the steps of the inputs it selects have the code's histogram exactly.
    Mutation caught: round(u·N) instead of ⌊u·N⌋."""
    f, metadata = official
    setting = metadata["ndtc"]
    z = np.random.default_rng(setting["seed"]).standard_normal(setting["count"])
    np.testing.assert_array_equal(z, f["ndtc.z"].numpy())
    for steps in setting["num_steps"]:
        step = np.repeat(np.arange(steps), 3)
        chosen = select_ndtc(step, steps, setting["count"], setting["mean"], setting["std"], setting["seed"],
                             replacement=True)
        np.testing.assert_array_equal(np.bincount(step[chosen], minlength=steps),
                                      np.bincount(f[f"ndtc.n{steps}.t"].numpy(), minlength=steps))


def test_ndtc_step_probabilities_use_the_code_bins(official):
    """The code's mapping, probed at u = s/N ∓ 1e-6, puts step s on [s/N, (s+1)/N) (tails in the end
    steps); ``ndtc_step_probabilities`` (the weights of the default, without-replacement selection) is
    the normal mass of exactly those bins, to 1e-12. Mutation caught: bins shifted by half a step
    ((s ± ½)/N edges, the mass of round(u·N))."""
    f, metadata = official
    setting = metadata["ndtc"]
    for steps in setting["num_steps"]:
        probe = f[f"ndtc.n{steps}.edge_t"].numpy().reshape(steps + 1, 2)
        below, above = probe[:, 0], probe[:, 1]
        np.testing.assert_array_equal(above[:-1], np.arange(steps))
        np.testing.assert_array_equal(below[1:], np.arange(steps))
        edges = np.arange(1, steps) / steps
        cdf = norm.cdf(edges, loc=setting["mean"], scale=setting["std"])
        expected = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
        np.testing.assert_allclose(ndtc_step_probabilities(steps, setting["mean"], setting["std"]), expected,
                                   rtol=0, atol=1e-12)
