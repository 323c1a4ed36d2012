"""The fused reconstruction kernels (tqdit/kernels/recon.py) against the torch-op references.

On the CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU); on a
GPU compiled. Each test checks values and gradients with an upstream gradient of random signs, on
sizes that are not multiples of the kernels' block, with the clamps exercised.
"""

import pytest
import torch

from tqdit.kernels import recon as recon_kernels
from tqdit.quant.quantizers import UniformQuantizer
from tqdit.quant.reconstruct import GAMMA, ZETA, AdaRoundWeight, lsq_fake_quant

pytestmark = pytest.mark.skipif(recon_kernels.triton is None, reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def adaround(rows=37, cols=53, bits=4):
    """An AdaRoundWeight on an asymmetric 4-bit grid, with v spread so that h(v) clamps at 0 and 1 for
    some elements and some codes clamp at the range's ends (ranges narrower than the weights)."""
    torch.manual_seed(0)
    weight = torch.randn(rows, cols)
    q = UniformQuantizer(bits, symmetric=False, channels=rows)
    q.set_range(0.7 * weight.amin(dim=1), 0.7 * weight.amax(dim=1))
    rounding = AdaRoundWeight(weight, q).to(DEVICE)
    with torch.no_grad():
        rounding.v.copy_(torch.randn_like(rounding.v) * 3)
    return weight.to(DEVICE), rounding


def grad_of(fn, v, upstream=None):
    v = v.detach().clone().requires_grad_()
    out = fn(v)
    (out * upstream if upstream is not None else out).sum().backward()
    return out.detach(), v.grad


def test_soft_weight_matches_the_torch_ops():
    """Mutations caught: the code-range clamp left out of the backward, the h(v) clamp's mask left out,
    or the row's scale taken from the column index."""
    weight, rounding = adaround()
    scaled = rounding.floor + rounding.h() + rounding.zero_point
    assert ((scaled < rounding.qmin) | (scaled > rounding.qmax)).any()  # the code clamp is exercised
    stretched = torch.sigmoid(rounding.v) * (ZETA - GAMMA) + GAMMA
    assert ((stretched < 0) | (stretched > 1)).any()  # so is h's

    def reference(v):
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
        codes = torch.clamp(rounding.floor + h + rounding.zero_point, rounding.qmin, rounding.qmax)
        return (codes - rounding.zero_point) * rounding.scale

    def fused(v):
        return recon_kernels.soft_weight(
            v, rounding.floor, rounding.scale, rounding.zero_point, rounding.qmin, rounding.qmax, ZETA, GAMMA
        )

    upstream = torch.randn_like(weight)
    expected, expected_grad = grad_of(reference, rounding.v, upstream)
    value, grad = grad_of(fused, rounding.v, upstream)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(grad != 0, expected_grad != 0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [20.0, 7.3, 2.0])
def test_rounding_penalty_matches_the_torch_ops(beta):
    """Σ(1 − |2h − 1|^β) and its gradient, h at 0.5 included. Mutations caught: the factor 2 of
    d(2h − 1)/dh, the exponent β − 1 written as β, or the sigmoid's slope left out."""
    _, rounding = adaround()
    with torch.no_grad():
        rounding.v[0, :3] = 0.0  # σ(v) = 1/2: h = 0.5, |2h − 1| = 0
    beta_tensor = torch.tensor(beta, device=DEVICE)

    def reference(v):
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
        return (1 - (2 * h - 1).abs().pow(beta_tensor)).sum()

    expected, expected_grad = grad_of(reference, rounding.v)
    value, grad = grad_of(lambda v: recon_kernels.rounding_penalty(v, beta_tensor, ZETA, GAMMA), rounding.v)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 1e-2  # the gradient is not trivially zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_learned_step_quant_matches_pytorchs_op(dtype):
    """Values and both gradients equal torch's learnable fake-quantize op, inside and outside the
    code range. Mutations caught: x's gradient let through the clamp, the step's outside term
    (qmax − z) replaced by 0, or ``grad_factor`` dropped."""
    torch.manual_seed(1)
    x = (torch.randn(5, 3, 71, device=DEVICE) * 3).to(dtype)
    step, zero, grad_factor = torch.tensor([0.05], device=DEVICE), torch.tensor([3.0], device=DEVICE), 0.037
    upstream = torch.randn(x.shape, device=DEVICE).to(dtype)
    results = []
    for fn in (recon_kernels.learned_step_quant, torch._fake_quantize_learnable_per_tensor_affine):
        x_leaf, step_leaf = x.float().clone().requires_grad_(), step.clone().requires_grad_()
        inputs = x_leaf.to(dtype) if fn is recon_kernels.learned_step_quant else x_leaf
        out = fn(inputs, step_leaf, zero, 0, 15, grad_factor)
        (out.float() * upstream.float()).sum().backward()
        results.append((out.to(dtype).float().detach(), x_leaf.grad, step_leaf.grad))
    (value, grad_x, grad_step), (expected, expected_x, expected_step) = results
    assert (x.float() / step > 12).any() and (x.float() / step < -3).any()  # both clamps are exercised
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert torch.equal(grad_x != 0, expected_x != 0)  # the same elements pass their gradient
    torch.testing.assert_close(grad_x, expected_x, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_step, expected_step, rtol=1e-4, atol=1e-6)


def test_learned_step_quant_matches_the_reference_on_a_view():
    """A transposed (non-contiguous) input, as attention's operands are: the same values and
    gradient as ``lsq_fake_quant`` on it (whose x gradient is upstream·Δ·(1/Δ): one rounding)."""
    torch.manual_seed(2)
    base = torch.randn(4, 33, 40, device=DEVICE) * 2
    step, zero = torch.tensor([0.04], device=DEVICE), torch.tensor([0.0], device=DEVICE)
    upstream = torch.randn(4, 40, 33, device=DEVICE)
    results = []
    for fn in (recon_kernels.learned_step_quant, lsq_fake_quant):
        leaf = base.clone().requires_grad_()
        out = fn(leaf.transpose(1, 2), step, zero, -128, 127, 0.01)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=0)
