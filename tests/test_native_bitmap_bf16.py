"""bitmap_linear with bf16 x and weights on its direct path (AVX512_BF16): the register-blocked kernel
(csrc/bitmap_avx512.inc ``bm_bf16_block``: 3 weight rows x 8 rows of x, expanded inline for up to two M-blocks
or once into a dense buffer for more) held to the reference and to the one-row kernel it replaces from
``bitmap_block_min_m()`` on. Split from test_native_paths.py to keep files short."""
import pytest
import torch

from laco_kernels import reference
from laco_kernels.formats import BitmapWeight

from _native_util import ISAS, _close, _native, make_bitmap, needs_ext

pytestmark = [needs_ext, pytest.mark.skipif("avx512bf16" not in ISAS, reason="the blocked kernel needs AVX512_BF16")]

# M: 1-3 (one partial M-block, inline expansion; 1 only when forced), 8 (one full block), 9 / 16 (two M-blocks,
# still inline), 17 / 65 (buffered, a partial last block); N: 1-4 (a group of 3 rows and its remainder), 70; K: under one word, not a multiple of 32 (a partial
# last word), 8196 (several K-blocks: the outputs are summed over blocks)
SHAPES = [(1, 5, 100), (2, 1, 36), (3, 4, 100), (8, 7, 1000), (9, 3, 1001), (16, 70, 576), (17, 5, 8196), (64, 10, 300),
          (65, 2, 2052)]


@pytest.fixture
def direct_blocked():
    """The direct path forced (no panels, pair / outer kernel or AMX tiles), blocked kernel from M = 0."""
    old = torch.get_num_threads()
    _native.set_isa("avx512bf16")
    for setter in (_native.set_panel_min_m, _native.set_outer_min_m, _native.set_amx_min_m):
        setter(10**9)
    _native.set_bitmap_block_min_m(0)
    try:
        yield
    finally:
        for setter in (_native.set_panel_min_m, _native.set_outer_min_m, _native.set_amx_min_m,
                       _native.set_bitmap_block_min_m):
            setter(None)
        _native.set_isa("auto")
        torch.set_num_threads(old)


def _weight(n: int, k: int, tile_k: int) -> BitmapWeight:
    """Density 0.5; row 0 empty, row 1 full, the last row 3 values (make_bitmap)."""
    return make_bitmap(n, k, torch.bfloat16, tile_k)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tile_k", [32, 128])
def test_blocked_kernel_matches_reference(direct_blocked, shape, tile_k):
    m, n, k = shape
    dt = torch.bfloat16
    bw = _weight(n, k, tile_k)
    assert _native.linear_path("bitmap_linear", dt, (n, k), m, bw.values.numel() / (n * k)) == "direct"
    x = torch.randn(k, m).to(dt).t()  # non-contiguous
    for b in (None, torch.randn(n).to(dt), torch.randn(n)):
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(_native.bitmap_linear(x, bw, b))
        y = outs[0]
        assert y.dtype == dt and y.shape == (m, n)
        assert all(torch.equal(o, y) for o in outs[1:])  # each output summed by one thread, fixed order
        _close(y, reference.bitmap_linear(x, bw, b), dt)
        _native.set_bitmap_block_min_m(10**9)  # the one-row kernel: same sums in another order
        try:
            _close(y, _native.bitmap_linear(x, bw, b), dt)
        finally:
            _native.set_bitmap_block_min_m(0)
    if k <= 2052:  # x = I: each output is one weight, exactly
        eye = torch.eye(k).to(dt)
        assert torch.equal(_native.bitmap_linear(eye[: max(m, 2)], bw).t(), bw.to_dense()[:, : max(m, 2)])
        assert torch.equal(_native.bitmap_linear(eye, bw).t(), bw.to_dense())


