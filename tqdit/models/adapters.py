"""Model families: where a DiT implementation keeps the operands that quantization methods touch.

The quantization engine never looks at a model class. It asks the model's ``Family`` for the modules
that play each role (qkv, proj, fc1, fc2, adaLN, the two attention matmuls, patch embedding, final
layer, timestep MLP), for the transformer blocks in order, and for how to call the model and one
block. Two families are known: tqdit's ``DiT`` (facebookresearch/DiT's layout) and diffusers'
``DiTTransformer2DModel`` (the Hugging Face layout of facebook/DiT-XL-2-256).

Both attention matmuls must be modules for a quantizer to reach their operands. tqdit's ``DiT`` has
them (``attn.qk_matmul``, ``attn.av_matmul``); for diffusers, ``prepare`` fuses each attention's
q, k, v projections into one Linear (diffusers' own ``fuse_projections``: ``attn1.to_qkv``, so q, k
and v share one input quantizer, as in the fused layout) and installs ``ExplicitAttnProcessor``,
which computes attention with two ``MatMul`` modules when ``explicit`` is set and with
``scaled_dot_product_attention`` otherwise. After ``prepare``, ``to_q``/``to_k``/``to_v`` are unused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdit.models.diffusers_dit import predict
from tqdit.models.dit import DiT, MatMul

# Roles of modules inside one transformer block, and outside the blocks.
BLOCK_ROLES = ("qkv", "proj", "fc1", "fc2", "adaln", "qk_matmul", "av_matmul")
MODEL_ROLES = ("patch_embed", "timestep_fc1", "timestep_fc2", "final_adaln", "final_linear")


@dataclass(frozen=True)
class Family:
    """How one DiT implementation names its parts and is called.

    ``block_roles``: role -> module name inside a block; ``model_roles``: role -> module name in the
    model (a role the family lacks is absent). ``units``: name prefixes whose modules are calibrated
    together, cut from the graph at that module (default: a block, or the top-level module).
    ``final_unit``: the module holding the final layer's adaLN and Linear, called ``(tokens, condition)``
    like a block, which reconstruction fits as one unit (PTQ4DiT's code: its ``QuantFinalLayer``); None:
    a family without one, whose final layers are fitted one at a time.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    block_list: str  # name of the submodule holding the blocks (an nn.ModuleList)
    block_roles: dict[str, str]
    model_roles: dict[str, str]
    predict: Callable  # (model, x, t, y) -> model output (N, C_out, H, W)
    embed: Callable  # (model, x, t, y) -> (tokens entering block 0, what each block is given besides them)
    run_block: Callable  # (block, tokens, condition) -> tokens
    output_shape: Callable  # model -> (C_out, H, W)
    attentions: Callable  # model -> the attention modules, one per block
    prepare: Callable = lambda model: None  # make both attention matmuls modules (idempotent)
    units: dict[str, str] = field(default_factory=dict)
    final_unit: str | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.block_list)

    def role_patterns(self, role: str) -> list[str]:
        """Module-name patterns (fnmatch) of ``role`` in a whole model; empty if the family lacks it."""
        if role in self.block_roles:
            return [f"{self.block_list}.*.{self.block_roles[role]}"]
        return [self.model_roles[role]] if role in self.model_roles else []

    def role_of(self, name: str) -> str | None:
        """The role of a module of the model by its name, or None."""
        if name.startswith(self.block_list + "."):
            inside = name[len(self.block_list) + 1 :].partition(".")[2]
            return next((role for role, local in self.block_roles.items() if local == inside), None)
        return next((role for role, full in self.model_roles.items() if full == name), None)

    def block_module(self, block: nn.Module, role: str) -> nn.Module:
        return block.get_submodule(self.block_roles[role])

    def unit_of(self, name: str) -> str:
        """The module whose call is cut from the graph when calibrating ``name``'s layers."""
        if name.startswith(self.block_list + "."):
            return ".".join(name.split(".")[: self.block_list.count(".") + 2])
        for prefix, unit in self.units.items():
            if name.startswith(prefix):
                return unit
        return name.split(".")[0]

    def set_explicit_attention(self, model: nn.Module, explicit: list[bool]) -> None:
        """Per block: compute attention through its two MatMul modules (True) or the fused kernel."""
        for attn, wanted in zip(self.attentions(model), explicit):
            attn.fused = not wanted
            attn.kernel = None  # a fused quantized kernel is installed only after calibration


# --- tqdit's DiT (facebookresearch/DiT's names) ------------------------------------------------------

def _dit_embed(model: DiT, x, t, y):
    return model.x_embedder(x) + model.pos_embed, model.t_embedder(t) + model.y_embedder(y, False)


TQDIT = Family(
    name="tqdit-dit",
    matches=lambda model: isinstance(model, DiT),
    block_list="blocks",
    block_roles={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                 "adaln": "adaLN_modulation.1", "qk_matmul": "attn.qk_matmul", "av_matmul": "attn.av_matmul"},
    model_roles={"patch_embed": "x_embedder.proj", "timestep_fc1": "t_embedder.mlp.0",
                 "timestep_fc2": "t_embedder.mlp.2", "final_adaln": "final_layer.adaLN_modulation.1",
                 "final_linear": "final_layer.linear"},
    predict=lambda model, x, t, y: model(x, t, y),
    embed=_dit_embed,
    run_block=lambda block, tokens, c: block(tokens, c),
    output_shape=lambda model: (model.out_channels, model.input_size, model.input_size),
    attentions=lambda model: [block.attn for block in model.blocks],
    units={"t_embedder.": "t_embedder.mlp"},
    final_unit="final_layer",
)


