"""Wrapping: which modules a setting quantizes (the scope) and the quantizers each one gets.

``wrap`` replaces each scoped Linear / attention MatMul by its quantized twin, with quantizers
chosen by the operand's position (MRQ for post-softmax and post-GELU when ``multi_region``;
symmetric for q, k, v and weights; asymmetric elsewhere) and ``time_groups`` parameter sets for
activations. Modules are found by role through the model's family (``tqdit.models.adapters``), so
every method runs on every DiT implementation the adapters know.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn

from tqdit.models.adapters import TQDIT, family_of
from tqdit.models.dit import MatMul
from tqdit.quant.config import POSITIONS, CalibrationConfig
from tqdit.quant.layers import PatchLinear, QuantLinear, QuantMatMul, quantizers, replace_module
from tqdit.quant.quantizers import (
    DynamicQuantizer,
    GeluMRQ,
    GroupWeightQuantizer,
    SoftmaxMRQ,
    TimeGroupContext,
    UniformNoise,
    UniformQuantizer,
)

# Named scopes, as roles. "blocks": every Linear in the DiT blocks (qkv, proj, fc1, fc2, adaLN modulation)
# and both attention matmuls (q·kᵀ and softmax·V, both operands). "all" adds the timestep MLP, the final
# layer (adaLN and linear) and the patch embedding (a Conv2d, quantized as the Linear over patches it is:
# ``PatchLinear``); it is what PTQ4DiT's code (and its Q-Diffusion runs) wrap. The label table and the
# norms stay in floating point. "linears": the blocks' Linears only, attention in floating point (its
# fused SDPA kernel) — the W8A8 setting of work that quantizes only the GEMMs. "tq_dit_code": TQ-DiT's
# released set (less its weight-only patch embedding). "gemms": qkv, proj, fc1, fc2 (Q-DiT's, DiTAS's code).
LINEAR_ROLES = ("qkv", "proj", "fc1", "fc2", "adaln")
SCOPES: dict[str, tuple[str, ...]] = {
    "blocks": LINEAR_ROLES + ("qk_matmul", "av_matmul"),
    "linears": LINEAR_ROLES,
    "tq_dit_code": ("qkv", "proj", "fc1", "fc2", "qk_matmul", "av_matmul", "final_linear"),
    # the blocks' four GEMMs: what Q-DiT's and DiTAS's code quantize
    "gemms": ("qkv", "proj", "fc1", "fc2"),
    "all": ("patch_embed",) + LINEAR_ROLES + ("qk_matmul", "av_matmul", "timestep_fc1", "timestep_fc2",
                                              "final_adaln", "final_linear"),
    # every Linear and the patch embedding, attention in floating point: PTQ4DM's code (its UNet's attention
    # is einsum, never wrapped)
    "all_linears": ("patch_embed",) + LINEAR_ROLES + ("timestep_fc1", "timestep_fc2", "final_adaln",
                                                      "final_linear"),
}
# Scopes that mean "every such layer": a family without some of their roles (diffusers' DiT has no
# shared timestep MLP: each block embeds the timestep itself) quantizes those it has.
EVERY_ROLE_THERE_IS = ("all", "all_linears")
# The activation operands of a module, by role (a module without a role: "post_norm").
ROLE_POSITIONS = {"qk_matmul": ("q", "k"), "av_matmul": ("post_softmax", "v"), "fc2": ("post_gelu",),
                  "proj": ("attn_out",), "timestep_fc1": ("timestep_freq",), "timestep_fc2": ("post_silu",),
                  "adaln": ("post_silu",), "final_adaln": ("post_silu",)}


def scope_patterns(model: nn.Module, scope: str | list[str]) -> list[str]:
    """Module-name patterns of ``scope``: a SCOPES name (resolved through the model's family) or patterns."""
    if isinstance(scope, str):
        if scope not in SCOPES:
            raise ValueError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)} or a list of "
                             "module-name patterns")
        family = family_of(model)
        missing = [role for role in SCOPES[scope] if not family.role_patterns(role)]
        if missing and scope not in EVERY_ROLE_THERE_IS:
            raise ValueError(f"scope={scope} needs roles {missing}, which {family.name} models lack; "
                             "use scope=blocks or a list of module-name patterns")
        return [pattern for role in SCOPES[scope] for pattern in family.role_patterns(role)]
    return list(scope)


