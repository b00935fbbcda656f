"""Test configuration: Triton runs in its CPU interpreter, kernels are selected explicitly.

TRITON_INTERPRET must be set before anything imports triton, hence at the very top.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# tolerances per dtype for kernel-vs-reference comparisons (fp32 accumulation in both)
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
              torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on CPU tensors) for the duration of a test."""
    monkeypatch.setenv("LACO_BACKEND", "triton")
    yield


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "reference")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def check_24_kernel(fn, m, n, k, dtype, bias, **kw):
    """A random pruned 2:4 weight [n, k] and x [m, k] of ``dtype`` (bias on or off) through the 2:4 kernel
    ``fn(x, values, meta, shape, bias, **kw)``: shape, dtype and values held to reference.sparse24_linear."""
    from laco_kernels import reference
    from laco_kernels.formats import Sparse24Weight

    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = fn(x, w24.values, w24.meta, w24.shape, b, **kw)
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), reference.sparse24_linear(x, w24, b).float(), **TOLERANCES[dtype])


def check_self_check_fallback(monkeypatch, mod, kernel: str, verified):
    """A GPU self-check of ``mod.<kernel>`` (2:4 decode) on a fake CUDA device, run on CPU tensors: a wrong
    kernel warns once and ``verified`` says False (cached per device and dtype), CPU always True, the real
    kernel passes. The problem comes from ``sparse24_gemv._self_check_problem``."""
    from laco_kernels.kernels import sparse24_gemv as sv

    class FakeCuda:
        type, index = "cuda", 7

    orig_problem, orig_kernel = sv._self_check_problem, getattr(mod, kernel)
    monkeypatch.setattr(mod, "_VERIFIED", {})
    monkeypatch.setattr(sv, "_self_check_problem", lambda dt, dev: orig_problem(dt, torch.device("cpu")))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "FakeGPU")
    monkeypatch.setattr(mod, kernel, lambda x, v, m, s, b=None, splits=None: torch.zeros(x.shape[0], s[0]))
    with pytest.warns(RuntimeWarning, match="failed its self-check on FakeGPU"):
        assert verified(FakeCuda(), torch.float16) is False
    assert verified(FakeCuda(), torch.float16) is False  # cached: checked once per device and dtype
    assert verified(torch.device("cpu"), torch.float16) is True
    monkeypatch.setattr(mod, "_VERIFIED", {})
    monkeypatch.setattr(mod, kernel, orig_kernel)
    assert verified(FakeCuda(), torch.bfloat16) is True  # a correct kernel passes (interpreter path)
