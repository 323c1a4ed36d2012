"""One job: model -> samples -> metrics -> results.json, all in the job directory.

Knows the config's shape (an OmegaConf/dict tree) but not Hydra itself; ``run.py`` passes the
composed config and the job directory in.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tqdit.data import load_digits
from tqdit.data.calibration import CalibrationSpec, cached_capture
from tqdit.diffusion import create_diffusion, space_timesteps
from tqdit.errors import TqditError
from tqdit.metrics import (
    all_metrics,
    build_extractor,
    extract_features,
    extractor_identity,
    frechet_distance,
    gaussian_statistics,
    load_reference,
    reference_features,
)
from tqdit.metrics.inception import inception_weights
from tqdit.metrics.reference import where_to_get
from tqdit.models import DIT_CONFIGS, load_model
from tqdit.models.adapters import TQDIT, DiffusersDiT, family_of
from tqdit.models.checkpoint import require_checkpoint
from tqdit.models.vae import VAE_REPOS, latent_decoder, load_vae
from tqdit.pipeline import distributed
from tqdit.pipeline.generate import finished_batches, generate, merge_shards
from tqdit.pipeline.sweep import recorded_config
from tqdit.pipeline.tracking import log_to_wandb
from tqdit.kernels import fused_attention
from tqdit.kernels.lowbit import fp8_supported, to_low_bit, weight_bytes
from tqdit.quant.config import MethodConfig
from tqdit.quant.layers import activation_ranges, prepare_for_compile
from tqdit.quant.methods import METHODS, config_from_settings, quantize
from tqdit.quant.reconstruct import ENGINES, PRECISIONS, ReconConfig
from tqdit.quant.search import SearchConfig
from tqdit.quant.state import load_quant_state, save_quant_state, saved_metadata
from tqdit.quant.wrapping import resolve_scope
from tqdit.report import setting_of, with_added_keys
from tqdit.utils import (atomic_write_bytes, atomic_write_json, keep_freed_memory, resolve_device,
                         resolve_dtype)

RECON_CHECKPOINTS = (
    "reconstruction"  # the job-dir folder of per-block reconstruction state (deleted when done)
)


def validate(cfg: DictConfig) -> None:
    """Cheap checks before any compute is spent; each error names the config key and the fix."""
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise TqditError(message)

    check(isinstance(cfg.num_samples, int) and cfg.num_samples >= 10,
          f"num_samples={cfg.num_samples} must be an integer of at least 10 (the Inception Score's parts)")
    image_size = cfg.model.input_size * (8 if cfg.model.latent else 1)
    reference = cfg.eval.reference
    check(
        reference is not None,
        f"eval.reference is not set: {where_to_get(image_size)}; or give a folder of real images",
    )
    check(
        reference == "mnist_digits" or Path(str(reference)).expanduser().exists(),
        f"eval.reference={reference}: not found; {where_to_get(image_size)}; or give a folder of real images",
    )
    if cfg.eval.feature_extractor == "tqdit-inception-v3":  # before hours of sampling, not after
        inception_weights(cfg.eval.weights)
    check(
        isinstance(cfg.batch_size, int) and cfg.batch_size >= 1,
        f"batch_size={cfg.batch_size} must be a positive integer",
    )
    check(
        cfg.sampler.method in ("ddpm", "ddim"),
        f"sampler.method={cfg.sampler.method} is unknown: use ddpm or ddim",
    )
    check(
        cfg.model.arch in DIT_CONFIGS,
        f"model.arch={cfg.model.arch} is unknown: choose one of {', '.join(DIT_CONFIGS)}",
    )
    try:
        space_timesteps(1000, cfg.sampler.steps)
        resolve_dtype(cfg.dtype)
        device = resolve_device(cfg.device)
    except ValueError as error:
        raise TqditError(str(error)) from None
    check(
        not (cfg.dtype == "fp16" and device.type == "cpu"),
        "dtype=fp16 is not supported on the CPU; use dtype=fp32 or bf16",
    )
    check(cfg.labels in ("balanced", "random"), f"labels={cfg.labels} is unknown: use balanced or random")
    quant = cfg.quant
    check(quant.name in METHODS, f"quant={quant.name} is unknown: choose one of {', '.join(METHODS)}")
    for key in ("w_bits", "a_bits"):
        value = cfg[key]
        check(
            isinstance(value, int) and not isinstance(value, bool) and (2 <= value <= 8 or value == 16),
            f"{key}={value} must be an integer bit width from 2 to 8 (or 16 as a no-op check); set bits= or "
            f"{key}=",
        )
    if quant.name in METHODS and METHODS[quant.name].uses_time_groups:
        steps = len(space_timesteps(1000, cfg.sampler.steps))
        check(isinstance(cfg.groups, int) and 1 <= cfg.groups <= steps,
              f"groups={cfg.groups} must be an integer from 1 to the number of sampling steps ({steps})")
    check(quant.search in ("hessian", "mse", "lp", "minmax", "percentile"),
          f"quant.search={quant.search} is unknown: use hessian, mse, lp, minmax or percentile")
    fixed = METHODS[quant.name].fixed_search
    check(fixed is None or quant.search == fixed,
          f"quant.search={quant.search}: {quant.name} chooses its scales by {fixed} as its paper does; "
          "drop quant.search= or use quant=uniform")
    recon = quant.recon
    check(
        all(isinstance(recon[k], int) and recon[k] >= 0 for k in ("iters", "act_iters")) and recon.batch >= 1,
        "quant.recon.iters, act_iters must be integers ≥ 0 and quant.recon.batch ≥ 1",
    )
    check(
        recon.engine in ENGINES,
        f"quant.recon.engine={recon.engine} is unknown: use one of {', '.join(ENGINES)}",
    )
    check(
        isinstance(recon.log_every, int) and recon.log_every >= 1,
        "quant.recon.log_every must be a positive integer",
    )
    check(recon.precision in PRECISIONS,
          f"quant.recon.precision={recon.precision} is unknown: use one of {', '.join(PRECISIONS)}")
    try:
        method_config(cfg)  # the method's config validates itself (bits, its own quant.params, ...)
    except (TypeError, ValueError) as error:
        raise TqditError(hydra_names(str(error), quant.name)) from None
    check(
        quant.backend in ("simulated", "int8", "fp8"),
        f"quant.backend={quant.backend} is unknown: use simulated, int8 or fp8",
    )
    check(
        quant.attention in ("auto", "fused", "explicit"),
        f"quant.attention={quant.attention} is unknown: use auto, fused or explicit",
    )
    if quant.attention == "fused" and quant.name != "fp":
        check(
            device.type == "cuda",
            f"quant.attention=fused runs a Triton kernel on a CUDA GPU; device={cfg.device} is not one: use "
            "quant.attention=auto or explicit",
        )
        check(
            fused_attention.available(),
            "quant.attention=fused needs Triton, which this PyTorch install lacks: install a CUDA build of "
            "PyTorch or use quant.attention=explicit",
        )
    if quant.backend == "fp8" and quant.name != "fp":
        check(
            fp8_supported(device),
            f"quant.backend=fp8 needs a CUDA GPU that runs row-wise scaled FP8 matmuls (Hopper; Ada with a "
            f"recent PyTorch); device={cfg.device} does not: use quant.backend=simulated",
        )
    if quant.name == "noise":  # a control of simulated quantization: nothing to run on 8-bit kernels
        check(
            quant.backend == "simulated",
            f"quant=noise adds noise instead of rounding; quant.backend={quant.backend} would "
            "round: use quant.backend=simulated",
        )
        check(
            quant.attention != "fused",
            "quant=noise: the fused attention kernel rounds; use quant.attention=auto or explicit",
        )
    if quant.name in METHODS and METHODS[quant.name].runtime_grids:
        check(quant.backend == "simulated",
              f"quant={quant.name} computes its activation grids at run time, which tqdit's 8-bit kernels do "
              f"not (yet): use quant.backend=simulated (results record it)")
        check(quant.attention != "fused",
              f"quant={quant.name}: the fused attention kernel takes calibrated grids only; use "
              "quant.attention=auto or explicit")
    if quant.backend in ("int8", "fp8") and quant.name != "fp":
        check(
            cfg.w_bits == 8 and cfg.a_bits == 8,
            f"quant.backend={quant.backend} runs W8A8 only, not W{cfg.w_bits}A{cfg.a_bits}: use bits=8 or "
            "quant.backend=simulated",
        )
    check(quant.load is None or Path(str(quant.load)).expanduser().is_file(),
          f"quant.load={quant.load}: file not found; point it at a job's quant_params.safetensors")
    checkpoint = cfg.model.checkpoint
    check(checkpoint is None or Path(str(checkpoint)).expanduser().is_file(),
          f"model.checkpoint={checkpoint}: file not found; give the path of the weights file")
    diffusers_model = cfg.model.get("diffusers")
    if diffusers_model is None:
        require_checkpoint(cfg.model.arch, cfg.model.input_size, checkpoint)
    else:  # diffusers' DiTTransformer2DModel: simulated quantization (the 8-bit kernels know tqdit's DiT)
        from tqdit.models.diffusers_dit import locate_diffusers_dit

        locate_diffusers_dit(str(diffusers_model))  # in the local cache or a folder, before any work
        check(checkpoint is None,
              f"model.diffusers={diffusers_model} and model.checkpoint={checkpoint}: give one of them")
        check(quant.backend == "simulated" or quant.name == "fp",
              f"quant.backend={quant.backend} runs on tqdit's DiT only, not on model.diffusers models: use "
              "quant.backend=simulated, or model.checkpoint= with the converted weights")
        check(quant.attention != "fused",
              "quant.attention=fused runs on tqdit's DiT only: use quant.attention=auto")
    if cfg.model.latent:
        check(
            cfg.model.vae is not None and cfg.model.vae.variant in VAE_REPOS,
            f"model.vae.variant={cfg.model.vae.variant if cfg.model.vae else None} is unknown: use "
            f"{' or '.join(VAE_REPOS)}",
        )
        check(
            isinstance(cfg.model.vae.decode_batch, int) and cfg.model.vae.decode_batch >= 1,
            "model.vae.decode_batch must be a positive integer",
        )


def check_model_matches(model, model_cfg: DictConfig) -> None:
    """A loaded diffusers model must be the one the config describes (sizes and classes drive sampling)."""
    expected = DIT_CONFIGS[model_cfg.arch]
    found = dict(input_size=model.input_size, in_channels=model.in_channels, num_classes=model.num_classes,
                 depth=len(model.transformer.transformer_blocks))
    wanted = dict(input_size=model_cfg.input_size, in_channels=expected["in_channels"],
                  num_classes=expected["num_classes"], depth=expected["depth"])
    if found != wanted:
        differ = ", ".join(f"{k}={found[k]} (config {wanted[k]})" for k in found if found[k] != wanted[k])
        raise TqditError(f"model.diffusers={model_cfg.diffusers} is not a {model_cfg.arch} at input size "
                         f"{model_cfg.input_size}: {differ}; set model.arch= and model.input_size= to match")


def hydra_names(message: str, method: str) -> str:
    """A config class's message in the names the command line uses, without the class name: a method's
    own fields are ``quant.params.<key>``, ``search.p`` is ``quant.p``, ``search=`` is ``quant.search=``,
    ``time_groups`` is ``groups``, the other shared fields ``quant.<key>`` (bit widths stay as they are)."""
    if not message.split(":")[0].endswith("Config"):
        return message  # already in command-line names (config_from_settings')
    message = message.split(": ", 1)[1]
    names = {"search.p": "quant.p", "time_groups": "groups", "recon": "quant.recon"}
    names |= {key: f"quant.{key}" for key in ("search", "scope", "grouped", "num_inputs", "capture_batch",
                                                    "protocol", "softmax_bits")}
    names |= {key: f"quant.params.{key}" for key in METHODS[method].own_settings}
    pattern = "|".join(re.escape(key) for key in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![\w.])({pattern})(?=[=.\s]|$)", lambda m: names[m.group(1)], message)


def method_config(cfg: DictConfig) -> MethodConfig:
    """The method's own config from the Hydra tree (methods never see Hydra); validated when built."""
    q = cfg.quant
    scope = OmegaConf.to_container(q.scope) if OmegaConf.is_list(q.scope) else q.scope
    grouped = OmegaConf.to_container(q.grouped) if OmegaConf.is_list(q.grouped) else q.grouped
    search = SearchConfig(criterion=q.search, rounds=q.rounds, candidates=q.candidates, alpha_min=q.alpha_min,
                          alpha_max=q.alpha_max, p=q.p, percentile=q.percentile, batch=q.search_batch)
    shared = dict(w_bits=cfg.w_bits, a_bits=cfg.a_bits, protocol=q.protocol, scope=scope,
                  softmax_bits=q.softmax_bits, time_groups=cfg.groups, grouped=grouped,
                  search=search, num_inputs=q.num_inputs, capture_batch=q.capture_batch, seed=q.seed,
                  recon=ReconConfig(**OmegaConf.to_container(q.recon)))
    return config_from_settings(q.name, shared, OmegaConf.to_container(q.params))


