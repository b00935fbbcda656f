"""The chunked distillation loss of the KL stage (``laco_kernels.recover._losses.distill_kl``)
against its plain-PyTorch reference; the reconstruction losses are tested in test_layerwise.py."""
import pytest
import torch

from laco_kernels.recover import _losses
from laco_kernels.recover._losses import distill_kl, distill_kl_reference


def _pair(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    return s, t


@pytest.mark.parametrize("rows", [1, 3, 1 << 20])  # chunks of 1 row, a partial last chunk, one chunk
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_value_and_gradient_match_reference(monkeypatch, rows, temperature):
    monkeypatch.setattr(_losses, "_kl_rows", lambda v: rows)
    s, t = _pair((2, 5, 37))
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    got = distill_kl(s1, t, temperature)
    want = distill_kl_reference(s2, t, temperature)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-8)
    assert got.dtype == torch.float32 and got.dim() == 0


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(_losses, "_kl_rows", lambda v: 2)
    s, t = _pair((5, 7), torch.float64, scale=1.0)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: distill_kl(x, t, 1.5), (s,))
    # a nonzero upstream gradient other than 1 is scaled through
    g = torch.autograd.grad(3.0 * distill_kl(s, t, 1.5), s)[0]
    g1 = torch.autograd.grad(distill_kl(s, t, 1.5), s)[0]
    torch.testing.assert_close(g, 3.0 * g1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_logits_compute_in_fp32_and_return_grad_in_their_dtype(dtype):
    s, t = _pair((4, 64), dtype)
    s.requires_grad_()
    got = distill_kl(s, t, 1.0)
    want = distill_kl_reference(s.detach().float(), t.float(), 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert s.grad.dtype == dtype
    ref = s.detach().float().requires_grad_()
    distill_kl_reference(ref, t.float(), 1.0).backward()
    torch.testing.assert_close(s.grad.float(), ref.grad, rtol=2e-2, atol=1e-5)


def test_non_contiguous_logits_and_zero_at_equal_distributions():
    s, t = _pair((37, 2, 6))
    sv, tv = s.transpose(0, 1), t.transpose(0, 1)  # [2, 37, 6], not contiguous
    assert not sv.is_contiguous()
    torch.testing.assert_close(distill_kl(sv, tv), distill_kl_reference(sv, tv), rtol=1e-5, atol=1e-6)
    assert abs(float(distill_kl(tv + 5.0, tv))) < 1e-5  # a shift of all logits is the same distribution


def test_teacher_gets_no_gradient():
    s, t = _pair((3, 11))
    s.requires_grad_()
    t.requires_grad_()
    distill_kl(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_bad_input_is_named():
    s, t = _pair((3, 11))
    with pytest.raises(ValueError, match="differ in shape"):
        distill_kl(s, t[:, :10])
    with pytest.raises(ValueError, match="temperature"):
        distill_kl(s, t, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        distill_kl(s, t, float("nan"))
    with pytest.raises(TypeError, match="floating point"):
        distill_kl(s.long(), t.long())
    with pytest.raises(ValueError, match="no tokens"):
        distill_kl(s[:0], t[:0])
