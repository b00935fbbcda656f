"""kernels/sparse24_gemm.py in the Triton interpreter against reference.sparse24_linear."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight
from laco_kernels.kernels import sparse24_gemm as sg
from laco_kernels.kernels.dense_gemm import gemm_config, split_k

# (M, N, K): M = 1 / 3 / 16 (decode, split-K), 67 / 256 (prefill); N, K not multiples of the tiles;
# K = 1028 is the "large K" case (9 K tiles, K % 32 != 0: a half-used meta word)
CASES = [(1, 37, 72, torch.float16, True), (1, 70, 1028, torch.float32, False), (3, 45, 100, torch.float16, False),
         (16, 33, 136, torch.float32, True), (67, 70, 200, torch.float16, True), (256, 40, 136, torch.float32, False)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("m,n,k,dtype,bias", CASES)
def test_matches_reference(m, n, k, dtype, bias):
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = sg.sparse24_linear(x, w24.values, w24.meta, w24.shape, b)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, reference.sparse24_linear(x, w24, b), dtype)


def test_non_contiguous_inputs_and_values():
    n, k = 50, 96
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    values = w24.values.t().contiguous().t()  # same numbers, column-major
    x = torch.randn(k, 5).t()
    assert not (x.is_contiguous() or values.is_contiguous())
    close(sg.sparse24_linear(x, values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float32)


def test_decode_uses_split_k_and_prefill_does_not():
    cfg = gemm_config("sparse24", 1, torch.float16)
    assert cfg.BLOCK_M == 16 and split_k(cfg, 1, 37, 1028, torch.device("cpu"))[0] > 1
    assert split_k(gemm_config("sparse24", 67, torch.float16), 67, 70, 1028, torch.device("cpu"))[0] == 1


def test_empty_batch():
    w24 = Sparse24Weight.from_dense(torch.randn(8, 32), prune=True)
    assert sg.sparse24_linear(torch.randn(0, 32), w24.values, w24.meta, w24.shape).shape == (0, 8)
