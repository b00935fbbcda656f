"""The fp32 kernels with output features in the vector lanes (csrc/lanes_fp32.cpp, AVX-512): sparse24_linear on the
shuffle path (each lane's x[i0] and x[i1] picked out of a broadcast group by vpermilps) and bitmap_linear on the
lanes path (rows decompressed, multiplied densely). Held to the reference on awkward shapes, to themselves across
thread counts, exactly on x = I, and the dispatch's ranges."""
import pytest
import torch

from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight

from _native_util import (ISAS, _close, _native, kernel_forced, needs_ext, same_bits_in_chunks, same_bits_over_threads,
                          make_bitmap)

pytestmark = [needs_ext, pytest.mark.skipif("avx512" not in ISAS, reason="the fp32 shuffle kernel needs AVX-512")]

# M: 1, 7 / 8 / 9 (register blocks), 17, 65; N: partial vectors and blocks; K: one group, 28 (7 groups: a partial
# 8-group transpose), 128 / 132 (32 groups: one K-block, and one more group), 4100, 8196
SHAPES = [(1, 5, 4), (7, 16, 28), (8, 17, 128), (9, 1, 132), (17, 33, 100), (65, 32, 576), (8, 70, 4100),
          (3, 33, 8196)]


@pytest.fixture
def shuffle_forced():
    with kernel_forced("avx512", _native.set_shuffle_min_m):
        yield


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_shuffle_kernel_matches_reference(shuffle_forced, shape):
    m, n, k = shape
    w = torch.randn(n, k)
    w[0] = 0
    w24 = Sparse24Weight.from_dense(w, prune=True)
    assert _native.linear_path("sparse24_linear", torch.float32, (n, k), m) == "shuffle"
    x = torch.randn(k, m).t()  # non-contiguous
    for b in (None, torch.randn(n)):
        y = same_bits_over_threads(lambda: _native.sparse24_linear(x, w24, b))
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _close(y, reference.sparse24_linear(x, w24, b), torch.float32)
    eye = torch.eye(k)
    assert torch.equal(_native.sparse24_linear(eye, w24).t(), w24.to_dense())


def test_fp32_shuffle_kernel_x_in_chunks(shuffle_forced):
    """x past 8 MB passes over the weight in chunks of rows (261 x 8196 fp32: 136 + 125 rows): the same bits as
    each slice of x alone (one chunk), and within fp32 rounding of the reference (sums of 4,098 products: the
    bound is relative to the sum of their magnitudes)."""
    m, n, k = 261, 33, 8196
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    x = torch.randn(m, k)
    assert x.numel() * 4 > 8 << 20
    y = same_bits_in_chunks(_native.sparse24_linear, x, w24, ((0, 8), (130, 140), (256, 261)))
    assert ((y - reference.sparse24_linear(x, w24)).abs() <= 1e-5 * (x.abs() @ w24.to_dense().abs().t())).all()


def test_fp32_shuffle_kernel_nan_and_empty(shuffle_forced):
    w24 = Sparse24Weight.from_dense(torch.randn(33, 64), prune=True)
    x = torch.randn(9, 64)
    x[2, 5] = float("nan")
    y = _native.sparse24_linear(x, w24)
    # only kept weights are multiplied (as in the direct kernels): the NaN reaches the outputs that keep column 5
    kept = w24.to_dense()[:, 5] != 0
    assert 0 < kept.sum() < 33
    assert torch.equal(torch.isnan(y[2]), kept) and not torch.isnan(y[[0, 1, 3]]).any()
    assert _native.sparse24_linear(x[:0], w24).shape == (0, 33)


@pytest.mark.skipif(_native is not None and _native.amx_available(), reason="not measured on AMX CPUs: off there")
def test_dispatch_takes_the_fp32_shuffle_kernel_from_m16():
    f32 = torch.float32
    for shape in ((1536, 576), (576, 1536), (11008, 4096)):
        assert _native.linear_path("sparse24_linear", f32, shape, 15) != "shuffle"
        for m in (16, 256, 4096):
            assert _native.linear_path("sparse24_linear", f32, shape, m) == "shuffle"
        assert _native.linear_path("bitmap_linear", f32, shape, 64) != "shuffle"
    _native.set_isa("avx2")  # no AVX-512: no kernel
    try:
        assert _native.linear_path("sparse24_linear", f32, (576, 1536), 64) != "shuffle"
    finally:
        _native.set_isa("auto")