def test_block_range_default_override_and_bad_input():
    assert _native.bitmap_block_range(576) == (2, 2**62)  # M = 1 keeps the one-row streaming kernel
    assert _native.bitmap_block_range(11008, 0.5) == (2, 4)  # long rows at 50%: the one-row kernel from M = 4
    assert _native.bitmap_block_range(11008, 0.3) == (2, 2**62)
    try:
        _native.set_bitmap_block_min_m(5)
        assert _native.bitmap_block_range(11008, 0.5) == (5, 2**62)
    finally:
        _native.set_bitmap_block_min_m(None)
    assert _native.bitmap_block_range(576) == (2, 2**62)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_bitmap_block_min_m: m must be None"):
            _native.set_bitmap_block_min_m(bad)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="bitmap_block_range: k must be a positive int"):
            _native.bitmap_block_range(bad)
    for bad in (1.5, -0.1, "0.5", None):
        with pytest.raises(ValueError, match="density must be a number in"):
            _native.bitmap_block_range(64, bad)


@pytest.mark.skipif(_native is not None and _native.amx_available(), reason="AMX tiles serve that M range")
def test_dispatch_keeps_small_bitmap_weights_on_the_blocked_kernel():
    """Below 16 MB (SmolLM2's linears) the blocked kernel serves bf16 bitmaps up to M = 31 (K < 1024) or 63
    (K >= 1024); the panels (50%) and the pair kernel (70%) take over there (stop 42's evidence). Since stop 44
    the lanes kernel serves from M = 32 at density >= 0.25 (test_native_lanes_bf16.py); here it is off."""
    dt = torch.bfloat16
    _native.set_lanes_min_m(10**9)
    try:
        _blocked_kernel_ranges(dt)
    finally:
        _native.set_lanes_min_m(None)


def _blocked_kernel_ranges(dt):
    for (n, k), first in (((1536, 576), 32), ((576, 1536), 64)):
        assert _native.panel_min_m("bitmap_linear", dt, (n, k)) == first
        assert _native.outer_min_m("bitmap_linear", dt, (n, k)) == first
        for density, after in ((0.5, "panel"), (0.3, "pair")):
            assert _native.linear_path("bitmap_linear", dt, (n, k), first - 1, density) == "direct"
            assert _native.linear_path("bitmap_linear", dt, (n, k), first, density) == after
    # 7B weights keep their ranges: panels from 8, the pair kernel at 70% from 16
    assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 8, 0.5) == "panel"
    assert _native.linear_path("bitmap_linear", dt, (11008, 4096), 16, 0.3) == "pair"
    _native.set_isa("avx512")  # no AVX512_BF16, no blocked kernel: small weights keep panels from 16
    try:
        assert _native.panel_min_m("bitmap_linear", dt, (576, 1536)) == 16
    finally:
        _native.set_isa("auto")


@pytest.mark.parametrize("m", [8, 17, 33])
def test_blocked_kernel_rounds_its_sums_as_torch(direct_blocked, m):
    """The fp32 sums go to bf16 in 16 x 16 register tiles (``bm_store_yt``): ties round to even and inf stays inf, bit
    for bit as torch rounds, and NaN where torch has NaN (as the quiet 0x7fc0 of ``c10::BFloat16``, as every native
    kernel writes it; torch's tensor conversion keeps the fp32 NaN's sign and payload instead), on M and N that are
    not multiples of 16."""
    n, k, tiny = 21, 64, 2.0**-8
    w = torch.zeros(n, k)
    for i in range(16):  # 1 + t * 2^-8, t = 1, 3, 5: ties between two bf16 neighbours, to be rounded to even
        w[i, i] = 1.0
        w[i, 32 + i] = tiny * (1 + 2 * (i % 3))
    w[16, 40], w[17, 41], w[18, 5], w[19, 6], w[20, 7] = 2.0**100, -2.0**-100, -3.0, 1e-30, 7.0
    x = torch.ones(m, k)
    x[0, 40] = float("nan")  # NaN on row 0 (times the zeros too: the dense product's NaN everywhere)
    x[1, 0] = float("inf")  # inf at (1, 0), inf * 0 = NaN elsewhere on row 1
    bw = BitmapWeight.from_dense(w.to(torch.bfloat16))
    y = _native.bitmap_linear(x.to(torch.bfloat16), bw)
    expected = (x @ w.t()).to(torch.bfloat16)  # each sum exact in fp32: only the rounding to bf16 is tested
    nan = torch.isnan(expected)
    assert nan.any() and torch.isinf(expected).any()
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert bool((y[nan].view(torch.int16) == 0x7FC0).all())
