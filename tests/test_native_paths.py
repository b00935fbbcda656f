"""The native linears' paths by M (csrc/outer_linear.cpp's dispatch): direct kernels, the outer-product
kernel (fp32) and the bf16 pair kernel (csrc/pair_outer_bf16.cpp), AMX tiles, decompressed panels + BLAS
(csrc/panel.cpp), split panels; each forced and held to the reference, and the thresholds the dispatch reports.
Split from test_native.py (which holds the kernels at their default paths) to keep files short."""
import pytest
import torch

from laco_kernels import reference
from laco_kernels.formats import BitmapWeight, Sparse24Weight

from _native_util import (CONFIGS, DTYPES, HAS_AMX, ISAS, LINEAR_PATHS, _close, _native, _outer_kernel_forced,  # noqa: F401
                          isa_and_threads, linear_path, needs_ext)  # (the fixtures)

# Paths by M: direct kernels, the 2:4 outer-product kernel (csrc/outer_linear.cpp, AVX2) from
# outer_min_m, decompressed panels + BLAS (csrc/panel.cpp) from panel_min_m.
# several panels: 1 MB panels of K=8196 fp32 rows hold 16 rows, N=37 makes 3 (the last one partial);
# N = 70 and 120 are split between threads by the "split" path (35 / 60 rows each with two threads)
PANEL_SHAPES = [(1, 5, 36), (3, 17, 100), (67, 9, 1000), (20, 37, 8196), (9, 70, 300), (40, 120, 2052)]


# the AMX and lanes paths exist at the avx512bf16 ISA only, the shuffle path at avx512 (fp32) and avx512bf16:
# no such combinations are generated elsewhere
PATH_CONFIGS = [(c, p) for c in CONFIGS for p in LINEAR_PATHS
                if p not in ("amx", "shuffle", "lanes") or c[0] == "avx512bf16" or (p == "shuffle" and c[0] == "avx512")]


@needs_ext
@pytest.mark.parametrize("isa_and_threads,linear_path", PATH_CONFIGS, indirect=True,
                         ids=[f"{c[0]}-t{c[1]}-{p}" for c, p in PATH_CONFIGS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=str)
def test_linears_both_sides_of_the_panel_threshold(isa_and_threads, linear_path, dtype, shape):
    if linear_path == "amx" and dtype != torch.bfloat16:
        pytest.skip("the AMX path is bf16 only")
    m, n, k = shape
    w = torch.randn(n, k)
    w24 = Sparse24Weight.from_dense(w.to(dtype), prune=True)
    bw = BitmapWeight.from_dense((w * (torch.rand(n, k) < 0.3)).to(dtype))
    x = torch.randn(k, m).to(dtype).t()  # non-contiguous x
    for b in (None, torch.randn(n).to(dtype), torch.randn(n)):  # no bias, x's dtype, fp32 with bf16 x
        y24, ybm = _native.sparse24_linear(x, w24, b), _native.bitmap_linear(x, bw, b)
        assert y24.dtype == ybm.dtype == dtype and y24.shape == ybm.shape == (m, n)
        _close(y24, reference.sparse24_linear(x, w24, b), dtype)
        _close(ybm, reference.bitmap_linear(x, bw, b), dtype)


# M = 8, 9 (one partial vector), 64 / 65 / 130 (one to three blocks of 64 rows, the last partial);
# K = 100 (one K-block), 1000 and 8196 (K-blocks of 64-640 columns, a partial meta word at the end)
OUTER_SHAPES = [(1, 3, 36), (8, 33, 100), (9, 17, 1000), (64, 5, 1000), (65, 7, 8196), (130, 19, 1000)]


@needs_ext
@pytest.mark.skipif("avx2" not in ISAS, reason="the outer-product kernel is AVX2 / AVX-512 code")
@pytest.mark.parametrize("isa", [i for i in ("avx2", "avx512") if i in ISAS])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OUTER_SHAPES, ids=str)
def test_sparse24_outer_kernel_matches_reference(isa, threads, dtype, shape):
    """ymm (8 rows of x per vector) on AVX2, zmm (16 rows) on AVX-512; forced on both."""
    m, n, k = shape
    with _outer_kernel_forced(isa):
        torch.set_num_threads(threads)
        assert _native.outer_min_m("sparse24_linear", dtype, (n, k)) == 0
        w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
        x = torch.randn(k, m).to(dtype).t()  # non-contiguous
        for b in (None, torch.randn(n).to(dtype), torch.randn(n)):
            y = _native.sparse24_linear(x, w24, b)
            assert y.dtype == dtype and y.shape == (m, n)
            _close(y, reference.sparse24_linear(x, w24, b), dtype)
        # one kept weight per output (x = I): exact, so offsets and values are placed right bit for bit
        eye = torch.eye(k).to(dtype)
        assert torch.equal(_native.sparse24_linear(eye, w24).t(), w24.to_dense())
        if isa == "avx512":  # the bitmap's outer kernel (AVX-512 only): tile_k 32 and 128, an empty row
            w = torch.randn(n, k) * (torch.rand(n, k) < 0.35)
            w[0] = 0
            for tile_k in (32, 128):
                bw = BitmapWeight.from_dense(w.to(dtype), tile_k=tile_k)
                for b in (None, torch.randn(n).to(dtype)):
                    _close(_native.bitmap_linear(x, bw, b), reference.bitmap_linear(x, bw, b), dtype)
                assert torch.equal(_native.bitmap_linear(eye, bw).t(), bw.to_dense())


