"""ops/sparse_gemm.py: public sparse24_linear / bitmap_linear: backends, shapes, gradients, errors."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import BitmapWeight, Sparse24Weight
from laco_kernels.ops import dispatch
from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


def weights(n, k, dtype, sparsity=0.6):
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    bw = BitmapWeight.from_dense((torch.randn(n, k) * (torch.rand(n, k) >= sparsity)).to(dtype))
    return w24, bw


@pytest.mark.parametrize("lead,dtype,bias", [((1,), torch.float16, True), ((2, 3), torch.float32, False),
                                             ((4, 5), torch.float16, False), ((1, 1, 1), torch.float32, True)])
def test_triton_matches_reference_any_leading_shape(triton_backend, lead, dtype, bias):
    n, k = 36, 72
    w24, bw = weights(n, k, dtype)
    x = torch.randn(*lead, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    for op, ref, w in ((sparse24_linear, reference.sparse24_linear, w24), (bitmap_linear, reference.bitmap_linear, bw)):
        y = op(x, w, b)
        assert y.shape == (*lead, n) and y.dtype == dtype
        close(y, ref(x, w, b), dtype)


def test_triton_non_contiguous_3d_input(triton_backend):
    n, k = 20, 64
    w24, bw = weights(n, k, torch.float32)
    x = torch.randn(3, k, 4).transpose(1, 2)  # [3, 4, K], last dim strided
    assert not x.is_contiguous()
    close(sparse24_linear(x, w24), reference.sparse24_linear(x, w24), torch.float32)
    close(bitmap_linear(x, bw), reference.bitmap_linear(x, bw), torch.float32)
    xs = torch.randn(6, k)[::2]  # row-strided view
    close(sparse24_linear(xs, w24), reference.sparse24_linear(xs, w24), torch.float32)


def test_fp32_bias_with_fp16_input(triton_backend):
    w24, bw = weights(12, 32, torch.float16)
    x, b = torch.randn(2, 32).half(), torch.randn(12)
    close(sparse24_linear(x, w24, b), reference.sparse24_linear(x, w24, b), torch.float16)
    close(bitmap_linear(x, bw, b), reference.bitmap_linear(x, bw, b), torch.float16)


def test_sparse24_gradients_triton(triton_backend):
    n, k = 10, 40
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    values = w24.values.clone().requires_grad_()
    w_train = Sparse24Weight(values, w24.meta, w24.shape)
    x = torch.randn(2, 3, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    dy = torch.randn(2, 3, n)
    sparse24_linear(x, w_train, b).backward(dy)
    grads = [t.grad.clone() for t in (x, values, b)]
    for t in (x, values, b):
        t.grad = None
    reference.sparse24_linear(x, w24, b, values=values).backward(dy)
    for got, want in zip(grads, (x.grad, values.grad, b.grad)):
        close(got, want, torch.float32)


def test_bitmap_gradients_triton(triton_backend):
    _, bw = weights(10, 40, torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    bitmap_linear(x, bw, b).sum().backward()
    gx, gb = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    reference.bitmap_linear(x, bw, b).sum().backward()
    close(gx, x.grad, torch.float32)
    close(gb, b.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_cpu_backend_matches_reference(monkeypatch, dtype):
    """auto on CPU: native extension for fp32 / bf16 when built, reference otherwise (fp16)."""
    monkeypatch.setenv("LACO_BACKEND", "auto")
    w24, bw = weights(24, 64, dtype)
    x, b = torch.randn(5, 64).to(dtype), torch.randn(24).to(dtype)
    close(sparse24_linear(x, w24, b), reference.sparse24_linear(x, w24, b), dtype)
    close(bitmap_linear(x, bw, b), reference.bitmap_linear(x, bw, b), dtype)


def test_forced_native_rejects_fp16(monkeypatch):
    if not dispatch.native_supports("sparse24_linear"):
        pytest.skip("native extension not built")
    monkeypatch.setenv("LACO_BACKEND", "native")
    w24, bw = weights(8, 32, torch.float16)
    with pytest.raises(TypeError, match="float32 / bfloat16"):
        sparse24_linear(torch.randn(2, 32).half(), w24)
    with pytest.raises(TypeError, match="float32 / bfloat16"):
        bitmap_linear(torch.randn(2, 32).half(), bw)


def test_errors(triton_backend):
    w24, bw = weights(8, 32, torch.float32)
    x = torch.randn(2, 32)
    for op, w in ((sparse24_linear, w24), (bitmap_linear, bw)):
        with pytest.raises(ValueError, match="in_features=32"):
            op(torch.randn(2, 30), w)
        with pytest.raises(TypeError, match="dtype"):
            op(x.half(), w)
        with pytest.raises(TypeError, match="dtype"):
            op(x.long(), w)
        with pytest.raises(ValueError, match="meta"):
            op(torch.empty(2, 32, device="meta"), w)
        with pytest.raises(ValueError, match="bias has shape"):
            op(x, w, torch.randn(7))
        with pytest.raises(ValueError, match="dimension"):
            op(torch.randn(()), w)
    with pytest.raises(TypeError, match="Sparse24Weight"):
        sparse24_linear(x, torch.randn(8, 32))
    with pytest.raises(TypeError, match="BitmapWeight"):
        bitmap_linear(x, w24)
    with pytest.raises(ValueError, match="w24.meta has shape"):
        sparse24_linear(x, Sparse24Weight(w24.values, w24.meta[:, :0], w24.shape))
    with pytest.raises(ValueError, match="not 2:4"):
        sparse24_linear(x, Sparse24Weight.from_dense(torch.ones(8, 32)))
    with pytest.raises(ValueError, match="tile_k"):
        bitmap_linear(x, BitmapWeight.from_dense(bw.to_dense(), tile_k=32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_gradients_native_in_row_blocks(monkeypatch, dtype):
    """The CPU backward decompresses the weight a row block at a time; with blocks of a few rows
    (a last block shorter than the others) the gradients still equal the reference's."""
    if not dispatch.native_supports("sparse24_linear"):
        pytest.skip("native extension not built")
    from laco_kernels.ops import sparse_gemm

    monkeypatch.setenv("LACO_BACKEND", "native")
    monkeypatch.setattr(sparse_gemm, "_BACKWARD_CHUNK", 3 * 44)  # 3 rows of K = 44 per block, N = 10
    n, k = 10, 44
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    values = w24.values.clone().requires_grad_()
    x = torch.randn(5, k).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_()
    dy = torch.randn(5, n).to(dtype)
    sparse24_linear(x, Sparse24Weight(values, w24.meta, w24.shape), b).backward(dy)
    grads = [t.grad.clone() for t in (x, values, b)]
    for t in (x, values, b):
        t.grad = None
    reference.sparse24_linear(x, w24, b, values=values).backward(dy)
    for got, want in zip(grads, (x.grad, values.grad, b.grad)):
        close(got, want, dtype)