def fused_attention_wanted(setting: str, device: torch.device, dtype: torch.dtype, compiled: bool) -> bool:
    """quant.attention: ``auto`` computes quantized attention with the fused Triton kernel for
    bf16/fp16 models running eagerly on CUDA (faster than the eager explicit ops) and with the
    explicit ops otherwise (compiled, inductor fuses those into faster kernels than ours; float32 was
    not measured: docs/performance.md); ``fused`` / ``explicit`` force one (validated beforehand)."""
    if setting == "auto":
        return (
            device.type == "cuda"
            and fused_attention.available()
            and dtype in (torch.bfloat16, torch.float16)
            and not compiled
        )
    return setting == "fused"


def fid_fitness(cfg: DictConfig, diffusion, decode, num_samples: int, seed: int):
    """model -> FID of ``num_samples`` samples (seed ``seed``, the same for every call) under this job's
    sampler, labels and reference: Q-DiT's search fitness, measured as the job will measure the result."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    extractor = build_extractor(cfg.eval.feature_extractor, device, cfg.eval.weights)  # built once
    cached: dict = {}

    def score(model) -> float:
        images, _ = generate(model, diffusion, num_samples, min(cfg.batch_size, num_samples), seed,
                             labels=cfg.labels, cfg_scale=cfg.sampler.cfg_scale,
                             cfg_channels=cfg.sampler.cfg_channels, method=cfg.sampler.method,
                             eta=cfg.sampler.eta, clip_denoised=cfg.sampler.clip_denoised, dtype=dtype,
                             decode=decode, progress=False)
        if "stats" not in cached:
            reference = evaluation_reference(cfg.eval, extractor, images.shape[1:])
            cached["stats"] = reference.get("pool_stats") or gaussian_statistics(reference["pool"])
        features = extract_features(images, extractor, cfg.eval.batch_size, progress=False)
        return frechet_distance(gaussian_statistics(features["pool"]), cached["stats"])  # FID only

    return score


def quantize_model(cfg: DictConfig, model, diffusion, job_dir: Path, decode=None) -> dict:
    """Calibrate and quantize ``model`` in place (or load saved parameters); returns what results record."""
    method = cfg.quant.name
    config = method_config(cfg)
    if method == "qdit" and config.fitness == "fid":
        config = replace(config, score=fid_fitness(cfg, diffusion, decode, config.fitness_samples,
                                                   config.fitness_seed))
    record = {"method": method, "model_family": family_of(model).name, "w_bits": cfg.w_bits,
              "a_bits": cfg.a_bits,
              "groups": config.time_groups if METHODS[method].uses_time_groups else None,
              "search": cfg.quant.search, "protocol": config.protocol, "scope": config.operand_scope(),
              "softmax_bits": config.operand_softmax_bits(),
              "eight_bit_roles": list(config.operand_eight_bit_roles()), "quantized_layers": 0}
    if method == "fp":
        record.update(w_bits=None, a_bits=None, search=None, protocol=None, scope=None, softmax_bits=None,
                      eight_bit_roles=None)
        return record
    record["scope_layers"] = resolve_scope(model, config.operand_scope())
    if METHODS[method].own_settings:
        record["params"] = config.own_settings()
    if METHODS[method].reconstructs:
        record["recon"] = {k: v for k, v in asdict(config.recon).items() if k != "checkpoint_dir"}
        # per-block state, so that a killed calibration resumes after its last finished block
        config = replace(config, recon=replace(config.recon, checkpoint_dir=str(job_dir / RECON_CHECKPOINTS)))
    saved = job_dir / "quant_params.safetensors"
    if not cfg.quant.load and saved.is_file():  # resuming this job: its calibration is finished
        _, _, info = load_quant_state(model, saved)
        previous = (
            json.loads((job_dir / "quant_record.json").read_text())
            if (job_dir / "quant_record.json").is_file()
            else {}
        )
        record.update(previous, resumed_calibration=True, **info)
        return record
    if cfg.quant.load:
        saved_method = saved_metadata(cfg.quant.load).get("method")
        if saved_method != method:
            raise TqditError(
                f"quant.load={cfg.quant.load} was calibrated by {saved_method}, not quant={method}; use "
                f"quant={saved_method}"
            )
        check_loaded_setting(cfg, Path(str(cfg.quant.load)).expanduser())
        _, _, info = load_quant_state(model, cfg.quant.load)
        record.update(loaded_from=str(cfg.quant.load), **info)
        return record
    calib_cfg = cfg.quant.calib
    spec = CalibrationSpec(
        policy=calib_cfg.policy,
        num_samples=calib_cfg.num_samples,
        num_steps=calib_cfg.num_steps,
        seed=calib_cfg.seed,
        cfg_scale=cfg.sampler.cfg_scale,
        cfg_channels=cfg.sampler.cfg_channels,
        method=cfg.sampler.method,
        clip_denoised=cfg.sampler.clip_denoised,
        labels=calib_cfg.labels,
    )
    start = time.perf_counter()
    calib, cached = cached_capture(model, diffusion, spec, cfg.cache_dir)
    record["calibration_capture_s"] = round(time.perf_counter() - start, 2)
    record["calibration_set_cached"] = cached
    classes = calib.y[calib.y != getattr(model, "null_class", -1)].unique()
    record["calibration_classes"] = {"labels": spec.labels, "distinct": len(classes),
                                     "min": int(classes.min()), "max": int(classes.max())}
    _, cost = quantize(model, calib, config)
    for name, value in cost.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"calibration produced a non-finite {name}")
    record.update(cost)
    save_activation_ranges(model, job_dir / "activation_ranges.csv")
    atomic_write_json(job_dir / "quant_record.json", record)  # the cost, for a resumed job's results
    setting = json.dumps(calibrated_setting(recorded_config(cfg)))
    save_quant_state(
        model,
        job_dir / "quant_params.safetensors",
        method,
        diffusion.timesteps,  # last: marks calibration done
        extra={"setting": setting},
    )
    shutil.rmtree(job_dir / RECON_CHECKPOINTS, ignore_errors=True)  # superseded by the saved calibration
    return record


# Keys of a job's setting that say how the calibrated model is executed, not what was calibrated: a
# calibration made on a GPU may sample on the CPU, a fake-quantized one on the int8/FP8 kernels (the rows
# then differ in these keys anyway).
EXECUTION_KEYS = ("device", "quant.backend", "compile")


def without_execution_keys(setting: dict) -> dict:
    return {key: value for key, value in setting.items() if key not in EXECUTION_KEYS}


def calibrated_setting(config: dict) -> dict:
    """What a calibration depends on: the job's table setting (tqdit.report), less EXECUTION_KEYS."""
    return without_execution_keys(setting_of(config, None))


