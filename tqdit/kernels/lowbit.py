"""Real low-bit inference for a calibrated model: INT8 or FP8 tensor-core matmuls, 8-bit weights.

``to_low_bit(model, backend)`` swaps the calibrated fake-quantized layers for ones that store 8-bit
weights and, where the activation quantizer is uniform, run the matmul in 8 bits:

- ``Int8Linear`` (``backend="int8"``) — a ``QuantLinear`` whose input quantizer is uniform (qkv,
  proj, fc1, adaLN): the input is rounded onto its *static calibrated* grid — per tensor, or per
  time group, each sample taking its own group's (Δ, z) — and the int8 codes are multiplied by the
  int8 weight codes with int32 accumulation (:mod:`tqdit.kernels.int8_gemm`). This computes the fake-
  quantized layer's function up to float32 rounding in the epilogue: the integer path of the same
  grids. (In a bf16 model the simulation rounds x̂ and ŵ to bf16, so there the int8 path is the
  more exact of the two.)
- ``Fp8Linear`` (``backend="fp8"``) — the same layers on FP8 (e4m3) tensor cores: the input is
  scaled by its static calibrated scale (per sample's group), cast to e4m3 and multiplied by the
  e4m3 weight with per-output-channel scales (``torch._scaled_mm``, row-wise scaling, bf16 out, the
  bias added in the GEMM's epilogue where this PyTorch supports it: :func:`fp8_bias_supported`). The
  e4m3 scales cover each calibrated range (activation: max(|low|, |high|) of its uniform grid;
  weight: the channel's max |ŵ|) with e4m3's ±448. FP8 is *not* the int8 grid: e4m3 keeps 3
  mantissa bits, so values are rounded relative to their magnitude rather than on a uniform grid
  (tests/test_lowbit.py compares the FIDs of the two paths, GPU only). Needs CUDA with FP8 support
  (compute capability ≥ 8.9).
- ``Fp8Mlp`` (``backend="fp8"``, on by default: ``to_low_bit(fuse_mlp=...)``) — a block's MLP whose
  fc1 and fc2 are both ``Fp8Linear`` (every uniform-input method, e.g. TGQ): fc1's GEMM applies GELU
  and writes fc2's e4m3 input codes from its epilogue (:mod:`tqdit.kernels.fp8_gemm`, a Triton kernel),
  so the largest activation never makes a bf16 round trip through memory.
- ``Int8WeightLinear`` (both backends) — a ``QuantLinear`` whose input quantizer has no fast
  kernel (TQ-DiT's post-GELU multi-region quantizer on fc2: two step sizes would need two integer
  matmuls): the weight is stored as its calibrated int8 codes and scales and dequantized inside the
  (compiled) graph; the input stays fake-quantized.
- Attention matmuls (q·kᵀ, softmax·V) stay simulated: MRQ's two regions have no single 8-bit form.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdit.models.dit import Mlp, gelu_tanh
from tqdit.kernels import int8_gemm
from tqdit.kernels.fp8_gemm import FP8, FP8_MAX  # importing it registers torch.ops.tqdit.fp8_linear_gelu
from tqdit.quant.layers import QuantLinear, replace_module
from tqdit.quant.quantizers import DynamicQuantizer, GroupWeightQuantizer, UniformQuantizer, per_sample

BACKENDS = ("int8", "fp8")


@functools.cache  # per device: every Fp8Linear asks
def _rowwise_fp8_matmul_correct(device: torch.device, with_bias: bool) -> bool:
    """Run one small row-wise scaled FP8 matmul (optionally with a bf16 bias) and check its value."""
    try:
        a = torch.ones(16, 32, device=device).to(FP8)
        b = torch.ones(16, 32, device=device).to(FP8).t()
        bias = torch.arange(16, device=device, dtype=torch.bfloat16) if with_bias else None
        out = torch._scaled_mm(
            a,
            b,
            scale_a=torch.ones(16, 1, device=device),
            scale_b=torch.ones(1, 16, device=device),
            bias=bias,
            out_dtype=torch.bfloat16,
        )
        expected = torch.full((16, 16), 32.0, device=device) + (0 if bias is None else bias.float())
        return bool(torch.allclose(out.float(), expected))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def fp8_supported(device: torch.device | str = "cuda") -> bool:
    """Whether row-wise scaled FP8 matmuls run here: checked by running one (the capability alone
    is not enough: row-wise scaling came to some GPUs in later PyTorch versions than others)."""
    device = torch.device(device)
    if (
        device.type != "cuda"
        or not torch.cuda.is_available()
        or torch.cuda.get_device_capability(device) < (8, 9)
    ):
        return False
    return _rowwise_fp8_matmul_correct(device, with_bias=False)


def fp8_bias_supported(device: torch.device | str = "cuda") -> bool:
    """Whether the row-wise scaled FP8 matmul also adds a bf16 bias in its epilogue here (checked by
    running one): then the bias costs no separate pass over the output (H200: 0.56 vs 1.04 ms for
    qkv at batch 128, benchmarks/gemm_8bit.py)."""
    return fp8_supported(device) and _rowwise_fp8_matmul_correct(torch.device(device), with_bias=True)


def refuse_input_scale(layer: QuantLinear) -> None:
    """The 8-bit layers compute x·W only: a layer whose input is balanced at run time (PTQ4DiT's
    ``balance=runtime``) would lose its factor; ``to_low_bit`` leaves those simulated."""
    if hasattr(layer, "input_scale"):
        raise ValueError("this layer multiplies its input by PTQ4DiT's run-time balancing factor, which the "
                         "8-bit kernels do not apply; keep it simulated (or calibrate with balance=fold)")


class Fp8Linear(nn.Module):
    """y = x W̃ᵀ + b on FP8 tensor cores with static calibrated scales (see module docstring)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        refuse_input_scale(layer)
        act = layer.act
        out_features, in_features = layer.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 GEMMs need in and out features that are multiples of 16, this linear has "
                             f"{in_features} → {out_features}: use quant.backend=int8 for this model")
        weight = layer.quantized_weight().detach().float()  # the calibrated 8-bit weight, dequantized
        weight_scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (weight / weight_scale[:, None]).to(FP8))
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())
        self.bias = (
            None
            if layer.bias is None
            else nn.Parameter(layer.bias.detach().to(torch.bfloat16), requires_grad=False)
        )
        low, high = (bound[:, 0].float() for bound in act.represented_range())
        self.register_buffer("act_scale", (torch.maximum(low.abs(), high.abs()) / FP8_MAX).clamp(min=1e-12))
        self.register_buffer("act_inv_scale", 1.0 / self.act_scale)
        self.context = act.context if act.groups > 1 else None
        self.out_features, self.in_features = weight.shape
        # decided once here, not per call: the probe is a matmul, which compiled graphs should not trace
        self.bias_in_matmul = self.bias is not None and fp8_bias_supported(weight.device)

    def row_scales(self, batch: int, rows: int) -> torch.Tensor:
        """(rows, 1) activation scales: the calibrated scale of each row's sample (its time group)."""
        return (
            per_sample(self.context, self.act_scale, batch)
            .repeat_interleave(rows // batch)
            .reshape(rows, 1)
            .contiguous()
        )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) e4m3 codes of x on its calibrated per-sample scale."""
        batch = x.shape[0]
        # scaled per sample as Int8Linear rounds: a (batch, 1, 1) multiplier, which inductor fuses into
        # the producer's kernel, rather than a division by the (rows, 1) scales the GEMM takes
        inv_scale = per_sample(self.context, self.act_inv_scale, batch).reshape(batch, 1, 1)
        per_sample_rows = x.reshape(batch, -1, self.in_features).float()
        return (per_sample_rows * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(-1, self.in_features)

    def matmul(self, x_fp8: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) input codes → (rows, out_features) bf16 output, bias added."""
        bias = self.bias if self.bias_in_matmul else None
        out = torch._scaled_mm(
            x_fp8,
            self.weight_fp8.t(),
            scale_a=row_scales,
            scale_b=self.weight_scale,
            bias=bias,
            out_dtype=torch.bfloat16,
        )
        if (
            self.bias is not None and not self.bias_in_matmul
        ):  # where the GEMM cannot add it (fp8_bias_supported)
            out = out + self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(self.quantize_input(x), self.row_scales(x.shape[0], x.numel() // self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Fp8Mlp(nn.Module):
    """A block's fc1 → GELU(tanh) → fc2 with both linears on FP8, fc1's GEMM applying GELU and writing
    fc2's e4m3 input codes from its epilogue (:mod:`tqdit.kernels.fp8_gemm`): the (tokens, 4·hidden)
    activation, the model's largest, is never written in bf16 and read back. The same function as
    ``fc2(gelu_tanh(fc1(x)))`` of the two :class:`Fp8Linear` up to how the GEMMs accumulate (Hopper's
    FP8 MMA keeps partial sums at reduced precision, cuBLAS's and Triton's alike). fc1's bias is
    always added in the fused kernel's epilogue, fc2's as :class:`Fp8Linear` adds it."""

    def __init__(self, fc1: Fp8Linear, fc2: Fp8Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows = x.shape[0], x.numel() // self.fc1.in_features
        codes = torch.ops.tqdit.fp8_linear_gelu(
            self.fc1.quantize_input(x),
            self.fc1.weight_fp8,
            per_sample(self.fc1.context, self.fc1.act_scale, batch).contiguous(),
            self.fc1.weight_scale.reshape(-1),
            self.fc1.bias,
            per_sample(self.fc2.context, self.fc2.act_inv_scale, batch).contiguous(),
            rows // batch,
            x.dtype,
        )
        out = self.fc2.matmul(codes, self.fc2.row_scales(batch, rows))
        return out.reshape(*x.shape[:-1], self.fc2.out_features).to(x.dtype)


def weight_codes(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero point) of the calibrated weight, codes (N, K) as float integers in
    [qmin, qmax], scale and zero point (N, 1) float: ŵ = (codes − zero point) · scale."""
    wq = layer.weight_quant
    quantized = layer.quantized_weight().detach()  # on the grid, whatever rounding the method learned
    scale, zero_point = wq.scale[0].float().reshape(-1, 1), wq.zero_point[0].float().reshape(-1, 1)
    return (
        torch.clamp(torch.round(quantized.float() / scale) + zero_point, wq.qmin, wq.qmax),
        scale,
        zero_point,
    )


def code_offset(quantizer: UniformQuantizer) -> int:
    """What is subtracted from a code to store it as int8: 128 for unsigned grids, 0 for signed."""
    return 128 if quantizer.qmin == 0 else 0


class Int8Linear(nn.Module):
    """y = x̂ Ŵᵀ + b as an int8 × int8 → int32 matmul of the calibrated codes (see module docstring)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        refuse_input_scale(layer)
        act, wq = layer.act, layer.weight_quant
        codes, scale, zero_point = weight_codes(layer)
        self.out_features, self.in_features = codes.shape
        if self.in_features > int8_gemm.MAX_EXACT_K:
            raise ValueError(
                f"int8 matmul with K={self.in_features} could overflow int32 "
                f"(at most {int8_gemm.MAX_EXACT_K})"
            )
        stored = (codes - code_offset(wq)).to(torch.int8)
        # one scale and offset per output channel (a per-tensor weight grid is expanded to all of them)
        offsets = (code_offset(wq) - zero_point).reshape(-1).expand(self.out_features).to(torch.int32)
        self.register_buffer("weight_codes", stored)
        self.register_buffer("weight_scale", scale.reshape(-1).expand(self.out_features).clone())
        self.register_buffer("weight_sum", stored.to(torch.int32).sum(dim=1, dtype=torch.int32))
        self.register_buffer(
            "weight_offset", offsets if bool((offsets != 0).any()) else None
        )  # None: symmetric weights
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        # the input grid per time group: round(x · (1/Δ)) + z, clamped, as fake_quant rounds it
        self.register_buffer("input_inv_scale", 1.0 / act.scale[:, 0].float())
        self.register_buffer("input_scale", act.scale[:, 0].float().clone())
        self.register_buffer("input_zero_point", act.zero_point[:, 0].float())
        self.register_buffer("input_offset", (code_offset(act) - act.zero_point[:, 0]).to(torch.int32))
        self.input_code_offset, self.qmin, self.qmax = code_offset(act), act.qmin, act.qmax
        self.context = act.context if act.groups > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        rows = x.numel() // self.in_features
        rows_per_sample = rows // batch
        inv_scale = per_sample(self.context, self.input_inv_scale, batch).reshape(batch, 1, 1)
        zero_point = per_sample(self.context, self.input_zero_point, batch).reshape(batch, 1, 1)
        per_sample_rows = x.reshape(batch, rows_per_sample, self.in_features).float()
        codes = torch.clamp(torch.round(per_sample_rows * inv_scale) + zero_point, self.qmin, self.qmax)
        a = (codes - self.input_code_offset).to(torch.int8).reshape(rows, self.in_features)
        out = torch.ops.tqdit.int8_linear(
            a,
            self.weight_codes,
            per_sample(self.context, self.input_scale, batch).contiguous(),
            per_sample(self.context, self.input_offset, batch).contiguous(),
            self.weight_scale,
            self.weight_offset,
            self.weight_sum,
            self.bias,
            rows_per_sample,
            x.dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8WeightLinear(nn.Module):
    """A quantized linear whose input stays fake-quantized; its weight is kept as int8 codes + scales."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        refuse_input_scale(layer)
        wq = layer.weight_quant
        self.act = layer.act
        codes, scale, zero_point = weight_codes(layer)
        self.register_buffer("codes", codes.to(torch.int8 if wq.qmin < 0 else torch.uint8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.weight_dtype = layer.weight.dtype

    def weight(self) -> torch.Tensor:
        return ((self.codes.float() - self.zero_point) * self.scale).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.weight(), self.bias)


def to_low_bit(model: nn.Module, backend: str = "fp8", fuse_mlp: bool = True) -> dict:
    """Swap calibrated QuantLinear layers in place for ``backend`` (``int8`` or ``fp8``, see module
    docstring); returns what was converted.

    Layers whose weight quantizer is off (no calibration) or not 8-bit, whose input quantizer is
    not 8-bit, or whose input is balanced at run time (PTQ4DiT's ``balance=runtime``), are left as
    they are. With ``fuse_mlp`` (FP8 only), every MLP whose fc1 and fc2 both
    became :class:`Fp8Linear` runs as one :class:`Fp8Mlp` (counted as ``fp8_mlp``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown low-bit backend '{backend}': use one of {', '.join(BACKENDS)}")
    if getattr(getattr(model, "quant_config", None), "error_model", "round") == "noise":
        raise ValueError(
            "the noise control adds noise instead of rounding: it has no low-bit form; keep it simulated"
        )
    runtime = [n for n, q in model.named_modules() if isinstance(q, (DynamicQuantizer, GroupWeightQuantizer))]
    if runtime:
        raise ValueError(f"{runtime[0]} has a grid computed from its tensor (Q-DiT, DiTAS): no 8-bit kernel "
                         "of tqdit runs those yet; keep the model simulated")
    fast, fast_name = (Int8Linear, "int8_linear") if backend == "int8" else (Fp8Linear, "fp8_linear")
    counts = {fast_name: 0, "int8_weight_linear": 0, "simulated": 0}
    names = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for name in names:
        layer = model.get_submodule(name)
        eight_bit = (
            not hasattr(layer, "input_scale")  # PTQ4DiT's run-time balancing: no kernel applies it; simulated
            and layer.weight_quant.enabled
            and layer.weight_quant.bits == 8
            and getattr(layer.act, "bits", None) == 8
        )
        if not eight_bit:
            counts["simulated"] += 1
            continue
        uniform_input = (
            isinstance(layer.act, UniformQuantizer) and layer.act.enabled and layer.act.scale.shape[1] == 1
        )
        new = fast(layer) if uniform_input else Int8WeightLinear(layer)
        counts[fast_name if uniform_input else "int8_weight_linear"] += 1
        replace_module(model, name, new)
    if backend == "fp8" and fuse_mlp:
        counts["fp8_mlp"] = fuse_fp8_mlps(model)
    return counts


def fuse_fp8_mlps(model: nn.Module) -> int:
    """Replace in place each GELU(tanh) MLP whose two linears are :class:`Fp8Linear` by an
    :class:`Fp8Mlp`; returns how many. (An fc2 with a multi-region input quantizer, as TQ-DiT's
    post-GELU one, is an :class:`Int8WeightLinear` and its MLP stays as it is.)"""
    names = [name for name, module in model.named_modules()
             if isinstance(module, Mlp) and module.act is gelu_tanh
             and isinstance(module.fc1, Fp8Linear) and isinstance(module.fc2, Fp8Linear)]
    for name in names:
        mlp = model.get_submodule(name)
        replace_module(model, name, Fp8Mlp(mlp.fc1, mlp.fc2))
    return len(names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward pass reads (parameters and weight buffers, not quantizer scales)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        for name in ("weight_fp8", "weight_codes", "codes"):
            buffer = getattr(module, name, None)
            if isinstance(buffer, torch.Tensor):
                total += buffer.numel() * buffer.element_size()
    return total
