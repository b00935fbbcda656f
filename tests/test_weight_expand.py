"""kernels/weight_expand.py (Triton interpreter) and the "expand" training path of the ops."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import BitmapWeight, PackedMask, Sparse24Weight
from laco_kernels.kernels import _train_tiles
from laco_kernels.kernels import masked_gemm as mg
from laco_kernels.kernels import sparse24_grad as sg
from laco_kernels.kernels import weight_expand as we
from laco_kernels.ops.masked_gemm import masked_linear
from laco_kernels.ops.sparse_gemm import bitmap_expand_linear, sparse24_linear
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
    # bitmap: kept values, bits, one offset per row and tile, the dense write
    assert we.expand_bytes("bitmap", 2, 300, 2, density=0.5, tile_k=128) == 300 * 2 + 2 * 10 * 4 + 2 * 3 * 4 + 2 * 300 * 2


# ----------------------------------------------------------------------------------------
# bitmap (unstructured): the GPU prefill path of bitmap_linear
# ----------------------------------------------------------------------------------------
def _bitmap(n, k, density, dtype, tile_k=128):
    w = torch.randn(n, k, dtype=dtype) * (torch.rand(n, k) < density).to(dtype)
    return BitmapWeight.from_dense(w, tile_k=tile_k)


def _expand(bw: BitmapWeight, values=None):
    return we.bitmap_to_dense(bw.values if values is None else values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k)


# one row; K % 32 != 0; K past 2 tiles of 128 (last one partial); K not a multiple of tile_k 256 and
# N past one row block (BLOCK_N = 4096 // tile_k); tile_k 64 with N past a block of 64
BITMAP_SHAPES = [(1, 72, 128), (37, 100, 128), (37, 300, 128), (70, 4100, 256), (67, 200, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("n,k,tile_k", BITMAP_SHAPES)
def test_bitmap_to_dense_is_exact(dtype, density, n, k, tile_k):
    bw = _bitmap(n, k, density, dtype, tile_k)
    got = _expand(bw)
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, bw.to_dense())


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_to_dense_copies_bits(dtype):
    """A copy, not arithmetic: -0.0, NaN payloads and subnormals come out with the same bits as to_dense()
    (the format never packs them, but nothing in the kernel may rely on that)."""
    bw = _bitmap(33, 260, 0.5, dtype)
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    v = bw.values.clone()
    v[::7] = -0.0
    v[1::7] = float("nan")
    v[2::7] = torch.finfo(dtype).tiny / 4  # subnormal
    raw = v.view(ints)
    raw[3::7] = raw[1::7][: raw[3::7].numel()] ^ 1  # another NaN payload
    got, want = _expand(bw, v), BitmapWeight(v, bw.bitmap, bw.offsets, bw.shape, bw.tile_k).to_dense()
    assert torch.equal(got.view(ints), want.view(ints))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_to_dense_strided_inputs(dtype):
    bw = _bitmap(40, 300, 0.5, dtype)
    nnz = bw.values.numel()
    values = torch.randn(2 * nnz, dtype=dtype)[::2]  # other values, same bitmap; stride 2: the launcher copies
    bitmap = torch.zeros(40, 2 * bw.bitmap.shape[1], dtype=torch.int32)[:, ::2]
    offsets = torch.zeros(40, 2 * bw.offsets.shape[1], dtype=torch.int32)[:, ::2]
    bitmap.copy_(bw.bitmap)
    offsets.copy_(bw.offsets)
    assert not values.is_contiguous() and bitmap.stride(1) != 1 and offsets.stride(1) != 1
    got = we.bitmap_to_dense(values, bitmap, offsets, bw.shape, bw.tile_k)
    assert torch.equal(got, BitmapWeight(values.contiguous(), bw.bitmap, bw.offsets, bw.shape).to_dense())
    # bitmap and offsets as row slices of bigger tensors (row stride > width: passed as strides, not copied)
    big_b = torch.zeros(40, bw.bitmap.shape[1] + 3, dtype=torch.int32)
    big_o = torch.zeros(40, bw.offsets.shape[1] + 5, dtype=torch.int32)
    big_b[:, :-3], big_o[:, :-5] = bw.bitmap, bw.offsets
    got = we.bitmap_to_dense(bw.values, big_b[:, :-3], big_o[:, :-5], bw.shape, bw.tile_k)
    assert torch.equal(got, bw.to_dense())


def test_bitmap_to_dense_empty():
    assert we.bitmap_to_dense(torch.zeros(0), torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 1, dtype=torch.int32),
                              (0, 64), 128).shape == (0, 64)
    assert we.bitmap_to_dense(torch.zeros(0), torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, 0, dtype=torch.int32),
                              (3, 0), 128).shape == (3, 0)


def test_bitmap_to_dense_bad_arguments_raise_before_any_launch(monkeypatch):
    monkeypatch.setattr(we._bitmap_expand_kernel, "run", lambda *a, **kw: pytest.fail("launched"))
    bw = _bitmap(8, 100, 0.5, torch.float32)
    v, b, o = bw.values, bw.bitmap, bw.offsets
    with pytest.raises(ValueError, match=r"tile_k=96 is not one the kernel supports \(64, 128, 256\)"):
        we.bitmap_to_dense(v, b, o, bw.shape, 96)
    with pytest.raises(ValueError, match="tile_k=True"):
        we.bitmap_to_dense(v, b, o, bw.shape, True)
    with pytest.raises(ValueError, match="tile_k=128.0"):
        we.bitmap_to_dense(v, b, o, bw.shape, 128.0)
    with pytest.raises(ValueError, match="int32 indexing"):
        we.bitmap_to_dense(v, b, o, (65536, 32768), 128)
    with pytest.raises(ValueError, match="values must have 1 dimensions"):
        we.bitmap_to_dense(v.view(1, -1), b, o, bw.shape, 128)
    with pytest.raises(TypeError, match="values has dtype float64"):
        we.bitmap_to_dense(v.double(), b, o, bw.shape, 128)
    with pytest.raises(ValueError, match=r"bitmap has shape \(8, 4\); a \[8, 200\] weight needs \(8, 7\)"):
        we.bitmap_to_dense(v, b, o, (8, 200), 128)
    with pytest.raises(TypeError, match="bitmap has dtype int64"):
        we.bitmap_to_dense(v, b.long(), o, bw.shape, 128)
    with pytest.raises(ValueError, match=r"offsets has shape \(8, 1\); a \[8, 100\] weight with tile_k=64 needs \(8, 2\)"):
        we.bitmap_to_dense(v, b, o, bw.shape, 64)
    with pytest.raises(TypeError, match="offsets has dtype int64"):
        we.bitmap_to_dense(v, b, o.long(), bw.shape, 128)
    with pytest.raises(ValueError, match="same device"):
        we.bitmap_to_dense(v.to("meta"), b, o, bw.shape, 128)


def test_bitmap_expand_launches_are_compile_specs(monkeypatch):
    """Every launch of the bitmap expansion (each tile_k, each dtype) is a spec the compile report compiles."""
    from laco_kernels.kernels.dense_gemm import BITMAP_TILE_KS

    seen = []
    kernel = we._bitmap_expand_kernel
    orig = kernel.run

    def run(*args, **kwargs):
        seen.append(({k: v for k, v in kwargs.items() if k not in ("grid", "warmup", "num_warps", "num_stages")},
                     kwargs.get("num_warps"), args[kernel.arg_names.index("w_ptr")].dtype))
        return orig(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    tl_names = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype in DTYPES:
        for tile_k in BITMAP_TILE_KS:
            _expand(_bitmap(5, 70, 0.5, dtype, tile_k))
    assert len(seen) == len(DTYPES) * len(BITMAP_TILE_KS)
    specs = [s for s in we.COMPILE_SPECS if s.name == "_bitmap_expand_kernel"]
    for consts, warps, dtype in seen:
        match = [s for s in specs if s.num_warps == warps and s.signature["w_ptr"] == tl_names[dtype]
                 and s.signature["v_ptr"] == tl_names[dtype] and all(s.constexprs[c] == v for c, v in consts.items())]
        assert match and set(match[0].archs) == {80, 90}, (consts, warps, dtype)
    assert sum(s.representative for s in specs) == 1  # the quick compile test: bf16, tile_k 128


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_expand_linear_kernel_path(monkeypatch, dtype):
    """kernel=True (the CUDA default, run here by the interpreter): the same bits as the to_dense path;
    on CPU tensors the default is to_dense (the kernel is never called)."""
    bw = _bitmap(37, 300, 0.3, dtype)
    x, b = torch.randn(300, 21, dtype=dtype).t(), torch.randn(37, dtype=dtype)
    want = bitmap_expand_linear(x, bw, b, kernel=False)
    assert torch.equal(bitmap_expand_linear(x, bw, b, kernel=True), want)
    torch.testing.assert_close(want.float(), reference.bitmap_linear(x, bw, b).float(), **TOLERANCES[dtype])
    monkeypatch.setattr(we, "bitmap_to_dense", lambda *a: pytest.fail("kernel on CPU tensors"))
    assert torch.equal(bitmap_expand_linear(x, bw, b), want)


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
    assert mg._dw_config(1536, dtype, 576, 132) == _train_tiles._DW16_FILL  # SmolLM2: 60 programs of 128 x 128
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
