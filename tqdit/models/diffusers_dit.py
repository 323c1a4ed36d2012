"""tqdit's DiT <-> diffusers' ``DiTTransformer2DModel`` (the Hugging Face layout of facebook/DiT-XL-2-256).

The two hold the same parameters under different names and groupings:

tqdit (facebookresearch/DiT)        diffusers
x_embedder.proj (Conv2d)            pos_embed.proj
pos_embed (buffer, 1×T×D)           pos_embed.pos_embed (a non-persistent buffer diffusers computes)
t_embedder.mlp.0 / mlp.2            transformer_blocks.N.norm1.emb.timestep_embedder.linear_1 / linear_2
y_embedder.embedding_table          transformer_blocks.N.norm1.emb.class_embedder.embedding_table
                                    (diffusers: one copy of both embedders per block)
blocks.N.attn.qkv (rows q, k, v)    transformer_blocks.N.attn1.to_q / to_k / to_v
blocks.N.attn.proj                  transformer_blocks.N.attn1.to_out.0
blocks.N.mlp.fc1 / fc2              transformer_blocks.N.ff.net.0.proj / ff.net.2
blocks.N.adaLN_modulation.1         transformer_blocks.N.norm1.linear
final_layer.adaLN_modulation.1      proj_out_1
final_layer.linear                  proj_out_2

Chunk orders agree, so those weights copy unchanged: the block modulation is (shift, scale, gate) for
attention then for the MLP in both, the final one (shift, scale) in both. The label table has
``num_classes + 1`` rows in both (the last is the null class of classifier-free guidance; diffusers
always adds it, so a tqdit DiT built with ``class_dropout_prob=0`` has no diffusers form). The
position tables are bitwise equal in float32 (column in the first half of the channels in both).

diffusers' DiT computes two things differently from facebookresearch/DiT; :func:`match_reference_dit`
undoes both (in place), and :func:`to_diffusers` and :func:`load_diffusers_dit` apply it by default:

* **Timestep frequencies.** The reference uses ``10000^(-i/128)``, i = 0..127; diffusers'
  ``CombinedTimestepLabelEmbeddings`` hard-codes ``downscale_freq_shift=1``, i.e. ``10000^(-i/127)``.
  The 256 sinusoidal features then differ by up to 1.94 (of a ±1 range) at t = 999, 0.28 at t = 100.
  Nothing in the model's config records it, so a model saved with ``save_pretrained`` and loaded by
  plain diffusers (``DiTPipeline``) uses diffusers' frequencies again.
* **MLP-branch LayerNorm epsilon.** ``norm3`` takes ``norm_eps``, 1e-5 by default (diffusers' DiT
  conversion script sets none, so facebook/DiT-XL-2-256 gets 1e-5); the reference uses 1e-6.
  :func:`diffusers_config` sets 1e-6. (The attention-branch and final LayerNorms use 1e-6 in both.)

The GELU is the same: the reference's tanh approximation is diffusers' ``activation_fn="gelu-approximate"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from tqdit.errors import TqditError
from tqdit.models.dit import DiT

DIT_EPS = 1e-6  # every LayerNorm of the reference DiT
# Transformer2DModel: configs written before diffusers had a DiT class (facebook/DiT-XL-2-256's)
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _transformer_class():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise TqditError("diffusers' DiT needs diffusers: pip install -e '.[latent]'") from None
    return DiTTransformer2DModel


def _sizes(dit: DiT) -> dict:
    """The sizes of a tqdit DiT, read from its modules (the constructor arguments are not all stored)."""
    block = dit.blocks[0]
    return dict(
        hidden=dit.x_embedder.proj.out_channels,
        heads=block.attn.num_heads,
        head_dim=block.attn.head_dim,
        depth=len(dit.blocks),
        mlp_hidden=block.mlp.fc1.out_features,
        table_rows=dit.y_embedder.embedding_table.num_embeddings,
    )


def diffusers_config(dit: DiT) -> dict:
    """The ``DiTTransformer2DModel`` constructor arguments of the same architecture as ``dit``.

    Raises ``ValueError`` for a DiT that diffusers' class cannot express: an MLP ratio other than 4
    (diffusers fixes it) or a label table without the null-class row (diffusers always has it).
    """
    sizes = _sizes(dit)
    if sizes["mlp_hidden"] != 4 * sizes["hidden"]:
        ratio = sizes["mlp_hidden"] / sizes["hidden"]
        raise ValueError(f"diffusers' DiT has MLP ratio 4; this DiT has {ratio:g}")
    if sizes["table_rows"] != dit.num_classes + 1:
        raise ValueError(
            f"diffusers' DiT has a label table of num_classes + 1 rows (the null class); this DiT has "
            f"{sizes['table_rows']} for {dit.num_classes} classes (built with class_dropout_prob=0)"
        )
    return dict(
        num_attention_heads=sizes["heads"],
        attention_head_dim=sizes["head_dim"],
        in_channels=dit.in_channels,
        out_channels=dit.out_channels,
        num_layers=sizes["depth"],
        dropout=0.0,
        attention_bias=True,
        sample_size=dit.input_size,
        patch_size=dit.patch_size,
        activation_fn="gelu-approximate",  # F.gelu(approximate="tanh"), the reference's GELU
        num_embeds_ada_norm=dit.num_classes,  # the number of classes (diffusers adds the null row)
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=DIT_EPS,  # diffusers' default is 1e-5 (used by the MLP branch's LayerNorm only)
    )


def match_reference_dit(transformer: nn.Module, reference: bool = True) -> nn.Module:
    """Make diffusers' DiT compute what facebookresearch/DiT computes (``reference=True``), in place.

    Sets every block's timestep frequencies to ``10000^(-i/128)`` (``downscale_freq_shift=0``) and its
    MLP-branch LayerNorm epsilon to 1e-6 (recorded in the config as ``norm_eps``). ``reference=False``
    restores diffusers' frequencies (``downscale_freq_shift=1``); the epsilon is left as it is.
    Returns ``transformer``.
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0 if reference else 1
        if reference:
            block.norm3.eps = DIT_EPS
    if reference and transformer.config.norm_eps != DIT_EPS:
        transformer.register_to_config(norm_eps=DIT_EPS)
    return transformer


