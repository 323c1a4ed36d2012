"""The library surface: one verb, method configs that validate themselves, the README's example."""

import copy
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import tqdit
from tqdit.data.calibration import CalibrationSpec, capture
from tqdit.diffusion import create_diffusion
from tqdit.quant.config import CalibrationConfig, MethodConfig
from tqdit.quant.layers import quantizers
from tqdit.quant.methods import METHODS, config_from_settings, method_of, quantize
from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ
from tqdit.quant.search import SearchConfig

from test_quant import tiny_dit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs_and_quantizes():
    """The README's "Use as a library" block, run as written."""
    text = README.read_text()
    block = re.search(r"<!-- library-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its library example"
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    qmodel, cost, metrics = namespace["qmodel"], namespace["cost"], namespace["metrics"]
    assert qmodel.quant_config.time_groups == 5 and qmodel.quant_config.multi_region
    assert cost["quantized_layers"] == 4 * 6 + 1 and cost["calibration_inputs"] == 20
    # W8A8 draws digits: at 100 samples the FP model's FID is 52.0 and this one's 55.8 (measured on a
    # 2-core CPU); an unquantized-looking FID band that a broken sampler (FID > 300) cannot reach
    assert 40 < metrics["fid"] < 70 and metrics["precision"] > 0.6, metrics


def test_one_record_per_method_says_what_it_does():
    assert set(METHODS) == {
        "fp",
        "noise",
        "uniform",
        "ptq4dm",
        "qdiffusion",
        "ptq4dit",
        "mrq",
        "tgq",
        "mrq_tgq",
        "qdit",
        "ditas",
    }
    assert {n for n, m in METHODS.items() if m.runtime_grids} == {"qdit", "ditas"}
    assert {n for n, m in METHODS.items() if m.uses_time_groups} == {"tgq", "mrq_tgq"}
    assert {n for n, m in METHODS.items() if m.reconstructs} == {"qdiffusion", "ptq4dit"}
    assert {n: m.fixed_search for n, m in METHODS.items() if m.fixed_search} == {
        "ptq4dm": "lp", "qdiffusion": "lp", "ptq4dit": "lp", "qdit": "minmax", "ditas": "minmax"}
    assert METHODS["ptq4dm"].own_settings == ("mean", "std", "p", "replacement")
    for method in METHODS.values():
        assert method_of(method.config_class()) is method
    with pytest.raises(TypeError, match="CalibrationConfig is not a method config"):
        quantize(None, None, CalibrationConfig())


def test_paper_defaults():
    """Defaults reproduce what the authors ran (references.md): calibration sizes, exponents, schedules."""
    assert (tqdit.PTQ4DMConfig().num_inputs, tqdit.PTQ4DMConfig().p) == (1024, 2.4)
    q, p = tqdit.QDiffusionConfig(), tqdit.PTQ4DiTConfig()
    assert (q.num_inputs, q.calib_steps, q.p, q.recon.act_lr) == (800, 25, 2.4, 4e-4)
    assert (q.recon.p, q.recon.act_p, q.phase_order) == (2.0, 2.4, "weights_first")  # its script's passes
    assert (p.num_inputs, p.calib_steps, p.p, p.recon.p, p.recon.act_lr) == (800, 25, 2.0, 2.0, 4e-5)
    assert (p.phase_order, p.balance, q.recon.reduction) == ("joint", "runtime", "dim1")
    assert tqdit.PTQ4DMConfig().replacement is False
    # operands as published: post-softmax 8 bits for both reconstruction baselines at W6A6
    assert q.operand_softmax_bits() == p.operand_softmax_bits() == 8 and q.operand_scope() == "all"
    assert replace(q, a_bits=6).operand_softmax_bits() == 8
    assert replace(q, a_bits=6, protocol="shared").operand_softmax_bits() == 6
    assert replace(q, protocol="shared").operand_scope() == "blocks"
    assert tqdit.PTQ4DMConfig().operand_eight_bit_roles() == ("patch_embed", "final_linear")
    assert (q.recon.iters, q.recon.act_iters, q.recon.round_weight) == (20000, 5000, 0.01)
    assert tqdit.TQDiTConfig().time_groups == 10 and tqdit.TQDiTConfig().search.criterion == "hessian"
    d, g = tqdit.DiTASConfig(), tqdit.QDiTConfig()
    assert (d.rank, d.alternations, d.group_elements, len(d.alphas), d.alphas[1]) == (32, 10, 32, 21, 0.05)
    assert (g.group_size, g.group_sizes, g.population, g.generations, g.parents) == (
        128, [32, 64, 128, 192, 288], 50, 10, 10)
    assert (g.mutations, g.crossovers, g.mutation_prob, g.fitness, g.fitness_samples) == (
        25, 25, 0.1, "fid", 800)
    assert g.weight_rounding == "gptq"  # the released main script's --use_gptq


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tqdit.PTQ4DMConfig(search=SearchConfig(criterion="hessian")), "chooses its scales by lp"),
        (
            lambda: tqdit.QDiffusionConfig(search=SearchConfig(criterion="lp", p=3.0)),
            r"search.p=3.0 conflicts with p=2.4",
        ),
        (lambda: tqdit.TQDiTConfig(a_bits=2), "multi-region quantization needs at least 3 bits"),
        (lambda: tqdit.MRQConfig(a_bits=2), "multi-region quantization needs at least 3 bits"),
        (lambda: tqdit.MRQConfig(softmax_bits=2), "softmax_bits=2: multi-region quantization needs"),
        (lambda: tqdit.UniformConfig(protocol="mine"), "protocol='mine' is unknown: use published or shared"),
        (lambda: tqdit.UniformConfig(softmax_bits=9), "softmax_bits=9 must be a bit width"),
        (lambda: tqdit.PTQ4DMConfig(replacement="maybe"), "replacement='maybe' must be true or false"),
        (lambda: tqdit.PTQ4DiTConfig(balance="sideways"), "use runtime .its code. or fold"),
        (lambda: tqdit.PTQ4DiTConfig(recon=tqdit.ReconConfig(act_p=2.4)), "leave act_p unset"),
        (lambda: tqdit.QDiffusionConfig(phase_order="joint"), "phase_order='joint': use one of"),
        (lambda: tqdit.ReconConfig(p=-1), r"quant.recon.p=-1 must be a positive exponent"),
        (lambda: tqdit.ReconConfig(reduction="mean"), "reduction='mean' is unknown"),
        (lambda: tqdit.UniformConfig(w_bits=9), "w_bits=9 must be an integer bit width"),
        (lambda: tqdit.TGQConfig(time_groups=0), "time_groups=0 must be a positive integer"),
        (
            lambda: tqdit.TGQConfig(grouped=["post_sofmax"]),
            r"grouped has unknown positions \['post_sofmax'\]",
        ),
        (lambda: tqdit.PTQ4DiTConfig(layers=["mlp.fc2"]), "balances only"),
        (lambda: tqdit.QDiffusionConfig(recon=tqdit.ReconConfig(iters=-1)), "recon.iters"),
    ],
)
def test_a_config_refuses_what_its_method_cannot_honour(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_settings_a_method_does_not_have_are_not_accepted():
    with pytest.raises(TypeError, match="time_groups"):
        tqdit.UniformConfig(time_groups=5)  # uniform has one grid for all timesteps: not silently 1
    known = "known keys: mean, p, replacement, std"
    with pytest.raises(ValueError, match=rf"unknown keys \['mu'\] for quant=ptq4dm; {known}"):
        config_from_settings("ptq4dm", {}, {"mu": 0.3})
    with pytest.raises(ValueError, match="quant=tgq takes no method parameters"):
        config_from_settings("tgq", {}, {"mean": 0.3})


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = tiny_dit()
    return model, capture(model, create_diffusion(6), CalibrationSpec(num_samples=4, cfg_scale=1.5))


@pytest.mark.parametrize("config, multi_region, groups", [
    (tqdit.TGQConfig(time_groups=3), False, 3),
    (tqdit.MRQConfig(), True, 1),
    (tqdit.TQDiTConfig(time_groups=2), True, 2),
    (tqdit.UniformConfig(), False, 1),
])
def test_the_engine_runs_exactly_what_the_config_says(setting, config, multi_region, groups):
    """The settings the model was calibrated with (``model.quant_config``) are the config's, and the
    quantizers follow them.

    Mutations caught: tgq's ``config.calibration(multi_region=False, time_groups=1)`` (the old silent
    override); mrq_tgq calibrating with ``multi_region=False``."""
    model, calib = setting
    search = SearchConfig(criterion=config.search.criterion, candidates=10, rounds=1)
    config = replace(config, num_inputs=12, capture_batch=8, search=search)
    quantized, cost = tqdit.quantize(copy.deepcopy(model), calib, config)
    used = quantized.quant_config
    shared = {f.name for f in fields(MethodConfig)} - {"protocol", "scope", "softmax_bits"}
    assert {k: getattr(used, k) for k in shared} == {k: getattr(config, k) for k in shared}
    # the protocol's choices, resolved: TQ-DiT's parts and its uniform baseline quantize its code's set
    assert (used.scope, used.softmax_bits) == (config.operand_scope(), config.operand_softmax_bits())
    assert used.scope == "tq_dit_code"  # TQ-DiT's ablation rows (uniform included) share its operands
    assert (used.multi_region, used.time_groups) == (multi_region, groups)
    kinds = {type(q) for _, q in quantizers(quantized)}
    assert (SoftmaxMRQ in kinds and GeluMRQ in kinds) == multi_region
    activations = [q for n, q in quantizers(quantized) if not n.endswith("weight_quant")]
    assert {q.groups for q in activations} == {groups}
