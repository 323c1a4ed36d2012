"""The job end to end through the Hydra entry point, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


FAST_QUANT = [
    "quant.candidates=10",
    "quant.rounds=1",
    "quant.num_inputs=8",
    "quant.calib.num_samples=4",
    "groups=2",
]


def run_job(tmp_path: Path, name: str, *overrides: str) -> Path:
    job_dir = tmp_path / name
    command = [sys.executable, "run.py", f"hydra.run.dir={job_dir}", f"cache_dir={tmp_path / 'cache'}",
               "num_samples=20", "batch_size=8", "sampler.steps=4", *FAST_QUANT, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FID" in result.stdout and "results:" in result.stdout
    return job_dir


def test_job_writes_results_samples_and_grid(tmp_path):
    job_dir = run_job(tmp_path, "a", "quant=fp")
    results = json.loads((job_dir / "results.json").read_text())
    assert set(results["metrics"]) == {"fid", "sfid", "is", "precision", "recall"}
    assert all(np.isfinite(v) for v in results["metrics"].values())
    assert results["seed"] == 0 and results["num_samples"] == 20
    assert results["config"]["sampler"]["steps"] == 4 and results["config"]["model"]["arch"] == "DiT-MNIST"
    assert results["timings"]["sampling_s"] > 0
    with np.load(job_dir / "samples.npz") as samples:
        assert samples["arr_0"].shape == (20, 32, 32, 1) and samples["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(samples["arr_1"], np.arange(20) % 10)
        assert samples["arr_0"].std() > 10  # digits, not a blank canvas
    assert Image.open(job_dir / "grid.png").size == (320, 64)


def test_job_is_deterministic_and_independent_of_batch_size(tmp_path):
    first = run_job(tmp_path, "first", "quant=fp")
    second = run_job(tmp_path, "second", "quant=fp", "batch_size=20")
    with np.load(first / "samples.npz") as a, np.load(second / "samples.npz") as b:
        # float round-off can differ with the batch shape; uint8 pixels almost never do
        assert (a["arr_0"] != b["arr_0"]).mean() < 1e-3
    again = run_job(tmp_path, "again", "quant=fp")
    with np.load(first / "samples.npz") as a, np.load(again / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    metrics = [json.loads((d / "results.json").read_text())["metrics"] for d in (first, again)]
    assert metrics[0] == metrics[1]


def test_missing_checkpoint_fails_with_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path}", "model.checkpoint=/nonexistent/dit.pt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: model.checkpoint=/nonexistent/dit.pt: file not found; give the path of the weights file"
    )


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampler.steps=ddim600", "no integer stride gives exactly 600"),
        ("num_samples=5", "num_samples=5 must be an integer of at least 10"),
        ("model.arch=DiT-XXL/2", "model.arch=DiT-XXL/2 is unknown"),
        ("dtype=fp64", "unknown dtype 'fp64'"),
        ("bits=9", "w_bits=9 must be an integer bit width from 2 to 8"),
        ("a_bits=1.5", "a_bits=1.5 must be an integer bit width"),
        ("groups=51", "groups=51 must be an integer from 1 to the number of sampling steps (50)"),
        ("quant=mrq a_bits=2", "multi-region quantization needs at least 3 bits"),
        ("quant.search=newton", "quant.search=newton is unknown"),
        ("quant.load=/nonexistent.safetensors", "quant.load=/nonexistent.safetensors: file not found"),
        (
            "quant=ptq4dm quant.search=hessian",
            "quant.search=hessian: ptq4dm chooses its scales by lp as its paper does",
        ),
        (
            "quant=qdiffusion +quant.params.iterations=5",
            "quant.params has unknown keys ['iterations'] for quant=qdiffusion",
        ),
        ("quant=mrq_tgq +quant.params.mean=0.3", "quant=mrq_tgq takes no method parameters"),
        ("quant=qdiffusion quant.recon.iters=-1", "quant.recon.iters, act_iters must be integers"),
        (
            "quant=qdiffusion quant.recon.precision=fp16",
            "quant.recon.precision=fp16 is unknown: use one of fp32, bf16",
        ),
        # messages of the method configs, in command-line names
        ("quant=ptq4dm quant.p=3.0", "quant.p=3.0 conflicts with quant.params.p=2.4"),
        (
            "quant=qdiffusion quant.params.calib_steps=0",
            "quant.params.calib_steps=0 must be a positive integer",
        ),
        ("quant=tgq quant.num_inputs=0", "quant.num_inputs=0 must be a positive integer"),
        ("quant.attention=flash", "quant.attention=flash is unknown: use auto, fused or explicit"),
        (
            "device=cpu quant=mrq_tgq quant.attention=fused",
            "quant.attention=fused runs a Triton kernel on a CUDA GPU; device=cpu is not one",
        ),
    ],
)
def test_bad_config_is_refused_before_any_work(override, message):
    from tqdit.errors import TqditError
    from tqdit.pipeline.job import validate

    with pytest.raises(TqditError) as error:
        validate(compose(*override.split()))
    assert message in str(error.value)


def test_quantized_attention_is_fused_only_where_it_is_faster():
    from tqdit.pipeline.job import fused_attention_wanted
    from tqdit.kernels import fused_attention

    cuda, cpu, bf16, fp32 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16, torch.float32
    # eager bf16 on a GPU: the Triton kernel (where Triton is installed)
    assert fused_attention_wanted("auto", cuda, bf16, compiled=False) == fused_attention.available()
    assert not fused_attention_wanted(
        "auto", cuda, bf16, compiled=True
    )  # compiled: inductor's kernels are faster
    assert not fused_attention_wanted("auto", cuda, fp32, compiled=False)  # not measured in float32
    assert not fused_attention_wanted("auto", cpu, bf16, compiled=False)
    assert fused_attention_wanted("fused", cuda, fp32, compiled=True) and not fused_attention_wanted(
        "explicit", cuda, bf16, compiled=False
    )


def test_default_and_sweep_values_validate():
    from tqdit.pipeline.job import validate

    for overrides in (
        [],
        ["bits=6"],
        ["w_bits=4", "a_bits=8"],
        ["groups=5"],
        ["groups=25"],
        ["quant=uniform", "groups=99"],
        ["quant=ptq4dm"],
        ["quant=qdiffusion", "quant/recon=quick"],
        ["quant=ptq4dit", "quant.params.ssc=false"],
        ["quant=qdit", "w_bits=4", "a_bits=8"],
        ["quant=ditas", "w_bits=6", "a_bits=8"],
        ["experiment=embedded_low_bit_weights", "quant=qdit_embedded", "w_bits=4"],
        ["experiment=embedded_main", "quant=ditas", "bits=16"],
    ):
        validate(compose(*overrides))  # groups are ignored by methods without time groups


def test_unknown_method_is_a_hydra_error_naming_the_options(tmp_path):
    result = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}", "quant=nope"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (
        result.returncode == 1
        and "Could not find 'quant/nope'" in result.stderr
        and "mrq_tgq" in result.stderr
    )


def test_quantized_job_records_method_and_reloads_its_calibration(tmp_path):
    job = run_job(tmp_path, "w4a8", "quant=mrq_tgq", "w_bits=4", "a_bits=8")
    results = json.loads((job / "results.json").read_text())
    quant = results["quant"]
    assert (quant["method"], quant["w_bits"], quant["a_bits"], quant["groups"]) == ("mrq_tgq", 4, 8, 2)
    # TQ-DiT's published operands: qkv, proj, fc1, fc2 and both matmuls of 4 blocks, and the final Linear
    assert quant["quantized_layers"] == 25 and len(quant["scope_layers"]) == 25
    assert (quant["protocol"], quant["scope"], quant["softmax_bits"]) == ("published", "tq_dit_code", 8)
    classes = quant["calibration_classes"]  # 4 trajectories, 4 distinct digits drawn across all 10
    assert (classes["labels"], classes["distinct"]) == ("spread", 4)
    assert 0 <= classes["min"] < classes["max"] <= 9
    assert (
        quant["calibration_s"] > 0
        and quant["peak_memory_bytes"] > 0
        and quant["calibration_set_cached"] is False
    )
    assert (job / "quant_params.safetensors").is_file()
    again = run_job(
        tmp_path,
        "reload",
        "quant=mrq_tgq",
        "w_bits=4",
        "a_bits=8",
        f"quant.load={job / 'quant_params.safetensors'}",
    )
    reloaded = json.loads((again / "results.json").read_text())
    assert (
        reloaded["quant"]["loaded_from"].endswith("quant_params.safetensors")
        and "calibration_s" not in reloaded["quant"]
    )
    with np.load(job / "samples.npz") as a, np.load(again / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # same parameters, same samples
    # a file calibrated under another setting would be filed under this job's row: refused, one line.
    # Mutation caught: quant.load checking the method only (this W4A8 file then samples as "W6A6").
    command = [
        sys.executable,
        "run.py",
        f"hydra.run.dir={tmp_path / 'other'}",
        f"cache_dir={tmp_path / 'cache'}",
        "num_samples=20",
        "batch_size=8",
        "sampler.steps=4",
        *FAST_QUANT,
        "quant=mrq_tgq",
        "bits=6",
        f"quant.load={job / 'quant_params.safetensors'}",
    ]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert (
        "was calibrated under another setting (a_bits=8 there, 6 here, w_bits=4 there, 6 here)"
        in refused.stderr
    )
    cached = run_job(tmp_path, "uniform", "quant=uniform", "bits=6")
    record = json.loads((cached / "results.json").read_text())["quant"]
    assert record["calibration_set_cached"] is True  # the sweep's second job reuses the captured set
    assert record["groups"] is None and record["search"] == "lp"


def test_quant_load_compares_what_was_calibrated_not_how_it_runs(tmp_path):
    """quant.load checks the setting a file records. Keys of how the calibrated model runs (backend,
    compile), which files saved before 2026-12-06 still record, do not count; the reconstruction code's
    version does for a method that reconstructs (a file without it is version 1). Mutations caught: the
    saved setting's EXECUTION_KEYS kept (the old file is refused), the version not recorded (the
    pre-version Q-Diffusion file loads)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from test_report import resolved_config
    from tqdit.errors import TqditError
    from tqdit.pipeline.job import calibrated_setting, check_loaded_setting

    def saved_file(method: str, drop: tuple = (), add: dict | None = None) -> Path:
        cfg = OmegaConf.create(json.loads(resolved_config((f"quant={method}",))))
        setting = {k: v for k, v in calibrated_setting(OmegaConf.to_container(cfg)).items() if k not in drop}
        path = tmp_path / f"{method}-{len(drop)}-{len(add or {})}.safetensors"
        metadata = {"setting": json.dumps({**setting, **(add or {})})}
        save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
        return cfg, path

    cfg, path = saved_file("qdiffusion", add={"quant.backend": "simulated", "compile": False})
    check_loaded_setting(cfg, path)  # an older file of the same setting loads
    cfg, path = saved_file("qdiffusion", drop=("quant.recon.algorithm",))
    with pytest.raises(TqditError, match="quant.recon.algorithm=1 there, 2 here"):
        check_loaded_setting(cfg, path)
    cfg, path = saved_file("mrq_tgq", drop=("quant.recon.algorithm",))
    check_loaded_setting(cfg, path)  # no reconstruction: the version means nothing to it


