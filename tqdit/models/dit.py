"""Diffusion Transformer (DiT), parameter-compatible with facebookresearch/DiT.

Module and parameter names follow the reference exactly (``blocks.0.attn.qkv.weight``,
``final_layer.linear.weight``, ...), so official checkpoints load with no key conversion.
Attention has two paths: PyTorch's fused ``scaled_dot_product_attention`` (fast, default) and an
explicit one (q·kᵀ, softmax, ·V through two :class:`MatMul` modules) that quantizers switch on to
reach both operands of each matmul, the post-softmax values included. A quantized model can set
``Attention.kernel`` to compute the explicit path's function in one kernel
(:mod:`tqdit.kernels.fused_attention`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: per-sample scale and shift broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features: cosines of all frequencies first, then sines (reference order)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        features = F.pad(features, (0, 1))
    return features


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position table of shape (grid_size², embed_dim), float64.

    Token k sits at row k // grid_size, column k % grid_size. As in the reference (MAE/DiT), the first
    half of the channels encodes the column and the second half the row; within each half, sines of
    all frequencies come before cosines.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for 2-D sin-cos embeddings, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij"
    )

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


class MatMul(nn.Module):
    """``a @ b`` as a module, so a quantizer can wrap both operands of an attention matmul."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens, via a strided convolution (key ``x_embedder.proj``)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """256-d sinusoidal features of t -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class LabelEmbedder(nn.Module):
    """Class-label table; the extra last row is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused path and an explicit, quantizable path."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.qk_matmul = MatMul()  # (q·scale) @ kᵀ
        self.av_matmul = MatMul()  # softmax(...) @ v
        self.fused = True  # quantizers set False to see q, k, the post-softmax values and v
        self.kernel = None  # optional f(attn, q, k, v) computing the explicit path in one kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.kernel is not None:
            out = self.kernel(self, q, k, v)
        else:
            scores = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
            out = self.av_matmul(scores.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


SQRT_8_OVER_PI = math.sqrt(8 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, 0.5·x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³).

    Eager: PyTorch's kernel. Compiled: the same function written x·σ(2u) (0.5·(1 + tanh(u)) = σ(2u)),
    which inductor's kernel computes with one fast exp instead of libdevice's tanh; the results
    differ by float32 rounding. It matters because the kernel after fc1 (GELU, and under real FP8
    the input quantization of fc2 fused into it) is arithmetic-bound: docs/performance.md.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(SQRT_8_OVER_PI * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = gelu_tanh
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: x + gate·branch(norm(x)·(1+scale)+shift)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Final norm with adaLN (shift, scale) and the linear map back to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer; predicts eps (and the variance interpolation if
    learn_sigma)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # A buffer, not a parameter: it is fixed, but the reference saves it in the state_dict.
        self.register_buffer(
            "pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float()[None]
        )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Training initialisation of the reference: xavier linears, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        patch_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for modulation in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1]
        ]:
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        """Label of the unconditional (null) embedding used by classifier-free guidance."""
        return self.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) tokens -> (N, C, H, W) image."""
        p, c = self.patch_size, self.out_channels
        grid = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], grid, grid, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, grid * p, grid * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) inputs, t: (N,) original timesteps 0..999, y: (N,) labels (null class allowed)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance as the reference applies it.

        The batch holds conditional labels in its first half and null labels in its second; only the
        first half of ``x`` is used (duplicated). Guidance ``u + s·(c − u)`` is applied to the first
        ``guided_channels`` output channels (3 in the reference, which leaves the fourth latent eps
        channel and the variance unguided); ``None`` guides all eps channels (standard CFG).
        Both halves of the result carry the guided channels.
        """
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        guided = self.in_channels if guided_channels is None else guided_channels
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2, dim=0)
        guided_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided_eps, guided_eps]), rest], dim=1)
