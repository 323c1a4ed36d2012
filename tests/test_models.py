"""The DiT equals the reference implementation on the official key layout."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tqdit.models import DIT_CONFIGS, CheckpointError, DiT, build_dit, load_dit_weights, read_state_dict
from tqdit.models.dit import gelu_tanh


def small_model(reference) -> DiT:
    return DiT(**reference["config"]).eval()


def set_attention(model: DiT, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused = fused


@pytest.mark.parametrize("fused", [True, False])
def test_forward_equals_reference_outputs(reference, fused, tmp_path):
    path = tmp_path / "official.pt"
    torch.save(reference["state"], path)  # a bare state_dict with the official key names
    model = load_dit_weights(small_model(reference), path)
    set_attention(model, fused)
    x, t, y = reference["x"], reference["t"], reference["y"]
    # outputs reach |18|, and float32 rounding in the timestep frequencies (t·ω up to 999 rad; exp and
    # sin kernels differ between CPUs, AVX2 vs AVX-512) moves the t = 999 sample's by up to 2.2e-4 on
    # some machines: tolerance 5e-4 absolute, 3e-5 of the largest output. (The erf GELU in place of
    # the tanh one, the subtlest wrong model, moves them by 1.1e-3.)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference["forward"], atol=5e-4, rtol=1e-5)
        cfg_out = model.forward_with_cfg(x, t, y, 1.5)
    torch.testing.assert_close(cfg_out, reference["forward_with_cfg"], atol=5e-4, rtol=1e-5)


def functional_dit(state: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT forward written from the paper's equations on the raw state_dict, sharing no code with tqdit."""
    p, hidden, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    n, c, size, _ = x.shape
    g = size // p
    # patchify: token (i, j) holds x[:, :, i*p:(i+1)*p, j*p:(j+1)*p] flattened channel-major
    patches = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
    w = state["x_embedder.proj.weight"].reshape(hidden, -1)
    tokens = patches @ w.T + state["x_embedder.proj.bias"]
    # position table: column coordinate in the first half, row in the second; sin then cos
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(g, dtype=torch.float64).repeat_interleave(g)
    cols = torch.arange(g, dtype=torch.float64).repeat(g)
    table = torch.cat([torch.sin(cols[:, None] * omega), torch.cos(cols[:, None] * omega),
                       torch.sin(rows[:, None] * omega), torch.cos(rows[:, None] * omega)], dim=1)
    tokens = tokens + table.float()
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    tf = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], dim=1)
    lin = lambda v, name: v @ state[f"{name}.weight"].T + state[f"{name}.bias"]  # noqa: E731
    cond = (
        lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
        + state["y_embedder.embedding_table.weight"][y]
    )
    norm = lambda v: F.layer_norm(v, (hidden,), eps=1e-6)  # noqa: E731
    head_dim = hidden // heads
    for b in range(cfg["depth"]):
        pre = f"blocks.{b}"
        mod = lin(F.silu(cond), f"{pre}.adaLN_modulation.1").unsqueeze(1)
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(hidden, dim=-1)
        h = norm(tokens) * (1 + sc1) + sh1
        q, k, v = lin(h, f"{pre}.attn.qkv").split(hidden, dim=-1)
        split = lambda m: m.reshape(n, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
        attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        a = (attn @ split(v)).transpose(1, 2).reshape(n, -1, hidden)
        tokens = tokens + g1 * lin(a, f"{pre}.attn.proj")
        h = norm(tokens) * (1 + sc2) + sh2
        tokens = tokens + g2 * lin(F.gelu(lin(h, f"{pre}.mlp.fc1"), approximate="tanh"), f"{pre}.mlp.fc2")
    shift, scale = lin(F.silu(cond), "final_layer.adaLN_modulation.1").unsqueeze(1).split(hidden, dim=-1)
    out = lin(norm(tokens) * (1 + scale) + shift, "final_layer.linear")
    out_c = out.shape[-1] // (p * p)
    return out.reshape(n, g, g, p, p, out_c).permute(0, 5, 1, 3, 2, 4).reshape(n, out_c, size, size)


@pytest.mark.parametrize("fused", [True, False])
def test_forward_equals_independent_computation(fused):
    cfg = dict(
        input_size=16, patch_size=4, in_channels=3, hidden_size=96, depth=3, num_heads=6, num_classes=7
    )
    model = DiT(**cfg).eval()
    with torch.no_grad():  # randomise every weight, including the zero-initialised ones
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    set_attention(model, fused)
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 5, 500, 999]), torch.tensor([0, 6, 7, 3])
    with torch.no_grad():
        expected = functional_dit(model.state_dict(), cfg, x, t, y)
        torch.testing.assert_close(model(x, t, y), expected, atol=1e-5, rtol=1e-4)


def test_compiled_gelu_is_the_tanh_approximation():
    """Compiled, GELU(tanh) is written x·σ(2u): the same function up to float32 rounding."""
    x = torch.linspace(-12, 12, 20001)
    expected = (
        0.5
        * x.double()
        * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)))
    )
    torch.testing.assert_close(gelu_tanh(x).double(), expected, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(torch.compile(gelu_tanh)(x).double(), expected, atol=2e-6, rtol=1e-6)


def test_official_configurations():
    assert len(DIT_CONFIGS) == 13  # XL/L/B/S × patch 2/4/8, plus the embedded model
    with torch.device("meta"):
        xl = build_dit("DiT-XL/2", input_size=32)
        s8 = build_dit("DiT-S/8", input_size=32)
    state = xl.state_dict()
    assert len(state) == 292  # as in the released DiT-XL-2-256x256.pt
    assert state["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 8, 1152)
    assert state["pos_embed"].shape == (1, 256, 1152)
    assert (
        sum(v.numel() for v in state.values()) == 675_129_632
    )  # "675M" in the DiT paper, pos_embed included
    assert len(s8.blocks) == 12 and s8.x_embedder.num_patches == 16
    with pytest.raises(ValueError, match="unknown DiT configuration 'DiT-XXL/2'"):
        build_dit("DiT-XXL/2", input_size=32)


def test_checkpoint_of_another_architecture_is_explained(reference, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in reference["state"].items()}, str(path))
    other = DiT(**{**reference["config"], "depth": 3, "hidden_size": 32, "num_heads": 4})
    with pytest.raises(CheckpointError) as error:
        load_dit_weights(other, path)
    message = str(error.value)
    assert "missing keys: blocks.2." in message
    assert "shape mismatches" in message and "hidden 64, depth 2, patch 2" in message


def test_damaged_and_unsafe_checkpoints_are_refused(reference, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(reference["state"], good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated download"):
        read_state_dict(truncated)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"blocks.0.attn.qkv.weight": Exploit()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(evil)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")


def test_training_checkpoint_prefers_ema(reference, tmp_path):
    path = tmp_path / "0400000.pt"
    ema = reference["state"]
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "ema": ema}, path)
    loaded = read_state_dict(path)
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
