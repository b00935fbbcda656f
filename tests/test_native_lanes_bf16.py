"""The bf16 kernels with output features in the vector lanes (csrc/lanes_bf16.cpp, AVX512_BF16): sparse24_linear on
the shuffle path (each lane's two x values picked out of a broadcast group by vpshufb) and bitmap_linear on the lanes
path (rows decompressed, multiplied densely). Held to the reference on awkward shapes, to themselves across thread
counts, exactly on x = I, and the dispatch's ranges."""
import pytest
import torch

from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight

from _native_util import (ISAS, _close, _native, kernel_forced, needs_ext, same_bits_in_chunks, same_bits_over_threads,
                          make_bitmap)

pytestmark = [needs_ext, pytest.mark.skipif("avx512bf16" not in ISAS, reason="the shuffle kernel needs AVX512_BF16")]


def assert_one_bf16_step(y, ref32):
    """y (bf16) is an fp32 sum rounded once: within one bf16 step of the fp32 reference ref32."""
    assert ((y.float() - ref32).abs() <= ref32.abs() * 2**-8 + 1e-3 * ref32.abs().max() + 1e-6).all()


# M: 1 (forced), 7 / 8 / 9 (one partial / full register block, a block and a row), 17, 65; N: 1, 5, 16, 17 (a
# partial vector), 32 / 33 (a full block, one more), 70; K: one group, 60 (15 groups: a partial 16-group
# transpose), 256 (64 groups: one full K-block), 260 (65: a second K-block of one group), 4100, 8196 (many
# K-blocks, meta words past the first 8 groups)
SHAPES = [(1, 5, 4), (7, 16, 60), (8, 17, 256), (9, 1, 260), (17, 33, 100), (65, 32, 576), (8, 70, 4100),
          (3, 33, 8196), (64, 5, 1540)]


@pytest.fixture
def shuffle_forced():
    with kernel_forced("avx512bf16", _native.set_shuffle_min_m):
        yield