# M = 1 / 5 / 8 (one 8-lane vector), 16 / 17 (one vector of 16 rows, partial), 64 / 65 / 130 (one to three blocks
# of 64 rows); K from one K-block to many (the table slice is 32-64 KB), K = 4100 / 1001 not a multiple of the
# 32-column words
PAIR_SHAPES = [(1, 5, 36), (5, 40, 4100), (8, 21, 1000), (16, 33, 100), (17, 7, 1000), (64, 9, 8196), (65, 19, 1000),
               (130, 3, 2052), (40, 70, 4100)]


@needs_ext
@pytest.mark.skipif("avx512bf16" not in ISAS, reason="the bf16 pair kernel needs AVX512_BF16")
@pytest.mark.parametrize("shape", PAIR_SHAPES, ids=str)
def test_bf16_pair_kernel_matches_reference(shape):
    """csrc/pair_outer_bf16.cpp, forced: 2:4 and bitmap (density 0.3, an empty and a full row, odd K), x
    non-contiguous, every bias kind; x = I is exact (each output one weight); threads 1 / 2 / 3 give the
    same bits (each output element is summed by one thread in a fixed order)."""
    m, n, k = shape
    with _outer_kernel_forced("avx512bf16"):
        dt = torch.bfloat16
        w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dt), prune=True)
        kb = k + 1 if k % 2 == 0 else k  # an odd K for the bitmap: its last column pair is half outside
        w = torch.randn(n, kb) * (torch.rand(n, kb) < 0.3)
        w[0] = 0
        if n > 1:
            w[1] = torch.randn(kb)  # every column pair of this row holds a weight
        bw = BitmapWeight.from_dense(w.to(dt), tile_k=32)
        assert _native.linear_path("sparse24_linear", dt, (n, k), m) == "pair"
        assert _native.linear_path("bitmap_linear", dt, (n, kb), m, bw.values.numel() / (n * kb)) == "pair"
        x = torch.randn(k, m).to(dt).t()
        xb = torch.randn(kb, m).to(dt).t()
        for b in (None, torch.randn(n).to(dt), torch.randn(n)):
            outs = {}
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs[threads] = (_native.sparse24_linear(x, w24, b), _native.bitmap_linear(xb, bw, b))
            y24, ybm = outs[1]
            assert y24.dtype == ybm.dtype == dt and y24.shape == ybm.shape == (m, n)
            for t in (2, 3):
                assert torch.equal(outs[t][0], y24) and torch.equal(outs[t][1], ybm)
            _close(y24, reference.sparse24_linear(x, w24, b), dt)
            _close(ybm, reference.bitmap_linear(xb, bw, b), dt)
        # values at an odd bf16 offset (a view): the kernel copies them instead of reading 32-bit pairs in place
        buf = torch.empty(w24.values.numel() + 1, dtype=dt)
        buf[1:].copy_(w24.values.reshape(-1))
        shifted = Sparse24Weight(buf[1:].view(n, k // 2), w24.meta, w24.shape)
        assert torch.equal(_native.sparse24_linear(x, shifted), _native.sparse24_linear(x, w24))
        if k <= 1000:  # x = I: each output is one weight, exactly
            assert torch.equal(_native.sparse24_linear(torch.eye(k).to(dt), w24).t(), w24.to_dense())
            assert torch.equal(_native.bitmap_linear(torch.eye(kb).to(dt), bw).t(), bw.to_dense())


@needs_ext
def test_linear_path_reports_the_dispatch():
    """linear_path is the dispatch itself: forced settings move it; the bitmap's pair range depends on the
    density; bad arguments are named."""
    dt = torch.bfloat16
    try:
        for path in ("direct", "panel"):
            _native.set_outer_min_m(10**9)
            _native.set_amx_min_m(10**9)
            _native.set_panel_min_m(0 if path == "panel" else 10**9)
            for op in ("sparse24_linear", "bitmap_linear"):
                for m in (1, 16, 300):
                    assert _native.linear_path(op, dt, (64, 128), m) == path
        _native.set_outer_min_m(None)
        _native.set_amx_min_m(None)
        _native.set_panel_min_m(None)
        for op in ("sparse24_linear", "bitmap_linear"):
            assert _native.linear_path(op, dt, (64, 128), 0) == "direct"  # empty x
        if "avx512bf16" in ISAS and not HAS_AMX:  # the measured pair range: low density only for the bitmap
            lo = _native.outer_min_m("bitmap_linear", dt, (576, 1536))
            # the bf16 bitmap under 16 MB at density >= 0.25: the lanes kernel from M = 32 (stop 44); below that
            # density, on 7B weights and with it off, the pair / panel ranges
            for density in (0.3, 0.5):
                assert [_native.linear_path("bitmap_linear", dt, (576, 1536), m, density) for m in (31, 32, 4096)] == \
                    ["direct", "lanes", "lanes"]
            assert _native.linear_path("bitmap_linear", dt, (576, 1536), lo, 0.1) == "pair"
            assert _native.linear_path("bitmap_linear", dt, (576, 1535), 64, 0.5) != "lanes"  # odd K
            assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 1024, 0.5) == "lanes"  # (stop 46: no upper end)
            assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 64, 0.3) == "lanes"  # (stop 46: no pair gap)
            _native.set_lanes_min_m(10**9)
            assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 64, 0.5) == "panel"
            assert _native.linear_path("bitmap_linear", dt, (576, 1536), lo, 0.3) == "pair"
            assert _native.linear_path("bitmap_linear", dt, (576, 1536), lo, 0.5) != "pair"
            _native.set_lanes_min_m(None)
            # 2:4 bf16: the shuffle kernel from M = 8 (stop 44); the pair / panel ranges below hold with it off
            for shape in ((576, 1536), (11008, 4096)):
                assert [_native.linear_path("sparse24_linear", dt, shape, m) for m in (7, 8, 64, 4096)] == \
                    ["direct", "shuffle", "shuffle", "shuffle"]
            _native.set_shuffle_min_m(10**9)
            assert _native.linear_path("sparse24_linear", dt, (576, 1536), lo) == "pair"
            hi = _native.pair_max_m("sparse24_linear", dt, (576, 1536))
            assert _native.linear_path("sparse24_linear", dt, (576, 1536), hi) == "panel"
            # 2:4 weights of 16 MB or more from M = 8 (8-lane vectors), smaller ones keep the direct kernel there
            assert _native.linear_path("sparse24_linear", dt, (11008, 4096), 8) == "pair"
            assert _native.linear_path("sparse24_linear", dt, (11008, 4096), 7) != "pair"
            assert _native.linear_path("sparse24_linear", dt, (576, 1536), 8) != "pair"
            # and up to M = 63 only (stop 41: the panels won from 64 on those weights); the bitmap keeps 128
            assert _native.pair_max_m("sparse24_linear", dt, (11008, 4096)) == 64
            assert _native.linear_path("sparse24_linear", dt, (11008, 4096), 63) == "pair"
            assert _native.linear_path("sparse24_linear", dt, (11008, 4096), 64) == "panel"
            _native.set_shuffle_min_m(None)
            assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 64, 0.3) == "lanes"
        if "avx512" in ISAS:  # fp32 on 7B weights (AMX tiles serve bf16 only): the outer kernel's range, by threads
            f32, big = torch.float32, (11008, 4096)
            threads = torch.get_num_threads()
            try:
                if not HAS_AMX:  # fp32 2:4 takes the shuffle kernel from M = 16 (stop 44); the ranges below: it off
                    assert [_native.linear_path("sparse24_linear", f32, big, m) for m in (15, 16, 1024)] == \
                        ["direct", "shuffle", "shuffle"]
                    # the fp32 bitmap: the lanes kernel where the panels would run (stop 44; 7B weights since stop 46)
                    pm = _native.panel_min_m("bitmap_linear", f32, (1536, 576))
                    assert [_native.linear_path("bitmap_linear", f32, (1536, 576), m) for m in (pm - 1, pm)] == \
                        [_native.linear_path("bitmap_linear", f32, (1536, 576), pm - 1), "lanes"]
                    assert _native.linear_path("bitmap_linear", f32, big, 1024) == "lanes"
                _native.set_shuffle_min_m(10**9)
                _native.set_lanes_min_m(10**9)
                torch.set_num_threads(2)
                assert [_native.linear_path("sparse24_linear", f32, big, m) for m in (256, 1023, 1024)] == \
                    ["outer", "outer", "panel"]
                assert [_native.linear_path("bitmap_linear", f32, big, m) for m in (16, 1023, 1024)] == \
                    ["outer", "outer", "panel"]
                assert _native.linear_path("bitmap_linear", f32, (1536, 576), 16) == "panel"  # small: panels
                torch.set_num_threads(1)
                assert [_native.linear_path("sparse24_linear", f32, big, m) for m in (128, 511, 512)] == \
                    ["outer", "outer", "panel"]
                assert [_native.linear_path("bitmap_linear", f32, big, m) for m in (256, 1023, 1024)] == \
                    ["outer", "outer", "panel"]
                assert _native.linear_path("sparse24_linear", f32, (1536, 576), 128) == "panel"  # small: as before
                assert _native.linear_path("bitmap_linear", f32, (1536, 576), 256) == "panel"
            finally:
                _native.set_shuffle_min_m(None)
                _native.set_lanes_min_m(None)
                torch.set_num_threads(threads)
    finally:
        _native.set_outer_min_m(None)
        _native.set_amx_min_m(None)
        _native.set_panel_min_m(None)
        _native.set_shuffle_min_m(None)
        _native.set_lanes_min_m(None)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _native.linear_path("sparse24_linear", torch.float16, (8, 8), 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _native.pair_max_m("sparse24_linear", torch.float16, (8, 8))
    for fn in (_native.pair_max_m, _native.panel_min_m, _native.outer_min_m, _native.amx_range):
        for bad in ((8,), (8, 8, 8), (-1, 8), ("a", 8), 8):
            with pytest.raises(ValueError, match=fn.__name__ + r": shape must be \(N, K\)"):
                fn("sparse24_linear", dt, bad)
    with pytest.raises(ValueError, match=r"linear_path: shape must be \(N, K\)"):
        _native.linear_path("sparse24_linear", dt, (8,), 1)
    with pytest.raises(ValueError, match="m must be an int"):
        _native.linear_path("sparse24_linear", dt, (8, 8), -1)
    with pytest.raises(ValueError, match="density must be in"):
        _native.linear_path("bitmap_linear", dt, (8, 8), 1, 1.5)
    with pytest.raises(RuntimeError, match="unknown op"):
        _native.linear_path("dense", dt, (8, 8), 1)


@needs_ext
@pytest.mark.skipif("avx2" not in ISAS, reason="the four-stream decode kernels are AVX2 / AVX-512 code")
@pytest.mark.parametrize("isa", [i for i in ("avx2", "avx512", "avx512bf16") if i in ISAS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [8, 9, 23])
@pytest.mark.parametrize("m", [1, 3])
def test_decode_four_streams_at_the_end_of_the_tensor(isa, dtype, n, m):
    """M = 1 reads four rows at a time, from the four quarters of a thread's rows; the AVX-512 bitmap
    kernels (M = 1 and M > 1) load values unmasked while a row ends at least 16 (bf16 x: 32) values
    before the tensor does, and take the masked (AVX-512) or one-row (AVX2) kernel for rows that end
    closer. The last rows here hold 0-3 values, K % 32 = 8 leaves a partial word: any thread count
    gives the same bits, close to the reference."""
    k = 1000
    w = torch.randn(n, k) * (torch.rand(n, k) < 0.3)
    w[-2:] = 0
    w[-2, :3] = 1.5  # the second-to-last row: 3 values, the last: none
    bw = BitmapWeight.from_dense(w.to(dtype))
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    old = torch.get_num_threads()
    _native.set_isa(isa)
    try:
        x = torch.randn(m, k).to(dtype)
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append((_native.bitmap_linear(x, bw), _native.sparse24_linear(x, w24)))
        assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs[1:])
        _close(outs[0][0], reference.bitmap_linear(x, bw), dtype)
        _close(outs[0][1], reference.sparse24_linear(x, w24), dtype)
    finally:
        _native.set_isa("auto")
        torch.set_num_threads(old)


@needs_ext
def test_prefetch_distance_changes_speed_not_results():
    n, k = 9, 8196  # M = 1 reads whole rows: the prefetch path
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    bw = BitmapWeight.from_dense(torch.randn(n, k) * (torch.rand(n, k) < 0.3))
    x = torch.randn(1, k)
    base = (_native.sparse24_linear(x, w24), _native.bitmap_linear(x, bw))
    try:
        for nbytes in (0, 64, 1 << 20):
            for op in ("sparse24_linear", "bitmap_linear"):
                _native.set_prefetch_bytes(op, nbytes)
                assert _native.prefetch_bytes(op) == nbytes
            assert torch.equal(_native.sparse24_linear(x, w24), base[0])
            assert torch.equal(_native.bitmap_linear(x, bw), base[1])
    finally:
        for op in ("sparse24_linear", "bitmap_linear"):
            _native.set_prefetch_bytes(op, None)
    assert _native.prefetch_bytes("sparse24_linear") == 1024 and _native.prefetch_bytes("bitmap_linear") == 6144
    with pytest.raises(RuntimeError, match="set_prefetch_bytes"):
        _native.set_prefetch_bytes("bitmap_linear", 1 << 30)
    with pytest.raises(RuntimeError, match="unknown op"):
        _native.prefetch_bytes("dense")


@needs_ext
def test_outer_threshold_is_reported_per_isa():
    old_isa = _native.isa()
    try:
        for isa in ISAS:
            _native.set_isa(isa)
            for dt in DTYPES:
                for shape in ((576, 1536), (11008, 4096)):
                    m24 = _native.outer_min_m("sparse24_linear", dt, shape)
                    mbm = _native.outer_min_m("bitmap_linear", dt, shape)
                    if isa == "avx2":  # 2:4 only; on SmolLM2 shapes used below the panel threshold
                        assert 2 <= m24 < 10**12 and mbm > 10**12
                        if shape == (576, 1536):
                            assert m24 < _native.panel_min_m("sparse24_linear", dt, shape)
                    elif isa.startswith("avx512") and dt == torch.float32:  # zmm kernel, both formats
                        assert 2 <= m24 < _native.panel_min_m("sparse24_linear", dt, shape)
                        assert 2 <= mbm < 10**12
                    elif isa == "avx512bf16" and not HAS_AMX:  # bf16: the pair kernel, both formats
                        assert 2 <= m24 <= mbm < _native.pair_max_m("sparse24_linear", dt, shape)  # 2:4 >= 16 MB: 8
                        assert m24 < _native.pair_max_m("bitmap_linear", dt, shape) <= 256
                    else:  # scalar ISA; bf16 below AVX512_BF16 or with AMX tiles (they or panels serve it)
                        assert m24 > 10**12 and mbm > 10**12
                        assert _native.pair_max_m("sparse24_linear", dt, shape) == 0
    finally:
        _native.set_isa(old_isa)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _native.outer_min_m("sparse24_linear", torch.float16, (8, 8))
    for setter in (_native.set_outer_min_m, _native.set_panel_min_m):
        for bad in (-1, 2.5, "8", True):
            with pytest.raises(ValueError, match="m must be None"):
                setter(bad)
    old_isa = _native.isa()
    try:
        if "avx2" in ISAS:
            _native.set_isa("avx2")  # K too large for the kernel's int32 offsets: never chosen
            assert _native.outer_min_m("sparse24_linear", torch.float32, (8, 1 << 25)) > 10**12
    finally:
        _native.set_isa(old_isa)


@needs_ext
@pytest.mark.parametrize("isa_and_threads", [(isa, 2) for isa in ISAS], indirect=True, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompressors_are_exact(isa_and_threads, dtype):
    """The panel's dense rows equal the format's to_dense bit for bit (odd K, padding bits, empty rows)."""
    n, k = 7, 1001 - 1001 % 4
    w = torch.randn(n, k) * (torch.rand(n, k) < 0.4)
    w[1] = 0
    w[-1, -1] = 3.0
    for tile_k in (32, 128):
        bw = BitmapWeight.from_dense(w.to(dtype), tile_k=tile_k)
        got = _native._C.bitmap_to_dense(bw.values, bw.bitmap, bw.offsets, bw.tile_k, n, k)
        assert torch.equal(got, bw.to_dense())
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    assert torch.equal(_native._C.sparse24_to_dense(w24.values, w24.meta, n, k), w24.to_dense())
    # through the panel GEMM: x = I gives the dense weight back (exact: one nonzero product per output)
    _native.set_panel_min_m(0)
    _native.set_amx_min_m(10**9)
    try:
        eye = torch.eye(k).to(dtype)
        assert torch.equal(_native.sparse24_linear(eye, w24).t(), w24.to_dense())
        assert torch.equal(_native.bitmap_linear(eye, bw).t(), bw.to_dense())
    finally:
        _native.set_panel_min_m(None)
        _native.set_amx_min_m(None)


@needs_ext
@pytest.mark.skipif(not HAS_AMX, reason="this CPU (or OS) has no AMX tiles")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 5, 36), (16, 32, 64), (17, 31, 100), (33, 65, 1000), (70, 40, 260)], ids=str)
def test_amx_tiles_match_reference_and_are_exact_on_identity(threads, shape):
    """The AMX path: M around the 16-row tile and 32-row block edges (1, 16, 17, 33, 70), N not a multiple of
    32, K not a multiple of 32 (padded), non-contiguous x, bias or not; and x = I gives the decompressed
    weight back bit for bit (one nonzero product per output), which pins the tile layout down exactly."""
    m, n, k = shape
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    _native.set_amx_min_m(0)
    try:
        w = torch.randn(n, k)
        w24 = Sparse24Weight.from_dense(w.bfloat16(), prune=True)
        bw = BitmapWeight.from_dense((w * (torch.rand(n, k) < 0.4)).bfloat16())
        x = torch.randn(k, m).bfloat16().t()
        for b in (None, torch.randn(n).bfloat16()):
            _close(_native.sparse24_linear(x, w24, b), reference.sparse24_linear(x, w24, b), torch.bfloat16)
            _close(_native.bitmap_linear(x, bw, b), reference.bitmap_linear(x, bw, b), torch.bfloat16)
        eye = torch.eye(k).bfloat16()
        assert torch.equal(_native.sparse24_linear(eye, w24).t(), w24.to_dense())
        assert torch.equal(_native.bitmap_linear(eye, bw).t(), bw.to_dense())
    finally:
        _native.set_amx_min_m(None)
        torch.set_num_threads(old)


