"""Shared by the native-kernel tests (test_native.py, test_native_paths.py): the extension (or None), the ISAs
this CPU has, the ISA / thread-count fixture, the dtype-aware comparison, and the fixtures that force one
linear path."""
import contextlib

import pytest
import torch

from conftest import TOLERANCES

_IMPORT_ERROR = None
try:
    from laco_kernels import _native
except ImportError as exc:  # the extension is optional
    _native, _IMPORT_ERROR = None, exc


needs_ext = pytest.mark.skipif(_native is None, reason="laco_kernels._C is not built (C++ extension is optional)")

_ISA_ORDER = ("scalar", "avx2", "avx512", "avx512bf16")
ISAS = list(_ISA_ORDER[: _ISA_ORDER.index(_native._C.detected_isa()) + 1]) if _native else ["scalar"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def isa_and_threads(request):
    isa, threads = request.param
    old = torch.get_num_threads()
    _native.set_isa(isa)
    assert _native.isa() == isa
    torch.set_num_threads(threads)
    yield isa
    _native.set_isa("auto")
    torch.set_num_threads(old)


CONFIGS = [(isa, t) for isa in ISAS for t in (1, 2)]


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])


HAS_AMX = bool(_native and _native.amx_available())


LINEAR_PATHS = ("direct", "outer", "amx", "panel", "split", "shuffle", "lanes")


@pytest.fixture
def linear_path(request):
    """Force one path for every op (restored to the measured defaults after). "outer" exists for 2:4 on
    AVX2; elsewhere that setting runs the direct kernels. "amx" (csrc/amx_linear.cpp) exists for bf16 on
    CPUs with AMX tiles at the avx512bf16 ISA; it is skipped elsewhere. "shuffle" (csrc/lanes_bf16.cpp,
    lanes_fp32.cpp) serves 2:4 (fp32 from the avx512 ISA, bf16 at avx512bf16), "lanes" the bf16 bitmap (even K) at
    avx512bf16; elsewhere those settings run the direct kernels."""
    if request.param == "amx" and not HAS_AMX:
        pytest.skip("this CPU (or OS) has no AMX tiles")
    if (request.param == "lanes" and "avx512bf16" not in ISAS) or (request.param == "shuffle" and "avx512" not in ISAS):
        pytest.skip("the shuffle kernels need AVX-512 (bf16: AVX512_BF16), the lanes kernel AVX512_BF16")
    _native.set_shuffle_min_m(0 if request.param == "shuffle" else 10**9)
    _native.set_lanes_min_m(0 if request.param == "lanes" else 10**9)
    _native.set_outer_min_m(0 if request.param == "outer" else 10**9)
    _native.set_amx_min_m(0 if request.param == "amx" else 10**9)
    _native.set_panel_min_m(0 if request.param in ("panel", "split") else 10**9)
    _native.set_panel_split(request.param == "split")
    yield request.param
    _native.set_shuffle_min_m(None)
    _native.set_lanes_min_m(None)
    _native.set_outer_min_m(None)
    _native.set_amx_min_m(None)
    _native.set_panel_min_m(None)
    _native.set_panel_split(None)


@contextlib.contextmanager
def _outer_kernel_forced(isa: str):
    """The outer-product kernel (bf16 at avx512bf16: the pair kernel) forced for every op at this ISA cap;
    the ISA, the thresholds and the thread count restored after."""
    old = torch.get_num_threads()
    _native.set_isa(isa)
    _native.set_amx_min_m(10**9)
    _native.set_outer_min_m(0)
    _native.set_panel_min_m(10**9)
    try:
        yield
    finally:
        _native.set_isa("auto")
        _native.set_outer_min_m(None)
        _native.set_amx_min_m(None)
        _native.set_panel_min_m(None)
        torch.set_num_threads(old)


@contextlib.contextmanager
def kernel_forced(isa: str, setter):
    """One kernel's threshold forced to 0 (``setter``: e.g. ``_native.set_shuffle_min_m``) at this ISA cap; the
    threshold, the ISA and the thread count restored after."""
    old = torch.get_num_threads()
    _native.set_isa(isa)
    setter(0)
    try:
        yield
    finally:
        setter(None)
        _native.set_isa("auto")
        torch.set_num_threads(old)


def make_bitmap(n: int, k: int, dtype: torch.dtype, tile_k: int, density: float = 0.5, last_row_values: int = 3):
    """A BitmapWeight at ``density``; row 0 empty, row 1 full, the last row ``last_row_values`` values (it ends near
    the tensor's end: unmasked value loads must give way to masked ones there)."""
    from laco_kernels.formats import BitmapWeight
    w = torch.randn(n, k) * (torch.rand(n, k) < density)
    w[0] = 0
    if n > 2:
        w[1] = torch.randn(k)
        w[-1] = 0
        w[-1, :last_row_values] = 1.5
    return BitmapWeight.from_dense(w.to(dtype), tile_k=tile_k)


def same_bits_over_threads(fn):
    """fn() at 1, 2 and 3 threads: asserts the outputs are bit-identical (each output summed by one thread in a
    fixed order) and returns the first."""
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(fn())
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    return outs[0]


def same_bits_in_chunks(linear, x, w, cuts):
    """linear(x, w) for an x large enough to go through the lane kernels in chunks of rows: bit-identical over 1-3
    threads and, for each (lo, hi) in cuts, to linear(x[lo:hi], w) (those rows alone: one chunk); returns it."""
    y = same_bits_over_threads(lambda: linear(x, w))
    for lo, hi in cuts:
        assert torch.equal(y[lo:hi], linear(x[lo:hi], w))
    return y
