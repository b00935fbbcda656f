"""kernels/sparse24_gemv.py (2:4 decode GEMV) in the Triton interpreter against reference.sparse24_linear."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight
from laco_kernels.kernels import sparse24_gemm as sg
from laco_kernels.kernels import sparse24_gemv as sv

# (M, N, K, dtype, bias, splits): M in {1, 2, 3, 7, 16}; N odd / not a multiple of BLOCK_N; K a multiple of
# 4 but not of 32 (half-used meta word) or of the unrolled step; K = 4100 the large-K case (4 unrolled
# steps + remainder); splits None = the launcher's choice, an int forces split-K (partials + reduce kernel)
CASES = [(1, 37, 72, torch.float16, True, None), (1, 70, 4100, torch.float16, False, None),
         (2, 45, 1028, torch.float32, True, 3), (3, 33, 136, torch.float16, False, 2),
         (7, 19, 2056, torch.float16, True, None), (16, 5, 100, torch.float32, False, None),
         (1, 17, 4100, torch.float32, True, 5), (3, 40, 260, torch.bfloat16, True, None)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("m,n,k,dtype,bias,splits", CASES)
def test_matches_reference(m, n, k, dtype, bias, splits):
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = sv.sparse24_gemv(x, w24.values, w24.meta, w24.shape, b, splits=splits)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, reference.sparse24_linear(x, w24, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_contiguous_and_misaligned_inputs(dtype):
    n, k = 21, 200
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    values = w24.values.t().contiguous().t()  # column-major values
    xs = [torch.randn(k, 2).to(dtype).t(),  # column-major x
          torch.randn(2, k + 1).to(dtype)[:, 1:],  # rows start off the 8-byte boundary of the int64 view
          torch.randn(3, k + 4).to(dtype)[1:, :k]]  # 8-byte aligned, not 16 (fp16): viewed in place
    for x in xs:
        assert not x.is_contiguous() or x.data_ptr() % 16
        close(sv.sparse24_gemv(x, values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), dtype)


def test_row_block_values_off_the_16_byte_boundary():
    w24 = Sparse24Weight.from_dense(torch.randn(9, 200).half(), prune=True)
    part = w24.row_block(slice(1, 9))  # values start 200 bytes in: 4-byte aligned, read in place
    x = torch.randn(1, 200).half()
    close(sv.sparse24_gemv(x, part.values, part.meta, part.shape), reference.sparse24_linear(x, part), torch.float16)


def test_launcher_routes_small_m_to_the_gemv(monkeypatch):
    w24 = Sparse24Weight.from_dense(torch.randn(24, 64), prune=True)
    calls = []
    real = sg.sparse24_gemv
    monkeypatch.setattr(sg, "sparse24_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, sv.GEMV_MAX_M, sv.GEMV_MAX_M + 1):
        x = torch.randn(m, 64)
        close(sg.sparse24_linear(x, w24.values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float32)
    assert calls == [1, sv.GEMV_MAX_M]


def test_3d_input_through_the_public_op(triton_backend):
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    w24 = Sparse24Weight.from_dense(torch.randn(30, 96).half(), prune=True)
    x = torch.randn(96, 2, 1).half().permute(2, 1, 0)  # [1, 2, 96], non-contiguous, M = 2 tokens
    b = torch.randn(30).half()
    close(sparse24_linear(x, w24, b), reference.sparse24_linear(x, w24, b), torch.float16)


def test_empty_batch():
    w24 = Sparse24Weight.from_dense(torch.randn(8, 32), prune=True)
    assert sv.sparse24_gemv(torch.randn(0, 32), w24.values, w24.meta, w24.shape).shape == (0, 8)


def test_compile_specs_describe_the_decode_loop():
    specs = [s for s in sv.COMPILE_SPECS if s.name == "_sparse24_gemv_kernel"]
    assert {s.constexprs["DT"] for s in specs} == {"fp16", "bf16", "fp32"}
    for s in specs:
        assert (s.family, s.regime) == ("sparse24", "decode")
        per_group = 2 * (4 if s.constexprs["DT"] == "fp32" else 2) + 0.5
        groups = s.constexprs["BLOCK_N"] * s.constexprs["UNROLL"] * 8 * s.constexprs["BLOCK_W"]
        assert s.loop_weight_bytes(0.3) == s.loop_weight_bytes(0.7) == groups * per_group
