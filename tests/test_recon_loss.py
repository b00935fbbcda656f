"""kernels/recon_loss.py in the Triton interpreter against reference.reconstruction_loss."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.kernels import recon_loss as rl

KINDS = ["mse", "nmse", "cosine"]
SHAPES = [(1, 7), (37, 130), (3, 5, 2100)]  # one row, odd, D over one BLOCK_D (several chunks)


def ref_loss_and_grad(pred, target, kind, g=0.7):
    p = pred.detach().clone().requires_grad_()
    loss = reference.reconstruction_loss(p, target, kind)
    loss.backward(torch.tensor(g))
    return loss.detach(), p.grad


def run_kernel(pred, target, kind, g=0.7):
    d = pred.shape[-1]
    p2, t2 = pred.reshape(-1, d), target.reshape(-1, d)
    loss, stats = rl.recon_loss_fwd(p2, t2, kind)
    return loss, rl.recon_loss_bwd(torch.tensor(g), p2, t2, kind, stats).reshape(pred.shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_grad_match_reference(dtype, shape, kind):
    pred = torch.randn(*shape, dtype=dtype)
    target = (pred.float() + 0.3 * torch.randn(*shape)).to(dtype)
    loss, grad = run_kernel(pred, target, kind)
    want_loss, want_grad = ref_loss_and_grad(pred, target, kind)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == pred.shape
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)  # fp32 accumulation in both
    tol = TOLERANCES[dtype]
    scale = want_grad.float().abs().max()
    torch.testing.assert_close(grad.float() / scale, want_grad.float() / scale, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_eps_clamps_like_the_reference(kind):
    """Zero target (nmse clamp at 1e-12), zero pred row and tiny rows (cosine clamp at 1e-8)."""
    pred, target = torch.randn(4, 33), torch.randn(4, 33)
    target[0] = 0
    pred[1] = 0
    pred[2] *= 1e-5
    target[2] *= 1e-5  # |p||t| ~ 3e-9 < 1e-8: clamped
    if kind == "nmse":
        target.zero_()
    loss, grad = run_kernel(pred, target, kind)
    want_loss, want_grad = ref_loss_and_grad(pred, target, kind)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_mixed_dtypes():
    pred = torch.randn(40, 24).t()               # [24, 40] column-major
    target = torch.randn(24, 80)[:, ::2].half()  # strided, another dtype
    for kind in KINDS:
        loss, stats = rl.recon_loss_fwd(pred, target, kind)
        grad = rl.recon_loss_bwd(torch.tensor(1.0), pred, target, kind, stats)
        want_loss, want_grad = ref_loss_and_grad(pred, target, kind, 1.0)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