# The fp32 bitmap on the lanes path (lanes_dense_fp32, its panels filled from the bitmap 16 columns at a time by
# bm_lanes_panel_f32: 16-feature column vectors): any K
# (K = 1, 127 / 128 / 129 around one 128-column block, 4099), tile_k 32 and 128.
BITMAP_SHAPES = [(1, 5, 1), (7, 16, 127), (8, 17, 128), (9, 1, 129), (17, 33, 100), (65, 32, 576), (8, 70, 4099)]


@pytest.fixture
def lanes_forced():
    with kernel_forced("avx512", _native.set_lanes_min_m):
        yield


@pytest.mark.parametrize("shape", BITMAP_SHAPES, ids=str)
@pytest.mark.parametrize("tile_k", [32, 128])
def test_fp32_lanes_kernel_matches_reference(lanes_forced, shape, tile_k):
    m, n, k = shape
    bw = make_bitmap(n, k, torch.float32, tile_k, last_row_values=1)
    assert _native.linear_path("bitmap_linear", torch.float32, (n, k), m, 0.5) == "lanes"
    x = torch.randn(k, m).t()  # non-contiguous
    for b in (None, torch.randn(n)):
        y = same_bits_over_threads(lambda: _native.bitmap_linear(x, bw, b))
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _close(y, reference.bitmap_linear(x, bw, b), torch.float32)
    assert torch.equal(_native.bitmap_linear(torch.eye(k), bw).t(), bw.to_dense())


def test_fp32_lanes_kernel_x_in_chunks(lanes_forced):
    """x past 8 MB in chunks of rows (261 x 8196 fp32): the rows are decompressed again per chunk; the same bits as
    each slice of x alone, within fp32 rounding of the reference."""
    m, n, k = 261, 33, 8196
    bw = make_bitmap(n, k, torch.float32, 128, last_row_values=1)
    x = torch.randn(m, k)
    assert x.numel() * 4 > 8 << 20
    y = same_bits_in_chunks(_native.bitmap_linear, x, bw, ((0, 8), (130, 140), (256, 261)))
    assert ((y - reference.bitmap_linear(x, bw)).abs() <= 1e-5 * (x.abs() @ bw.to_dense().abs().t())).all()


@pytest.mark.skipif(_native is not None and _native.amx_available(), reason="not measured on AMX CPUs: off there")
def test_dispatch_puts_fp32_bitmaps_on_the_lanes_kernel_in_place_of_panels():
    """Measured defaults: the lanes kernel where the panels would start (stop 44; 7B weights since stop 46), and above
    a density of 0.4 from M = 16 at the latest (stop 45: it beat the outer-product kernel there); sparser than 0.25
    never."""
    f32 = torch.float32
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for shape in ((1536, 576), (576, 1536), (11008, 4096), (4096, 11008)):
                first = _native.panel_min_m("bitmap_linear", f32, shape)
                assert _native.linear_path("bitmap_linear", f32, shape, first, 0.3) == "lanes"
                assert _native.linear_path("bitmap_linear", f32, shape, first - 1, 0.3) != "lanes"
                start = min(first, 16)
                assert _native.linear_path("bitmap_linear", f32, shape, start, 0.5) == "lanes"
                assert _native.linear_path("bitmap_linear", f32, shape, start - 1, 0.5) != "lanes"
                assert _native.linear_path("bitmap_linear", f32, shape, first, 0.2) == "panel"  # sparser: not measured
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(_native is not None and (_native.amx_available() or "avx512" not in _native.isa()),
                    reason="measured on AVX-512 CPUs without AMX")
def test_dispatch_keeps_small_fp32_bitmaps_on_the_direct_kernel_below_m12_with_two_threads():
    """Stop 47: with two threads the fp32 lanes kernel on weights under 16 MB starts at M = 12 (it started at 8, where
    the direct kernel was 1.2-1.4x faster); one thread keeps its thresholds."""
    f32 = torch.float32
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for shape in ((1536, 576), (576, 1536)):
            assert _native.panel_min_m("bitmap_linear", f32, shape) == 12
            for density in (0.5, 0.3):
                for m in (8, 11):
                    assert _native.linear_path("bitmap_linear", f32, shape, m, density) == "direct"
                assert _native.linear_path("bitmap_linear", f32, shape, 12, density) == "lanes"
        torch.set_num_threads(1)
        assert _native.panel_min_m("bitmap_linear", f32, (1536, 576)) == 256
        assert _native.linear_path("bitmap_linear", f32, (1536, 576), 16, 0.5) == "lanes"
    finally:
        torch.set_num_threads(old)