def test_int8_job_runs_the_integer_path_and_records_it(tmp_path):
    """A fake-quantized calibration sampled on the int8 kernels (quant.load): how a calibrated model is
    executed is not part of what was calibrated. Mutation caught: quant.backend left in the setting
    quant.load compares (the GPU tests' int8/FP8 FID checks load the same way)."""
    fake = run_job(tmp_path, "fake", "quant=tgq", "bits=8", "quant.protocol=shared")
    job = run_job(tmp_path, "int8", "quant=tgq", "bits=8", "quant.backend=int8", "quant.protocol=shared",
                  f"quant.load={fake / 'quant_params.safetensors'}")
    quant = json.loads((job / "results.json").read_text())["quant"]
    # every Linear of the 4 blocks (the shared scope) has a uniform input under TGQ: all 20 run in int8
    assert quant["lowbit"] == {"int8_linear": 20, "int8_weight_linear": 0, "simulated": 0}
    assert quant["loaded_from"].endswith("quant_params.safetensors") and "calibration_s" not in quant
    model_bytes = sum(
        t.numel() * t.element_size() for t in load_file(ROOT / "tqdit/assets/dit_mnist.safetensors").values()
    )
    assert quant["weight_bytes"] < 0.5 * model_bytes


RECON_FAST = ["quant/recon=quick", "quant.recon.iters=20", "quant.recon.act_iters=5", "quant.num_inputs=16"]