def check_loaded_setting(cfg: DictConfig, path: Path) -> None:
    """quant.load reuses a calibration only for its own setting: the table files the job under this
    job's setting, so a file calibrated under another one (other bits, G, search, guidance, model …)
    is refused instead of silently sampling a different quantized model under this row's name."""
    metadata = saved_metadata(path)
    if "setting" in metadata:  # files saved before EXECUTION_KEYS were left out still hold some of them
        saved = without_execution_keys(with_added_keys(json.loads(metadata["setting"])))
    elif (path.parent / "config.json").is_file():  # saved before settings were recorded: the job beside it
        saved = calibrated_setting(json.loads((path.parent / "config.json").read_text()))
    else:
        raise TqditError(
            f"quant.load={path}: the file does not record the setting it was calibrated under (an older "
            "file away from its job directory); recalibrate, or load it from its job directory"
        )
    mine = calibrated_setting(recorded_config(cfg))
    differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if differ:
        shown = ", ".join(f"{k}={saved.get(k)} there, {mine.get(k)} here" for k in differ[:3])
        raise TqditError(
            f"quant.load={path} was calibrated under another setting ({shown}"
            f"{' …' if len(differ) > 3 else ''}); load the file of this setting or drop quant.load"
        )


def save_activation_ranges(model, path: Path) -> None:
    """activation_ranges.csv: every activation quantizer's range per time group (for plots and W&B)."""
    rows = activation_ranges(model)
    if not rows:
        return
    columns = ["layer", "operand", "group", "kind", "low", "high", "split"]
    atomic_write_bytes(path, pd.DataFrame(rows, columns=columns).to_csv(index=False).encode())


