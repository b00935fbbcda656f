"""semi_structured.py and SparseLinear24.enable_semi_structured: the CPU-visible logic.

The semi-structured product itself needs a CUDA GPU with sparse tensor cores; it is run (and
checked against the reference) by bench/gpu_gemm.py, method ``sparse24_semi_dispatch``.
"""
import pytest
import torch

from laco_kernels import semi_structured as ss
from laco_kernels.formats import Sparse24Weight
from laco_kernels.nn import SparseLinear24


def test_threshold():
    assert ss.SEMI_STRUCTURED_MIN_M == 256
    assert not ss.use_semi_structured(1) and not ss.use_semi_structured(255)
    assert ss.use_semi_structured(256) and ss.use_semi_structured(4096)
    assert ss.use_semi_structured(17, min_m=16) and not ss.use_semi_structured(15, min_m=16)


def test_memory_accounting():
    # 4096 x 4096 fp16: 8 MiB of values + 2 MiB of indices = 9/16 of the 32 MiB dense weight
    assert ss.semi_structured_bytes(4096, 4096, torch.float16) == 4096 * 4096 * 2 * 9 // 16
    assert ss.semi_structured_bytes(8, 64, torch.bfloat16) == 8 * 32 * 2 + 8 * 64 // 8
    with pytest.raises(ValueError, match="K not divisible by 4"):
        ss.semi_structured_bytes(8, 62, torch.float16)


def test_unavailable_on_cpu():
    assert "CUDA device" in ss.unavailable_reason("cpu", torch.float16)
    with pytest.raises(RuntimeError, match="CUDA device"):
        ss.build(torch.zeros(32, 64, dtype=torch.float16))


def test_enable_refuses_on_cpu_and_changes_nothing():
    w24 = Sparse24Weight.from_dense(torch.randn(32, 64).half(), prune=True)
    mod = SparseLinear24(w24)
    x = torch.randn(300, 64).half()
    before = mod(x)
    with pytest.raises(RuntimeError, match="CUDA device"):
        mod.enable_semi_structured()
    assert "_semi" not in mod.__dict__
    assert torch.equal(mod(x), before)


def test_enable_refuses_trainable():
    mod = SparseLinear24(Sparse24Weight.from_dense(torch.randn(32, 64), prune=True), trainable=True)
    with pytest.raises(RuntimeError, match="trainable"):
        mod.enable_semi_structured()


def test_enable_rejects_bad_threshold():
    mod = SparseLinear24(Sparse24Weight.from_dense(torch.randn(32, 64), prune=True))
    with pytest.raises(ValueError, match="min_m"):
        mod.enable_semi_structured(min_m=0)
