"""kernels/_selfcheck.py: the once-per-(device, dtype) self-check of the tensor-core GEMVs."""
import pytest
import torch

from laco_kernels.kernels._selfcheck import self_check_once


class _FakeCuda:
    type, index = "cuda", 0


def test_self_check_warns_once_caches_and_passes_good_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    calls = []

    def bad():
        calls.append(1)
        return torch.ones(4), torch.zeros(4)

    cache = {}
    with pytest.warns(RuntimeWarning, match="the kernel K failed its self-check on FakeGPU .*using fallback F"):
        assert self_check_once(cache, _FakeCuda(), torch.float16, bad, "the kernel K", "fallback F") is False
    assert self_check_once(cache, _FakeCuda(), torch.float16, bad, "the kernel K", "fallback F") is False
    assert len(calls) == 1  # cached per (device, dtype)
    good = lambda: (torch.ones(4, dtype=torch.float16), torch.ones(4) + 1e-3)  # noqa: E731 - within 16-bit tolerance
    assert self_check_once(cache, _FakeCuda(), torch.bfloat16, good, "the kernel K", "fallback F") is True
    assert cache == {(0, torch.float16): False, (0, torch.bfloat16): True}