def resolve_scope(model: nn.Module, scope: str | list[str]) -> list[str]:
    """Names of the Linear/MatMul modules (and the patch-embedding Conv2d) that ``scope`` (a SCOPES key or a
    pattern list) selects."""
    family_of(model).prepare(model)
    patterns = scope_patterns(model, scope)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, MatMul, nn.Conv2d))
        and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
    if not names:
        raise ValueError(f"scope {patterns} matches no Linear or attention matmul of the model")
    return names


def activation_positions(model: nn.Module, name: str) -> tuple[str, ...]:
    """What a scoped module's activation operands are, by its role in the model's family."""
    return ROLE_POSITIONS.get(family_of(model).role_of(name), ("post_norm",))


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


def _is_grouped(position: str, grouped: str | list) -> bool:
    return grouped == "all" or grouped == position or (not isinstance(grouped, str) and position in grouped)


def _activation_quantizer(
    position: str, cfg: CalibrationConfig, context: TimeGroupContext | None, linear: nn.Linear | None = None
) -> nn.Module:
    if cfg.activation_grid != "static":
        return _dynamic_quantizer(cfg, linear, position)
    groups = cfg.time_groups if _is_grouped(position, cfg.grouped) else 1
    ctx = context if groups > 1 else None
    bits = _activation_bits(cfg, position)
    if cfg.multi_region and position == "post_softmax":
        return SoftmaxMRQ(bits, groups, ctx)
    if cfg.multi_region and position == "post_gelu":
        return GeluMRQ(bits, groups, ctx)
    return UniformQuantizer(bits, symmetric=position in ("q", "k", "v"), groups=groups, context=ctx)


def _activation_bits(cfg: CalibrationConfig, position: str) -> int:
    """The operand's width: the post-softmax operand's own (``softmax_bits``) where set, else a_bits."""
    return cfg.softmax_bits if position == "post_softmax" and cfg.softmax_bits is not None else cfg.a_bits


def _dynamic_quantizer(cfg: CalibrationConfig, linear: nn.Linear | None, position: str) -> DynamicQuantizer:
    """Q-DiT's / DiTAS's run-time grids. A Linear's input gets ``group_size`` channel groups (Q-DiT) and
    smoothing factors (DiTAS); attention operands (in scope=blocks) the whole token or sample (kᵀ, the
    second operand of q·kᵀ, holds tokens in its columns)."""
    bits = _activation_bits(cfg, position)
    if cfg.activation_grid == "sample":  # DiTAS's code divides its range by 2^b
        channels = linear.in_features if (cfg.smoothing and linear is not None) else 0
        return DynamicQuantizer(bits, "sample", channels=channels, codes_per_range=2**bits)
    group_size = cfg.group_size if linear is not None else 0
    return DynamicQuantizer(bits, "token_groups", group_size=group_size,
                            channel_dim=-2 if position == "k" else -1)


def _weight_quantizer(cfg: CalibrationConfig, linear: nn.Linear) -> nn.Module:
    if cfg.weight_grid == "channel":
        return UniformQuantizer(cfg.w_bits, symmetric=cfg.weight_symmetric, channels=linear.out_features,
                                axis=0)
    return GroupWeightQuantizer(cfg.w_bits, cfg.weight_grid, cfg.group_size, linear.out_features,
                                linear.in_features, rank=cfg.low_rank)


def _read_time_groups(model, args, kwargs) -> None:
    """Forward pre-hook: this call's timesteps into the model's own context (the second argument of
    tqdit's DiT and of diffusers' DiT, or ``timestep=``).

    Looked up on the model at call time, not captured when the hook is made, so a deep copy of a
    quantized model follows its own timesteps (its quantizers hold the copied context)."""
    model.quant_context.set_timesteps(args[1] if len(args) > 1 else kwargs["timestep"])


