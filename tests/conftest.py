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