# --- diffusers' DiTTransformer2DModel ------------------------------------------------------------------

class ExplicitAttnProcessor:
    """diffusers self-attention computed as tqdit's DiT computes it, so its matmuls can be quantized.

    Uses the fused ``to_qkv`` projection and, when ``attn.fused`` is False, ``softmax((q·d^-½)·kᵀ)·v``
    through ``attn.qk_matmul`` and ``attn.av_matmul`` (the same operations, in the same order, as
    ``tqdit.models.dit.Attention``); when True, ``scaled_dot_product_attention``. Self-attention
    without masks only (what DiT uses); anything else is an error.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("ExplicitAttnProcessor computes unmasked self-attention only (DiT's)")
        batch, tokens, dim = hidden_states.shape
        heads = attn.heads
        qkv = attn.to_qkv(hidden_states).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if attn.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        elif attn.kernel is not None:
            out = attn.kernel(attn, q, k, v)
        else:
            scores = attn.qk_matmul(q * (dim // heads) ** -0.5, k.transpose(-2, -1))
            out = attn.av_matmul(scores.softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(batch, tokens, dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _is_diffusers_dit(model: nn.Module) -> bool:
    return type(model).__name__ == "DiTTransformer2DModel" and hasattr(model, "transformer_blocks")


@torch.no_grad()
def _prepare_diffusers(model: nn.Module) -> None:
    for block in model.transformer_blocks:
        attn = block.attn1
        if getattr(attn, "to_qkv", None) is None:
            attn.fuse_projections()
        if not isinstance(getattr(attn, "qk_matmul", None), nn.Module):
            attn.qk_matmul, attn.av_matmul = MatMul(), MatMul()
            attn.fused, attn.kernel = True, None
        if not isinstance(attn.processor, ExplicitAttnProcessor):
            attn.set_processor(ExplicitAttnProcessor())


def _diffusers_predict(model, x, t, y):
    _prepare_diffusers(model)
    return predict(model, x, t, y)


def _diffusers_embed(model, x, t, y):
    # Each diffusers block embeds (t, y) itself (its own copy of the timestep and label embedders), so
    # what a block is given besides the tokens is (t, y), stacked.
    return model.pos_embed(x), torch.stack([t.long(), y.long()], dim=1)


DIFFUSERS = Family(
    name="diffusers-dit",
    matches=_is_diffusers_dit,
    block_list="transformer_blocks",
    block_roles={"qkv": "attn1.to_qkv", "proj": "attn1.to_out.0", "fc1": "ff.net.0.proj", "fc2": "ff.net.2",
                 "adaln": "norm1.linear", "qk_matmul": "attn1.qk_matmul", "av_matmul": "attn1.av_matmul"},
    # No shared timestep MLP: every block holds its own copy inside norm1.emb.
    model_roles={"patch_embed": "pos_embed.proj", "final_adaln": "proj_out_1", "final_linear": "proj_out_2"},
    predict=_diffusers_predict,
    embed=_diffusers_embed,
    run_block=lambda block, tokens, c: block(tokens, timestep=c[:, 0], class_labels=c[:, 1]),
    output_shape=lambda model: (model.out_channels, model.config.sample_size, model.config.sample_size),
    attentions=lambda model: [block.attn1 for block in model.transformer_blocks],
    prepare=_prepare_diffusers,
)

class DiffusersDiT(nn.Module):
    """diffusers' ``DiTTransformer2DModel`` with tqdit's sampling interface: ``forward(x, t, y)``,
    ``forward_with_cfg``, ``in_channels``, ``input_size``, ``num_classes``, ``null_class`` (what the
    sampler and the calibration capture use). The transformer is ``self.transformer``, quantized in place."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.in_channels = transformer.config.in_channels
        self.out_channels = transformer.out_channels
        self.input_size = transformer.config.sample_size
        self.num_classes = transformer.config.num_embeds_ada_norm
        self.learn_sigma = self.out_channels == 2 * self.in_channels

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _diffusers_predict(self.transformer, x, t, y)

    forward_with_cfg = DiT.forward_with_cfg  # the same guidance, through this forward


def _inside(family: Family, prefix: str, unwrap: Callable) -> Family:
    """``family`` for a model that holds the implementation as submodule ``prefix``."""
    return replace(
        family, name=f"{family.name} (as {prefix})", matches=lambda model: isinstance(model, DiffusersDiT),
        block_list=f"{prefix}.{family.block_list}",
        model_roles={role: f"{prefix}.{name}" for role, name in family.model_roles.items()},
        predict=lambda model, x, t, y: model(x, t, y),
        embed=lambda model, x, t, y: family.embed(unwrap(model), x, t, y),
        output_shape=lambda model: family.output_shape(unwrap(model)),
        attentions=lambda model: family.attentions(unwrap(model)),
        prepare=lambda model: family.prepare(unwrap(model)),
        units={**{f"{prefix}.{p}": f"{prefix}.{u}" for p, u in family.units.items()},
               **{f"{prefix}.{name}": f"{prefix}.{name}" for name in family.model_roles.values()}},
        final_unit=None if family.final_unit is None else f"{prefix}.{family.final_unit}")


DIFFUSERS_WRAPPED = _inside(DIFFUSERS, "transformer", lambda model: model.transformer)
FAMILIES = (TQDIT, DIFFUSERS, DIFFUSERS_WRAPPED)


def family_of(model: nn.Module) -> Family:
    """The family of ``model``; an unknown model is an error naming the known ones."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    names = ", ".join(f.name for f in FAMILIES)
    raise TypeError(f"{type(model).__name__} is not a known DiT implementation ({names}); "
                    "add a Family for it in tqdit/models/adapters.py")