def uses_reference_timesteps(transformer: nn.Module) -> bool:
    """Whether every block of diffusers' DiT embeds timesteps with the reference frequencies."""
    blocks = transformer.transformer_blocks
    return all(block.norm1.emb.time_proj.downscale_freq_shift == 0 for block in blocks)


# tqdit name -> diffusers name (each with its .weight and .bias where it has one)
MODEL_NAMES = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
               "final_layer.linear": "proj_out_2"}
BLOCK_NAMES = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
               "adaLN_modulation.1": "norm1.linear"}  # blocks.N.<key> -> transformer_blocks.N.<value>
EMBEDDER_NAMES = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
                  "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
                  "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}  # in every block


def _renamed(source: dict, names: dict, ours: str = "", theirs: str = "") -> dict:
    """``{theirs + names[k] + .kind: source[ours + k + .kind]}`` for each tensor of ``source`` named so."""
    return {f"{theirs}{new}.{kind}": source[f"{ours}{old}.{kind}"]
            for old, new in names.items() for kind in ("weight", "bias") if f"{ours}{old}.{kind}" in source}


@torch.no_grad()
def to_diffusers(dit: DiT, reference: bool = True) -> nn.Module:
    """A new ``DiTTransformer2DModel`` holding ``dit``'s weights (same dtype and device, eval mode).

    ``reference=True`` (default) keeps ``dit``'s function exactly (see :func:`match_reference_dit`);
    ``reference=False`` gives the model as stock diffusers runs it (its own timestep frequencies).
    The shared timestep MLP and label table are copied into every block's ``norm1.emb`` (diffusers'
    final layer reads block 0's); the position table is copied too (equal to diffusers' own).
    """
    transformer = _transformer_class()(**diffusers_config(dit))
    weight = dit.x_embedder.proj.weight
    transformer.to(device=weight.device).eval()
    if weight.dtype != transformer.dtype:  # (diffusers warns on any dtype cast)
        transformer.to(dtype=weight.dtype)
    source = dit.state_dict()
    target = _renamed(source, MODEL_NAMES)
    for n in range(len(dit.blocks)):
        ours, theirs = f"blocks.{n}.", f"transformer_blocks.{n}."
        target |= _renamed(source, BLOCK_NAMES, ours, theirs) | _renamed(source, EMBEDDER_NAMES, "", theirs)
        for kind in ("weight", "bias"):
            q, k, v = source[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)  # rows: q, k, v (reference order)
            target |= {f"{theirs}attn1.to_{name}.{kind}": part for name, part in zip("qkv", (q, k, v))}
    transformer.load_state_dict({name: value.clone() for name, value in target.items()}, strict=True)
    transformer.pos_embed.pos_embed.copy_(dit.pos_embed)  # non-persistent: not in the state_dict
    return match_reference_dit(transformer, reference)


