"""kernels/sparse24_grad.py in the Triton interpreter against reference.py (fp16 / fp32)."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight
from laco_kernels.kernels import sparse24_grad as sg

SHAPES = [(1, 37, 72), (33, 45, 100), (4, 20, 1028)]  # M = 1, odd (K % 32 != 0), large K


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_input_and_values_match_reference(dtype, shape):
    m, n, k = shape
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
    dx = sg.sparse24_grad_input(dy, w24.values, w24.meta, w24.shape)
    close(dx, dy.float() @ w24.to_dense().float(), dtype)
    dv, db = sg.sparse24_values_grad(dy, x, w24.meta, w24.shape, want_bias=True)
    assert dv.shape == w24.values.shape and dv.dtype == dtype
    close(dv, reference.sparse24_values_grad(dy, x, w24), dtype)
    close(db, dy.float().sum(0), dtype)


def test_prefill_tiles_and_non_contiguous():
    m, n, k = 140, 70, 136
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    values = torch.randn(k // 2, n).t()  # strided values with the same metadata
    x, dy = torch.randn(k, m).t(), torch.randn(n, m).t()
    assert not (values.is_contiguous() or x.is_contiguous() or dy.is_contiguous())
    close(sg.sparse24_grad_input(dy, values, w24.meta, w24.shape), dy @ w24.to_dense(values), torch.float32)
    dv, db = sg.sparse24_values_grad(dy, x, w24.meta, w24.shape)
    assert db is None
    close(dv, reference.sparse24_values_grad(dy, x, w24), torch.float32)


@pytest.mark.parametrize("arch", [None, 90])
def test_prefill_16bit_dx_word_expansion(monkeypatch, arch):
    """16-bit dX at > 64 rows reads the values as int32 group words and expands them with the
    byte-permute emulation, in 256-row tiles: a 32-row reduction step off sm_90 (sm_80's tile), 64 on
    sm_90 (forced, grid-fill rule off). Odd N, K % 32 != 0, strided values (copied to unit stride by
    the launcher)."""
    from laco_kernels.kernels import dense_gemm

    monkeypatch.setattr(dense_gemm, "device_arch", lambda device: arch)
    monkeypatch.setattr(sg, "_SMS", 1)
    m, n, k = 260, 45, 100
    cfg = sg._dx24_config(m, torch.float16, arch, k)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (256, 64 if arch == 90 else 32)
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=torch.float16), prune=True)
    values = w24.values.t().contiguous().t()
    dy = torch.randn(m, n, dtype=torch.float16)
    assert not values.is_contiguous()
    close(sg.sparse24_grad_input(dy, values, w24.meta, w24.shape), dy.float() @ w24.to_dense().float(),
          torch.float16)


def test_values_grad_is_the_gradient_of_the_reference():
    """dV from the kernel equals autograd of reference.sparse24_linear w.r.t. its values."""
    n, k = 12, 40
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    x, dy = torch.randn(5, k), torch.randn(5, n)
    v = w24.values.clone().requires_grad_()
    reference.sparse24_linear(x, w24, values=v).backward(dy)
    close(sg.sparse24_values_grad(dy, x, w24.meta, w24.shape)[0], v.grad, torch.float32)


def test_reference_gradcheck_float64():
    # the reference computes in fp32; it is linear in x, values and bias, so central
    # differences with a large step are exact but for fp32 rounding
    w24 = Sparse24Weight.from_dense(torch.randn(6, 16), prune=True)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    v = w24.values.double().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: reference.sparse24_linear(x, w24, b, values=v), (x, v, b),
                                    eps=1e-2, atol=1e-3, rtol=1e-3)


# ---- through the public op: ops/sparse_gemm.sparse24_linear's backward runs these kernels ----
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,k", [((1,), 24, 40), ((2, 7), 33, 100)])
def test_sparse24_linear_grads_through_op(triton_backend, dtype, lead, n, k):
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    x, b, dy = torch.randn(*lead, k, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(*lead, n, dtype=dtype)
    got, want = [], []
    for fn, out in ((lambda x, v, b: sparse24_linear(x, Sparse24Weight(v, w24.meta, w24.shape), b), got),
                    (lambda x, v, b: reference.sparse24_linear(x, w24, b, values=v), want)):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        v = torch.nn.Parameter(w24.values.clone())  # the nn.Parameter-friendly path
        y = fn(xs, v, bs)
        y.backward(dy)
        out += [y, xs.grad, v.grad, bs.grad]
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        close(g, r, dtype)


def test_sparse24_linear_bias_only_and_adamw(triton_backend):
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    n, k = 16, 64
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    b = torch.zeros(n, requires_grad=True)
    x = torch.randn(6, k)
    sparse24_linear(x, w24, b).sum().backward()  # values need no grad: db alone
    close(b.grad, torch.full((n,), 6.0), torch.float32)
    v = torch.nn.Parameter(w24.values.clone())
    opt = torch.optim.AdamW([v], lr=1e-2, weight_decay=0.0)
    target = torch.randn(6, n)
    for _ in range(5):
        opt.zero_grad()
        loss = ((sparse24_linear(x, Sparse24Weight(v, w24.meta, w24.shape)) - target) ** 2).mean()
        loss.backward()
        opt.step()
    dense = Sparse24Weight(v.detach(), w24.meta, w24.shape).to_dense()
    assert bool((dense[~w24.mask()] == 0).all()) and not torch.equal(v.detach(), w24.values)


def _check_dx_dv_db(m, n, k, dtype):
    """dX, dV and db of a random 2:4 weight [n, k] and m rows against the reference."""
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
    close(sg.sparse24_grad_input(dy, w24.values, w24.meta, w24.shape), dy.float() @ w24.to_dense().float(), dtype)
    dv, db = sg.sparse24_values_grad(dy, x, w24.meta, w24.shape, want_bias=True)
    close(dv, reference.sparse24_values_grad(dy, x, w24), dtype)
    close(db, dy.float().sum(0), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_even_loops_and_wide_fp32_tiles(dtype):
    """M, N multiples of the loop steps (EVEN variants of dX and dV); fp32 with N % 16 == 0 and
    K % 32 == 0 takes the 32-row dX reduction step, otherwise the 16-row one."""
    m, n, k = 128, 128, 96
    if dtype == torch.float32:
        assert sg._dx24_config(m, dtype, None, k, n=n)["BLOCK_N"] == 32
        assert sg._dx24_config(m, dtype, None, k, n=n + 1)["BLOCK_N"] == 16
    _check_dx_dv_db(m, n, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_peeled_last_step_matches_reference(dtype):
    """N and M not multiples of the dX / dV loop steps, with whole steps before the partial one
    (the peeled last step after the unbounded loop)."""
    m, n, k = 150, 150, 96
    assert n % sg._dx24_config(m, dtype, None, k, n=n)["BLOCK_N"] != 0
    _check_dx_dv_db(m, n, k, dtype)


@pytest.mark.parametrize("n, splits", [(200, 2), (256, 3), (256, 4), (200, None)])
def test_split_reduction_matches_reference(monkeypatch, n, splits):
    """sm_90's 256-row 16-bit dX with its reduction over N split into slices (fp32 partials summed
    by _splitk.reduce_partials): whole-step slices, the partial last step (N = 200) only in the
    last slice, EVEN (N = 256); ``None``: the launcher's own rule on a 132-SM grid (2 x 1 programs,
    N >= 2K: it splits)."""
    from laco_kernels.kernels import _splitk, dense_gemm

    monkeypatch.setattr(dense_gemm, "device_arch", lambda device: 90)
    monkeypatch.setattr(sg, "_SMS", 132)
    m, k = 300, 96
    cfg = sg._dx24_config(m, torch.float16, 90, k, n)
    assert cfg["BLOCK_M"] == 256
    if splits is None:
        assert sg._dx24_splits(m, n, k, cfg, 132) > 1
    calls = []
    real = _splitk.reduce_partials
    monkeypatch.setattr(_splitk, "reduce_partials", lambda p, b, y: calls.append(p.shape[0]) or real(p, b, y))
    w24 = Sparse24Weight.from_dense(torch.randn(n, k, dtype=torch.float16), prune=True)
    dy = torch.randn(m, n, dtype=torch.float16)
    close(sg.sparse24_grad_input(dy, w24.values, w24.meta, w24.shape, splits=splits),
          dy.float() @ w24.to_dense().float(), torch.float16)
    assert len(calls) == 1 and calls[0] > 1


def test_split_rule():
    """Split only where the 256-row grid fills at most half the SMs and N >= 2K; at most 4 slices,
    each at least two steps."""
    cfg = sg._dx24_config(1024, torch.bfloat16, 90, 576, 1536)
    assert sg._dx24_splits(1024, 1536, 576, cfg, 132) == 4      # 20 programs, 24 steps
    assert sg._dx24_splits(1024, 576, 1536, cfg, 132) == 1      # N < 2K: partials cost more
    assert sg._dx24_splits(4096, 1536, 576, cfg, 132) == 1      # 80 programs: more than half the SMs
    assert sg._dx24_splits(256, 192, 64, cfg, 132) == 1         # 3 steps: one slice of at least two
    assert sg._dx24_config(1024, torch.bfloat16, 100, 576, 1536)["BLOCK_M"] == 128  # an arch not audited
    c80 = sg._dx24_config(1024, torch.bfloat16, 80, 576, 1536)  # sm_80's 256-row tile splits by the same rule
    assert sg._dx24_splits(1024, 1536, 576, c80, 108) == 4
    assert sg._dx24_splits(4096, 1536, 576, c80, 108) == 1
