"""Real low-bit inference for a calibrated model: FP8 tensor-core matmuls on Hopper, 8-bit weights.

``to_low_bit(model)`` swaps the calibrated fake-quantized layers for ones that store 8-bit weights
and, where the activation quantizer is uniform, run the matmul on FP8 (e4m3) tensor cores:

- ``Fp8Linear`` — a ``QuantLinear`` whose input quantizer is uniform (qkv, proj, fc1, adaLN):
  the input is scaled by its *static calibrated* scale — per tensor, or per time group, gathered per
  sample and expanded to that sample's rows — cast to e4m3 and multiplied by the e4m3 weight with
  per-output-channel scales (``torch._scaled_mm``, row-wise scaling, bf16 out). The e4m3 scales
  cover each calibrated range (activation: max(|low|, |high|) of its uniform grid; weight: the
  channel's max |ŵ|) with e4m3's ±448.
- ``Int8WeightLinear`` — a ``QuantLinear`` whose input quantizer has no fast kernel (TQ-DiT's
  post-GELU multi-region quantizer on fc2): the weight is stored as its calibrated int8 codes and
  scales and dequantized inside the (compiled) graph; the input stays fake-quantized.
- Attention matmuls (q·kᵀ, softmax·V with MRQ) stay simulated: MRQ's two regions have no FP8 form.

FP8 is not the int8 grid: e4m3 keeps 3 mantissa bits, so values are rounded relative to their
magnitude rather than on a uniform grid. That is the point of comparing FIDs of the two paths
(tests/test_lowbit.py, GPU only). Needs CUDA with FP8 support (compute capability ≥ 8.9).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdit.quant.layers import QuantLinear
from tqdit.quant.quantizers import UniformQuantizer

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_supported(device: torch.device | str = "cuda") -> bool:
    """Whether row-wise scaled FP8 matmuls run here: checked by running one (the capability alone
    is not enough: row-wise scaling came to some GPUs in later PyTorch versions than others)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        a = torch.ones(16, 32, device=device).to(FP8)
        b = torch.ones(16, 32, device=device).to(FP8).t()
        out = torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                               out_dtype=torch.bfloat16)
        return bool(torch.allclose(out.float(), torch.full_like(out.float(), 32.0)))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class Fp8Linear(nn.Module):
    """y = x W̃ᵀ + b on FP8 tensor cores with static calibrated scales (see module docstring)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        act = layer.act
        weight = layer.quantized_weight().detach().float()  # the calibrated 8-bit weight, dequantized
        weight_scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (weight / weight_scale[:, None]).to(FP8))
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(torch.bfloat16), requires_grad=False)
        low, high = (bound[:, 0].float() for bound in act.represented_range())
        self.register_buffer("act_scale", (torch.maximum(low.abs(), high.abs()) / FP8_MAX).clamp(min=1e-12))
        self.context = act.context if act.groups > 1 else None
        self.out_features, self.in_features = weight.shape

    def row_scales(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, 1) activation scales: the calibrated scale of each row's sample (its time group)."""
        rows = x.numel() // self.in_features
        if self.context is None:
            return self.act_scale[:1].expand(rows).reshape(rows, 1).contiguous()
        per_sample = self.context.per_sample(self.act_scale, x.shape[0])
        return per_sample.repeat_interleave(rows // x.shape[0]).reshape(rows, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.row_scales(x)
        rows = x.reshape(-1, self.in_features).float()
        x_fp8 = (rows / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=scales, scale_b=self.weight_scale, out_dtype=torch.bfloat16)
        if self.bias is not None:  # added after: row-wise scaled FP8 GEMMs do not take a bias everywhere
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8WeightLinear(nn.Module):
    """A quantized linear whose input stays fake-quantized; its weight is kept as int8 codes + scales."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        wq = layer.weight_quant
        self.act = layer.act
        quantized = layer.quantized_weight().detach()  # on the grid, whatever rounding the method learned
        scale, zero_point = wq.scale[0].float().reshape(-1, 1), wq.zero_point[0].float().reshape(-1, 1)
        codes = torch.clamp(torch.round(quantized.float() / scale) + zero_point, wq.qmin, wq.qmax)
        self.register_buffer("codes", codes.to(torch.int8 if wq.qmin < 0 else torch.uint8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.weight_dtype = quantized.dtype

    def weight(self) -> torch.Tensor:
        return ((self.codes.float() - self.zero_point) * self.scale).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.weight(), self.bias)


def to_low_bit(model: nn.Module) -> dict:
    """Swap calibrated QuantLinear layers in place (see module docstring); returns what was converted.

    Layers whose weight quantizer is off (no calibration) or not 8-bit, or whose input quantizer is
    not 8-bit, are left as they are.
    """
    counts = {"fp8_linear": 0, "int8_weight_linear": 0, "simulated": 0}
    names = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for name in names:
        layer = model.get_submodule(name)
        eight_bit = layer.weight_quant.enabled and layer.weight_quant.bits == 8 and getattr(layer.act, "bits", None) == 8
        if not eight_bit:
            counts["simulated"] += 1
            continue
        uniform_input = isinstance(layer.act, UniformQuantizer) and layer.act.enabled and layer.act.scale.shape[1] == 1
        new = Fp8Linear(layer) if uniform_input else Int8WeightLinear(layer)
        counts["fp8_linear" if uniform_input else "int8_weight_linear"] += 1
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward pass reads (parameters and weight buffers, not quantizer scales)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        for name in ("weight_fp8", "codes"):
            buffer = getattr(module, name, None)
            if isinstance(buffer, torch.Tensor):
                total += buffer.numel() * buffer.element_size()
    return total
