"""kernels/bitmap_gemv.py (popcount decode GEMV, canonical layout) and kernels/bitmap_chunks.py (GEMV on the
derived chunk layout, the default) in the Triton interpreter against reference.bitmap_linear."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import BitmapWeight
from laco_kernels.kernels import bitmap_chunks as bc
from laco_kernels.kernels import bitmap_gemm as bg
from laco_kernels.kernels import bitmap_gemv as bv

# (M, N, K, dtype, bias, sparsity, tile_k, splits): every tile_k of the table and one outside it (96);
# K not a multiple of 32 (half-used bitmap word) nor of the unrolled step; K = 4100 the large-K case
CASES = [(1, 37, 72, torch.float16, True, 0.5, 64, None), (1, 70, 4100, torch.float16, False, 0.7, 128, None),
         (2, 45, 1000, torch.float32, True, 0.7, 256, 2), (3, 33, 300, torch.float16, False, 0.9, 96, None),
         (7, 19, 1030, torch.float32, False, 0.3, 128, 3), (16, 5, 136, torch.float16, True, 0.5, 64, None),
         (1, 50, 4100, torch.float32, True, 0.5, 256, 7), (2, 40, 260, torch.bfloat16, True, 0.7, 128, None)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


def sparse(n, k, s, dtype):
    return (torch.randn(n, k) * (torch.rand(n, k) >= s)).to(dtype)


@pytest.mark.parametrize("layout", ["chunks", "canonical"])
@pytest.mark.parametrize("m,n,k,dtype,bias,s,tile_k,splits", CASES)
def test_matches_reference(m, n, k, dtype, bias, s, tile_k, splits, layout):
    bw = BitmapWeight.from_dense(sparse(n, k, s, dtype), tile_k=tile_k)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = bv.bitmap_gemv(x, bw.values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k, b, splits=splits, layout=layout)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, reference.bitmap_linear(x, bw, b), dtype)


def test_popcount_fallback_matches_torch():
    import triton
    import triton.language as tl

    @triton.jit
    def _k(a_ptr, o_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, bv._popc(tl.load(a_ptr + offs), False))

    a = torch.tensor([0, 1, -1, 2 ** 31 - 1, -2 ** 31, 0x55555555, 12345678, -7], dtype=torch.int32)
    out = torch.empty_like(a)
    _k[(1,)](a, out, BLOCK=8)
    expect = [bin(int(v) & 0xFFFFFFFF).count("1") for v in a]
    assert out.tolist() == expect


@pytest.mark.parametrize("layout", ["chunks", "canonical"])
def test_empty_rows_and_all_zero_weight(layout):
    w = sparse(9, 200, 0.5, torch.float32)
    w[3] = 0  # a row without nonzeros: its base must carry over unchanged
    for weight in (w, torch.zeros(9, 200)):
        bw = BitmapWeight.from_dense(weight, tile_k=64)
        x = torch.randn(2, 200)
        close(bv.bitmap_gemv(x, bw.values, bw.bitmap, bw.offsets, bw.shape, 64, splits=2, layout=layout),
              reference.bitmap_linear(x, bw), torch.float32)


@pytest.mark.parametrize("layout,limit", [("chunks", bv.GEMV_MAX_M), ("canonical", bv.CANONICAL_GEMV_MAX_M)])
def test_non_contiguous_x_and_launcher_routing(monkeypatch, layout, limit):
    monkeypatch.setenv(bv.LAYOUT_ENV, layout)
    bw = BitmapWeight.from_dense(sparse(20, 96, 0.5, torch.float16), tile_k=64)
    calls = []
    real = bg.bitmap_gemv
    monkeypatch.setattr(bg, "bitmap_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, limit, limit + 1):
        x = torch.randn(96, m).half().t()
        y = bg.bitmap_linear(x, bw.values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k)
        close(y, reference.bitmap_linear(x, bw), torch.float16)
    assert calls == [1, limit]


def test_bad_layout_env(monkeypatch):
    monkeypatch.setenv(bv.LAYOUT_ENV, "dense")
    with pytest.raises(ValueError, match=bv.LAYOUT_ENV):
        bv.gpu_layout()
    bw = BitmapWeight.from_dense(sparse(4, 64, 0.5, torch.float32), tile_k=64)
    with pytest.raises(ValueError, match="layout"):
        bv.bitmap_gemv(torch.randn(1, 64), bw.values, bw.bitmap, bw.offsets, bw.shape, 64, layout="dense")


def test_chunk_layout_invariants_and_fillers():
    k = 2000
    w = sparse(40, k, 0.7, torch.float32)  # 40 rows: two blocks of 32, the second mostly padding rows
    w[5] = 0
    w[5, 0], w[5, k - 1] = 1.0, 2.0  # a gap of 1999 columns: 133 zero fillers
    w[9] = 0  # an empty row
    w[11] = torch.randn(k)  # a dense row: its block is as long as it
    w[12] = 0
    w[12, 1990:] = 1.0  # 10 values at the end: lane 0 takes all, the other lanes start at the last column
    bw = BitmapWeight.from_dense(w)
    lay = bc.build_layout(bw.values, bw.bitmap, bw.shape, splits=3)
    nb = bc.triton.cdiv(40, bc.ROWS)
    assert bc.ROWS * bc.LANES == bc.BLOCK_N
    assert lay.vals.shape[1:] == (bc.BLOCK_N, 8) and lay.offs.shape[1:] == (bc.BLOCK_N,) and lay.splits == 3
    assert lay.starts.tolist()[0] == 0 and lay.starts[-1] == lay.vals.shape[0] and lay.bases.shape == (nb, 3, bc.BLOCK_N)
    assert sorted(lay.perm[:40].tolist()) == list(range(40)) and (lay.perm[40:] == 40).all()
    # the 8 4-bit gaps of every chunk row (byte b of the word = gap 2b | gap 2b + 1 << 4)
    words = lay.offs.view(torch.uint8).view(-1, bc.BLOCK_N, 4).long()
    gaps = torch.stack([words & 15, words >> 4], dim=-1).view(-1, bc.BLOCK_N, 8)
    assert int(gaps.max()) <= bc.MAX_GAP == 15
    offs = torch.cumsum(gaps, dim=-1)
    # decode every layout row (weight row r // LANES of its block, lane r % LANES) back to dense: columns =
    # running base (from bases at the block's first chunk) + offsets, all inside [0, K), nondecreasing
    dense = torch.zeros(nb * bc.ROWS, k)
    for b in range(nb):
        c0, c1 = int(lay.starts[b]), int(lay.starts[b + 1])
        base = lay.bases[b, 0].long()
        for t in range(c0, c1):
            cols = base[:, None] + offs[t]
            assert int(cols.max()) < k and (cols.diff(dim=1) >= 0).all()
            for r in range(bc.BLOCK_N):
                dense[b * bc.ROWS + r // bc.LANES].index_add_(0, cols[r], lay.vals[t, r].float())
            base = cols[:, 7]
        # the bases of every split are the running bases at that split's first chunk
        per = -(-(c1 - c0) // 3)
        for sp in range(1, 3):
            if sp * per < c1 - c0:
                start = lay.bases[b, 0].long()
                for t in range(c0, c0 + sp * per):
                    start = start + offs[t, :, 7]
                assert torch.equal(lay.bases[b, sp].long(), start)
    out = torch.zeros(41, k)
    out.index_add_(0, lay.perm.long(), dense)
    torch.testing.assert_close(out[:40], w)
    assert int(lay.starts[1]) == -(-k // (8 * bc.LANES)) and int(lay.perm[0]) == 11  # sorted by length: the dense row first
    x = torch.randn(3, k)
    close(bc.chunks_gemv(x, lay, None), reference.bitmap_linear(x, bw), torch.float32)


def test_layout_cache_is_reused_and_rebuilt_after_in_place_change():
    bw = BitmapWeight.from_dense(sparse(33, 100, 0.5, torch.float32), tile_k=32)
    a = bc.cached_layout(bw.values, bw.bitmap, bw.shape)
    assert bc.cached_layout(bw.values, bw.bitmap, bw.shape) is a
    bw.values.mul_(2)  # same tensor, new version: the derived copy must follow
    b = bc.cached_layout(bw.values, bw.bitmap, bw.shape)
    assert b is not a
    x = torch.randn(1, 100)
    close(bv.bitmap_gemv(x, bw.values, bw.bitmap, bw.offsets, bw.shape, 32), reference.bitmap_linear(x, bw), torch.float32)


def test_3d_input_through_the_public_op(triton_backend):
    from laco_kernels.ops.sparse_gemm import bitmap_linear

    bw = BitmapWeight.from_dense(sparse(30, 128, 0.7, torch.float16), tile_k=128)
    x = torch.randn(1, 2, 128).half()
    b = torch.randn(30).half()
    close(bitmap_linear(x, bw, b), reference.bitmap_linear(x, bw, b), torch.float16)


def test_bad_tile_k():
    bw = BitmapWeight.from_dense(sparse(4, 64, 0.5, torch.float32), tile_k=64)
    with pytest.raises(ValueError, match="tile_k"):
        bv.bitmap_gemv(torch.randn(1, 64), bw.values, bw.bitmap, bw.offsets, bw.shape, 48)


def test_chunk_specs_describe_the_decode_loop():
    assert {s.signature["x_ptr"] for s in bc.COMPILE_SPECS} == {"*fp16", "*bf16", "*fp32"}
    for s in bc.COMPILE_SPECS:
        assert (s.family, s.regime) == ("bitmap", "decode") and s.constexprs["BLOCK_N"] == bc.BLOCK_N
        assert s.loop_weight_bytes(0.3) == bc.BLOCK_N * 8 * bc.UNROLL * (0.5 + (4 if "fp32" in s.config else 2))
        assert s.expect_tensor_core == ("fp32" not in s.config) and s.constexprs["EMULATE"] is False
    plan = bc.SASS_LAUNCH_PLAN(bc.COMPILE_SPECS[0], 1, 4096, 4096, 0.3)
    assert plan[0]["programs"] >= 132 and plan[-1]["name"].startswith("_splitk_reduce")
    assert 0.9 * 4096 * 4096 * 0.3 * 2.5 < plan[0]["bytes"] < 1.05 * 4096 * 4096 * 0.3 * 2.5  # fp16 + 4-bit gap


def test_compile_specs_describe_the_decode_loop():
    specs = [s for s in bv.COMPILE_SPECS if s.name == "_bitmap_gemv_kernel"]
    assert {s.constexprs["TILE_K"] for s in specs} == {64, 128, 256}
    for s in specs:
        assert (s.family, s.regime) == ("bitmap", "decode") and s.constexprs["HW_POPC"]
        assert s.loop_weight_bytes(0.3) < s.loop_weight_bytes(0.5)


def test_module_builds_the_derived_layout_once(monkeypatch, triton_backend):
    from laco_kernels.nn import BitmapLinear

    builds = []
    real = bc.build_layout
    monkeypatch.setattr(bc, "build_layout", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    lin = torch.nn.Linear(64, 40).half()
    with torch.no_grad():
        lin.weight.mul_(torch.rand(40, 64) > 0.6)
    mod = BitmapLinear.from_linear(lin)
    x = torch.randn(1, 64).half()
    for _ in range(3):  # through the custom op with autograd on, then without
        close(mod(x), reference.bitmap_linear(x, mod.weight_bitmap(), mod.bias), torch.float16)
    with torch.no_grad():
        mod(x)
    assert len(builds) == 1
    assert set(mod.state_dict()) == {"weight", "bias"}  # the derived layout never reaches a checkpoint
