"""ops/masked_gemm.py: masked_linear autograd (Triton in the interpreter, native CPU, reference), errors."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import PackedMask
from laco_kernels.ops.masked_gemm import masked_linear
from test_masked_gemm import make_mask


def _grads(fn, x, w, b, mask, dy):
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(xs, ws, mask, bs)
    y.backward(dy)
    return y, xs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,k", [((1,), 24, 40), ((2, 7), 33, 100)])
@pytest.mark.parametrize("density", [0.0, 0.5, "2:4", 0.9])
def test_values_and_all_grads_match_reference(triton_backend, dtype, lead, n, k, density):
    x = torch.randn(*lead, k, dtype=dtype)
    w, b, dy = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(*lead, n, dtype=dtype)
    mask = make_mask(n, k, density)
    pm = PackedMask.from_bool(mask)
    got = _grads(masked_linear, x, w, b, pm, dy)
    want = _grads(reference.masked_linear, x, w, b, mask, dy)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), **TOLERANCES[dtype])
    assert bool((got[2][~mask] == 0).all())


def test_bool_mask_non_contiguous_and_partial_grads(triton_backend):
    n, k = 20, 36
    x = torch.randn(k, 6).t()
    w = torch.randn(k, n).t()
    mask = make_mask(n, k, 0.5)
    ws = w.clone().requires_grad_()  # only the weight needs a gradient, no bias
    masked_linear(x, ws, mask).sum().backward()
    torch.testing.assert_close(ws.grad, reference.masked_weight_grad(torch.ones(6, n), x, mask))
    xs = x.clone().requires_grad_()  # only x, with a bias that needs no gradient
    b = torch.randn(n)
    y = masked_linear(xs, w, mask, b)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, reference.masked_linear(x, w, mask, b))
    torch.testing.assert_close(xs.grad, torch.ones(6, n) @ (w * mask))


@pytest.mark.parametrize("backend", ["triton_backend", "reference_backend"])
def test_adamw_keeps_pruned_weights_exactly_zero(backend, request):
    request.getfixturevalue(backend)
    n, k = 24, 48
    mask = make_mask(n, k, 0.5)
    pm = PackedMask.from_bool(mask)
    w = torch.nn.Parameter(torch.randn(n, k) * mask)
    b = torch.nn.Parameter(torch.zeros(n))
    x = torch.randn(32, k)
    target = x @ torch.randn(n, k).t()
    opt = torch.optim.AdamW([w, b], lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = ((masked_linear(x, w, pm, b) - target) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert bool((w.detach()[~mask] == 0).all()), "a pruned weight became nonzero"
    assert bool((w.detach()[mask] != 0).all())
    assert loss.item() < first  # it did train


@pytest.mark.parametrize("zero_pruned", [True, False])
def test_guarded_path_values_and_grads_for_clean_and_dirty_weights(triton_backend, monkeypatch, zero_pruned):
    """>= GUARD_MIN_ROWS tokens: the forward checks W at the pruned slots once (the backward's dX
    reuses the verdict) and is exact whether or not W is zero there; and AdamW keeps a zeroed W
    clean, so recovery steps keep taking the plain-GEMM loops."""
    from laco_kernels.kernels import masked_gemm as mg

    calls = []
    real = mg.pruned_nonzero
    monkeypatch.setattr(mg, "pruned_nonzero", lambda w, bits: calls.append(1) or real(w, bits))
    m, n, k = mg.GUARD_MIN_ROWS + 5, 40, 72
    mask = make_mask(n, k, 0.5)
    pm = PackedMask.from_bool(mask)
    x, b, dy = torch.randn(m, k), torch.randn(n), torch.randn(m, n)
    w = torch.randn(n, k) * (mask if zero_pruned else 1)
    got = _grads(masked_linear, x, w, b, pm, dy)
    want = _grads(reference.masked_linear, x, w, b, mask, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOLERANCES[torch.float32])
    assert len(calls) == 1 and bool((got[2][~mask] == 0).all())
    masked_linear(x[:3], w, pm, b)  # a few tokens: unguarded, no check
    assert len(calls) == 1
    if zero_pruned:
        wp = torch.nn.Parameter(w.clone())
        opt = torch.optim.AdamW([wp], lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            masked_linear(x, wp, pm, b).square().mean().backward()
            opt.step()
        assert mg.pruned_nonzero(wp.detach(), pm.bits).tolist() == [0]


def test_reference_backend_matches_reference(reference_backend):
    x, w, mask = torch.randn(3, 40), torch.randn(8, 40), make_mask(8, 40, 0.5)
    torch.testing.assert_close(masked_linear(x, w, mask), reference.masked_linear(x, w, mask))


def test_reference_gradcheck_float64():
    # the reference computes in fp32 (like the kernels), so the finite differences use a large
    # step; the function is linear in each argument, so central differences are exact but for
    # fp32 rounding, which the tolerances cover
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mask = make_mask(5, 12, 0.5)
    assert torch.autograd.gradcheck(lambda x, w, b: reference.masked_linear(x, w, mask, b), (x, w, b),
                                    eps=1e-2, atol=1e-3, rtol=1e-3)


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(3, 40), torch.randn(8, 40)
    with pytest.raises(ValueError, match="mask has shape"):
        masked_linear(x, w, torch.ones(8, 41, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has shape"):
        masked_linear(x, w, PackedMask.from_bool(torch.ones(9, 40, dtype=torch.bool)))
    with pytest.raises(TypeError, match="bool tensor"):
        masked_linear(x, w, torch.ones(8, 40))
    with pytest.raises(TypeError, match="PackedMask or a bool"):
        masked_linear(x, w, [[True] * 40] * 8)
    with pytest.raises(ValueError, match="in_features=40"):
        masked_linear(torch.randn(3, 39), w, torch.ones(8, 40, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        masked_linear(x.half(), w, torch.ones(8, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias has shape"):
        masked_linear(x, w, torch.ones(8, 40, dtype=torch.bool), torch.randn(7))
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        masked_linear(x, w[None], torch.ones(8, 40, dtype=torch.bool))
    with pytest.raises(TypeError, match="weight has dtype"):
        masked_linear(x.long(), w.long(), torch.ones(8, 40, dtype=torch.bool))


def test_bias_only_gradient(triton_backend):
    x, w, mask = torch.randn(5, 40).half(), torch.randn(8, 40).half(), make_mask(8, 40, 0.5)
    b = torch.randn(8, requires_grad=True)  # an fp32 bias beside fp16 x and weight
    y = masked_linear(x, w, mask, b)
    torch.testing.assert_close(y.float(), reference.masked_linear(x, w, mask, b).float(), **TOLERANCES[torch.float16])
    y.float().sum().backward()
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, torch.full((8,), 5.0))


def _native_built():
    try:
        from laco_kernels import _native  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _native_built(), reason="laco_kernels._C is not built (C++ extension is optional)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,n,k", [((1,), 24, 40), ((2, 7), 33, 100), ((3,), 70, 1001)])
@pytest.mark.parametrize("density", [0.0, 0.5, "2:4", 1.0])
def test_native_backend_values_and_grads_match_reference(monkeypatch, dtype, lead, n, k, density):
    """LACO_BACKEND=auto on CPU tensors runs the native kernels (what CPU recovery uses)."""
    from laco_kernels.ops import dispatch

    monkeypatch.setenv("LACO_BACKEND", "auto")
    assert dispatch.select_backend("masked_linear", [torch.zeros(1)]) == "native"
    if density == "2:4" and k % 4:
        k -= k % 4
    x = torch.randn(*lead, k).to(dtype)
    w, b, dy = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(*lead, n).to(dtype)
    mask = make_mask(n, k, density)
    got = _grads(masked_linear, x, w, b, PackedMask.from_bool(mask), dy)
    want = _grads(reference.masked_linear, x, w, b, mask, dy)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), **TOLERANCES[dtype])
    assert bool((got[2][~mask] == 0).all())
    # fp16 has no native kernel: auto falls back to the reference
    y16 = masked_linear(x.half(), w.half(), mask)
    torch.testing.assert_close(y16.float(), reference.masked_linear(x.half(), w.half(), mask).float(),
                               **TOLERANCES[torch.float16])


def test_cpu_autocast_runs_bf16_and_matches_reference():
    """Under CPU autocast masked_linear casts x, weight and bias to bf16 (bf16 out); the fp32
    weight's gradient stays zero at pruned entries and within bf16 error of the fp32 reference."""
    from laco_kernels.ops import dispatch

    if not dispatch.native_supports("masked_linear"):
        pytest.skip("native extension not built")
    n, k, m = 40, 64, 17
    x, w, b, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    mask = make_mask(n, k, 0.5)

    def autocast_fn(xs, ws, mk, bs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = masked_linear(xs.to(torch.bfloat16), ws, mk, bs)  # x bf16, weight fp32: allowed under autocast
        assert y.dtype == torch.bfloat16
        return y.float()

    y, dx, dw, db = _grads(autocast_fn, x, w, b, mask, dy)
    y_ref, dx_ref, dw_ref, db_ref = _grads(reference.masked_linear, x, w, b, mask, dy)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.detach(), atol=0.03 * want.abs().max().item(), rtol=0.02)
    keep = mask if isinstance(mask, torch.Tensor) else mask.to_bool()
    assert torch.all(dw[~keep] == 0)
