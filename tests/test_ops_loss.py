"""ops/loss.py: reconstruction_loss autograd on every backend, target handling, errors."""
import pytest
import torch

from laco_kernels import reference
from laco_kernels.ops import dispatch
from laco_kernels.ops.loss import reconstruction_loss

KINDS = ["mse", "nmse", "cosine"]


def _loss_grad(fn, pred, target, kind):
    p = pred.detach().clone().requires_grad_()
    loss = fn(p, target, kind)
    (3.0 * loss).backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_matches_reference(triton_backend, kind, dtype):
    pred = torch.randn(2, 9, 70, dtype=dtype)
    target = (pred.float() + 0.5 * torch.randn(2, 9, 70)).to(dtype)
    loss, grad = _loss_grad(reconstruction_loss, pred, target, kind)
    want_loss, want_grad = _loss_grad(reference.reconstruction_loss, pred, target, kind)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype and grad.shape == pred.shape
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2e-2 if dtype == torch.float16 else 1e-4,
                               atol=1e-5 if dtype == torch.float16 else 1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_backend_on_cpu_matches_reference(kind, dtype, monkeypatch):
    """CPU under ``auto``: native (fp32 / bf16, when built) or reference (fp16)."""
    monkeypatch.setenv("LACO_BACKEND", "auto")
    pred, target = torch.randn(5, 33, dtype=dtype), torch.randn(5, 33, dtype=dtype)
    loss, grad = _loss_grad(reconstruction_loss, pred, target, kind)
    want_loss, want_grad = _loss_grad(reference.reconstruction_loss, pred, target, kind)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2e-2, atol=1e-4)


def test_forced_native_rejects_float16(monkeypatch):
    if not dispatch.native_supports("reconstruction_loss"):
        pytest.skip("native extension not built")
    monkeypatch.setenv("LACO_BACKEND", "native")
    with pytest.raises(TypeError, match="float32 / bfloat16"):
        reconstruction_loss(torch.randn(2, 8).half(), torch.randn(2, 8).half())


def test_target_is_a_constant(triton_backend):
    pred = torch.randn(4, 16, requires_grad=True)
    target = torch.randn(4, 16, requires_grad=True)
    reconstruction_loss(pred, target, "nmse").backward()
    assert pred.grad is not None and target.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradcheck_float64(kind):
    # the reference works in fp32 (like the kernels): finite differences with a moderate step,
    # tolerances that cover fp32 rounding (mse / nmse are quadratic: central differences exact)
    pred = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: reference.reconstruction_loss(p, target, kind), (pred,),
                                    eps=1e-3, atol=2e-4, rtol=1e-2)


def test_bad_inputs_raise_clear_errors():
    p = torch.randn(3, 8)
    with pytest.raises(ValueError, match="unknown kind"):
        reconstruction_loss(p, p, "l1")
    with pytest.raises(ValueError, match="target has shape"):
        reconstruction_loss(p, torch.randn(8, 3))
    with pytest.raises(TypeError, match="pred has dtype"):
        reconstruction_loss(p.long(), p)
    with pytest.raises(ValueError, match="empty"):
        reconstruction_loss(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        reconstruction_loss(torch.tensor(1.0), torch.tensor(1.0))
