"""ops/dispatch.py: select_backend rules for every LACO_BACKEND value."""
import pytest
import torch

from laco_kernels.ops import dispatch

CPU = [torch.zeros(2), None]


def test_auto_cpu_native_or_reference(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "auto")
    want = "native" if dispatch.native_supports("sparse24_linear") else "reference"
    assert dispatch.select_backend("sparse24_linear", CPU) == want
    assert dispatch.select_backend("no_such_op", CPU) == "reference"  # the extension does not implement it


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "reference")
    assert dispatch.select_backend("sparse24_linear", CPU) == "reference"
    monkeypatch.setenv("LACO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_backend("sparse24_linear", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.select_backend("sparse24_linear", CPU)
    monkeypatch.setenv("LACO_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native"):
        dispatch.select_backend("no_such_op", CPU)


def test_meta_device_counts_as_not_cpu(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "auto")
    assert dispatch.select_backend("sparse24_linear", [torch.empty(2, device="meta")]) == "reference"
    with pytest.raises(ValueError, match="several device types"):
        dispatch.select_backend("sparse24_linear", [torch.zeros(2), torch.empty(2, device="meta")])


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="not a backend"):
        dispatch.select_backend("sparse24_linear", CPU)
