"""The fused quantized attention kernel (tqdit/kernels/fused_attention.py) computes the explicit path's
function.

On the CPU the Triton kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1
when no GPU is present); on a GPU the same tests run compiled, plus one at DiT-XL/2's shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from test_lowbit import calibrated
from tqdit.models.dit import Attention
from tqdit.kernels import fused_attention
from tqdit.kernels.fused_attention import use_fused_attention
from tqdit.quant.layers import QuantMatMul
from tqdit.quant.quantizers import SoftmaxMRQ, TimeGroupContext, UniformQuantizer

pytestmark = pytest.mark.skipif(not fused_attention.available(), reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized_attention(
    dim: int,
    heads: int,
    post_softmax: str,
    bits: int = 8,
    device: str = DEVICE,
    dtype=torch.float32,
    symmetric: bool = True,
):
    """An Attention with time-grouped (2 groups) quantizers on every operand and hand-set ranges.

    ``symmetric=False``: q, k, v on asymmetric grids and a post-softmax grid reaching below 0, so
    every operand has a nonzero zero point."""
    context = TimeGroupContext(torch.arange(1000) // 500)
    attn = Attention(dim, heads).to(device=device, dtype=dtype)

    def uniform(low, high, symmetric=True):
        quantizer = UniformQuantizer(bits, symmetric=symmetric, groups=2, context=context).to(device)
        quantizer.set_range(torch.tensor(low).reshape(2, 1), torch.tensor(high).reshape(2, 1))
        return quantizer

    if post_softmax == "mrq":
        p = SoftmaxMRQ(bits, groups=2, context=context).to(device)
        p.set_split(torch.tensor([3, 6]))
    elif post_softmax == "uniform":
        p = uniform([0.0 if symmetric else -0.05, 0.0 if symmetric else -0.02], [0.6, 0.3], symmetric=False)
    else:
        p = SoftmaxMRQ(bits, groups=2, context=context).to(device)  # left uncalibrated: off
    shift = 0.0 if symmetric else 0.3
    attn.qk_matmul = QuantMatMul(uniform([-1.5 + shift, -0.8], [1.5, 0.8 + shift], symmetric),
                                 uniform([-2.0, -1.2 + shift], [2.0 + shift, 1.2], symmetric))
    attn.av_matmul = QuantMatMul(p, uniform([-1.8 + shift, -1.0], [1.8, 1.0 + shift], symmetric))
    attn.fused = False
    return attn, context


def explicit_and_fused(attn, x):
    with torch.no_grad():
        attn.kernel = None
        explicit = attn(x)
        attn.kernel = fused_attention.fused_quantized_attention
        fused = attn(x)
    return explicit.float(), fused.float()


@pytest.mark.parametrize(
    "post_softmax,symmetric,dtype,head_dim",
    [
        ("mrq", True, torch.float32, 12),
        ("uniform", True, torch.float32, 12),
        ("off", True, torch.float32, 12),
        ("mrq", False, torch.float32, 12),
        ("uniform", False, torch.float32, 12),
        ("mrq", True, torch.float16, 12),
        ("mrq", False, torch.float32, 20),
        ("off", True, torch.float32, 20),
    ],
)
def test_kernel_computes_the_explicit_quantized_attention(post_softmax, symmetric, dtype, head_dim):
    # 3 samples of both time groups, 37 tokens (not a multiple of the key block), head_dim 12 or 20
    # (padded to a 16- or 32-wide tile, as DiT-XL/2's 72 to 128)
    attn, context = quantized_attention(
        dim=2 * head_dim, heads=2, post_softmax=post_softmax, symmetric=symmetric, dtype=dtype
    )
    if not symmetric:  # every uniform operand's grid is offset
        uniform = [
            m
            for m in (
                attn.qk_matmul.a_quant,
                attn.qk_matmul.b_quant,
                attn.av_matmul.a_quant,
                attn.av_matmul.b_quant,
            )
            if isinstance(m, UniformQuantizer)
        ]
        assert len(uniform) >= 3 and all((m.zero_point != 0).all() for m in uniform)
    x = torch.randn(3, 37, 2 * head_dim, device=DEVICE, dtype=dtype)
    context.set_timesteps(torch.tensor([10, 900, 499], device=DEVICE))
    explicit, fused = explicit_and_fused(attn, x)
    with torch.no_grad():
        attn.kernel, attn.fused = None, True
        full_precision = attn(x).float()
    quantization_error = (explicit - full_precision).norm()
    assert quantization_error > 1e-3 * full_precision.norm()  # the quantizers do change the output
    # same function: only float rounding differs (a rare value may cross a rounding boundary); fp16
    # rounds the scores and probabilities coarsely, so a few more values move to a neighbouring code
    assert (fused - explicit).norm() < (0.01 if dtype == torch.float32 else 0.1) * quantization_error
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize("head_dim", [12, 20, 32])
def test_kernel_without_quantizers_is_softmax_attention(head_dim):
    q, k = torch.randn(2, 2, 3, 37, head_dim, device=DEVICE).unbind(0)
    v = torch.randn(2, 3, head_dim, 37, device=DEVICE).transpose(
        -2, -1
    )  # a strided head dimension is accepted too
    params = torch.zeros(2, fused_attention.PARAMS_PER_SAMPLE, device=DEVICE)
    out = torch.ops.tqdit.quant_attention(q, k, v, params, head_dim**-0.5, [0, 0, 0, 0], [0, 0], [0, 0])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_kernel_uses_each_samples_time_group():
    attn, context = quantized_attention(dim=24, heads=2, post_softmax="mrq")
    x = torch.randn(1, 37, 24, device=DEVICE).expand(2, -1, -1).contiguous()
    context.set_timesteps(torch.tensor([10, 900], device=DEVICE))  # the same input in groups 0 and 1
    explicit, fused = explicit_and_fused(attn, x)
    assert (fused[0] - fused[1]).abs().max() > 1e-3  # different parameters give different outputs
    torch.testing.assert_close(fused, explicit, rtol=0, atol=2e-2 * explicit.abs().max().item())


def test_calibrated_model_runs_the_kernel_and_keeps_its_samples():
    fp, quantized, calib = calibrated("mrq_tgq", device=DEVICE)
    pick = torch.arange(0, len(calib.x), max(1, len(calib.x) // 8))  # samples of every time group
    x, t, y = calib.x[pick].to(DEVICE), calib.t[pick].to(DEVICE), calib.y[pick].to(DEVICE)
    calls = []

    def counted(attn, q, k, v):
        calls.append(attn)
        return fused_attention.fused_quantized_attention(attn, q, k, v)

    with torch.no_grad():
        reference, explicit = fp(x, t, y), quantized(x, t, y)
        assert use_fused_attention(quantized) == len(quantized.blocks)
        for block in quantized.blocks:
            assert block.attn.kernel is fused_attention.fused_quantized_attention
            block.attn.kernel = counted
        ours = quantized(x, t, y)
    assert len(calls) == len(quantized.blocks)  # every block's attention ran in the kernel
    assert (ours - explicit).norm() < 0.02 * (explicit - reference).norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_at_dit_xl_shapes_in_bf16():
    # DiT-XL/2 256: 16 heads of 72 dims, 256 tokens; bf16 as in the ImageNet recipe
    attn, context = quantized_attention(dim=1152, heads=16, post_softmax="mrq", dtype=torch.bfloat16)
    x = torch.randn(8, 256, 1152, device="cuda", dtype=torch.bfloat16)
    context.set_timesteps(torch.tensor([0, 999] * 4, device="cuda"))
    explicit, fused = explicit_and_fused(attn, x)
    with torch.no_grad():
        attn.kernel, attn.fused = None, True
        full_precision = attn(x).float()
    # bf16: the explicit path rounds between its kernels where the fused one keeps float32 sums
    assert (fused - explicit).norm() < 0.1 * (explicit - full_precision).norm()