def save_samples(job_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM layout: ``arr_0`` uint8 NHWC images, ``arr_1`` labels, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images, arr_1=labels)
    atomic_write_bytes(job_dir / "samples.npz", buffer.getvalue())


def save_grid(path: Path, images: np.ndarray, columns: int = 10, rows: int = 10) -> None:
    """The first rows×columns samples as one PNG (with balanced labels, column c shows class c)."""
    count = min(len(images), columns * rows)
    rows = -(-count // columns)
    h, w, c = images.shape[1:]
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(count):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def evaluation_reference(eval_cfg: DictConfig, extractor, image_shape: tuple) -> dict:
    """The configured reference's features or statistics: the embedded digits, an ADM batch or a folder."""
    if eval_cfg.reference == "mnist_digits":
        real_images = load_digits()[0][..., None]
        return reference_features(
            real_images, extractor, extractor_identity(extractor), eval_cfg.cache_dir, eval_cfg.batch_size
        )
    return load_reference(eval_cfg.reference, extractor, image_shape, eval_cfg.cache_dir, eval_cfg.batch_size)


def evaluate(images: np.ndarray, eval_cfg: DictConfig, device: torch.device) -> dict[str, float | None]:
    """Metrics of ``images`` against the configured reference: the embedded digits, an ADM batch or a
    folder."""
    extractor = build_extractor(eval_cfg.feature_extractor, device, eval_cfg.weights)
    reference = evaluation_reference(eval_cfg, extractor, images.shape[1:])
    generated = extract_features(images, extractor, eval_cfg.batch_size, desc="sample features")
    # ADM: parts of 5000; the embedded evaluation: null = 10 parts of N // 10
    return all_metrics(generated, reference, split_size=eval_cfg.is_split_size, k=eval_cfg.pr_k)


def ignored_keys(method: str) -> set[str]:
    """Top-level config keys that mean nothing to ``method``: a sweep over them repeats identical jobs."""
    if method == "fp":
        return {"bits", "w_bits", "a_bits", "groups"}
    return set() if METHODS[method].uses_time_groups else {"groups"}


def identical_finished_job(cfg: DictConfig, job_dir: Path, sweep_dir: Path) -> Path | None:
    """A finished job of the same sweep whose config differs from ours only in keys our method ignores.

    ``groups`` means nothing to a method without time groups (nor bit widths to ``fp``), so
    ``-m quant=fp,ptq4dm,mrq_tgq bits=6,8 groups=5,10`` would otherwise repeat identical jobs.
    Decision: run the first, and let the others point to it.
    """
    ignored = ignored_keys(cfg.quant.name)
    if not ignored:
        return None

    def relevant(config: dict) -> dict:
        kept = {key: value for key, value in config.items() if key not in ignored}
        if cfg.quant.name == "fp" and isinstance(
            kept.get("quant"), dict
        ):  # no quantizer settings matter either
            kept["quant"] = {"name": kept["quant"].get("name")}
        return kept

    mine = relevant(recorded_config(cfg))
    for path in sorted(sweep_dir.rglob("results.json")):
        if path.parent.resolve() == job_dir.resolve():
            continue
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "metrics" in other and relevant(other.get("config") or {}) == mine:
            return path.parent
    return None


def resume_point(config: dict, job_dir: Path) -> dict | None:
    """Resuming in an existing job directory: its results if the job is complete, else None (continue).

    A directory that holds another configuration is refused rather than mixed with this one.
    """
    stored = job_dir / "config.json"
    if not stored.is_file():
        return None
    try:
        previous = json.loads(stored.read_text())
    except ValueError:
        return None  # damaged marker: the job starts over
    def comparable(c: dict) -> dict:
        # which GPU of a machine ran it, and how it was logged, do not change the job
        device = str(c.get("device", ""))
        return {**c, "device": "cuda" if device.startswith("cuda") else device, "logger": None}

    if comparable(previous) != comparable(config):
        changed = sorted(
            k for k in set(previous) | set(config) if comparable(previous).get(k) != comparable(config).get(k)
        )
        raise TqditError(
            f"{job_dir} holds a job with a different configuration (differs in {', '.join(changed)}); "
            "use another output directory or delete it"
        )
    results_path = job_dir / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        if "metrics" in results:
            return {**results, "resumed": "complete"}
    return None


def already_done(cfg: DictConfig, config: dict, job_dir: Path, sweep_dir: Path | None) -> dict | None:
    """Results without running: the job is complete, or (in a sweep) repeats a finished one."""
    finished = resume_point(config, job_dir)
    if finished is not None:
        return finished
    original = identical_finished_job(cfg, job_dir, sweep_dir) if sweep_dir is not None else None
    if original is None:
        return None
    results = {
        "duplicate_of": str(original),
        "config": config,
        "reason": f"{'bit widths and groups have' if cfg.quant.name == 'fp' else 'groups has'} no effect on "
        f"quant={cfg.quant.name}; identical to {original.name}",
    }
    atomic_write_json(job_dir / "results.json", results)
    return results


def run_job(cfg: DictConfig, job_dir: str | Path, sweep_dir: str | Path | None = None) -> dict:
    """Run one configured job and return (and write) its results.

    In a sweep (``sweep_dir`` given), a job identical to a finished one except for a ``groups`` value its
    method ignores is not run again: its ``results.json`` names the job it duplicates (reports skip it).

    Under ``torchrun`` (see :mod:`tqdit.pipeline.distributed`) rank 0 decides, calibrates, merges and
    evaluates; every rank samples its share of the batches; every rank returns rank 0's results.
    """
    job_dir = Path(job_dir)
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else None
    validate(cfg)
    config = recorded_config(cfg)
    done = distributed.on_rank_zero(already_done, cfg, config, job_dir, sweep_dir)
    if done is not None:
        return done
    timings: dict[str, float] = {}
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    freed_memory_kept = device.type == "cpu" and keep_freed_memory()  # page faults cost more than the math
    torch.backends.cuda.matmul.allow_tf32 = True  # as the reference sampler does
    torch.backends.cudnn.allow_tf32 = True

    if distributed.rank() == 0:
        job_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_dir / "config.json", config)  # what this directory holds; checked on resume
    def load():
        if cfg.model.get("diffusers"):  # diffusers' DiT, behind tqdit's sampling interface
            from tqdit.models.diffusers_dit import load_diffusers_dit

            model = DiffusersDiT(load_diffusers_dit(cfg.model.diffusers)).eval()
            check_model_matches(model, cfg.model)
        else:
            model = load_model(cfg.model.arch, cfg.model.input_size, cfg.model.checkpoint)
        model = model.to(device=device, dtype=dtype)
        decode = None
        if cfg.model.latent:  # loaded before calibration: a missing VAE should fail now, not after sampling
            vae = load_vae(cfg.model.vae.variant, cfg.model.vae.path, device)
            decode = latent_decoder(vae, cfg.model.vae.decode_batch)
        return model, decode

    # Every step between collectives either runs on rank 0 only or through all_succeed, so a failure
    # on any rank reaches all of them and no rank waits forever (or drifts into the next sweep job).
    start = time.perf_counter()
    model, decode = distributed.all_succeed(load)
    diffusion = create_diffusion(cfg.sampler.steps, learn_sigma=model.learn_sigma)
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    quant_record = distributed.on_rank_zero(quantize_model, cfg, model, diffusion, job_dir, decode)

    def follow_rank_zero() -> dict:
        if distributed.rank() != 0:  # the other ranks read the parameters rank 0 just saved
            quantize_model(cfg, model, diffusion, job_dir, decode)
        record = {}
        if (
            cfg.quant.backend != "simulated" and cfg.quant.name != "fp"
        ):  # real low-bit kernels from the calibrated scales
            record.update(lowbit=to_low_bit(model, cfg.quant.backend), weight_bytes=weight_bytes(model))
        if (cfg.quant.name not in ("fp", "noise") and not METHODS[cfg.quant.name].runtime_grids
                and family_of(model) is TQDIT
                and fused_attention_wanted(cfg.quant.attention, device, dtype, cfg.compile)):
            record["fused_attention_blocks"] = fused_attention.use_fused_attention(model)
        return record

    quant_record = {**quant_record, **distributed.all_succeed(follow_rank_zero)}
    timings["quantize_s"] = time.perf_counter() - start
    if cfg.compile:  # ~1.9x for FP DiT-XL/2 on an H100 (README, Performance); costs a minute to compile
        prepare_for_compile(model).compile()

    start = time.perf_counter()
    shard_dir = job_dir / "shards"
    resumed = finished_batches(shard_dir, cfg.num_samples, cfg.batch_size)  # a killed or requeued run's
    sampling = dict(num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed, labels=cfg.labels)
    images, labels = distributed.all_succeed(
        generate,
        model,
        diffusion,
        **sampling,
        cfg_scale=cfg.sampler.cfg_scale,
        cfg_channels=cfg.sampler.cfg_channels,
        method=cfg.sampler.method,
        eta=cfg.sampler.eta,
        clip_denoised=cfg.sampler.clip_denoised,
        dtype=dtype,
        decode=decode,
        shard_dir=shard_dir,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    timings["sampling_s"] = time.perf_counter() - start

    def finish() -> dict:
        nonlocal images, labels
        if distributed.world_size() > 1:  # every rank's shards are on disk now
            images, labels = merge_shards(shard_dir, num_classes=model.num_classes, **sampling)
        save_samples(job_dir, images, labels)
        save_grid(job_dir / "grid.png", images)
        start = time.perf_counter()
        metrics = evaluate(images, cfg.eval, device)
        timings["metrics_s"] = time.perf_counter() - start
        results = {
            "metrics": metrics,
            "quant": quant_record,
            "seed": cfg.seed,
            "num_samples": cfg.num_samples,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            # the rate of this run's own draws: batches read back from shards are not counted
            "image_steps_per_s": round(
                (cfg.num_samples - sum(map(len, resumed))) * diffusion.num_steps / timings["sampling_s"], 1
            ),
            "resumed_batches": len(resumed),
            "environment": {
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "processes": distributed.world_size(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                "pid": os.getpid(),  # which process ran it (a launcher's worker, torchrun rank 0)
                "freed_memory_kept": freed_memory_kept,
                # the SLURM job (and its restarts: requeued after a time limit or preemption)
                "slurm_job_id": slurm_job_id(),
                "slurm_restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            },
            "config": config,
        }
        atomic_write_json(job_dir / "results.json", results)
        shutil.rmtree(shard_dir, ignore_errors=True)  # samples.npz holds them now
        if cfg.logger.name == "wandb":
            warning = log_to_wandb(
                results, OmegaConf.to_container(cfg.logger, resolve=True), job_dir, sweep_dir
            )
            if warning:
                print(f"warning: {warning}")
        return results

    return distributed.on_rank_zero(finish)


def slurm_job_id() -> str | None:
    """The SLURM job running this process, as squeue and scancel name it (``<array>_<task>`` in an array)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def summary_line(results: dict) -> str:
    if "duplicate_of" in results:
        return f"skipped: {results['reason']}"
    m, cfg, q = results["metrics"], results["config"], results["quant"]
    method = (
        q["method"]
        if q["method"] == "fp"
        else f"{q['method']} W{q['w_bits']}A{q['a_bits']}" + (f" G={q['groups']}" if q["groups"] else "")
    )
    calibration = f", calibration {q['calibration_s']:.0f} s" if "calibration_s" in q else ""
    return (
        f"{method} | {cfg['model']['arch']} {cfg['sampler']['method']}-{cfg['sampler']['steps']} "
        f"cfg={cfg['sampler']['cfg_scale']} "
        f"N={results['num_samples']} seed={results['seed']}: FID {m['fid']:.3f}  sFID {m['sfid']:.3f}  IS "
        f"{m['is']:.3f}  "
        f"precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
        f"(sampling {results['timings']['sampling_s']:.0f} s, {results['image_steps_per_s']:.0f} "
        f"image-steps/s{calibration})"
    )