@needs_ext
def test_amx_range_is_reported_bf16_only_and_can_be_turned_off():
    for op in ("sparse24_linear", "bitmap_linear"):
        for shape in ((576, 1536), (11008, 4096)):
            lo, hi = _native.amx_range(op, torch.bfloat16, shape)
            if HAS_AMX:
                assert 1 <= lo < hi <= 1024
            else:
                assert lo > 10**12
            assert _native.amx_range(op, torch.float32, shape)[0] > 10**12
    if HAS_AMX:
        try:
            _native.set_amx_enabled(False)
            assert _native.amx_range("sparse24_linear", torch.bfloat16, (576, 1536))[0] > 10**12
            _native.set_amx_enabled(True)
            _native.set_isa("avx512")  # the tile path needs the avx512bf16 ISA (its conversions)
            assert _native.amx_range("sparse24_linear", torch.bfloat16, (576, 1536))[0] > 10**12
        finally:
            _native.set_amx_enabled(True)
            _native.set_isa("auto")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _native.amx_range("sparse24_linear", torch.float16, (8, 8))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="m must be None"):
            _native.set_amx_min_m(bad)
    with pytest.raises(TypeError, match="True or False"):
        _native.set_amx_enabled("no")  # a truthy string must not switch the path on


@needs_ext
def test_panel_thresholds_are_reported():
    for op in ("sparse24_linear", "bitmap_linear"):
        for dt in DTYPES:
            for shape in ((576, 1536), (11008, 4096)):
                assert 2 <= _native.panel_min_m(op, dt, shape) <= 1024
    _native.set_panel_min_m(3)
    try:
        assert _native.panel_min_m("bitmap_linear", torch.float32, (8, 8)) == 3
    finally:
        _native.set_panel_min_m(None)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _native.panel_min_m("bitmap_linear", torch.float16, (8, 8))
    with pytest.raises(RuntimeError, match="unknown op"):
        _native.panel_min_m("dense", torch.float32, (8, 8))