def _dit_arguments(config) -> dict:
    """tqdit ``DiT`` constructor arguments from a diffusers config; ``ValueError`` if it is not a DiT's."""
    expected = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False)
    wrong = {key: config[key] for key, value in expected.items() if config[key] != value}
    if wrong:
        raise ValueError(f"not a facebookresearch/DiT architecture: {wrong} (a DiT has {expected})")
    out_channels = config["out_channels"] or config["in_channels"]
    if out_channels not in (config["in_channels"], 2 * config["in_channels"]):
        raise ValueError(f"out_channels={out_channels}: a DiT predicts in_channels, or 2·in_channels with "
                         "learned sigma")
    return dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        depth=config["num_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=4.0,
        class_dropout_prob=0.1,  # any value > 0: the table gets the null-class row, as diffusers' has
        num_classes=config["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * config["in_channels"],
    )


@torch.no_grad()
def from_diffusers(transformer: nn.Module) -> DiT:
    """A tqdit ``DiT`` with the weights of diffusers' DiT transformer; the inverse of :func:`to_diffusers`.

    ``to_q``, ``to_k``, ``to_v`` are stacked back into ``qkv``; the timestep MLP and label table are
    block 0's (the ones diffusers' final layer uses). Every other block must hold the same copy
    (``ValueError`` otherwise: tqdit's DiT shares one). The DiT computes the reference function, which
    is the transformer's own only with the reference timestep frequencies (:func:`match_reference_dit`).
    """
    dit = DiT(**_dit_arguments(transformer.config))
    weight = transformer.pos_embed.proj.weight
    dit.to(device=weight.device, dtype=weight.dtype).eval()
    source = transformer.state_dict()
    inverse = lambda names: {new: old for old, new in names.items()}  # noqa: E731
    target = _renamed(source, inverse(MODEL_NAMES))
    target |= _renamed(source, inverse(EMBEDDER_NAMES), "transformer_blocks.0.")
    target["pos_embed"] = transformer.pos_embed.pos_embed  # non-persistent there, saved here
    for n in range(len(transformer.transformer_blocks)):
        ours, theirs = f"blocks.{n}.", f"transformer_blocks.{n}."
        for name, value in _renamed(source, inverse(EMBEDDER_NAMES), theirs).items():
            if not torch.equal(value, target[name]):
                raise ValueError(f"{theirs}{EMBEDDER_NAMES[name.rsplit('.', 1)[0]]} differs from block 0's: "
                                 "tqdit's DiT has one timestep MLP and label table for all blocks")
        target |= _renamed(source, inverse(BLOCK_NAMES), theirs, ours)
        for kind in ("weight", "bias"):
            qkv = torch.cat([source[f"{theirs}attn1.to_{name}.{kind}"] for name in "qkv"], dim=0)
            fused = source.get(f"{theirs}attn1.to_qkv.{kind}")  # diffusers' fuse_projections keeps to_q/k/v
            if fused is not None and not torch.equal(fused, qkv):
                raise ValueError(f"{theirs}attn1.to_qkv differs from to_q, to_k, to_v stacked")
            target[f"{ours}attn.qkv.{kind}"] = qkv
    dit.load_state_dict({name: value.clone() for name, value in target.items()}, strict=True)
    return dit


def _not_found(path_or_repo: str) -> TqditError:
    return TqditError(
        f"model.diffusers={path_or_repo} is not in the local Hugging Face cache or a folder: download it "
        f"once with `huggingface-cli download {path_or_repo}` on a machine with internet, or give a folder "
        "saved by save_pretrained"
    )


def _check_config(config_file: str | Path, where: str) -> None:
    """A config.json that is not a DiT transformer's (a VAE's, a UNet's) is an error naming what it is."""
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as error:
        raise TqditError(f"model.diffusers={where}: cannot read {config_file} ({error}); give a folder saved "
                         "by save_pretrained") from None
    name, norm = config.get("_class_name"), config.get("norm_type", "ada_norm_zero")
    if name not in DIFFUSERS_CLASSES or norm != "ada_norm_zero":
        found = f"class {name}" if name not in DIFFUSERS_CLASSES else f"{name} with norm_type={norm}"
        raise TqditError(f"model.diffusers={where} holds a model of {found}, not a DiT transformer: "
                         "give a DiT pipeline (with transformer/) or its transformer folder")


def locate_diffusers_dit(path_or_repo: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, subfolder) for a folder or a repo id in the local cache; reads
    config files only, so a job checks it before any work. Missing: a one-line TqditError."""
    candidates = [subfolder] if subfolder is not None else [None, "transformer"]
    folder = Path(path_or_repo).expanduser()
    if folder.is_dir():
        for candidate in candidates:
            config_file = folder / (candidate or "") / "config.json"
            if config_file.is_file():
                _check_config(config_file, path_or_repo)
                return str(folder), candidate
        where = f"{subfolder}/config.json" if subfolder else "config.json, nor transformer/config.json"
        raise TqditError(f"model.diffusers={path_or_repo}: the folder has no {where}; give a folder saved by "
                         "save_pretrained (a DiT pipeline's or its transformer/)")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise TqditError("diffusers' DiT needs diffusers: pip install -e '.[latent]'") from None
    for candidate in candidates:
        try:
            config_name = f"{candidate}/config.json" if candidate else "config.json"
            cached = try_to_load_from_cache(path_or_repo, config_name)
        except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError) nor a folder
            raise _not_found(path_or_repo) from None
        if isinstance(cached, str):
            _check_config(cached, path_or_repo)
            return path_or_repo, candidate
    raise _not_found(path_or_repo)


def load_diffusers_dit(path_or_repo: str, subfolder: str | None = None, reference: bool = True) -> nn.Module:
    """diffusers' ``DiTTransformer2DModel`` (eval mode) from a folder or the local Hugging Face cache.

    ``path_or_repo`` is a folder written by ``save_pretrained`` or a repo id already in the cache
    (nothing is downloaded: ``local_files_only``). Without ``subfolder``, the model is looked for at
    the top, then under ``transformer/`` (where a pipeline such as facebook/DiT-XL-2-256 keeps it).
    ``reference=True`` (default) makes it compute facebookresearch/DiT's function
    (:func:`match_reference_dit`); ``reference=False`` leaves it as diffusers runs it.
    Anything missing is a one-line :class:`TqditError` naming the fix.
    """
    transformer_class = _transformer_class()
    source, found = locate_diffusers_dit(str(path_or_repo), subfolder)
    try:
        transformer = transformer_class.from_pretrained(
            source, subfolder=found, local_files_only=True, low_cpu_mem_usage=False
        )
    except OSError as error:  # config present, weights absent (an interrupted download)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fix = ("save the model there again with save_pretrained" if Path(source).is_dir() else
               f"download it again with `huggingface-cli download {path_or_repo}`")
        message = f"model.diffusers={path_or_repo}: the weights cannot be read ({first}); {fix}"
        raise TqditError(message) from None
    return match_reference_dit(transformer.eval(), reference)


def predict(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """diffusers' DiT on latents ``x`` (N, C, H, W), original timesteps ``t`` (N,), labels ``y`` (N,)."""
    return transformer(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
