"""kernels/weight_expand.py (Triton interpreter) and the "expand" training path of the ops."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import PackedMask, Sparse24Weight
from laco_kernels.kernels import masked_gemm as mg
from laco_kernels.kernels import sparse24_grad as sg
from laco_kernels.kernels import weight_expand as we
from laco_kernels.ops.masked_gemm import masked_linear
from laco_kernels.ops.sparse_gemm import sparse24_linear
from test_masked_gemm import make_mask

DTYPES = [torch.float16, torch.bfloat16, torch.float32]  # elementwise: bf16 is exact in the interpreter too
SHAPES = [(1, 4), (37, 72), (33, 1028), (70, 516)]  # one group, K % 32 != 0, large K, N past a tile


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_sparse24_to_dense_is_exact(dtype, n, k):
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    got = we.sparse24_to_dense(w24.values, w24.meta, w24.shape)
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, w24.to_dense())


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_to_dense_strided_values(dtype):
    n, k = 40, 136
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    strided = torch.randn(k // 2, n, dtype=dtype).t()  # other values, same metadata
    meta = torch.zeros(n, 2 * w24.meta.shape[1], dtype=torch.int32)[:, ::2]
    meta.copy_(w24.meta)  # non-unit stride along K: the launcher copies it
    assert not strided.is_contiguous() and meta.stride(1) != 1
    assert torch.equal(we.sparse24_to_dense(strided, meta, w24.shape), w24.to_dense(strided))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES[1:])
def test_masked_to_dense_exact_zeros(dtype, n, k):
    w = torch.randn(n, k, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    w = w.masked_fill(~mask, float("nan"))  # whatever a pruned slot holds, W ⊙ M is 0 there
    w[~mask & (torch.arange(k) % 3 == 0)] = float("inf")
    got = we.masked_to_dense(w, PackedMask.from_bool(mask).bits)
    assert torch.equal(got[mask], w[mask]) and bool((got[~mask] == 0).all())
    wt = torch.randn(k, n, dtype=dtype).t()  # strided weight
    assert torch.equal(we.masked_to_dense(wt, PackedMask.from_bool(mask).bits), torch.where(mask, wt, 0))


def test_empty_weights():
    assert we.sparse24_to_dense(torch.zeros(0, 2), torch.zeros(0, 1, dtype=torch.int32), (0, 4)).shape == (0, 4)
    assert we.masked_to_dense(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.int32)).shape == (3, 0)


def test_bad_arguments_raise_before_any_launch():
    w24 = Sparse24Weight.from_dense(torch.randn(8, 64), prune=True)
    with pytest.raises(ValueError, match="K not divisible by 4"):
        we.sparse24_to_dense(w24.values, w24.meta, (8, 62))
    with pytest.raises(ValueError, match=r"values has shape \(8, 32\); shape \(8, 128\)"):
        we.sparse24_to_dense(w24.values, w24.meta, (8, 128))
    with pytest.raises(TypeError, match="meta has dtype int64"):
        we.sparse24_to_dense(w24.values, w24.meta.long(), (8, 64))
    with pytest.raises(TypeError, match="values has dtype float64"):
        we.sparse24_to_dense(w24.values.double(), w24.meta, (8, 64))
    with pytest.raises(ValueError, match="bits has shape"):
        we.masked_to_dense(torch.randn(8, 64), torch.zeros(8, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        we.masked_to_dense(torch.randn(64), torch.zeros(1, 2, dtype=torch.int32))


def test_expand_bytes():
    assert we.expand_bytes("sparse24", 2, 64, 2) == 2 * 32 * 2 + 2 * 2 * 4 + 2 * 64 * 2
    assert we.expand_bytes("masked", 2, 64, 4) == 2 * 64 * 4 + 2 * 2 * 4 + 2 * 64 * 4


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,k", [((1,), 24, 40), ((3, 7), 33, 100), ((2,), 16, 1028)])
def test_masked_expand_path_matches_reference(triton_backend, dtype, lead, n, k):
    """path="expand": y, dX, dW (exact zeros where pruned), db against autograd through the reference."""
    x, dy = torch.randn(*lead, k, dtype=dtype), torch.randn(*lead, n, dtype=dtype)
    w, b = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    pm = PackedMask.from_bool(mask)
    got = _grads(lambda x, w, b: masked_linear(x, w, pm, b, path="expand"), (x, w, b), dy)
    want = _grads(lambda x, w, b: reference.masked_linear(x.float(), w.float(), mask, b.float()), (x, w, b),
                  dy.float())
    for g, r in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), **TOLERANCES[dtype])
    assert bool((got[2][~mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 20, 40), (9, 33, 104), (5, 8, 1028)])
def test_sparse24_expand_path_matches_reference(triton_backend, dtype, m, n, k):
    """path="expand": y, dX, dV [N, K/2], db against autograd through the reference; x non-contiguous."""
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    x, dy, b = torch.randn(k, m, dtype=dtype).t(), torch.randn(m, n, dtype=dtype), torch.randn(n, dtype=dtype)
    got = _grads(lambda x, v, b: sparse24_linear(x, Sparse24Weight(v, w24.meta, w24.shape), b, path="expand"),
                 (x, w24.values, b), dy)
    want = _grads(lambda x, v, b: reference.sparse24_linear(x.float(), w24, b.float(), values=v.float()),
                  (x, w24.values, b), dy.float())
    for g, r in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), **TOLERANCES[dtype])
    assert got[2].shape == (n, k // 2)


def test_expand_path_is_what_the_op_runs(triton_backend, monkeypatch):
    """The expand path calls the expansion kernel (forward and backward) and never the fused GEMMs."""
    calls = []
    real = we.sparse24_to_dense
    monkeypatch.setattr(we, "sparse24_to_dense", lambda *a: calls.append("expand") or real(*a))
    monkeypatch.setattr(sg, "sparse24_grad_input", lambda *a, **kw: pytest.fail("fused dX on the expand path"))
    w24 = Sparse24Weight.from_dense(torch.randn(8, 64), prune=True)
    v = w24.values.clone().requires_grad_()
    x = torch.randn(3, 64, requires_grad=True)
    sparse24_linear(x, Sparse24Weight(v, w24.meta, w24.shape), path="expand").sum().backward()
    assert calls == ["expand", "expand"] and v.grad.shape == (8, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weight_grad_tiles_by_grid_fill(dtype):
    """16-bit dW / dV: the 128 x 128 output tile while its grid fills the SMs, else 64 x 128 (4 warps)."""
    assert mg._dw_config(1536, dtype, 576, 132) == mg._DW16_FILL  # SmolLM2: 60 programs of 128 x 128
    assert mg._dw_config(4096, dtype, 11008, 132)["BLOCK_N"] == 128  # 7B: 2,752 programs
    assert mg._dw_config(1536, dtype, 576, 8)["BLOCK_N"] == 128
    assert mg._dw_config(1536, dtype)["BLOCK_N"] == 128  # no K given: the main tile


@pytest.mark.parametrize("sms", [1, 132])  # the main tile (grid >= 1 SM) and the small-grid tile
def test_16bit_weight_grads_on_both_tiles(monkeypatch, sms):
    monkeypatch.setattr(mg, "_SMS", sms)
    monkeypatch.setattr(sg, "_SMS", sms)
    m, n, k = 70, 130, 136  # M, N and K not multiples of the tiles
    dtype = torch.float16
    x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    dw, db = mg.masked_linear_dw(dy, x, PackedMask.from_bool(mask).bits, want_bias=True)
    want = (dy.float().t() @ x.float()) * mask
    torch.testing.assert_close(dw.float(), want, **TOLERANCES[dtype])
    torch.testing.assert_close(db.float(), dy.float().sum(0), **TOLERANCES[dtype])
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    dv, _ = sg.sparse24_values_grad(dy, x, w24.meta, w24.shape)
    torch.testing.assert_close(dv.float(), reference.sparse24_values_grad(dy, x, w24).float(), **TOLERANCES[dtype])