def _weight(n: int, k: int) -> Sparse24Weight:
    """2:4 by magnitude, so every one of the six kept-column pairs occurs; row 0 all zero."""
    w = torch.randn(n, k)
    w[0] = 0
    return Sparse24Weight.from_dense(w.to(torch.bfloat16), prune=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shuffle_kernel_matches_reference(shuffle_forced, shape):
    m, n, k = shape
    dt = torch.bfloat16
    w24 = _weight(n, k)
    assert _native.linear_path("sparse24_linear", dt, (n, k), m) == "shuffle"
    x = torch.randn(k, m).to(dt).t()  # non-contiguous
    for b in (None, torch.randn(n).to(dt), torch.randn(n)):
        y = same_bits_over_threads(lambda: _native.sparse24_linear(x, w24, b))
        assert y.dtype == dt and y.shape == (m, n)
        _close(y, reference.sparse24_linear(x, w24, b), dt)
        ref32 = x.float() @ w24.to_dense().float().t() + (b.float() if b is not None else 0)
        assert_one_bf16_step(y, ref32)
    if k <= 4100:  # x = I: each output is one weight, exactly (every lane's pair lands on its own column)
        eye = torch.eye(k).to(dt)
        assert torch.equal(_native.sparse24_linear(eye, w24).t(), w24.to_dense())


def test_shuffle_kernel_x_in_chunks(shuffle_forced):
    """x past 8 MB passes over the weight in chunks of rows (517 x 8196 bf16: 264 + 253 rows, the last register
    block partial): the same bits as each slice of x alone (one chunk), and within one bf16 step of fp32."""
    m, n, k = 517, 33, 8196
    dt = torch.bfloat16
    w24 = _weight(n, k)
    x = torch.randn(m, k).to(dt)
    assert x.numel() * 2 > 8 << 20
    b = torch.randn(n)
    cuts = ((0, 8), (258, 270), (512, 517))  # first rows, both sides of the chunk edge, the last rows
    y = same_bits_in_chunks(lambda x_, w_: _native.sparse24_linear(x_, w_, b), x, w24, cuts)
    assert_one_bf16_step(y, x.float() @ w24.to_dense().float().t() + b)


def test_shuffle_kernel_nan_and_empty(shuffle_forced):
    dt = torch.bfloat16
    w24 = _weight(33, 64)
    x = torch.randn(9, 64).to(dt)
    b = torch.zeros(33)
    b[3] = float("nan")
    y = _native.sparse24_linear(x, w24, b)
    assert torch.isnan(y[:, 3]).all() and not torch.isnan(y[:, :3]).any()
    assert _native.sparse24_linear(x[:0], w24).shape == (0, 33)


@pytest.mark.skipif(_native is not None and _native.amx_available(), reason="AMX tiles serve that M range")
def test_dispatch_takes_the_shuffle_kernel_from_m8():
    """Measured defaults (stop 44): from M = 8 on for every 2:4 bf16 weight (from 9 on 7B down projections, stop 46);
    the direct kernel below; the bitmap
    never (fp32: test_native_lanes_fp32.py); a forced threshold of another path wins over the default, a forced shuffle over all."""
    dt = torch.bfloat16
    for shape in ((1536, 576), (576, 1536), (11008, 4096)):
        assert _native.linear_path("sparse24_linear", dt, shape, 7) == "direct"
        for m in (8, 64, 1024):
            assert _native.linear_path("sparse24_linear", dt, shape, m) == "shuffle"
        assert _native.linear_path("bitmap_linear", dt, shape, 64) != "shuffle"
    # 16 MB and more with K >= 2 N (stop 46): the direct kernel keeps one register block of x, M <= 8
    for shape in ((4096, 11008), (1024, 8196)):
        assert [_native.linear_path("sparse24_linear", dt, shape, m) for m in (8, 9)] == ["direct", "shuffle"]
    assert _native.linear_path("sparse24_linear", dt, (1024, 2048), 8) == "shuffle"  # under 16 MB
    try:
        _native.set_panel_min_m(0)
        assert _native.linear_path("sparse24_linear", dt, (576, 1536), 64) == "panel"
        assert _native.linear_path("sparse24_linear", dt, (4096, 11008), 8) == "panel"  # forced over the direct rule
        _native.set_shuffle_min_m(0)
        assert _native.linear_path("sparse24_linear", dt, (576, 1536), 1) == "shuffle"
        assert _native.linear_path("sparse24_linear", dt, (4096, 11008), 8) == "shuffle"
        _native.set_shuffle_min_m(10**9)
        _native.set_panel_min_m(None)
        assert _native.linear_path("sparse24_linear", dt, (576, 1536), 64) in ("pair", "panel")
    finally:
        _native.set_shuffle_min_m(None)
        _native.set_panel_min_m(None)
    _native.set_isa("avx512")  # no AVX512_BF16: no shuffle kernel
    try:
        assert _native.linear_path("sparse24_linear", dt, (576, 1536), 64) != "shuffle"
    finally:
        _native.set_isa("auto")
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_shuffle_min_m: m must be None"):
            _native.set_shuffle_min_m(bad)


# The bitmap on the lanes path (lanes_dense_bf16: 16 rows' words expanded straight into 16-feature pair vectors):
# K even only (odd K keeps the other paths); K = 2 (one pair), 254 / 256 / 258 (around one 128-pair block),
# 4098; tile_k 32 and 128; rows empty, full and nearly empty.
BITMAP_SHAPES = [(1, 5, 2), (7, 16, 254), (8, 17, 256), (9, 1, 258), (17, 33, 100), (65, 32, 576), (8, 70, 4098),
                 (33, 3, 1540)]


@pytest.fixture
def lanes_forced():
    with kernel_forced("avx512bf16", _native.set_lanes_min_m):
        yield


@pytest.mark.parametrize("shape", BITMAP_SHAPES, ids=str)
@pytest.mark.parametrize("tile_k", [32, 128])
def test_lanes_kernel_matches_reference(lanes_forced, shape, tile_k):
    m, n, k = shape
    dt = torch.bfloat16
    bw = make_bitmap(n, k, torch.bfloat16, tile_k, last_row_values=1)
    density = bw.values.numel() / (n * k)
    assert _native.linear_path("bitmap_linear", dt, (n, k), m, density) == "lanes"
    x = torch.randn(k, m).to(dt).t()  # non-contiguous
    for b in (None, torch.randn(n).to(dt), torch.randn(n)):
        y = same_bits_over_threads(lambda: _native.bitmap_linear(x, bw, b))
        assert y.dtype == dt and y.shape == (m, n)
        _close(y, reference.bitmap_linear(x, bw, b), dt)
        ref32 = x.float() @ bw.to_dense().float().t() + (b.float() if b is not None else 0)
        assert_one_bf16_step(y, ref32)
    eye = torch.eye(k).to(dt)
    assert torch.equal(_native.bitmap_linear(eye, bw).t(), bw.to_dense())


def test_lanes_kernel_x_in_chunks(lanes_forced):
    """x past 8 MB in chunks of rows (517 x 8196 bf16): every chunk refills the panels from the bitmap, the rows'
    cursors restarting per chunk; the same bits as each slice of x alone, within one bf16 step of fp32."""
    m, n, k = 517, 33, 8196
    dt = torch.bfloat16
    bw = make_bitmap(n, k, dt, 128, last_row_values=1)
    x = torch.randn(m, k).to(dt)
    assert x.numel() * 2 > 8 << 20
    y = same_bits_in_chunks(_native.bitmap_linear, x, bw, ((0, 8), (258, 270), (512, 517)))
    assert_one_bf16_step(y, x.float() @ bw.to_dense().float().t())


def test_lanes_kernel_odd_k_keeps_other_paths(lanes_forced):
    dt = torch.bfloat16
    bw = make_bitmap(20, 101, torch.bfloat16, 32)
    assert _native.linear_path("bitmap_linear", dt, (20, 101), 40, 0.5) != "lanes"
    x = torch.randn(40, 101).to(dt)
    _close(_native.bitmap_linear(x, bw), reference.bitmap_linear(x, bw), dt)


@pytest.mark.skipif(_native is not None and _native.amx_available(), reason="AMX tiles serve that M range")
def test_dispatch_takes_the_lanes_kernel_for_small_bitmaps_from_m32():
    """Measured defaults (stop 44): bf16 bitmaps under 16 MB at density >= 0.25 from M = 32 on; sparser ones
    never (fp32: test_native_lanes_fp32.py). 7B weights: test_dispatch_lanes_range_on_large_bf16_weights."""
    dt = torch.bfloat16
    for shape in ((1536, 576), (576, 1536)):
        for density in (0.3, 0.5):
            assert _native.linear_path("bitmap_linear", dt, shape, 31, density) == "direct"
            assert _native.linear_path("bitmap_linear", dt, shape, 32, density) == "lanes"
            assert _native.linear_path("bitmap_linear", dt, shape, 1024, density) == "lanes"
        assert _native.linear_path("bitmap_linear", dt, shape, 64, 0.2) != "lanes"
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_lanes_min_m: m must be None"):
            _native.set_lanes_min_m(bad)


@pytest.mark.skipif(_native is not None and _native.amx_available(), reason="AMX tiles serve that M range")
def test_dispatch_lanes_range_on_large_bf16_weights():
    """Measured defaults (stops 45-46): bf16 bitmaps of 16 MB and more take the lanes kernel from M = 8 on at density
    0.25 and more (x in 8 MB chunks at large M; stop 45 left the pair kernel's range at density <= 0.4 and stopped at
    1024); fp32 ones (lanes_fp32.cpp) from M = 16 at density above 0.4 and from panel_min_m below it."""
    dt = torch.bfloat16
    for shape in ((11008, 4096), (4096, 11008)):
        for m in (1, 4, 7):
            assert _native.linear_path("bitmap_linear", dt, shape, m, 0.5) == "direct"
        pair_end = _native.pair_max_m("bitmap_linear", dt, shape)
        assert 32 < pair_end < 1024
        for density in (0.5, 0.3):
            for m in (8, 16, 32, pair_end - 1, pair_end, 256, 1023, 1024, 4096):
                assert _native.linear_path("bitmap_linear", dt, shape, m, density) == "lanes"
        assert _native.linear_path("bitmap_linear", dt, shape, 64, 0.2) != "lanes"
        f32 = torch.float32
        pm = _native.panel_min_m("bitmap_linear", f32, shape)
        assert 16 < pm <= 1024
        assert _native.linear_path("bitmap_linear", f32, shape, 15, 0.5) != "lanes"
        for m in (16, 64, pm, 4096):
            assert _native.linear_path("bitmap_linear", f32, shape, m, 0.5) == "lanes"
        assert _native.linear_path("bitmap_linear", f32, shape, 64, 0.3) == "outer"
        assert _native.linear_path("bitmap_linear", f32, shape, pm, 0.3) == "lanes"
    # a forced threshold covers the sparser weights too
    _native.set_lanes_min_m(8)
    try:
        assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 64, 0.2) == "lanes"
        assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 4096, 0.5) == "lanes"
    finally:
        _native.set_lanes_min_m(None)
