"""The calibration engine every method uses: wrap the scoped layers, capture FP data, search scales.

Flow for ``calibrate(model, calib, cfg)``:

1. ``wrap`` replaces each scoped Linear / attention MatMul by its quantized twin, with quantizers
   chosen by position (MRQ for post-softmax and post-GELU when ``multi_region``; symmetric for
   q, k, v and weights; asymmetric elsewhere) and ``time_groups`` parameter sets for activations.
2. Calibration inputs: ``num_inputs`` in all, ⌈num_inputs / G⌉ drawn (seeded) from the calibration
   set for each time group (an input's group is that of its sampling step), so methods with and
   without time groups see the same amount of data.
3. Per unit (a DiT block, the final layer, the timestep MLP), in full precision: a forward pass
   records each scoped layer's inputs and, for the Hessian criterion, a backward pass of
   L = ⟨r, model output⟩ (fixed N(0, 1) probe r per input) records ∂L/∂O at each layer output.
   The unit's inputs are cut from the graph, so the backward pass stops at the unit.
4. ``search_layer`` fits each layer (see ``search.py``). Layers see FP inputs (PTQ4ViT's choice),
   so the result does not depend on the order of layers.

Calibration cost (seconds, peak memory) is measured around all of it, the capture included.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tqdit.data.calibration import CalibrationSet, select_per_group
from tqdit.models.dit import DiT, MatMul
from tqdit.quant.layers import (QuantLinear, QuantMatMul, quantization_disabled, quantizers, replace_module, resolve_scope,
                                use_explicit_attention)
from tqdit.quant.reconstruct import ReconConfig
from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ, TimeGroupContext, UniformNoise, UniformQuantizer
from tqdit.quant.search import SearchConfig, linear_problem, matmul_problem, search_layer

POSITIONS = ("post_norm", "attn_out", "post_gelu", "post_silu", "timestep_freq", "q", "k", "post_softmax", "v")


@dataclass
class QuantConfig:
    """Everything a method needs; built from the Hydra config by the pipeline (methods never see Hydra)."""

    w_bits: int = 8
    a_bits: int = 8
    weight_symmetric: bool = True  # per-output-channel weight grids: symmetric (most methods) or asymmetric (PTQ4DiT)
    scope: str | list = "blocks"
    multi_region: bool = False
    time_groups: int = 1
    grouped: str | list = "all"  # activation positions with per-group parameters (see POSITIONS)
    search: SearchConfig = field(default_factory=SearchConfig)
    num_inputs: int = 256  # calibration inputs in all, split evenly over the time groups (at least 1 each)
    capture_batch: int = 32
    seed: int = 0
    recon: ReconConfig = field(default_factory=ReconConfig)  # block reconstruction (Q-Diffusion, PTQ4DiT)
    params: dict = field(default_factory=dict)  # method-specific settings (each method validates its own)
    error_model: str = "round"  # round: quantize; noise: add noise of the grid's step instead (the noise control)


def activation_positions(name: str) -> tuple[str, ...]:
    """What a scoped module's activation operands are, by module name."""
    if name.endswith("qk_matmul"):
        return ("q", "k")
    if name.endswith("av_matmul"):
        return ("post_softmax", "v")
    if name.endswith("mlp.fc2"):
        return ("post_gelu",)
    if name.endswith("attn.proj"):
        return ("attn_out",)
    if name.endswith("t_embedder.mlp.0"):
        return ("timestep_freq",)
    if "adaLN_modulation" in name or name.endswith("t_embedder.mlp.2"):
        return ("post_silu",)
    return ("post_norm",)


def group_table(timesteps: np.ndarray, groups: int) -> torch.Tensor:
    """(1000,) original timestep -> time group. Sampling step i of S (i = 0 cleanest) is in group ⌊i·G/S⌋.

    Timesteps off the schedule take the group of the nearest scheduled one.
    """
    steps = len(timesteps)
    if not 1 <= groups <= steps:
        raise ValueError(f"groups={groups} must be between 1 and the number of sampling steps ({steps})")
    step_groups = (np.arange(steps) * groups) // steps
    nearest = np.abs(np.arange(1000)[:, None] - np.asarray(timesteps)[None]).argmin(axis=1)
    return torch.as_tensor(step_groups[nearest], dtype=torch.long)


