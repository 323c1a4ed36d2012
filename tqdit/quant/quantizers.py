"""Quantizer primitives: uniform (symmetric/asymmetric, per-tensor/per-channel) and TQ-DiT's two
multi-region quantizers (post-softmax, post-GELU), all optionally holding one parameter set per
time group.

Every quantizer is a fake quantizer: it returns dequantized values, so a quantized model runs with
ordinary kernels. Rounding is round-half-to-even through ``torch.fake_quantize_per_*_affine`` (one
fused kernel, with the straight-through gradient inside the clipping range for methods that learn).

Time groups: a quantizer built with ``groups = G > 1`` stores G parameter sets (leading dimension)
and reads the current per-sample group ids from a shared :class:`TimeGroupContext`, filled once per
model call from the timesteps. Selection is a tensor gather, never a Python branch per layer.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn

# The fixed range of MRQ's negative post-GELU region, as TQ-DiT's released code sets it. The tanh GELU
# DiT uses has its minimum at −0.170041 (x ≈ −0.7525), the erf GELU at −0.169971 (x ≈ −0.7518):
# the code's constant is the erf one, so the tanh GELU's lowest values (below −0.16997) are clipped
# onto the most negative code by at most 7.1e-5, 5 % of the negative step at 8 bits (1.3 % at 6).
GELU_MIN = 0.16997124254703522  # the code's constant to the digit (tests/test_official_code.py)


class TimeGroupContext:
    """Per-sample time-group ids shared by all grouped quantizers of one model."""

    def __init__(self, group_of_timestep: torch.Tensor):
        self.group_of_timestep = group_of_timestep  # (1000,) int64: original timestep -> group
        self.groups: torch.Tensor | None = None  # (batch,) int64, set per model call
        self.single: int | None = None  # the group when the whole batch shares one (always while sampling)
        # For torch.compile: never read group ids back to Python (no device sync, no graph break, no
        # recompilation per group); every quantizer then gathers its parameters per sample on the device.
        self.tensor_only = False

    def set_timesteps(self, t: torch.Tensor) -> None:
        table = self.group_of_timestep.to(t.device)
        self.set_groups(table[t.long()])

    def set_groups(self, groups: torch.Tensor) -> None:
        self.groups = groups
        if self.tensor_only:
            self.single = None
            return
        first = int(groups[0])
        self.single = first if bool((groups == first).all()) else None

    def per_sample(self, values: torch.Tensor, batch: int) -> torch.Tensor:
        """values (G,) -> (batch,) for the current call's samples."""
        if self.groups is None or self.groups.shape[0] != batch:
            raise RuntimeError(
                "time-grouped quantizer called without the timesteps of this batch "
                f"(groups for {None if self.groups is None else self.groups.shape[0]} samples, batch {batch})"
            )
        return values[self.groups]


class CalibratedState(nn.Module):
    """What every quantizer shares: whether it is calibrated, as a ``state_dict`` buffer.

    ``calibrated`` travels with ``state_dict`` / ``load_state_dict``; after a load, a hook refreshes
    the quantizer (its Python-number caches and ``enabled``) from the loaded buffers, so a reloaded
    model computes what the saved one did. ``enabled`` is the run-time switch (calibration turns it
    off temporarily to capture full-precision data); it follows ``calibrated`` after every load.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.enabled = False  # off until calibrated
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def refresh(self) -> None:
        """Mark calibrated, enable, and cache what forward reads (after setting or loading parameters)."""
        self.calibrated.fill_(True)
        self.enabled = True


def _refresh_after_load(module: CalibratedState, incompatible_keys) -> None:
    if bool(module.calibrated):
        module.refresh()
    else:
        module.enabled = False


class InputScale(CalibratedState):
    """b (in_features,) multiplied into a QuantLinear's input ahead of its quantizer: PTQ4DiT's balancing
    as its code runs it (divided at run time, not folded), so the layer computes Q(x·b)·Q(W/b)ᵀ. A
    re-parameterisation, not a quantizer: it applies whether quantization is on or off."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("factor", torch.ones(channels))

    @property
    def enabled(self) -> bool:  # on once set; the switches that turn quantization off do not apply
        return bool(self.calibrated)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        pass

    def set_factor(self, factor: torch.Tensor) -> None:
        self.factor.copy_(factor)
        self.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor.to(x.dtype)


