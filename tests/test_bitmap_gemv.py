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
    # fp16 + 4-bit gap, plus one int32 column base per layout row and K slice (5 slices here: +2.6%)
    assert 0.9 * 4096 * 4096 * 0.3 * 2.5 < plan[0]["bytes"] < 1.08 * 4096 * 4096 * 0.3 * 2.5


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


# ---- the GPU 16-bit path (two mma.sync per chunk) cannot run in the interpreter: its lane mapping is
# ---- checked against the compiled layout, and its arithmetic by a lane-level model of the PTX fragments

_COMPILE_CHUNKS = r"""
import json, re, sys
from laco_kernels.kernels import _sass, bitmap_chunks as bc
from laco_kernels.kernels._compile import compile_kernel
pat = re.compile(r"#blocked\d* = #ttg.blocked<\{sizePerThread = \[1, 8\], threadsPerWarp = \[(\d+), (\d+)\], "
                 r"warpsPerCTA = \[(\d+), (\d+)\], order = \[1, 0\]\}>")
out = {}
for spec in bc.COMPILE_SPECS:
    if spec.signature["x_ptr"] == "*fp32":
        continue
    k = compile_kernel(spec, 90)[0]
    layouts = [tuple(int(v) for v in m.groups()) for m in map(pat.match, k.asm["ttgir"].splitlines()) if m]
    st = _sass.loop_stats(_sass.disassemble(k.asm["cubin"]), spec.num_warps)
    out[spec.config] = dict(layouts=layouts, sts=st["sts"], lds=st["lds"], hmma=st["opcodes"].get("HMMA", 0),
                            ldg=st["opcodes"].get("LDG", 0), loop=st["loop_instructions"])
open(sys.argv[1], "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_chunks(tmp_path_factory):
    """sm_90 facts of the 16-bit chunk GEMV specs: the [1, 8] blocked layouts of the TTGIR and the loop's
    STS / LDS / HMMA / LDG counts (compiled in a clean process: lowering fails in one that ran the interpreter)."""
    import json

    from test_sass import _run_clean

    out = tmp_path_factory.mktemp("chunks") / "facts.json"
    _run_clean(_COMPILE_CHUNKS, out)
    return json.loads(out.read_text())


def test_gpu_16bit_chunk_loop_is_registers_and_tensor_cores(compiled_chunks):
    assert len(compiled_chunks) == 6  # fp16 / bf16 x (out, out + bias, partial)
    for config, r in compiled_chunks.items():
        assert r["sts"] == r["lds"] == 0, (config, r)
        # per chunk: 2 mma, 8 gathers + the values + the gap word
        assert r["hmma"] == 2 * bc.UNROLL and r["ldg"] == 10 * bc.UNROLL, (config, r)


def _half(bits, dt):
    import numpy as np

    if dt == "fp16":
        return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])
    return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])


def _mma_operands(asm):
    """(A, B, C, D) operand numbers of each mma.sync in the chunk asm, read from its text."""
    import re

    stmts = re.findall(r"mma\.sync[^{]*\{([^}]*)\},\s*\{([^}]*)\},\s*\{([^}]*)\},\s*\{([^}]*)\}", asm)
    return [tuple([int(t.strip().lstrip("$")) for t in grp.split(",")] for grp in (a, b, c, d)) for d, a, b, c in stmts]


def _simulate_chunk_mma(lay, x, layout, dt):
    """Run the kernel's GPU path (two mma.sync per chunk, then _mma_diagonal and the sum of a row's
    LANES layout rows) lane by lane, on the lane -> layout row map read from the TTGIR, with the PTX
    fragment rules; 16-bit operands packed two per register, element 2i in the low half. One block."""
    import numpy as np

    tr, tc, wr, wc = layout
    assert tc == 1 and wc == 1 and tr == 32, layout
    ops = _mma_operands(bc._CHUNK_MMA_FP16.value if dt == "fp16" else bc._CHUNK_MMA_BF16.value)
    assert len(ops) == 2 and all(len(a) == 4 and len(b) == 2 for a, b, c, d in ops)
    # accumulators: out $0-$3 / $4-$7 and in $16-$19 / $20-$23 (the kernel keeps them as acc[0:4] / acc[4:8])
    assert [(d, c) for a, b, c, d in ops] == [([0, 1, 2, 3], [16, 17, 18, 19]), ([4, 5, 6, 7], [20, 21, 22, 23])]
    words = lay.offs.view(torch.uint8).view(-1, bc.BLOCK_N, 4).long()
    gaps = torch.stack([words & 15, words >> 4], dim=-1).view(-1, bc.BLOCK_N, 8)
    offs = torch.cumsum(gaps, dim=-1)
    vbits = lay.vals.view(torch.int16).long() & 0xFFFF  # [chunks, BLOCK_N, 8]
    xbits = x.view(torch.int16).long() & 0xFFFF
    c0, c1 = int(lay.starts[0]), int(lay.starts[1])
    base = lay.bases[0, 0].long()
    out = np.zeros(bc.ROWS)
    for warp in range(wr):
        acc, acc2 = np.zeros((32, 4)), np.zeros((32, 4))
        b = base.clone()
        for t in range(c0, c1):
            cols = b[:, None] + offs[t]
            mats = [(np.zeros((16, 16)), np.zeros((16, 8))) for _ in ops]
            for lane in range(32):
                r = warp * tr + lane  # the layout row this lane holds
                v = [int(vbits[t, r, e]) for e in range(8)]
                xs = [int(xbits[cols[r, e]]) for e in range(8)]
                regs = {8 + i: v[2 * i] | v[2 * i + 1] << 16 for i in range(4)}  # $8..$11: value pairs as loaded
                regs.update({12 + i: xs[2 * i] | xs[2 * i + 1] << 16 for i in range(4)})  # $12..$15: x pairs
                gid, tig = divmod(lane, 4)
                for (a, bb, _, _), (Am, Bm) in zip(ops, mats):
                    for h in range(2):
                        Am[gid, 2 * tig + h] = _half((regs[a[0]] >> 16 * h) & 0xFFFF, dt)
                        Am[gid + 8, 2 * tig + h] = _half((regs[a[1]] >> 16 * h) & 0xFFFF, dt)
                        Am[gid, 2 * tig + 8 + h] = _half((regs[a[2]] >> 16 * h) & 0xFFFF, dt)
                        Am[gid + 8, 2 * tig + 8 + h] = _half((regs[a[3]] >> 16 * h) & 0xFFFF, dt)
                        Bm[2 * tig + h, gid] = _half((regs[bb[0]] >> 16 * h) & 0xFFFF, dt)
                        Bm[2 * tig + 8 + h, gid] = _half((regs[bb[1]] >> 16 * h) & 0xFFFF, dt)
            for (Am, Bm), accs in zip(mats, (acc, acc2)):
                D = Am @ Bm
                for lane in range(32):
                    gid, tig = divmod(lane, 4)
                    accs[lane] += [D[gid, 2 * tig], D[gid, 2 * tig + 1], D[gid + 8, 2 * tig], D[gid + 8, 2 * tig + 1]]
            b = cols[:, 7]
        for lane in range(32):  # _mma_diagonal, then the sum over the LANES layout rows of a weight row
            gid, tig = divmod(lane, 4)
            if tig == gid >> 1:
                out[(warp * tr + lane) // bc.LANES] += acc[lane][gid & 1] + acc2[lane][2 + (gid & 1)]
    return out


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_chunk_mma_lane_model_matches_reference(dt, compiled_chunks):
    """The compiled layout gives each lane one layout row, in order, so a weight row's LANES layout rows
    are the 4 lanes of an mma group; with that layout the two mma.sync per chunk + the diagonal pick
    compute exactly the row dot products (model of the PTX fragment rules, lane by lane)."""
    spec = next(s for s in bc.COMPILE_SPECS if s.signature["x_ptr"] == f"*{dt}" and not s.constexprs["PARTIAL"]
                and not s.constexprs["HAS_BIAS"])
    layouts = compiled_chunks[spec.config]["layouts"]
    assert len(layouts) == 1, layouts  # one layout with 8 entries per thread: the one the chunk asm runs in
    tdt = torch.float16 if dt == "fp16" else torch.bfloat16
    k = 300
    w = sparse(bc.ROWS, k, 0.6, tdt)
    w[3] = 0
    w[3, 0], w[3, k - 1] = 1.0, 2.0  # fillers
    bw = BitmapWeight.from_dense(w)
    lay = bc.build_layout(bw.values, bw.bitmap, bw.shape, splits=1)
    x = torch.randn(k).to(tdt)
    got = torch.from_numpy(_simulate_chunk_mma(lay, x, layouts[0], dt))
    out = torch.zeros(bc.ROWS + 1, dtype=torch.float64)
    out.index_add_(0, lay.perm.long(), got)
    want = reference.bitmap_linear(x[None].float(), BitmapWeight.from_dense(w.float()))[0].double()
    torch.testing.assert_close(out[:bc.ROWS], want, rtol=1e-5, atol=1e-4)


def test_chunk_self_check_problem_passes_in_the_interpreter():
    x, lay, want = bc._self_check_problem(torch.float16, torch.device("cpu"))
    assert lay.starts.numel() == 3 and lay.vals.shape[0] > 0  # two blocks of ROWS = 32 weight rows
    close(bc.chunks_gemv(x, lay), want, torch.float16)


def test_failed_gpu_self_check_warns_and_routes_to_the_canonical_gemv(monkeypatch):
    """On CUDA a chunk GEMV that disagrees with the dense product is not used: one warning, then the
    canonical-layout GEMV (simulated: the check runs on CPU tensors with a fake CUDA device)."""
    class FakeCuda:
        type, index = "cuda", 7

    orig_problem, orig_gemv, orig_verified = bc._self_check_problem, bc.chunks_gemv, bc.gemv_verified
    monkeypatch.setattr(bc, "_VERIFIED", {})
    monkeypatch.setattr(bc, "_self_check_problem", lambda dt, dev: orig_problem(dt, torch.device("cpu")))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "FakeGPU")
    monkeypatch.setattr(bc, "chunks_gemv", lambda x, lay, b=None: torch.zeros(x.shape[0], lay.shape[0]))
    with pytest.warns(RuntimeWarning, match="failed its self-check on FakeGPU"):
        assert bc.gemv_verified(FakeCuda(), torch.float16) is False
    assert bc.gemv_verified(FakeCuda(), torch.float16) is False  # cached: checked once per device and dtype
    assert bc.gemv_verified(torch.device("cpu"), torch.float16) is True
    assert bc.gemv_verified(FakeCuda(), torch.float32) is True  # fp32: no tensor cores, nothing to check
    # bitmap_gemv asks the check, and runs the canonical kernel when it fails (the broken GEMV is not called)
    bw = BitmapWeight.from_dense(sparse(20, 96, 0.5, torch.float16), tile_k=64)
    x = torch.randn(2, 96).half()
    monkeypatch.setattr(bc, "gemv_verified", lambda dev, dt: False)
    close(bv.bitmap_gemv(x, bw.values, bw.bitmap, bw.offsets, bw.shape, 64, layout="chunks"),
          reference.bitmap_linear(x, bw), torch.float16)
    monkeypatch.setattr(bc, "_VERIFIED", {})
    monkeypatch.setattr(bc, "chunks_gemv", orig_gemv)
    monkeypatch.setattr(bc, "gemv_verified", orig_verified)
    assert bc.gemv_verified(FakeCuda(), torch.bfloat16) is True  # a correct kernel passes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("s", [0.5, 0.9])
def test_chunk_gemv_many_tokens_odd_shapes_strided_x(dtype, s):
    """The chunk GEMV itself for M = 1..16 (the launcher routes up to GEMV_MAX_M), odd N (3 blocks, the
    last mostly padding rows) and K, 90% sparsity (gaps > 15 columns: fillers), x a column slice of a wider
    tensor (row stride != K) or transposed (copied), bias on and off, split-K forced and automatic."""
    n, k = 67, 333
    w = sparse(n, k, s, dtype)
    bw = BitmapWeight.from_dense(w)
    wide = torch.randn(16, k + 13).to(dtype)
    for m, bias, splits in ((1, True, None), (2, False, 3), (5, True, 2), (11, False, None), (16, True, None)):
        x = wide[:m, 7:7 + k]  # unit stride along K, row stride k + 13
        b = torch.randn(n).to(dtype) if bias else None
        lay = bc.build_layout(bw.values, bw.bitmap, bw.shape, splits)
        close(bc.chunks_gemv(x, lay, b), reference.bitmap_linear(x, bw, b), dtype)
    xt = torch.randn(k, 3).to(dtype).t()  # stride along K != 1
    close(bc.chunks_gemv(xt, bc.build_layout(bw.values, bw.bitmap, bw.shape), None), reference.bitmap_linear(xt, bw), dtype)
