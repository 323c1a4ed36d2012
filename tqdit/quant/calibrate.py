"""The calibration driver every method uses: wrap the scoped layers, capture FP data, search scales.

Flow for ``calibrate(model, calib, cfg)``:

1. ``wrapping.wrap`` swaps each scoped layer for its quantized twin (quantizers by operand position).
2. Calibration inputs: ``num_inputs`` in all, ⌈num_inputs / G⌉ drawn (seeded) from the calibration
   set for each time group (an input's group is that of its sampling step), so methods with and
   without time groups see the same amount of data.
3. Per unit (a DiT block, the final layer, the timestep MLP), in full precision, ``capture.capture_unit``
   records each scoped layer's inputs and, for the Hessian criterion, output gradients.
4. ``search_layer`` fits each layer (see ``search.py``). Layers see FP inputs (PTQ4ViT's choice),
   so the result does not depend on the order of layers.

Calibration cost (seconds, peak memory) is measured around all of it, the capture included.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tqdit.data.calibration import CalibrationSet, select_per_group
from tqdit.models.adapters import family_of
from tqdit.quant.capture import capture_unit, check_finite
from tqdit.quant.config import CalibrationConfig
from tqdit.quant.layers import QuantLinear
from tqdit.quant.search import linear_problem, matmul_problem, search_layer
from tqdit.quant.wrapping import wrap


def calibrate(model: nn.Module, calib: CalibrationSet, cfg: CalibrationConfig, progress: bool = True,
              index: np.ndarray | None = None, started: float | None = None) -> tuple[nn.Module, dict]:
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
        index = select_per_group(
            calib.step.numpy(), groups_of_step, -(-cfg.num_inputs // cfg.time_groups), cfg.seed
        )
    sample_groups = groups_of_step[calib.step.numpy()[index]]
    x, t, y = calib.x[index].to(device), calib.t[index].to(device), calib.y[index].to(device)
    x = x.to(next(model.parameters()).dtype)
    sample_groups = torch.as_tensor(sample_groups, dtype=torch.long)
    need_grads = cfg.search.criterion == "hessian"
    probes = None
    if need_grads:
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        out_shape = family_of(model).output_shape(model)
        probes = torch.randn((len(t), *out_shape), generator=generator).to(device)

    units = by_unit(model, names)
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
                problem = matmul_problem(
                    module, record["inputs"][0], record["inputs"][1], grads, sample_groups
                )
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
    return model, calibration_cost(start, device, len(names), len(t))


def by_unit(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Scoped module names grouped by their calibration unit (a DiT block, the final layer, ...), in order."""
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(family_of(model).unit_of(name), []).append(name)
    return units


def draw_inputs(model: nn.Module, calib: CalibrationSet, count: int, seed: int):
    """(x, t, y): ``count`` calibration inputs drawn (seeded) from all steps, on the model's device and
    dtype — the data of methods without time groups that take no per-step selection of their own."""
    parameter = next(model.parameters())
    one_group = np.zeros(len(calib.timesteps), dtype=np.int64)
    index = select_per_group(calib.step.numpy(), one_group, count, seed)
    x = calib.x[index].to(parameter.device, parameter.dtype)
    return x, calib.t[index].to(parameter.device), calib.y[index].to(parameter.device)


def calibration_cost(start: float, device: torch.device, quantized_layers: int, inputs: int, **extra) -> dict:
    """What every method reports: seconds since ``start``, peak memory, layers and inputs, and ``extra``."""
    peak, kind = peak_memory(device)
    return {
        "calibration_s": round(time.perf_counter() - start, 2),
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "quantized_layers": quantized_layers,
        "calibration_inputs": inputs,
        **extra,
    }


def start_cost(device: torch.device) -> float:
    """Begin measuring a calibration: reset the CUDA allocator's peak; returns the start time."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: the CUDA allocator's peak (reset when calibration starts) or the process's
    peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "process_max_rss"