def per_sample(context: TimeGroupContext | None, values: torch.Tensor, batch: int) -> torch.Tensor:
    """(groups,) parameter values -> (batch,): each sample's time group's, or the one value of an
    ungrouped quantizer (``context`` None) for all — a device gather, no Python branch per group."""
    return context.per_sample(values, batch) if context is not None else values[:1].expand(batch)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, qmin, qmax) − zero_point, times scale (computed in float32).

    ``axis`` None: one (scale, zero_point) for the tensor; otherwise one per index along ``axis``.
    With gradients, PyTorch's fused fake-quantize ops provide the straight-through estimator; without,
    four in-place passes are used, which on the CPU run 3× faster than those ops (same values:
    both round x·(1/scale) half to even).
    """
    dtype = x.dtype
    x = x.float()
    scale = scale.float().to(x.device)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32)
    if torch.is_grad_enabled() and x.requires_grad:
        if axis is None:
            out = torch.fake_quantize_per_tensor_affine(
                x, scale.reshape(()), zero_point.reshape(()), qmin, qmax
            )
        else:
            out = torch.fake_quantize_per_channel_affine(
                x, scale.reshape(-1), zero_point.reshape(-1), axis % x.dim(), qmin, qmax
            )
        return out.to(dtype)
    if axis is None:
        shape = ()
    else:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape).float()
    out = x * (1.0 / scale)
    out.round_()
    out = (
        torch.clamp(out, qmin - zero_point, qmax - zero_point)
        if axis is not None or zero_point.dim()
        else out.clamp_(qmin - zero_point.item(), qmax - zero_point.item())
    )
    return out.mul_(scale).to(dtype)


def fake_quant_scalar(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """``fake_quant`` with Python-number parameters: no device sync, in-place passes on the CPU path."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, qmin, qmax).to(x.dtype)
    out = x.float() * (1.0 / scale)
    out.round_().clamp_(qmin - zero_point, qmax - zero_point)
    return out.mul_(scale).to(x.dtype)