def _activation_quantizer(position: str, cfg: QuantConfig, context: TimeGroupContext | None) -> nn.Module:
    grouped = cfg.grouped == "all" or (not isinstance(cfg.grouped, str) and position in cfg.grouped) or cfg.grouped == position
    groups = cfg.time_groups if grouped else 1
    ctx = context if groups > 1 else None
    if cfg.multi_region and position == "post_softmax":
        return SoftmaxMRQ(cfg.a_bits, groups, ctx)
    if cfg.multi_region and position == "post_gelu":
        return GeluMRQ(cfg.a_bits, groups, ctx)
    return UniformQuantizer(cfg.a_bits, symmetric=position in ("q", "k", "v"), groups=groups, context=ctx)


def _read_time_groups(model, args) -> None:
    """Forward pre-hook: this call's timesteps (DiT's second argument) into the model's own context.

    Looked up on the model at call time, not captured when the hook is made, so a deep copy of a
    quantized model follows its own timesteps (its quantizers hold the copied context)."""
    model.quant_context.set_timesteps(args[1])


def wrap(model: DiT, cfg: QuantConfig, timesteps: np.ndarray) -> list[str]:
    """Swap the scoped modules for quantized ones (in place); returns their names.

    With time groups, a forward pre-hook reads each call's timesteps into the shared context.
    Idempotent: wrapping a model already wrapped with the same settings changes nothing (no second
    hook, no quantizers inside quantizers); with other settings it is an error.
    """
    if getattr(model, "quant_config", None) is not None:
        if model.quant_config != cfg:
            raise ValueError("the model is already quantized with other settings; quantize a fresh copy of the FP model")
        return [name for name, module in model.named_modules() if isinstance(module, (QuantLinear, QuantMatMul))]
    if not isinstance(cfg.grouped, str):
        unknown = set(cfg.grouped) - set(POSITIONS)
        if unknown:
            raise ValueError(f"quant.grouped has unknown positions {sorted(unknown)}; choose from {', '.join(POSITIONS)}")
    context = None
    if cfg.time_groups > 1:
        context = TimeGroupContext(group_table(timesteps, cfg.time_groups))
        model.register_forward_pre_hook(_read_time_groups)
    model.quant_context = context
    model.quant_config = cfg  # the effective settings (what a method chose), saved with the parameters
    names = resolve_scope(model, cfg.scope)
    for name in names:
        module = model.get_submodule(name)
        positions = activation_positions(name)
        if isinstance(module, MatMul):
            new = QuantMatMul(*(_activation_quantizer(p, cfg, context) for p in positions))
        else:
            weight_quant = UniformQuantizer(cfg.w_bits, symmetric=cfg.weight_symmetric, channels=module.out_features, axis=0)
            new = QuantLinear(module, _activation_quantizer(positions[0], cfg, context), weight_quant)
        replace_module(model, name, new.to(module.weight.device if isinstance(module, nn.Linear) else next(model.parameters()).device))
    use_explicit_attention(model)
    if cfg.error_model == "noise":  # a saved noise control being loaded (it calibrates with rounding)
        add_noise_instead_of_rounding(model)
    return names


def add_noise_instead_of_rounding(model: nn.Module) -> None:
    """The noise control: every uniform quantizer keeps its grid and adds noise of its step instead of
    rounding (``UniformNoise``); ``model.quant_config`` says so, so a saved model reloads the same way."""
    for name, quantizer in quantizers(model):
        if type(quantizer) is UniformQuantizer:
            UniformNoise.from_uniform(quantizer, name)
    model.quant_config = replace(model.quant_config, error_model="noise")
    for module in model.modules():
        if isinstance(module, QuantLinear) and module._frozen_weight is not None:
            module.freeze()


def unit_of(name: str) -> str:
    """The module whose call is cut from the graph when calibrating ``name``'s layers."""
    if name.startswith("blocks."):
        return ".".join(name.split(".")[:2])
    if name.startswith("t_embedder."):
        return "t_embedder.mlp"
    return name.split(".")[0]


