"""tqdit's DiT <-> diffusers' DiTTransformer2DModel (tqdit/models/diffusers_dit.py): same function, same
weights both ways, and loading from a folder or the local Hugging Face cache only."""

import json

import pytest
import torch

from tqdit.errors import TqditError
from tqdit.models import DiT, build_dit

pytest.importorskip("diffusers")
from tqdit.models.diffusers_dit import (  # noqa: E402  (needs diffusers)
    diffusers_config,
    from_diffusers,
    load_diffusers_dit,
    match_reference_dit,
    predict,
    to_diffusers,
    uses_reference_timesteps,
)

NUM_CLASSES = 10  # label 10 is the null class


def random_dit(std: float = 0.1) -> DiT:
    """Depth 2, hidden 64, 4 heads, patch 2, 8×8×4 input, learned sigma (8 output channels), 10 classes,
    every parameter redrawn from a seeded generator (the reference init zeroes adaLN and the final
    layer, which would hide a wrong conversion of them). std 0.1 keeps outputs of order 1 (max ≈ 3)."""
    dit = build_dit("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=NUM_CLASSES)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in dit.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return dit.eval()


def inputs():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 17, 250, 500, 750, 998, 999])
    y = torch.tensor([0, 1, 2, 5, 9, NUM_CLASSES, NUM_CLASSES, 3])  # the null class included
    return x, t, y


@pytest.fixture(scope="module")
def pair():
    dit = random_dit()
    return dit, to_diffusers(dit)


def max_difference(dit, transformer) -> tuple[float, float]:
    """(max |tqdit − diffusers|, max |tqdit|) on :func:`inputs`."""
    x, t, y = inputs()
    with torch.no_grad():
        ours, theirs = dit(x, t, y), predict(transformer, x, t, y)
    assert theirs.shape == ours.shape == (8, 8, 8, 8)
    return (theirs - ours).abs().max().item(), ours.abs().max().item()


def test_config_is_diffusers_dit_of_the_same_size(pair):
    dit, transformer = pair
    config = diffusers_config(dit)
    assert config == {key: transformer.config[key] for key in config}
    assert config["activation_fn"] == "gelu-approximate" and config["norm_eps"] == 1e-6
    assert (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]) == (2, 64)
    assert (config["in_channels"], config["out_channels"], config["num_embeds_ada_norm"]) == (4, 8, 10)
    table = transformer.transformer_blocks[1].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NUM_CLASSES + 1 == dit.y_embedder.embedding_table.num_embeddings
    assert uses_reference_timesteps(transformer) and not transformer.training


def test_converted_model_computes_the_same_function(pair):
    """float32, 8 inputs (t from 0 to 999, the null label twice); the outputs reach |2.74|.

    Measured (2-core CPU, torch 2.14.1, diffusers 0.42.1): max |difference| = 0.0 (bitwise equal).
    Tolerance: 1e-6 of the output scale (2.7e-6), room for other kernels' float32 rounding only.
    What a wrong conversion does on these inputs (max |difference|): to_k and to_v swapped 1.39; the
    blocks' adaLN shift and scale chunks swapped 0.77, their two gates swapped 2.61; proj_out_1's shift
    and scale swapped 2.13; label rows 9 and 10 (the null class) swapped 0.70; diffusers' own timestep
    frequencies 1.54; even the MLP LayerNorm at diffusers' default eps 1e-5 instead of 1e-6 3.3e-5,
    12x the tolerance. Mutations applied once to tqdit/models/diffusers_dit.py to see this test fail:
    ``q, v, k = qkv.chunk(3)`` in ``to_diffusers`` (difference 1.39; the round trip and load tests fail
    too), and ``to_diffusers`` returning the model without :func:`match_reference_dit` (1.54).
    """
    difference, scale = max_difference(*pair)
    assert scale > 1.0  # outputs of order 1: the tolerance below is relative to a real signal
    assert difference <= 1e-6 * scale, (difference, scale)


def test_diffusers_own_timestep_frequencies_give_another_function(pair):
    """diffusers embeds t with 10000^(-i/127), the reference with 10000^(-i/128): not a rounding effect."""
    dit, _ = pair
    stock = to_diffusers(dit, reference=False)
    assert not uses_reference_timesteps(stock)
    difference, scale = max_difference(dit, stock)
    assert difference > 0.1 * scale, (difference, scale)
    match_reference_dit(stock)
    difference, scale = max_difference(dit, stock)
    assert difference <= 1e-6 * scale


def test_matches_the_facebookresearch_dit_code(reference):
    """The reference code's own outputs (tests/fixtures/reference_dit.safetensors, weights std 0.2, outputs
    up to |30|) through its checkpoint -> tqdit DiT -> diffusers: same tolerance as tests/test_models.py."""
    dit = DiT(**reference["config"]).eval()
    dit.load_state_dict(reference["state"])
    transformer = to_diffusers(dit)
    with torch.no_grad():
        out = predict(transformer, reference["x"], reference["t"], reference["y"])
        stock = predict(to_diffusers(dit, reference=False), reference["x"], reference["t"], reference["y"])
    torch.testing.assert_close(out, reference["forward"], atol=5e-4, rtol=1e-5)  # measured: bitwise equal
    assert (stock - reference["forward"]).abs().max() > 1.0  # measured 18.5: diffusers as shipped differs


