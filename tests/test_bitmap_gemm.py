"""kernels/bitmap_gemm.py in the Triton interpreter against reference.bitmap_linear."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import BitmapWeight
from laco_kernels.kernels import bitmap_gemm as bg

# (M, N, K, dtype, bias, sparsity, tile_k); N, K not multiples of the tiles, K = 1000 the large-K case
CASES = [(1, 37, 72, torch.float16, True, 0.5, 128), (1, 70, 1000, torch.float32, False, 0.7, 128),
         (3, 45, 100, torch.float16, False, 0.9, 64), (16, 33, 300, torch.float32, True, 0.5, 256),
         (67, 70, 200, torch.float16, True, 0.7, 128), (256, 40, 136, torch.float32, False, 0.5, 64)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


def sparse(n, k, s, dtype):
    return (torch.randn(n, k) * (torch.rand(n, k) >= s)).to(dtype)


def run(x, bw, b=None):
    return bg.bitmap_linear(x, bw.values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k, b)


@pytest.mark.parametrize("m,n,k,dtype,bias,s,tile_k", CASES)
def test_matches_reference(m, n, k, dtype, bias, s, tile_k):
    bw = BitmapWeight.from_dense(sparse(n, k, s, dtype), tile_k=tile_k)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = run(x, bw, b)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, reference.bitmap_linear(x, bw, b), dtype)


def test_empty_rows_full_tiles_and_non_contiguous_x():
    w = sparse(20, 260, 0.5, torch.float32)
    w[3] = 0  # a row with no nonzero
    w[5, :128] = torch.randn(128)  # a fully dense tile
    w[7, 128:] = 0
    bw = BitmapWeight.from_dense(w)
    x = torch.randn(260, 4).t()
    assert not x.is_contiguous()
    close(run(x, bw), reference.bitmap_linear(x, bw), torch.float32)


def test_all_zero_weight():
    bw = BitmapWeight.from_dense(torch.zeros(9, 64), tile_k=64)
    assert bw.values.numel() == 0
    b = torch.randn(9)
    close(run(torch.randn(2, 64), bw, b), b.expand(2, 9), torch.float32)


# prefill (M > 16): tile_k 64 / 128 / 256,
# K not a multiple of tile_k (a partial last tile and a half-used last word), odd N
PREFILL = [(17, 37, 300, torch.float16, False, 0.5, 256), (67, 45, 200, torch.float32, True, 0.9, 64),
           (256, 33, 452, torch.float16, True, 0.7, 128)]


@pytest.mark.parametrize("m,n,k,dtype,bias,s,tile_k", PREFILL)
def test_prefill_matches_reference(m, n, k, dtype, bias, s, tile_k):
    w = sparse(n, k, s, dtype)
    w[1] = 0  # an empty row
    w[2, :tile_k] = torch.randn(tile_k).to(dtype)  # a full tile (rank reaches tile_k - 1)
    w[3, -1] = 1.5  # the very last column
    bw = BitmapWeight.from_dense(w, tile_k=tile_k)
    x = torch.randn(k, m).to(dtype).t()  # non-contiguous
    b = torch.randn(n).to(dtype) if bias else None
    close(run(x, bw, b), reference.bitmap_linear(x, bw, b), dtype)