def capture_unit(model: DiT, unit: str, names: list[str], x, t, y, probes, need_grads: bool, batch: int) -> dict:
    """FP inputs (and output gradients) of the scoped modules ``names`` inside ``unit``, per calibration input."""
    records = {name: {"inputs": None, "grads": []} for name in names}
    handles = []

    def forward_hook(name):
        def hook(module, args, output):
            entry = records[name]
            operands = [a.detach() for a in args]
            if entry["inputs"] is None:
                entry["inputs"] = [[] for _ in operands]
            for slot, operand in zip(entry["inputs"], operands):
                slot.extend(operand.unbind(0))
            if need_grads:
                output.register_hook(lambda grad: entry["grads"].extend(grad.detach().unbind(0)))
        return hook

    def cut_graph(module, args):
        return tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(forward_hook(name)))
    if need_grads:
        handles.append(model.get_submodule(unit).register_forward_pre_hook(cut_graph))
    try:
        with quantization_disabled(model):
            for start in range(0, len(t), batch):
                part = slice(start, start + batch)
                with torch.set_grad_enabled(need_grads):
                    out = model(x[part], t[part], y[part])
                    if need_grads:
                        (out.float() * probes[part]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return records  # gradients arrive batch by batch (one backward each), so they line up with the inputs


def calibrate(model: DiT, calib: CalibrationSet, cfg: QuantConfig, progress: bool = True,
              index: np.ndarray | None = None, started: float | None = None) -> tuple[DiT, dict]:
    """Quantize ``model`` in place with the configured quantizers and search; returns (model, cost).

    ``index``: which calibration inputs to use (a method's own selection); default: ⌈num_inputs / G⌉
    random inputs from each time group. ``started``: when the method began, for methods with stages
    before this one (PTQ4DiT's salience balancing): the cost then covers them, and the peak memory
    is not reset here (the method reset it with ``start_cost``).
    """
    timesteps = calib.timesteps.numpy()
    device = next(model.parameters()).device
    start = start_cost(device) if started is None else started
    model.requires_grad_(False)
    names = wrap(model, cfg, timesteps)
    steps = len(timesteps)
    groups_of_step = (np.arange(steps) * cfg.time_groups) // steps
    if index is None:
        index = select_per_group(calib.step.numpy(), groups_of_step, -(-cfg.num_inputs // cfg.time_groups), cfg.seed)
    sample_groups = groups_of_step[calib.step.numpy()[index]]
    x, t, y = calib.x[index].to(device), calib.t[index].to(device), calib.y[index].to(device)
    x = x.to(next(model.parameters()).dtype)
    sample_groups = torch.as_tensor(sample_groups, dtype=torch.long)
    need_grads = cfg.search.criterion == "hessian"
    probes = None
    if need_grads:
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        out_shape = (model.out_channels, model.input_size, model.input_size)
        probes = torch.randn((len(t), *out_shape), generator=generator).to(device)

    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(unit_of(name), []).append(name)
    bar = tqdm(units.items(), desc="calibrate", unit="unit", disable=not progress)
    for unit, members in bar:
        bar.set_postfix_str(f"{unit}: capturing")  # the unit (a block, or the embedders) it is on
        records = capture_unit(model, unit, members, x, t, y, probes, need_grads, cfg.capture_batch)
        for name in members:
            bar.set_postfix_str(f"searching {name}")
            module, record = model.get_submodule(name), records[name]
            check_finite(name, record["inputs"] + ([record["grads"]] if need_grads else []), sample_groups)
            grads = record["grads"] if need_grads else None
            if isinstance(module, QuantLinear):
                problem = linear_problem(module, record["inputs"][0], grads, sample_groups)
            else:
                problem = matmul_problem(module, record["inputs"][0], record["inputs"][1], grads, sample_groups)
            search_layer(problem, cfg.search, model.quant_context)
        del records
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            bar.set_postfix_str(f"{unit} done, peak {peak:.1f} GiB")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.freeze()
    if model.quant_context is not None:
        model.quant_context.groups, model.quant_context.single = None, None
    peak, kind = peak_memory(device)
    cost = {"calibration_s": round(time.perf_counter() - start, 2), "peak_memory_bytes": peak, "peak_memory_kind": kind,
            "quantized_layers": len(names), "calibration_inputs": len(t)}
    return model, cost


def check_finite(name: str, operands: list[list[torch.Tensor]], groups: torch.Tensor) -> None:
    """Stop calibration at the first layer whose recorded data hold NaN/Inf, naming it and the time group."""
    for slot in operands:
        bad = torch.stack([~torch.isfinite(x).all() for x in slot])
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise FloatingPointError(f"calibration: {name} sees NaN/Inf values (time group {int(groups[first])}, calibration input "
                                     f"{first}); the FP model diverges on its calibration data")


def start_cost(device: torch.device) -> float:
    """Begin measuring a calibration: reset the CUDA allocator's peak; returns the start time."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: the CUDA allocator's peak (reset when calibration starts) or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "process_max_rss"


def method_settings(kind, params: dict, method: str):
    """A method's own settings dataclass from ``quant.params``; unknown keys are an error, not ignored."""
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"quant.params has unknown keys {unknown} for quant={method}; known keys: {', '.join(sorted(known))}")
    return kind(**params)