def test_round_trip_gives_the_same_state_dict_exactly(pair):
    dit, transformer = pair
    back = from_diffusers(transformer)
    assert type(back) is DiT and not back.training
    ours, theirs = dit.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert theirs[name].dtype == value.dtype and torch.equal(theirs[name], value), name
    sizes = ("input_size", "patch_size", "in_channels", "out_channels", "learn_sigma", "num_classes")
    for attribute in sizes:
        assert getattr(back, attribute) == getattr(dit, attribute), attribute


def test_conversion_refuses_what_the_other_side_cannot_hold(pair):
    dit, transformer = pair
    without_null = build_dit("DiT-S/2", input_size=8, depth=1, hidden_size=64, num_heads=4, num_classes=10,
                             class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        to_diffusers(without_null)
    edited = to_diffusers(dit)
    with torch.no_grad():
        edited.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias[0] += 1
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_2 differs"):
        from_diffusers(edited)


def test_loads_a_saved_model_folder_and_a_pipeline_folder(pair, tmp_path):
    dit, transformer = pair
    transformer.save_pretrained(tmp_path / "model")
    transformer.save_pretrained(tmp_path / "pipeline" / "transformer")
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    for folder, subfolder in (("model", None), ("pipeline", None), ("pipeline", "transformer")):
        loaded = load_diffusers_dit(str(tmp_path / folder), subfolder=subfolder)
        assert type(loaded) is type(transformer) and not loaded.training and uses_reference_timesteps(loaded)
        saved = transformer.state_dict()
        assert all(torch.equal(loaded.state_dict()[name], value) for name, value in saved.items())
        # the position table is recomputed by diffusers on loading (not saved); equal to tqdit's
        assert torch.equal(loaded.pos_embed.pos_embed, dit.pos_embed)
        difference, scale = max_difference(dit, loaded)
        assert difference <= 1e-6 * scale, (folder, subfolder, difference)
    assert not uses_reference_timesteps(load_diffusers_dit(str(tmp_path / "model"), reference=False))


def test_loads_a_hub_style_config(pair, tmp_path):
    """facebook/DiT-XL-2-256 was converted with Transformer2DModel (before DiTTransformer2DModel existed):
    its config names that class, has no norm_eps (so diffusers uses 1e-5) and carries keys of the generic
    class. Loaded with reference=True, the model is the reference function again (eps 1e-6)."""
    dit, transformer = pair
    folder = tmp_path / "hub" / "transformer"
    transformer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config = {key: value for key, value in config.items() if key != "norm_eps"}
    config |= {"_class_name": "Transformer2DModel", "cross_attention_dim": None, "num_vector_embeds": None,
               "only_cross_attention": False, "use_linear_projection": False}
    (folder / "config.json").write_text(json.dumps(config))
    stock = load_diffusers_dit(str(tmp_path / "hub"), reference=False)
    assert stock.config.norm_eps == 1e-5 and stock.transformer_blocks[0].norm3.eps == 1e-5
    loaded = load_diffusers_dit(str(tmp_path / "hub"))
    assert loaded.config.norm_eps == 1e-6 and loaded.transformer_blocks[0].norm3.eps == 1e-6
    difference, scale = max_difference(dit, loaded)
    assert difference <= 1e-6 * scale, difference


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_loads_a_pipeline_repo_from_the_local_cache(pair, tmp_path, monkeypatch):
    """A repo id in the Hugging Face cache (laid out as ``huggingface-cli download`` leaves it), offline."""
    import huggingface_hub.constants

    dit, transformer = pair
    snapshot = tmp_path / "hub" / "models--someone--tiny-dit" / "snapshots" / ("0" * 40)
    transformer.save_pretrained(snapshot / "transformer")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_diffusers_dit("someone/tiny-dit")
    difference, scale = max_difference(dit, loaded)
    assert difference <= 1e-6 * scale, difference
    assert "no-such" in one_line_error("someone/no-such-dit")


def one_line_error(path_or_repo: str, **kwargs) -> str:
    with pytest.raises(TqditError) as error:
        load_diffusers_dit(path_or_repo, **kwargs)
    message = str(error.value)
    assert "\n" not in message and path_or_repo in message, message
    return message


def test_a_missing_repo_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error("nobody/no-such-dit")
    assert "not in the local Hugging Face cache" in message
    assert "huggingface-cli download nobody/no-such-dit" in message and "save_pretrained" in message
    one_line_error("not a repo id")  # neither a folder nor a valid repo id: the same one line


def test_a_folder_without_a_dit_is_one_line(pair, tmp_path):
    _, transformer = pair
    (tmp_path / "empty").mkdir()
    assert "no config.json, nor transformer/config.json" in one_line_error(str(tmp_path / "empty"))
    assert "no vae/config.json" in one_line_error(str(tmp_path / "empty"), subfolder="vae")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert "holds a model of class AutoencoderKL" in one_line_error(str(tmp_path / "vae"))
    transformer.save_pretrained(tmp_path / "weightless")
    for weights in (tmp_path / "weightless").glob("*.safetensors"):
        weights.unlink()
    assert "the weights cannot be read" in one_line_error(str(tmp_path / "weightless"))
