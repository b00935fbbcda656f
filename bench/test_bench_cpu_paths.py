"""pytest-benchmark of the CPU paths of the sparse linear ops (small shapes).

    pytest bench/test_bench_cpu_paths.py --benchmark-only

Times ``sparse24_linear`` / ``bitmap_linear`` on the default CPU backend (the native extension
for fp32 / bf16 when built, else the reference) and the reference itself, against ``F.linear``.
"""
import pytest
import torch
import torch.nn.functional as F

from laco_kernels import reference
from laco_kernels.formats import BitmapWeight, Sparse24Weight
from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear

N, K = 512, 512


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    w24 = Sparse24Weight.from_dense(w, prune=True)
    bw = BitmapWeight.from_dense(w * (torch.rand(N, K, generator=g) >= 0.7))
    return w24, bw


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "auto")


@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("impl", ["F.linear", "sparse24", "sparse24_reference", "bitmap70", "bitmap70_reference"])
def test_cpu_linear(benchmark, weights, impl, m):
    w24, bw = weights
    x = torch.randn(m, K)
    fn = {"F.linear": lambda: F.linear(x, w24.to_dense()), "sparse24": lambda: sparse24_linear(x, w24),
          "sparse24_reference": lambda: reference.sparse24_linear(x, w24),
          "bitmap70": lambda: bitmap_linear(x, bw), "bitmap70_reference": lambda: reference.bitmap_linear(x, bw)}[impl]
    y = benchmark(fn)
    assert y.shape == (m, N)
