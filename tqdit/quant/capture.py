"""Capture, per calibration unit (a DiT block, the final layer, the timestep MLP): the FP inputs of
its scoped layers and, for the Hessian criterion, the gradient of L = ⟨r, model output⟩ (a fixed
N(0, 1) probe r per input) at each layer output. The unit's inputs are cut from the graph, so the
backward pass stops at the unit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tqdit.models.adapters import family_of
from tqdit.quant.layers import quantization_disabled


def capture_unit(model: nn.Module, unit: str, names: list[str], x, t, y, probes, need_grads: bool,
                 batch: int) -> dict:
    """FP inputs (and output gradients) of the scoped modules ``names`` inside ``unit``, per
    calibration input."""
    records = {name: {"inputs": None, "grads": []} for name in names}
    family = family_of(model)
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
                # An output that does not depend on the unit's float inputs (diffusers' adaLN: its block
                # embeds the integer timestep and label itself) becomes a leaf, so ∂L/∂O still reaches it.
                output = output if output.requires_grad else output.detach().requires_grad_()
                output.register_hook(lambda grad: entry["grads"].extend(grad.detach().unbind(0)))
                return output
        return hook

    def cut_graph(module, args):
        return tuple(
            a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args
        )

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(forward_hook(name)))
    if need_grads:
        handles.append(model.get_submodule(unit).register_forward_pre_hook(cut_graph))
    try:
        with quantization_disabled(model):
            for start in range(0, len(t), batch):
                part = slice(start, start + batch)
                with torch.set_grad_enabled(need_grads):
                    out = family.predict(model, x[part], t[part], y[part])
                    if need_grads:
                        (out.float() * probes[part]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return records  # gradients arrive batch by batch (one backward each), so they line up with the inputs


def check_finite(name: str, operands: list[list[torch.Tensor]], groups: torch.Tensor) -> None:
    """Stop calibration at the first layer whose recorded data hold NaN/Inf, naming it and the time group."""
    for slot in operands:
        bad = torch.stack([~torch.isfinite(x).all() for x in slot])
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"calibration: {name} sees NaN/Inf values (time group {int(groups[first])}, "
                f"calibration input {first}); the FP model diverges on its calibration data"
            )