@needs_ext
def test_panel_split_rule_and_override():
    """The measured rules (two threads; fp32 on AVX2, and on AVX-512 without AMX: weights under 16 MB
    always, the Xeon's rule above; the AMX Xeon: 33-64 rows of x, or 16-32 where K >= 2N; bf16: weights
    under 16 MB up to M = 128, larger ones up to 256, on AVX-512 BF16 without AMX, else never), one thread never, and the
    override both ways."""
    old = torch.get_num_threads()
    no_amx_avx512 = _native.isa().startswith("avx512") and not _native.amx_available()
    bf16_split = _native._C.detected_isa() == "avx512bf16" and not _native.amx_available()
    try:
        torch.set_num_threads(2)
        for m in (8, 128, 256):
            want = bf16_split and m <= 128
            assert _native.panel_split((576, 1536), m, torch.bfloat16) == want
            assert _native.panel_split((1536, 576), m, torch.bfloat16) == want
        big16 = (11008, 4096)  # 90 MB in bf16: up to M = 256 (stop 41)
        for m in (64, 128, 256):
            assert _native.panel_split(big16, m, torch.bfloat16) == bf16_split
        assert not _native.panel_split(big16, 512, torch.bfloat16)
        if _native.isa() == "avx2" or no_amx_avx512:  # stop 35 (Zen 3) / 36 (Zen 4): split panels won every
            for m in (8, 16, 128, 1024):  # small-weight cell
                assert _native.panel_split((576, 1536), m) and _native.panel_split((1536, 576), m)
            big = (4096, 11008)  # 180 MB in fp32: the Xeon's rule
            assert _native.panel_split((11008, 4096), 64) and not _native.panel_split(big, 128)
            assert not _native.panel_split(big, 8) and not _native.panel_split((11008, 4096), 16)
        else:
            assert _native.panel_split((576, 1536), 64) and _native.panel_split((1536, 576), 64)
            assert _native.panel_split((576, 1536), 16) and not _native.panel_split((1536, 576), 16)
            assert not _native.panel_split((576, 1536), 128) and not _native.panel_split((576, 1536), 8)
        assert not _native.panel_split((20, 1536), 64)  # fewer than 16 rows a thread
        _native.set_panel_split(True)
        assert _native.panel_split((1536, 576), 1024)
        _native.set_panel_split(False)
        assert not _native.panel_split((576, 1536), 64)
        _native.set_panel_split(None)
        torch.set_num_threads(1)
        assert not _native.panel_split((576, 1536), 64)
        with pytest.raises(TypeError, match="True, False or None"):
            _native.set_panel_split("no")  # a truthy string must not switch the split on
        with pytest.raises(ValueError, match="shape"):
            _native.panel_split((576,), 64)
        with pytest.raises(TypeError, match="float32 or bfloat16"):
            _native.panel_split((576, 1536), 64, torch.float16)
    finally:
        _native.set_panel_split(None)
        torch.set_num_threads(old)