def wrap(model: nn.Module, cfg: CalibrationConfig, timesteps: np.ndarray) -> list[str]:
    """Swap the scoped modules for quantized ones (in place); returns their names.

    With time groups, a forward pre-hook reads each call's timesteps into the shared context.
    Idempotent: wrapping a model already wrapped with the same settings changes nothing (no second
    hook, no quantizers inside quantizers); with other settings it is an error.
    """
    if getattr(model, "quant_config", None) is not None:
        if model.quant_config != cfg:
            raise ValueError("the model is already quantized with other settings; quantize a fresh copy of "
                             "the FP model")
        return [
            name for name, module in model.named_modules() if isinstance(module, (QuantLinear, QuantMatMul))
        ]
    if not isinstance(cfg.grouped, str):
        unknown = set(cfg.grouped) - set(POSITIONS)
        if unknown:
            raise ValueError(
                f"grouped has unknown positions {sorted(unknown)}; choose from {', '.join(POSITIONS)}"
            )
    names = resolve_scope(model, cfg.scope)
    context = None
    if cfg.time_groups > 1:
        context = TimeGroupContext(group_table(timesteps, cfg.time_groups))
        model.register_forward_pre_hook(_read_time_groups, with_kwargs=True)
    model.quant_context = context
    model.quant_config = cfg  # the effective settings (what a method chose), saved with the parameters
    device = next(model.parameters()).device
    family = family_of(model)
    wrapped = []
    for name in names:
        module = model.get_submodule(name)
        positions = activation_positions(model, name)
        role = family.role_of(name)
        if isinstance(module, nn.Conv2d):  # the patch embedding: quantized as the Linear it is
            patch = PatchLinear(module)
            replace_module(model, name, patch)
            name, module = f"{name}.linear", patch.linear
        wrapped.append(name)
        # PTQ4DM's code keeps its first and last layer at 8 bits below W8A8 (W16/A16 stay: the no-op check)
        eight_bit = role in cfg.eight_bit_roles
        own = replace(cfg, w_bits=max(8, cfg.w_bits), a_bits=max(8, cfg.a_bits)) if eight_bit else cfg
        if isinstance(module, MatMul):
            new = QuantMatMul(*(_activation_quantizer(p, own, context) for p in positions))
        else:
            act = _activation_quantizer(positions[0], own, context, module)
            new = QuantLinear(module, act, _weight_quantizer(own, module))
            if role in cfg.runtime_scaled_roles:
                new.add_input_scale()
        replace_module(model, name, new.to(module.weight.device if isinstance(module, nn.Linear) else device))
    use_explicit_attention(model)
    if cfg.error_model == "noise":  # a saved noise control being loaded (it calibrates with rounding)
        add_noise_instead_of_rounding(model)
    return wrapped


def use_explicit_attention(model: nn.Module) -> None:
    """Quantized matmuls need the explicit attention path (the fused kernel hides them)."""
    family = family_of(model)
    explicit = [any(isinstance(m, QuantMatMul) for m in (attn.qk_matmul, attn.av_matmul))
                for attn in family.attentions(model)]
    family.set_explicit_attention(model, explicit)


def reference_name(model: nn.Module, name: str) -> str:
    """A quantizer's name as it would be in tqdit's DiT (``blocks.3.attn.qkv.act``): the same operand has
    the same name in every family (the noise control's seeds are drawn from it)."""
    family = family_of(model)
    layer, _, operand = name.rpartition(".")
    role = family.role_of(layer)
    if role is None or family is TQDIT:
        return name
    if role in family.block_roles:
        number = layer[len(family.block_list) + 1 :].partition(".")[0]
        return f"{TQDIT.block_list}.{number}.{TQDIT.block_roles[role]}.{operand}"
    return f"{TQDIT.model_roles[role]}.{operand}"


def add_noise_instead_of_rounding(model: nn.Module) -> None:
    """The noise control: every uniform quantizer keeps its grid and adds noise of its step instead of
    rounding (``UniformNoise``); ``model.quant_config`` says so, so a saved model reloads the same way."""
    for name, quantizer in quantizers(model):
        if type(quantizer) is UniformQuantizer:
            UniformNoise.from_uniform(quantizer, reference_name(model, name))
    model.quant_config = replace(model.quant_config, error_model="noise")
    for module in model.modules():
        if isinstance(module, QuantLinear) and module._frozen_weight is not None:
            module.freeze()