class UniformQuantizer(CalibratedState):
    """Uniform quantizer: x̂ = (clamp(round(x/Δ) + z, qmin, qmax) − z)·Δ.

    symmetric: signed codes, z = 0. asymmetric: unsigned codes with a zero point.
    ``channels``: per-channel along ``axis`` (weights: output channels) when > 1.
    ``groups``: time groups (activations only). ``bits >= 16`` is a real 16-bit grid (a near no-op check).
    """

    def __init__(self, bits: int, symmetric: bool, channels: int = 1, axis: int = 0, groups: int = 1,
                 context: TimeGroupContext | None = None):
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"bit width {bits} is outside the supported 2..16")
        if groups > 1 and channels > 1:
            raise ValueError("per-channel quantizers cannot be time-grouped")
        if groups > 1 and context is None:
            raise ValueError("a time-grouped quantizer needs a TimeGroupContext")
        self.bits, self.symmetric, self.axis, self.groups, self.context = (
            bits,
            symmetric,
            axis,
            groups,
            context,
        )
        self.qmin, self.qmax = qrange(bits, signed=symmetric)
        self.register_buffer("scale", torch.ones(groups, channels))
        self.register_buffer("zero_point", torch.zeros(groups, channels, dtype=torch.int32))

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Parameters that map [low, high] onto the code range.

        ``low``/``high`` broadcast to (groups, channels): a scalar, (channels,) for per-channel
        weights, or (groups, 1) for time-grouped activations.
        """
        scale, zero_point = range_to_params(low, high, self.bits, self.symmetric)
        self.scale.copy_(scale.expand_as(self.scale))
        self.zero_point.copy_(zero_point.expand_as(self.zero_point))
        self.refresh()

    def represented_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) per group and channel, (groups, channels), in float64: the values the grid
        represents."""
        scale, zero_point = self.scale.double(), self.zero_point.double()
        return (self.qmin - zero_point) * scale, (self.qmax - zero_point) * scale

    def refresh(self) -> None:
        """Enable the quantizer and cache per-tensor parameters as Python numbers (after setting or
        loading)."""
        super().refresh()
        if self.scale.shape[1] == 1:
            self._scalars = [
                (float(s), int(z)) for s, z in zip(self.scale[:, 0].tolist(), self.zero_point[:, 0].tolist())
            ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.scale.shape[1] > 1:
            return fake_quant(x, self.scale[0], self.zero_point[0], self.qmin, self.qmax, axis=self.axis)
        group = 0 if self.groups == 1 else self.context.single
        if group is None:  # samples from several time groups in one batch
            batch = x.shape[0]
            scale = self.context.per_sample(self.scale[:, 0], batch)
            zero_point = self.context.per_sample(self.zero_point[:, 0], batch)
            return fake_quant(x, scale, zero_point, self.qmin, self.qmax, axis=0)
        scale, zero_point = self._scalars[group]
        return fake_quant_scalar(x, scale, zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, channels={self.scale.shape[1]}, groups={self.groups}"


def hash_uniform(codes: torch.Tensor, positions: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """A deterministic pseudo-random value in [−½, ½] per element, from a hash (MurmurHash3's 32-bit
    finaliser, in int64 arithmetic masked to 32 bits) of its grid index, its position in its sample
    and ``salt`` (one per quantizer, so two operands never share their draws).

    Keyed on the grid index, the draw changes only where rounding itself would (float round-off of
    a batched matmul moves it no more often than it moves a rounded code); keyed on the position,
    values that share a grid cell still get unrelated draws. The same on every device."""
    mask = 0xFFFFFFFF
    h = ((codes.to(torch.int64) * 0x9E3779B1) ^ (positions * 0x27D4EB2F) ^ salt) & mask
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return h.to(torch.float32) * 2.0**-32 - 0.5


class UniformNoise(UniformQuantizer):
    """The noise control's operand: x + Δ·u, u ∈ [−½, ½] from ``hash_uniform``, on the calibrated
    grid's step Δ (per channel, per time group) — rounding's error size (variance Δ²/12) without its
    structure: no clipping and no error that is a function of where x sits in its grid cell. Same
    buffers as the uniform quantizer, so calibration, saving and loading are unchanged. Positions
    count within one sample (a weight is one sample), so sample i never depends on its batch;
    ``salt`` is a hash of the quantizer's name in the model (``name_noise``)."""

    salt = 0

    @classmethod
    def from_uniform(cls, quantizer: UniformQuantizer, name: str) -> "UniformNoise":
        """The same quantizer, adding noise instead of rounding (its grid and buffers unchanged)."""
        quantizer.__class__ = cls
        quantizer.salt = zlib.crc32(name.encode())
        return quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.scale.shape[1] > 1:  # a weight, per output channel
            shape = [1] * x.dim()
            shape[self.axis % x.dim()] = -1
            step = self.scale[0].reshape(shape).to(x.device)
            positions = torch.arange(x.numel(), device=x.device).reshape(x.shape)
        else:
            if self.groups > 1 and self.context.single is None:
                step = self.context.per_sample(self.scale[:, 0], x.shape[0]).reshape(
                    (-1,) + (1,) * (x.dim() - 1)
                )
            else:
                step = self._scalars[0 if self.groups == 1 else self.context.single][0]
            positions = torch.arange(x[0].numel(), device=x.device).reshape(x.shape[1:])
        xf = x.float()
        return (xf + step * hash_uniform(torch.round(xf / step), positions, self.salt)).to(x.dtype)


def range_to_params(
    low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of a uniform grid covering [low, high]; symmetric grids cover
    ±max(|low|, |high|)."""
    low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(low.abs(), high.abs()) / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
        scale = (high - low) / (qmax - qmin)
        zero_point = torch.clamp(torch.round(-low / scale.clamp(min=1e-12)), qmin, qmax).to(torch.int32)
    return scale.clamp(min=1e-8), zero_point


def two_region_quant(
    x: torch.Tensor, threshold, step_below, step_above, qmin: int, qmax: int
) -> torch.Tensor:
    """Each value on its own region's grid: step = step_below if x < threshold else step_above,
    x̂ = clamp(round(x · (1/step)), qmin, qmax) · step. Parameters are Python numbers or per-sample
    tensors shaped to broadcast over x. With gradients, a straight-through estimator.

    The reciprocal is taken of the (per-sample) step, not per element: as in ``fake_quant``, and
    compiled it spares every element a float division (the post-GELU tensor is DiT's largest).
    Tensor parameters are used in float32 (their reciprocal too); Python numbers are rounded to
    float32 after the reciprocal. Without gradients on the CPU, ``_two_region_quant_cpu`` computes
    the same values faster."""
    tensors = any(isinstance(v, torch.Tensor) for v in (threshold, step_below, step_above))
    if tensors:
        step_below = torch.as_tensor(step_below, dtype=torch.float32, device=x.device)
        step_above = torch.as_tensor(step_above, dtype=torch.float32, device=x.device)
    inv_below, inv_above = 1.0 / step_below, 1.0 / step_above
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        below, above = (step_below, inv_below), (step_above, inv_above)
        return _two_region_quant_cpu(x, threshold, below, above, qmin, qmax)
    xf = x.float()
    below_mask = xf < threshold
    step = torch.where(below_mask, step_below, step_above)
    inv_step = torch.where(below_mask, inv_below, inv_above)
    out = (xf * inv_step).round_().clamp_(qmin, qmax).mul_(step)
    if torch.is_grad_enabled() and x.requires_grad:
        out = xf + (out - xf).detach()
    return out.to(x.dtype)


# Elements per pass of the CPU path below: a chunk and its scratch (2 MiB) stay in the L2 cache.
CPU_CHUNK = 1 << 18


def _two_region_quant_cpu(x: torch.Tensor, threshold, below: tuple, above: tuple, qmin: int, qmax: int):
    """``two_region_quant`` on the CPU without gradients (sampling, the scale search), ``below`` and
    ``above`` being (step, 1/step) pairs: the same float32 operations on the same operands, so the same
    values bit for bit, except that a zero may come back as +0 where the reference gives −0; 5–8× faster
    on DiT's post-GELU and post-softmax tensors.

    The reference's ``where`` over a per-element step is the slowest CPU kernel of a fake-quantized
    DiT, and each of its passes streams the whole tensor through memory. Here the tensor goes in chunks
    of whole samples (about ``CPU_CHUNK`` elements, so that per-sample parameters slice along with
    them); each chunk is split exactly into its two regions, x_below = x·[x < threshold] and
    x_above = x − x_below (one of the two is x, the other 0), each is quantized on its own grid in
    place (0 stays 0: it lies on both grids) and the two are added. Inputs must be finite (softmax and
    GELU outputs are).
    """
    xf = x.float().reshape((1,) + x.shape) if x.dim() == 0 else x.float()
    out = torch.empty_like(xf)
    samples = max(1, CPU_CHUNK // max(1, xf[0].numel()))
    scratch = torch.empty((min(samples, xf.shape[0]),) + xf.shape[1:])

    def rows(value, part: slice):  # a per-sample parameter's rows for this chunk
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == xf.shape[0] > 1:
            return value[part]
        return value

    for start in range(0, xf.shape[0], samples):
        part = slice(start, start + samples)
        chunk, high = xf[part], out[part]
        low = scratch[: chunk.shape[0]]
        torch.lt(chunk, rows(threshold, part), out=low)  # 1.0 where x < threshold
        low.mul_(chunk)
        torch.sub(chunk, low, out=high)
        low.mul_(rows(below[1], part)).round_().clamp_(qmin, qmax).mul_(rows(below[0], part))
        high.mul_(rows(above[1], part)).round_().clamp_(qmin, qmax).mul_(rows(above[0], part))
        high.add_(low)
    return out.view(x.shape).to(x.dtype)


class _MultiRegionQuantizer(CalibratedState):
    """What both MRQ quantizers share: the bit-width check and picking the searched parameter of the
    current time group (``searched()``: one value per group) before ``quantize``."""

    def __init__(self, bits: int, groups: int, context: TimeGroupContext | None):
        super().__init__()
        if not 3 <= bits <= 16:
            raise ValueError(f"multi-region quantization needs 3..16 bits, got {bits}")
        self.bits, self.groups, self.context = bits, groups, context
        self.levels = 2 ** (bits - 1) - 1

    def searched(self) -> torch.Tensor:
        raise NotImplementedError

    def refresh(self) -> None:
        """Enable, and cache the per-group values as Python numbers (no device sync per call)."""
        super().refresh()
        self._values = self.searched().tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        group = 0 if self.groups == 1 else self.context.single
        if group is None:  # samples from several time groups in one batch
            return self.quantize(x, self.context.per_sample(self.searched(), x.shape[0]))
        return self.quantize(x, self._values[group])


class SoftmaxMRQ(_MultiRegionQuantizer):
    """Multi-region quantizer for post-softmax values in [0, 1] (TQ-DiT MRQ; PTQ4ViT's twin uniform).

    With b bits, one code bit selects the region and b−1 bits index inside it. Values below the
    split s = 2^-i use Δ_lo = s / (2^(b-1) − 1) on [0, s]; values at or above s use
    Δ_hi = 1 / (2^(b-1) − 1) on [0, 1]. Δ_hi / Δ_lo = 2^i, a power of two. Each value is quantized
    in its own region only (the released code adds both branches, offsetting large values by s).
    ``split_exponent`` i (0..19) is the searched parameter, one per time group.
    """

    def __init__(self, bits: int, groups: int = 1, context: TimeGroupContext | None = None):
        super().__init__(bits, groups, context)
        self.register_buffer("split_exponent", torch.zeros(groups, dtype=torch.int64))

    def searched(self) -> torch.Tensor:
        return self.split_exponent

    def set_split(self, exponent: torch.Tensor) -> None:
        self.split_exponent.copy_(torch.as_tensor(exponent).long().reshape(self.groups))
        self.refresh()

    def quantize(self, x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
        """Quantize with per-sample split exponents ``exponent`` (batch,) or one exponent for all."""
        if isinstance(exponent, int):
            split = 2.0**-exponent
        else:
            split = torch.pow(2.0, -torch.as_tensor(exponent, device=x.device).float()).reshape(
                (-1,) + (1,) * (x.dim() - 1)
            )
        return two_region_quant(x, split, split / self.levels, 1.0 / self.levels, 0, self.levels)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, splits=2^-{self.split_exponent.tolist()}"


class GeluMRQ(_MultiRegionQuantizer):
    """Multi-region quantizer for post-GELU values (TQ-DiT MRQ).

    Negative values (GELU ≥ −0.16997, see GELU_MIN) use a fixed Δ₋ = 0.16997 / 2^(b-1) on [−0.16997, 0]
    with codes −2^(b-1)..0; positive values use a searched Δ₊ on [0, (2^(b-1) − 1)·Δ₊]. Each value is
    quantized in its own region. ``positive_scale`` Δ₊ is the searched parameter, one per time group.
    """

    def __init__(self, bits: int, groups: int = 1, context: TimeGroupContext | None = None):
        super().__init__(bits, groups, context)
        self.negative_scale = GELU_MIN / 2 ** (bits - 1)
        self.register_buffer("positive_scale", torch.ones(groups))

    def searched(self) -> torch.Tensor:
        return self.positive_scale

    def set_positive_scale(self, scale: torch.Tensor) -> None:
        self.positive_scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(self.groups))
        self.refresh()

    def quantize(self, x: torch.Tensor, positive_scale: torch.Tensor | float) -> torch.Tensor:
        """Quantize with per-sample positive steps (batch,) or one step for all."""
        if not isinstance(positive_scale, float):
            positive_scale = torch.as_tensor(positive_scale, device=x.device, dtype=torch.float32).reshape(
                (-1,) + (1,) * (x.dim() - 1)
            )
        return two_region_quant(
            x, 0.0, self.negative_scale, positive_scale, -(2 ** (self.bits - 1)), self.levels
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, negative_step={self.negative_scale:.3g}"


def minmax_fake_quant(x: torch.Tensor, bits: int, dims, codes_per_range: int | None = None,
                      clamp_zero: bool = False) -> torch.Tensor:
    """Asymmetric round-to-nearest onto a grid from the min and max over ``dims`` (kept), in float32:
    Δ = (max − min) / D, z = round(−min / Δ), x̂ = (clamp(round(x / Δ) + z, 0, 2^b − 1) − z)·Δ.

    D = 2^b − 1 (``codes_per_range`` None: the grid's ends are min and max; Q-DiT's code) or
    ``codes_per_range`` (DiTAS's code divides by 2^b, so the top value is clipped one step below max).
    No gradient path (these grids are not learned). Δ is floored at 1e-5 / D (a constant slice).
    ``clamp_zero`` (Q-DiT's code): z clamped to [0, 2^b − 1], so a group whose values all share one sign
    is clipped at one end; DiTAS's code does not clamp (its group min is always a code).
    """
    xf = x.float()
    low, high = xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)
    qmax = 2**bits - 1
    divisor = qmax if codes_per_range is None else codes_per_range
    scale = (high - low).clamp(min=1e-5) / divisor
    zero_point = torch.round(-low / scale)
    if clamp_zero:
        zero_point = zero_point.clamp(0, qmax)
    codes = torch.clamp(torch.round(xf / scale) + zero_point, 0, qmax)
    return ((codes - zero_point) * scale).to(x.dtype)


class DynamicQuantizer(CalibratedState):
    """Activation quantizer whose grid is computed at run time from the tensor itself (nothing
    calibrated): asymmetric min/max round-to-nearest (``minmax_fake_quant``).

    ``granularity``:
    - ``token_groups`` (Q-DiT's code): one grid per token and per group of ``group_size`` consecutive
      channels of dimension ``channel_dim`` (``group_size`` 0: the whole token), every other dimension
      indexing tokens;
    - ``sample`` (DiTAS, per sample): one grid per sample over all its elements.
    ``smoothing`` (DiTAS): a per-channel factor s of the last dimension; the quantizer sees x / s and
    returns its values times s, i.e. Q(x / s)·s — SmoothQuant's migration with s folded back into the
    weight side, which is the same product as Q(x / s)·(diag(s)·Wᵀ) up to float rounding.
    The grid of a sample never depends on the other samples of its batch.
    """

    def __init__(self, bits: int, granularity: str, group_size: int = 0, channels: int = 0,
                 codes_per_range: int | None = None, channel_dim: int = -1):
        super().__init__()
        self.groups = 1  # no time groups: the grid is the tensor's own
        if granularity not in ("token_groups", "sample"):
            raise ValueError(f"unknown dynamic granularity {granularity!r}: use token_groups or sample")
        self.bits, self.granularity, self.codes_per_range = bits, granularity, codes_per_range
        self.channel_dim = channel_dim  # -2 for kᵀ of q·kᵀ (its tokens are columns)
        self.register_buffer("group_size", torch.tensor(group_size, dtype=torch.int64))
        self.register_buffer("smoothing", torch.ones(channels))  # (channels,) or () when unused
        self._group = group_size

    def set_group_size(self, group_size: int) -> None:
        self.group_size.fill_(group_size)
        self.refresh()

    def set_smoothing(self, factors: torch.Tensor) -> None:
        self.smoothing.copy_(factors)
        self.refresh()

    def refresh(self) -> None:
        super().refresh()
        self._group = int(self.group_size)
        self._smoothed = bool((self.smoothing != 1).any()) if self.smoothing.numel() else False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self._smoothed:
            return self.quantize(x / self.smoothing.to(x.dtype)) * self.smoothing.to(x.dtype)
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "sample":  # DiTAS
            return minmax_fake_quant(x, self.bits, tuple(range(1, x.dim())), self.codes_per_range)
        if self.channel_dim != -1:
            return self._token_groups(x.transpose(self.channel_dim, -1)).transpose(self.channel_dim, -1)
        return self._token_groups(x)

    def _token_groups(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        group = self._group or width
        if width % group:
            raise ValueError(f"dynamic group size {group} does not divide the {width} channels of this "
                             "operand; choose quant.params.group_size (and group_sizes) that divide it")
        grouped = x.reshape(*x.shape[:-1], width // group, group)  # Q-DiT
        quantized = minmax_fake_quant(grouped, self.bits, (-1,), self.codes_per_range, clamp_zero=True)
        return quantized.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, dynamic {self.granularity}, group_size={int(self.group_size)}"


class GroupWeightQuantizer(CalibratedState):
    """Weight quantizer with one asymmetric min/max grid per group of weights (no search, no learning).

    ``layout``:
    - ``input_groups`` (Q-DiT): each output row split into contiguous groups of ``group_size`` input
      channels (``group_size`` must divide in_features, as Q-DiT's code asserts);
    - ``strided`` (DiTAS's code): the flattened weight viewed as (``group_size``, −1), one grid per
      column of that view, i.e. ``group_size`` elements of one input column in rows out/``group_size``
      apart, with Δ = (max − min)/2^b as that code computes it.
    ``rank`` > 0 (DiTAS): a low-rank term kept in floating point. DiTAS alternates K times
    Q_k = Q(W − L_{k−1}R_{k−1}), L_kR_k = best rank-r fit of W − Q_k, and keeps Q_K and L_KR_K, so
    Ŵ = Q(W − shift) + L·R with ``shift`` = L_{K−1}R_{K−1} (``shift_left @ shift_right``) and L·R =
    ``lora_left @ lora_right`` (see ``ditas.fit_low_rank``); the layer's quantized input multiplies both.
    """

    def __init__(self, bits: int, layout: str, group_size: int, out_features: int, in_features: int,
                 rank: int = 0):
        super().__init__()
        self.groups = 1
        if layout not in ("input_groups", "strided"):
            raise ValueError(f"unknown weight group layout {layout!r}: use input_groups or strided")
        self.bits, self.layout = bits, layout
        self.register_buffer("group_size", torch.tensor(group_size, dtype=torch.int64))
        self.register_buffer("lora_left", torch.zeros(out_features, rank))
        self.register_buffer("lora_right", torch.zeros(rank, in_features))
        self.register_buffer("shift_left", torch.zeros(out_features, rank))
        self.register_buffer("shift_right", torch.zeros(rank, in_features))
        # True: the layer's weight parameter already holds its rounded values (Q-DiT's GPTQ, on a grid
        # whose parameters it chose column by column), so it is used as it is
        self.register_buffer("rounded_offline", torch.zeros((), dtype=torch.bool))
        self._group, self._rounded_offline = group_size, False

    def set_group_size(self, group_size: int) -> None:
        self.group_size.fill_(group_size)
        self.refresh()

    def refresh(self) -> None:
        super().refresh()
        self._group, self._rounded_offline = int(self.group_size), bool(self.rounded_offline)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(shift, L·R), or None without a low-rank term."""
        if self.lora_left.shape[1] == 0:
            return None
        return self.shift_left @ self.shift_right, self.lora_left @ self.lora_right

    def quantize_groups(self, weight: torch.Tensor) -> torch.Tensor:
        out_features, in_features = weight.shape
        group = self._group
        if self.layout == "strided":
            if weight.numel() % group:
                raise ValueError(f"strided weight groups of {group} elements do not divide a "
                                 f"{tuple(weight.shape)} weight; choose a quant.params.group_elements that "
                                 "does")
            view = weight.reshape(group, -1)
            quantized = minmax_fake_quant(view, self.bits, (0,), codes_per_range=2**self.bits)
            return quantized.reshape(weight.shape)
        if in_features % group:
            raise ValueError(f"weight group size {group} does not divide in_features={in_features}; "
                             "choose a group size that divides it")
        view = weight.reshape(out_features, in_features // group, group)  # Q-DiT
        return minmax_fake_quant(view, self.bits, (-1,), clamp_zero=True).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self._rounded_offline:
            return weight
        low_rank = self.low_rank()
        if low_rank is None:
            return self.quantize_groups(weight)
        shift, added = low_rank  # float32, as fitted: the fitted codes, whatever the model's dtype
        return (self.quantize_groups(weight.float() - shift) + added).to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, {self.layout}, group_size={int(self.group_size)}, "
                f"rank={self.lora_left.shape[1]}")