def test_ptq4dit_job_saves_folded_weights_and_reloads_them(tmp_path):
    job = run_job(tmp_path, "ptq4dit", "quant=ptq4dit", "bits=6", *RECON_FAST)
    quant = json.loads((job / "results.json").read_text())["quant"]
    assert quant["method"] == "ptq4dit" and quant["recon"]["iters"] == 20 and quant["recon"]["p"] == 2.0
    assert quant["params"]["ssc"] is True
    # published scope "all": the layers outside the 4 blocks are reconstructed too, in the model's order
    assert quant["reconstruction"]["units"] == ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2",
                                                "blocks.0", "blocks.1", "blocks.2", "blocks.3", "final_layer"]
    again = run_job(
        tmp_path,
        "reload",
        "quant=ptq4dit",
        "bits=6",
        *RECON_FAST,
        f"quant.load={job / 'quant_params.safetensors'}",
    )
    assert json.loads((again / "results.json").read_text())["quant"]["parameters_loaded"] > 0
    with np.load(job / "samples.npz") as a, np.load(again / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_sweeping_groups_runs_a_method_without_time_groups_once(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "run.py",
        "-m",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={tmp_path / 'cache'}",
        "num_samples=20",
        "batch_size=10",
        "sampler.steps=4",
        *FAST_QUANT[:-1],
        "quant=ptq4dm",
        "groups=2,3,4",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert (
        len(jobs) == 3
        and sum("metrics" in j for j in jobs) == 1
        and sum("duplicate_of" in j for j in jobs) == 2
    )
    assert result.stdout.count("skipped: groups has no effect on quant=ptq4dm") == 2
    from tqdit.report import load_results
    assert len(load_results([sweep])) == 1
    fp_sweep = tmp_path / "fp"
    command = [c for c in command if not c.startswith(("hydra.sweep.dir=", "quant=", "groups="))]
    result = subprocess.run(
        [*command, f"hydra.sweep.dir={fp_sweep}", "quant=fp", "bits=6,8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("skipped: bit widths and groups have no effect on quant=fp") == 1


def test_bf16_model_calibrates_and_samples(tmp_path):
    """dtype=bf16 (the ImageNet recipe's setting): capture, calibration and sampling all run the bf16
    model."""
    job_dir = run_job(tmp_path, "bf16", "quant=mrq_tgq", "dtype=bf16")
    results = json.loads((job_dir / "results.json").read_text())
    assert results["quant"]["quantized_layers"] > 0
    assert all(np.isfinite(v) for v in results["metrics"].values())
    fp32 = json.loads((run_job(tmp_path, "fp32", "quant=mrq_tgq") / "results.json").read_text())
    # bf16 changes round-off, not the result: same digits within the noise of 20 samples
    assert abs(results["metrics"]["fid"] - fp32["metrics"]["fid"]) < 0.25 * fp32["metrics"]["fid"]