def test_sparse24_cpu_autocast_runs_bf16_and_matches_reference():
    """Under CPU autocast the 2:4 op casts x, values and bias to bf16 like F.linear (bf16 out), and
    its gradients reach the fp32 values / x / bias within bf16 error of the fp32 reference; with
    autocast off the same call stays fp32 and exact to fp32 rounding."""
    if not dispatch.native_supports("sparse24_linear"):
        pytest.skip("native extension not built")
    n, k, m = 96, 64, 33
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    values = w24.values.clone().requires_grad_()
    x = torch.randn(m, k).requires_grad_()
    b = torch.randn(n).requires_grad_()
    dy = torch.randn(m, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse24_linear(x, Sparse24Weight(values, w24.meta, w24.shape), b)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    grads = [t.grad.clone() for t in (x, values, b)]
    for t in (x, values, b):
        t.grad = None
    want = reference.sparse24_linear(x, w24, b, values=values)
    want.backward(dy)
    torch.testing.assert_close(y.float(), want.detach(), atol=0.05 * want.abs().max().item(), rtol=0.02)
    for got, ref in zip(grads, (x.grad, values.grad, b.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=0.02 * ref.abs().max().item(), rtol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        y32 = sparse24_linear(x, Sparse24Weight(values, w24.meta, w24.shape), b)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, want, atol=1e-4, rtol=1e-5)


def test_bitmap_gpu_path_routes_prefill_to_expand_on_cuda_only():
    from laco_kernels.kernels.bitmap_gemv import GEMV_MAX_M
    from laco_kernels.ops.sparse_gemm import bitmap_gpu_path

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bitmap_gpu_path(1, cuda) == "gemv" and bitmap_gpu_path(GEMV_MAX_M, cuda) == "gemv"
    assert bitmap_gpu_path(GEMV_MAX_M + 1, cuda) == "tiled" and bitmap_gpu_path(16, cuda) == "tiled"
    assert bitmap_gpu_path(17, cuda) == "expand" and bitmap_gpu_path(4096, cuda) == "expand"
    assert bitmap_gpu_path(4096, cpu) == "tiled"  # the interpreter always runs the kernel
    # fp32 past the GEMV expands (H200: 120.8 us against 146.9 for the tiled kernel at M = 16); 16-bit stays tiled
    assert bitmap_gpu_path(16, cuda, torch.float32) == "expand" and bitmap_gpu_path(16, cuda, torch.float16) == "tiled"
    assert bitmap_gpu_path(1, cuda, torch.float32) == "gemv" and bitmap_gpu_path(16, cpu, torch.float32) == "tiled"


def test_sparse24_gpu_path_expands_past_the_decode_kernel_on_cuda_only():
    from laco_kernels.kernels.sparse24_mma import MMA_MAX_M
    from laco_kernels.ops.sparse_gemm import sparse24_gpu_path

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for dt in (torch.float16, torch.bfloat16):
        assert sparse24_gpu_path(1, cuda, dt) == "kernel" and sparse24_gpu_path(MMA_MAX_M, cuda, dt) == "kernel"
        assert sparse24_gpu_path(MMA_MAX_M + 1, cuda, dt) == "expand" and sparse24_gpu_path(4096, cuda, dt) == "expand"
    assert sparse24_gpu_path(1, cuda, torch.float32) == "expand"  # the fp32 decode lost at every timed M
    assert all(sparse24_gpu_path(m, cpu, dt) == "kernel" for m in (1, 17, 4096)
               for dt in (torch.float16, torch.float32))


@pytest.mark.parametrize("fn_name", ["sparse24_gpu_path", "bitmap_gpu_path"])
def test_gpu_path_choice_checks_its_arguments(fn_name):
    from laco_kernels.ops import sparse_gemm

    fn = getattr(sparse_gemm, fn_name)
    assert fn(4096, "cuda", torch.float16) == "expand" and fn(4096, "cpu", torch.float16) != "expand"
    with pytest.raises(ValueError, match=f"{fn_name}: m must be"):
        fn(-1, "cuda", torch.float16)
    with pytest.raises(ValueError, match="m must be"):
        fn(2.5, "cuda", torch.float16)
    with pytest.raises(TypeError, match="dtype must be"):
        fn(1, "cuda", torch.int8)
    with pytest.raises(ValueError, match="is not a device"):
        fn(1, "tpu:x", torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse24_inference_expand_backend_matches_reference(dtype):
    """The backend string the public op sends on CUDA past the decode kernel: same result as the reference."""
    from laco_kernels import reference
    from laco_kernels.ops.sparse_gemm import _sparse24_impl
    from laco_kernels.ops.train_dispatch import EXPAND

    g = torch.Generator().manual_seed(3)
    w24 = Sparse24Weight.from_dense(torch.randn(37, 72, generator=g).to(dtype), prune=True)
    x = torch.randn(72, 19, generator=g).to(dtype).t()  # 19 rows, non-contiguous
    b = torch.randn(37, generator=g).to(dtype)
    got = _sparse24_impl(x, w24.values, w24.meta, b, EXPAND)
    want = reference.sparse24_linear(x, w24, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitmap_expand_linear_matches_reference(dtype):
    from laco_kernels import reference
    from laco_kernels.formats import BitmapWeight
    from laco_kernels.ops.sparse_gemm import bitmap_expand_linear

    w = torch.randn(37, 100) * (torch.rand(37, 100) > 0.7)
    bw = BitmapWeight.from_dense(w.to(dtype))
    x = torch.randn(100, 19).to(dtype).t()
    b = torch.randn(37).to(dtype)
    want = reference.bitmap_linear(x, bw, b)
    got = bitmap_expand_linear(x, bw, b)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=2e-2)


@pytest.mark.parametrize("k", [4, 12, 44, 64, 100, 576])
def test_kept_columns_are_the_mask_positions(k):
    """The byte-table decode of the 2:4 metadata lists the kept columns in the values' order,
    padding groups past K/4 cut off (K = 4 mod 8 leaves half a meta byte)."""
    from laco_kernels.ops.sparse_gemm import kept_columns

    w24 = Sparse24Weight.from_dense(torch.randn(7, k), prune=True)
    cols = kept_columns(w24.meta, k)
    assert cols.shape == (7, k // 2) and cols.dtype == torch.int64
    dense = w24.to_dense()
    assert torch.equal(dense.gather(1, cols), w24.values)
    assert torch.equal(cols, w24.mask().nonzero()[:, 1].view(7, k // 2))


@pytest.mark.parametrize("k", [4, 12, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_gather_is_the_gather_at_kept_columns(k, dtype):
    """_native.sparse24_gather (the CPU 2:4 backward's dV gather) copies exactly what a gather at
    kept_columns picks, N = 1 and K not a multiple of 32 included; bad input raises before any work."""
    from laco_kernels import _native
    from laco_kernels.ops.sparse_gemm import kept_columns

    if not _native.supports("sparse24_linear"):
        pytest.skip("the C++ extension is not built")
    for n in (1, 9):
        w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
        dense = torch.randn(n, k).to(dtype)
        got = _native.sparse24_gather(dense, w24.meta)
        assert got.dtype == dtype and torch.equal(got, dense.gather(1, kept_columns(w24.meta, k)))
    with pytest.raises(RuntimeError, match="meta must be contiguous int32"):
        _native.sparse24_gather(dense, w24.meta[:-1])
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _native.sparse24_gather(dense.half(), w24.meta)