@needs_ext
def test_panel_bytes_override_and_default():
    """set_panel_bytes: a positive size holds for every dtype, 0 restores the measured default (1 MB; bf16 on
    AVX512_BF16 CPUs without AMX take twice that, csrc/panel.cpp), a negative size is refused by name."""
    try:
        _native._C.set_panel_bytes(64 << 10)
        assert _native._C.panel_bytes() == 64 << 10
        with pytest.raises(RuntimeError, match="set_panel_bytes"):
            _native._C.set_panel_bytes(-1)
        assert _native._C.panel_bytes() == 64 << 10  # unchanged by the refused call
    finally:
        _native._C.set_panel_bytes(0)
    assert _native._C.panel_bytes() == 1 << 20


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_panels_several_per_thread_match_one_call(dtype):
    """64 KB panels: each thread's 61 / 60 rows go through four panels (the last partial); the split result
    equals the reference and the unsplit panel path's."""
    old = torch.get_num_threads()
    m, n, k = 21, 121, 2052
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    try:
        torch.set_num_threads(2)
        _native._C.set_panel_bytes(64 << 10)
        _native.set_panel_min_m(0)
        _native.set_amx_min_m(10**9)
        _native.set_panel_split(True)
        split = _native.sparse24_linear(x, w24, b)
        _native.set_panel_split(False)
        whole = _native.sparse24_linear(x, w24, b)
    finally:
        _native._C.set_panel_bytes(0)  # the measured default
        for setter in (_native.set_panel_min_m, _native.set_amx_min_m, _native.set_panel_split):
            setter(None)
        torch.set_num_threads(old)
    _close(split, reference.sparse24_linear(x, w24, b), dtype)
    _close(split, whole, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_panels_under_inference_mode(dtype):
    """The split path's pool threads run the GEMM into an inference tensor: they must see the caller's
    inference mode (before stop 35 they did not, and a prefill under torch.inference_mode() failed with
    "Inplace update to inference tensor outside InferenceMode")."""
    old = torch.get_num_threads()
    m, n, k = 40, 64, 96
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    bw = BitmapWeight.from_dense(torch.randn(n, k).to(dtype) * (torch.rand(n, k) > 0.7))
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    try:
        torch.set_num_threads(2)
        _native.set_panel_min_m(0)
        _native.set_amx_min_m(10**9)
        _native.set_outer_min_m(10**9)
        _native.set_panel_split(True)
        with torch.inference_mode():
            y24 = _native.sparse24_linear(x, w24, b)
            ybm = _native.bitmap_linear(x, bw, b)
    finally:
        for setter in (_native.set_panel_min_m, _native.set_amx_min_m, _native.set_outer_min_m,
                       _native.set_panel_split):
            setter(None)
        torch.set_num_threads(old)
    assert y24.is_inference() and ybm.is_inference()
    _close(y24, reference.sparse24_linear(x, w24, b), dtype)
    _close(ybm, reference.bitmap_linear(x, bw, b), dtype)
