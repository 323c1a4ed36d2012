"""Quantized layers: ``QuantLinear`` fake-quantizes its input (per-tensor, optionally per time group)
and its weight (per output channel); ``QuantMatMul`` fake-quantizes both operands of an attention
matmul. Which modules are wrapped is decided in ``wrapping.py``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdit.quant.quantizers import InputScale


class QuantLinear(nn.Module):
    """Linear with a fake-quantized input (``act``) and weight (``weight_quant``, per output channel).

    The frozen (quantized once) weight is derived state: after ``load_state_dict`` it is recomputed
    from the loaded weight and grid, so it never holds the values of the model it was copied from.
    """

    def __init__(self, linear: nn.Linear, act: nn.Module, weight_quant: nn.Module):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.act, self.weight_quant = act, weight_quant
        self._frozen_weight: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_refreeze_after_load)

    def quantized_weight(self) -> torch.Tensor:
        if self._frozen_weight is not None:
            return self._frozen_weight
        return self.weight_quant(self.weight)

    def freeze(self) -> None:
        """Quantize the weight once, so inference does not redo it every call."""
        self._frozen_weight = self.weight_quant(self.weight).detach() if self.weight_quant.enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.quantized_weight(), self.bias)

    def add_input_scale(self) -> None:
        """Multiply the input by ``input_scale`` (ones until set) before anything else sees it: a forward
        pre-hook, so capture hooks record the scaled input that the quantizer quantizes."""
        self.input_scale = InputScale(self.weight.shape[1]).to(self.weight.device)
        self.register_forward_pre_hook(_scale_input)


def _scale_input(module: QuantLinear, args: tuple) -> tuple:
    return (module.input_scale(args[0]),) + tuple(args[1:])


class PatchLinear(nn.Module):
    """A patch-embedding Conv2d (kernel = stride = patch size, no padding) computed as what it is: one
    Linear over every non-overlapping patch, unfolded channel-major as the kernel's weight is laid out.
    The engine then quantizes it like any Linear (its input per tensor, its weight per output channel),
    as the methods' code quantize the convolution. Equal to the convolution up to float summation order."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        plain = conv.groups == 1 and tuple(conv.dilation) == (1, 1) and tuple(conv.padding) == (0, 0)
        if tuple(conv.kernel_size) != tuple(conv.stride) or not plain:
            raise ValueError(f"{conv} is not a patch embedding (kernel = stride, no padding, one group): "
                             "leave it out of the scope")
        self.patch = tuple(conv.kernel_size)
        weight = conv.weight.detach()
        self.linear = nn.Linear(weight[0].numel(), conv.out_channels, bias=conv.bias is not None,
                                device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        patches = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (batch, patches, C·p·p)
        out = self.linear(patches).transpose(1, 2)
        return out.reshape(batch, -1, height // self.patch[0], width // self.patch[1])


def _refreeze_after_load(module: QuantLinear, incompatible_keys) -> None:
    with torch.no_grad():
        module.freeze()  # runs after its quantizers' own hooks (children load first)


class QuantMatMul(nn.Module):
    """``a @ b`` with both operands fake-quantized."""

    def __init__(self, a_quant: nn.Module, b_quant: nn.Module):
        super().__init__()
        self.a_quant, self.b_quant = a_quant, b_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quant(a) @ self.b_quant(b)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantizers(model: nn.Module):
    """(name, quantizer) for every quantizer module in the model."""
    from tqdit.quant.quantizers import CalibratedState

    return [(n, m) for n, m in model.named_modules() if isinstance(m, CalibratedState)]


@contextmanager
def quantization_disabled(model: nn.Module, activations_only: bool = False):
    """Run the wrapped model in full precision (calibration captures FP activations), then restore.

    ``activations_only``: weights stay quantized (block reconstruction's rounding-only phase).
    """
    saved = [
        (q, q.enabled)
        for name, q in quantizers(model)
        if not (activations_only and name.endswith("weight_quant"))
    ]
    frozen = (
        []
        if activations_only
        else [(m, m._frozen_weight) for m in model.modules() if isinstance(m, QuantLinear)]
    )
    for q, _ in saved:
        q.enabled = False
    for m, _ in frozen:
        m._frozen_weight = None
    try:
        yield
    finally:
        for q, state in saved:
            q.enabled = state
        for m, weight in frozen:
            m._frozen_weight = weight


def activation_ranges(model: nn.Module) -> list[dict]:
    """What each calibrated activation quantizer represents, per time group: rows of
    {layer, operand, kind, group, low, high} (MRQ post-softmax: its split as ``split``)."""
    from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ, UniformQuantizer

    rows = []
    for name, q in quantizers(model):
        if not q.enabled or name.endswith("weight_quant") or isinstance(q, InputScale):
            continue
        layer, _, operand = name.rpartition(".")
        for group in range(q.groups):
            if isinstance(q, UniformQuantizer):
                low, high = q.represented_range()
                row = {"kind": "uniform", "low": float(low[group, 0]), "high": float(high[group, 0])}
            elif isinstance(q, SoftmaxMRQ):
                row = {
                    "kind": "mrq_softmax",
                    "low": 0.0,
                    "high": 1.0,
                    "split": 2.0 ** -int(q.split_exponent[group]),
                }
            elif isinstance(q, GeluMRQ):
                row = {
                    "kind": "mrq_gelu",
                    "low": -q.negative_scale * 2 ** (q.bits - 1),
                    "high": float(q.positive_scale[group]) * q.levels,
                }
            else:
                continue
            rows.append({"layer": layer, "operand": operand, "group": group, **row})
    return rows


def prepare_for_compile(model: nn.Module) -> nn.Module:
    """Make a calibrated model's fake quantization traceable by ``torch.compile`` without graph breaks.

    Time-grouped quantizers then select their parameters by a device-side gather of the current
    group ids instead of a Python lookup (which would sync the device every call and specialise the
    compiled graph on the group, recompiling for each of up to 250 groups). Weights are quantized once
    (frozen), so the compiled graph sees constant weights. Eager results are unchanged.
    """
    context = getattr(model, "quant_context", None)
    if context is not None:
        context.tensor_only = True
    for module in model.modules():
        if isinstance(module, QuantLinear) and module._frozen_weight is None:
            module.freeze()
    return model
