"""Public sparse linear ops: ``sparse24_linear`` (2:4) and ``bitmap_linear`` (unstructured).

    y = x @ dense(W)^T + b        x [..., K] -> y [..., N], in x's dtype, fp32 accumulation

x may have any leading shape (M = 1 included, never padded) and any strides; x, the packed
values and bias share a float dtype (fp16 / bf16 / fp32; bias may be any float dtype, it is
added in fp32) and a device. Bad input raises an error naming the argument and the problem.

Backends (``ops.dispatch.select_backend``):
- ``triton``: CUDA tensors, or CPU tensors with ``LACO_BACKEND=triton`` and ``TRITON_INTERPRET=1``
  (kernels in ``kernels/sparse24_gemm.py`` and ``kernels/bitmap_gemm.py``). Bitmap weights with
  a ``tile_k`` outside ``kernels.dense_gemm.BITMAP_TILE_KS`` raise (pack with tile_k=128).
- ``native``: the C++ extension (CPU, fp32 / bf16). Under ``LACO_BACKEND=auto`` fp16 CPU inputs,
  which the extension does not implement, run the reference; forcing ``native`` with fp16 raises.
- ``reference``: ``reference.py`` (plain PyTorch), differentiable through autograd.

cuSPARSELt / CUTLASS (``torch.sparse.to_sparse_semi_structured``) runs only where a module opted
in with ``SparseLinear24.enable_semi_structured()`` (``laco_kernels/semi_structured.py``): it needs
a second, re-compressed copy of the weight (9/16 of the dense bytes), so it is never the default.
Bitmap prefill on CUDA goes through a transient dense weight and cuBLAS (:func:`bitmap_gpu_path`).

Gradients: on the triton / native paths ``sparse24_linear`` is a small autograd Function whose
backward gives x, the packed values (``w24.values`` if it requires grad) and bias their gradients:
on triton through ``kernels/sparse24_grad.py`` (dX from the compressed weight, dV ``[N, K/2]``
gathered in registers), on native through :func:`_sparse24_grads_cpu` (row blocks of the weight,
torch ops). To train the values, wrap an ``nn.Parameter`` ``[N, K/2]`` with the
metadata buffer: ``sparse24_linear(x, Sparse24Weight(param, meta, shape), bias)`` (what
``nn.SparseLinear24(trainable=True)`` does); the optimizer then holds state for the kept half only. ``bitmap_linear`` gives x and
bias gradients; its packed values are not trainable (use ``masked_linear`` to train).

torch.compile: the public functions validate their arguments and pick the backend in plain
Python (dynamo traces that; the backend is fixed when a model is compiled), unpack the packed
weight into its tensors and call the custom ops ``torch.ops.laco.sparse24_linear`` /
``torch.ops.laco.bitmap_linear`` (2-D x, the backend as a string argument), whose backward is
the custom op ``laco::sparse24_linear_backward`` / ``laco::bitmap_linear_backward``. The ops are
opaque to dynamo and inductor (no graph break; inductor never traces the unpacking), have fake
implementations for shape propagation, and do no host synchronisation on the Triton path, so a
compiled decode step can be captured in a CUDA graph. See docs/torch_compile.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_linear_inputs, check_tensor
from ..formats import BitmapWeight, Sparse24Weight, _row_chunks
from .dispatch import call_direct, call_route, eager_function, grad_or_empty, requested_backend, select_backend
from .train_dispatch import EXPAND, choose_train_path, requested_train_path, sparse24_linear_torch


def _native_ok(op: str, *dtypes: torch.dtype) -> bool:
    from .. import _native

    if _native.supports_dtype(op, *dtypes):
        return True
    if requested_backend() == "native":
        raise TypeError(f"{op}: LACO_BACKEND=native but the native kernels do not take dtype {dtypes[0]} "
                        "(float32 / bfloat16 only)")
    return False


def _check_layout(op: str, shape, **tensors) -> None:
    """Cheap per-call check of a packed weight's tensors: dtype, rank and expected shape.

    (The content, e.g. sorted 2:4 positions or offsets matching the bitmap, is checked once by
    ``from_dense`` / ``from_tensors`` / ``validate()``, not on every call: that would cost more
    than the GEMM at decode.)
    """
    for name, (t, dtypes, expect) in tensors.items():
        check_tensor(t, f"{op}: {name}", dtypes=dtypes, ndim=len(expect))
        if tuple(t.shape) != tuple(expect):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expect)} for a weight of "
                             f"shape {tuple(shape)}")


def _bias_for_kernel(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def _bias_grad(dy: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    return dy.float().sum(0).to(bias_dtype)


# ----------------------------------------------------------------------------------------
# 2:4
# ----------------------------------------------------------------------------------------
_BACKWARD_CHUNK = 1 << 21  # weight elements the CPU backward decompresses at once


# the 4 kept columns (within 8) of the 2 groups one meta byte describes: bits 0-1 / 2-3 index the
# first group's two kept columns, bits 4-5 / 6-7 the second's (formats.Sparse24Weight)
_META_BYTE_COLS = torch.tensor([[b & 3, (b >> 2) & 3, 4 + ((b >> 4) & 3), 4 + ((b >> 6) & 3)] for b in range(256)],
                               dtype=torch.int64)


def kept_columns(meta: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[N, K/2]``: the column of every kept value of a 2:4 weight with int32 ``meta``.

    One table lookup per meta byte (little-endian, as on every CPU the native kernels build
    for); padding groups past K/4 are cut off. ``dense.gather(1, kept_columns(meta, k))`` is
    the values' layout, and 6-15x faster than ``masked_select`` with ``mask()`` on this CPU.
    """
    n = meta.shape[0]
    by = meta.contiguous().view(torch.uint8).long()  # [N, 4 * ceil(K/32)]: 2 groups per byte
    base = 8 * torch.arange(by.shape[1], device=meta.device).view(1, -1, 1)
    cols = torch.nn.functional.embedding(by, _META_BYTE_COLS.to(meta.device)).add_(base)
    return cols.view(n, -1)[:, : k // 2]


def _sparse24_grads_cpu(dy: torch.Tensor, x2: torch.Tensor, w24: Sparse24Weight, values: torch.Tensor,
                        need_x: bool, need_v: bool):
    """(dX [M, K] in dY's dtype or None, dV [N, K/2] in x's dtype or None).

    dX = dY @ dense(values, meta) and dV = (dY^T X) at the kept positions, one row block of the
    weight at a time (about ``_BACKWARD_CHUNK`` elements): no dense ``[N, K]`` weight or gradient
    exists, which in block-by-block recovery would sit on top of the parameters, gradients and
    AdamW state (a 4096 x 11008 fp32 weight is 180 MB). The row block is decompressed by the
    native kernel and dV gathered by ``_native.sparse24_gather`` (the same copy as a gather at
    :func:`kept_columns`, without building that int64 index every step).

    GEMMs in fp32, or in bf16 when dY, X and the values are bf16 (autocast) on a CPU with
    AVX512-BF16 (fp32 accumulation inside the GEMM; AMX here, 3x fp32 on 1024 x 576 x 1536; dX
    sums the row blocks in fp32). bf16 GEMMs without those instructions are slower than fp32.
    """
    from .. import _native

    n, k = w24.shape
    bf16 = dy.dtype == x2.dtype == values.dtype == torch.bfloat16 and _native.has_bf16_gemm()
    gemm_dtype = torch.bfloat16 if bf16 else torch.float32
    dyf = dy.to(gemm_dtype)
    xf = x2.to(gemm_dtype) if need_v else None
    dx = torch.zeros(dy.shape[0], k, dtype=torch.float32, device=dy.device) if need_x else None
    dv = torch.empty(n, k // 2, dtype=x2.dtype, device=x2.device) if need_v else None
    vals = values.detach().to(gemm_dtype)
    for rows in _row_chunks(n, k, _BACKWARD_CHUNK):
        meta = w24.meta[rows].contiguous()
        if need_x:
            dense = _native.sparse24_to_dense(vals[rows].contiguous(), meta, (meta.shape[0], k))
            if bf16:
                dx.add_(dyf[:, rows] @ dense)
            else:
                dx.addmm_(dyf[:, rows], dense)
        if need_v:
            dv[rows] = _native.sparse24_gather(dyf[:, rows].t() @ xf, meta)
    return (dx.to(dy.dtype) if need_x else None), dv


def _sparse24_impl(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                 backend: str) -> torch.Tensor:
    """x ``[M, K]`` @ dense(values ``[N, K/2]``, meta int32 ``[N, ceil(K/32)]``)^T + bias -> ``[M, N]``.

    Arguments already checked by :func:`sparse24_linear`; ``backend``: triton / native / reference.
    """
    w24 = Sparse24Weight(values, meta, (values.shape[0], 2 * values.shape[1]))
    if backend == "reference":
        return reference.sparse24_linear(x, w24, bias)
    if backend == EXPAND:  # training "expand" path: one dense expansion, then cuBLAS (kernels/weight_expand.py)
        from ..kernels.weight_expand import sparse24_to_dense

        return torch.nn.functional.linear(x, sparse24_to_dense(values, meta, w24.shape), _bias_for_kernel(bias, x.dtype))
    if backend == "triton":
        from ..kernels import sparse24_gemm as k

        return k.sparse24_linear(x, values, meta, w24.shape, _bias_for_kernel(bias, x.dtype))
    from .. import _native

    return _native.sparse24_linear_checked(x, values, meta, bias)


def _check_path_args(name: str, m, device, dtype) -> torch.device:
    """The device as a ``torch.device`` after checking the arguments of a GPU path choice: m an int >= 0,
    device a ``torch.device`` or a device string, dtype a float dtype of the ops (or None)."""
    if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)) or m < 0:
        raise ValueError(f"{name}: m must be a row count (int >= 0), got {m!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{name}: device {device!r} is not a device: {e}") from None


def sparse24_gpu_path(m: int, device: torch.device, dtype: torch.dtype) -> str:
    """Which GPU path runs a 2:4 linear with ``m`` rows of x when its values are not trained (trained
    values follow ``ops.train_dispatch``): ``"kernel"`` or ``"expand"``.

    - fp16 / bf16 with ``m <= kernels.sparse24_mma.MMA_MAX_M`` (16): ``"kernel"`` (the sparse
      tensor-core decode, ``kernels/sparse24_mma.py``).
    - otherwise on CUDA: ``"expand"``: ``kernels/weight_expand.sparse24_to_dense`` writes a transient
      dense ``[N, K]`` weight and cuBLAS (``F.linear``) runs the product. Measured on an H200
      (bench/results/gpu_decode_sweep.json, 4096 x 4096): fp16 M = 32 39.7 us against 153.8 for the
      ``tl.dot`` tile kernel, M = 4096 232 against 1233 (cuBLAS on a stored dense weight: 10.1 / 201);
      fp32 M = 4 62.6 us against 234.7 for the fp32 decode GEMV / tile, M = 256 208.6 against 1407.
      fp32 at M = 1-2 was not timed; the fp32 decode time was flat in M from 4 to 16 (230-235 us), so
      the expansion is taken there too. It costs one dense weight of transient memory per call.
    The interpreter (CPU tensors) always runs the kernels, so tests exercise them.
    """
    from ..kernels.sparse24_mma import MMA_MAX_M

    device = _check_path_args("sparse24_gpu_path", m, device, dtype)
    if device.type != "cuda" or (dtype in (torch.float16, torch.bfloat16) and 0 < m <= MMA_MAX_M):
        return "kernel"
    return "expand"


_sparse24_op = torch.library.custom_op("laco::sparse24_linear", _sparse24_impl, mutates_args=())


@_sparse24_op.register_fake
def _(x, values, meta, bias, backend):
    return x.new_empty(x.shape[0], values.shape[0])


def _sparse24_backward_impl(dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, backend: str,
                          need_x: bool, need_v: bool, need_b: bool, bias_dtype: Optional[torch.dtype]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX ``[M, K]``, dV ``[N, K/2]``, db ``[N]``) of :func:`_sparse24_op`; an empty tensor where not needed."""
    w24 = Sparse24Weight(values, meta, (values.shape[0], 2 * values.shape[1]))
    dx = dv = db = None
    if backend in ("triton", EXPAND):  # kernels/sparse24_grad.py: compressed weight only, db fused into dV
        from ..kernels import sparse24_grad as g

        if need_x and backend == EXPAND:  # re-expanded (nothing of W's size is kept from the forward)
            from ..kernels.weight_expand import sparse24_to_dense

            dx = torch.mm(dy, sparse24_to_dense(values, meta, w24.shape))
        elif need_x:
            dx = g.sparse24_grad_input(dy, values, meta, w24.shape)
        if need_v:
            dv, db = g.sparse24_values_grad(dy, x, meta, w24.shape, want_bias=need_b, bias_dtype=bias_dtype)
        elif need_b:
            db = _bias_grad(dy, bias_dtype)
    elif backend == "native":
        dx, dv = _sparse24_grads_cpu(dy, x, w24, values, need_x, need_v)
        db = _bias_grad(dy, bias_dtype) if need_b else None
    else:  # what autograd through reference.sparse24_linear gives, bit for bit
        dx, dw, db = reference.linear_fp32_grads(dy, x, w24.to_dense() if need_x else values, need_x, need_v,
                                                 need_b, bias_dtype)
        if need_v:
            dv = dw.to(values.dtype).masked_select(w24.mask()).view(values.shape)
    return grad_or_empty(dx, dy), grad_or_empty(dv, values), grad_or_empty(db, dy)


_sparse24_backward_op = torch.library.custom_op("laco::sparse24_linear_backward", _sparse24_backward_impl,
                                               mutates_args=())


@_sparse24_backward_op.register_fake
def _(dy, x, values, meta, backend, need_x, need_v, need_b, bias_dtype):
    n = values.shape[0]
    return (dy.new_empty(dy.shape[0], x.shape[1]) if need_x else dy.new_empty(0),
            values.new_empty(values.shape) if need_v else values.new_empty(0),
            dy.new_empty(n, dtype=bias_dtype) if need_b else dy.new_empty(0))


def _sparse24_setup(ctx, inputs, output):
    x, values, meta, bias, backend = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sparse24_backward(ctx, dy):
    x, values, meta = ctx.saved_tensors
    need_x, need_v, _, need_b, _ = ctx.needs_input_grad
    bwd = _sparse24_backward_impl if call_direct(dy, x, values, meta) else torch.ops.laco.sparse24_linear_backward
    dx, dv, db = bwd(dy, x, values, meta, ctx.backend, need_x, need_v, need_b, ctx.bias_dtype)
    return (dx if need_x else None), (dv if need_v else None), None, (db if need_b else None), None


_sparse24_op.register_autograd(_sparse24_backward, setup_context=_sparse24_setup)
# CPU autocast (bf16, its default) casts x, values and bias to bf16 like it does for F.linear:
# the native bf16 kernels and the bf16 backward above then run (stage-2 recovery uses this)
torch.library.register_autocast("laco::sparse24_linear", "cpu", torch.bfloat16)
# eager training calls: the same impl / setup / backward without the custom op's dispatch (ops/dispatch.py)
_Sparse24LinearEager = eager_function("_Sparse24LinearEager", _sparse24_impl, _sparse24_setup, _sparse24_backward)


def sparse24_linear(x: torch.Tensor, w24: Sparse24Weight, bias: torch.Tensor | None = None,
                    path: str | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(w24)^T + bias ``[N]`` -> ``[..., N]`` in x's dtype.

    w24: a :class:`Sparse24Weight` of shape ``(N, K)`` (its tensors' shapes, dtypes and device are
    checked here; ``from_dense`` already refused any non-2:4 weight).
    Differentiable in x, bias and ``w24.values`` (when it requires grad).
    path: when the values are trained on the Triton backend, ``"auto"`` / ``"triton"`` / ``"torch"``
    (default ``LACO_TRAIN_PATH``, else ``auto``): the Triton kernels or ``F.linear(x, dense(w24))``
    + autograd, chosen by ``ops/train_dispatch.py`` under ``auto``. Values not trained: on CUDA past the
    decode kernel's M (:func:`sparse24_gpu_path`) a transient dense weight and cuBLAS.
    """
    op = "sparse24_linear"
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{op}: w24 must be a Sparse24Weight (Sparse24Weight.from_dense(W)), got {type(w24).__name__}")
    n, k = w24.shape
    if k % 4:
        raise ValueError(f"{op}: 2:4 weight shape {tuple(w24.shape)} has K not divisible by 4")
    _check_layout(op, w24.shape, **{"w24.values": (w24.values, FLOAT_DTYPES, (n, k // 2)),
                                    "w24.meta": (w24.meta, (torch.int32,), (n, (k // 4 + 7) // 8))})
    # under CPU autocast x may be bf16 and the values fp32 (or the reverse): the op's autocast
    # rule casts both to bf16, so only the devices and shapes must agree
    autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    check_linear_inputs(x, k, n, x.dtype if autocast else w24.values.dtype, w24.values.device, bias, op)
    if w24.meta.device != x.device:
        raise ValueError(f"{op}: w24.meta is on {w24.meta.device} but x is on {x.device}")
    requested_train_path(path)  # a bad path / LACO_TRAIN_PATH fails on every backend
    backend = select_backend(op, [x, w24.values, w24.meta, bias])
    if backend == "native" and not _native_ok(op, x.dtype):
        backend = "reference"
    x2 = x.reshape(-1, k)
    if backend == "triton" and w24.values.requires_grad and torch.is_grad_enabled():
        train_path = choose_train_path(op, x2.shape[0], n, k, x.dtype, x.device, path)
        if train_path == "torch":
            return sparse24_linear_torch(x, w24, bias)
        if train_path == "expand":
            backend = EXPAND
    elif backend == "triton" and sparse24_gpu_path(x2.shape[0], x.device, x.dtype) == "expand":
        backend = EXPAND  # inference past the decode kernel's M on CUDA: transient dense weight + cuBLAS
    args = (x2, w24.values, w24.meta, bias)
    route = call_route(*args)
    if route == "direct":
        y = _sparse24_impl(*args, backend)
    elif route == "eager":
        y = _Sparse24LinearEager.apply(*args, backend)
    else:
        y = torch.ops.laco.sparse24_linear(*args, backend)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------
# bitmap
# ----------------------------------------------------------------------------------------
def _bitmap_impl(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
               bias: Optional[torch.Tensor], k: int, tile_k: int, backend: str) -> torch.Tensor:
    """x ``[M, K]`` @ dense(values ``[nnz]``, bitmap, offsets)^T + bias -> ``[M, N]`` (N = bitmap rows).

    Arguments already checked by :func:`bitmap_linear`; ``backend``: triton / native / reference.
    """
    bw = BitmapWeight(values, bitmap, offsets, (bitmap.shape[0], k), tile_k)
    if backend == "reference":
        return reference.bitmap_linear(x, bw, bias)
    if backend == "triton":
        from ..kernels import bitmap_gemm as kb

        if bitmap_gpu_path(x.shape[0], x.device, x.dtype) == "expand":
            return bitmap_expand_linear(x, bw, bias)
        return kb.bitmap_linear(x, values, bitmap, offsets, bw.shape, tile_k, _bias_for_kernel(bias, x.dtype))
    from .. import _native

    return _native.bitmap_linear_checked(x, bw, bias)


def bitmap_gpu_path(m: int, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Which GPU path runs a bitmap linear with ``m`` rows of x: ``"gemv"``, ``"tiled"`` or ``"expand"``.

    - ``m <= kernels.bitmap_gemv.gemv_max_m()`` (13; 4 with ``LACO_BITMAP_GPU_LAYOUT=canonical``):
      a decode GEMV, by default on the derived chunk layout (``kernels/bitmap_chunks.py``, built
      once per weight; products on the tensor cores). Measured on an H200 (fp16, M = 1,
      bench/results/gpu_gemm_graph.json): 70% sparsity 9.8 / 15.0 / 19.6 us against cuBLAS's
      10.5 / 24.9 / 28.6 on 4096 x 4096 / 11008 x 4096 / 4096 x 11008; 50% 12.9 / 36.2 / 49.4 (slower).
    - up to ``DECODE_MAX_M`` (16), fp16 / bf16: the tiled ``tl.dot`` kernel (H200, fp16, 4096 x 4096,
      M = 16: 48.5 us against 75.4 for the expansion below).
    - otherwise on CUDA (prefill, ``m > 16``; fp32 past the GEMV): expand the weight to a transient
      dense ``[N, K]`` tensor (:func:`bitmap_expand_linear`, ``weight_expand.bitmap_to_dense``) and run
      cuBLAS (``F.linear``). Measured on an H200 (bench/results/gpu_decode_sweep.json, 4096 x 4096,
      50%): the expansion alone 62.5 us (fp16; ``BitmapWeight.to_dense``'s masked scatter: 375), fp16
      M = 4096 260 us against cuBLAS's 201 on a stored dense weight; fp32 M = 16 120.8 us against
      146.9 for the tiled kernel. It costs one dense weight of transient memory per call.
    The interpreter (CPU tensors) always runs the kernels, so tests exercise them.
    """
    from ..kernels.bitmap_gemv import gemv_max_m
    from ..kernels.dense_gemm import DECODE_MAX_M

    device = _check_path_args("bitmap_gpu_path", m, device, dtype)
    if 0 < m <= gemv_max_m():
        return "gemv"
    if device.type != "cuda" or (m <= DECODE_MAX_M and dtype != torch.float32):
        return "tiled"
    return "expand"


def bitmap_expand_linear(x: torch.Tensor, bw: BitmapWeight, bias: Optional[torch.Tensor],
                         kernel: Optional[bool] = None) -> torch.Tensor:
    """x ``[M, K]`` @ dense(bw)^T + bias through a transient dense weight and ``F.linear`` (the GPU
    prefill path of :func:`bitmap_gpu_path`); fp32 accumulation as cuBLAS does it, output in x's dtype.

    The dense weight: :func:`_bitmap_dense` (``kernel`` as there).
    """
    dense = _bitmap_dense(bw, kernel)
    return torch.nn.functional.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _bitmap_dense(bw: BitmapWeight, kernel: Optional[bool] = None) -> torch.Tensor:
    """``bw`` as a dense ``[N, K]`` tensor: ``kernels.weight_expand.bitmap_to_dense`` (one Triton pass, the
    same bits as ``bw.to_dense()``; H200, 4096 x 4096 fp16 at 50% density: 62.5 us against 375 for the
    ``masked_scatter`` of ``to_dense``, bench/results/gpu_decode_sweep.json) when the weight is on CUDA
    with a tile_k the kernel supports (``dense_gemm.BITMAP_TILE_KS``), else ``bw.to_dense()``.
    ``kernel=True`` forces the kernel (the interpreter runs it on CPU tensors), False ``to_dense``."""
    from ..kernels.dense_gemm import BITMAP_TILE_KS

    if kernel is None:
        kernel = bw.values.device.type == "cuda" and bw.tile_k in BITMAP_TILE_KS
    if kernel:
        from ..kernels.weight_expand import bitmap_to_dense

        return bitmap_to_dense(bw.values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k)
    return bw.to_dense()


_bitmap_op = torch.library.custom_op("laco::bitmap_linear", _bitmap_impl, mutates_args=())


@_bitmap_op.register_fake
def _(x, values, bitmap, offsets, bias, k, tile_k, backend):
    return x.new_empty(x.shape[0], bitmap.shape[0])


def _bitmap_backward_impl(dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor,
                        offsets: torch.Tensor, k: int, tile_k: int, backend: str, need_x: bool, need_b: bool,
                        bias_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dX ``[M, K]``, db ``[N]``) of :func:`_bitmap_op`; an empty tensor where not needed."""
    bw = BitmapWeight(values, bitmap, offsets, (bitmap.shape[0], k), tile_k)
    dx = db = None
    if backend == "reference":  # what autograd through reference.bitmap_linear gives, bit for bit
        dx, _, db = reference.linear_fp32_grads(dy, x, bw.to_dense(), need_x, False, need_b, bias_dtype)
    else:
        dx = (dy.float() @ _bitmap_dense(bw).float()).to(dy.dtype) if need_x else None
        db = _bias_grad(dy, bias_dtype) if need_b else None
    return grad_or_empty(dx, dy), grad_or_empty(db, dy)


_bitmap_backward_op = torch.library.custom_op("laco::bitmap_linear_backward", _bitmap_backward_impl, mutates_args=())


@_bitmap_backward_op.register_fake
def _(dy, x, values, bitmap, offsets, k, tile_k, backend, need_x, need_b, bias_dtype):
    return (dy.new_empty(dy.shape[0], k) if need_x else dy.new_empty(0),
            dy.new_empty(bitmap.shape[0], dtype=bias_dtype) if need_b else dy.new_empty(0))


def _bitmap_setup(ctx, inputs, output):
    x, values, bitmap, offsets, bias, k, tile_k, backend = inputs
    ctx.save_for_backward(x, values, bitmap, offsets)
    ctx.k, ctx.tile_k, ctx.backend = k, tile_k, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bitmap_backward(ctx, dy):
    x, values, bitmap, offsets = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    bwd = (_bitmap_backward_impl if call_direct(dy, x, values, bitmap, offsets)
           else torch.ops.laco.bitmap_linear_backward)
    dx, db = bwd(dy, x, values, bitmap, offsets, ctx.k, ctx.tile_k, ctx.backend, need_x, need_b, ctx.bias_dtype)
    return (dx if need_x else None), None, None, None, (db if need_b else None), None, None, None


_bitmap_op.register_autograd(_bitmap_backward, setup_context=_bitmap_setup)
_BitmapLinearEager = eager_function("_BitmapLinearEager", _bitmap_impl, _bitmap_setup, _bitmap_backward)


def bitmap_linear(x: torch.Tensor, bw: BitmapWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(bw)^T + bias ``[N]`` -> ``[..., N]`` in x's dtype.

    bw: a :class:`BitmapWeight` of shape ``(N, K)`` (tensors' shapes, dtypes, device checked here;
    their content once by ``from_dense`` / ``load`` / ``validate()``).
    Differentiable in x and bias.
    """
    op = "bitmap_linear"
    if not isinstance(bw, BitmapWeight):
        raise TypeError(f"{op}: bw must be a BitmapWeight (BitmapWeight.from_dense(W)), got {type(bw).__name__}")
    n, k = bw.shape
    tiles = (k + bw.tile_k - 1) // bw.tile_k if bw.tile_k > 0 else -1
    _check_layout(op, bw.shape, **{"bw.values": (bw.values, FLOAT_DTYPES, (bw.values.numel(),)),
                                   "bw.bitmap": (bw.bitmap, (torch.int32,), (n, (k + 31) // 32)),
                                   "bw.offsets": (bw.offsets, (torch.int32,), (n, tiles))})
    check_linear_inputs(x, k, n, bw.values.dtype, bw.values.device, bias, op)
    for name, t in (("bitmap", bw.bitmap), ("offsets", bw.offsets)):
        if t.device != x.device:
            raise ValueError(f"{op}: bw.{name} is on {t.device} but x is on {x.device}")
    if bw.values.requires_grad:
        raise ValueError(f"{op}: BitmapWeight.values requires grad, but bitmap_linear does not train packed values "
                         "(use masked_linear for training)")
    backend = select_backend(op, [x, bw.values, bw.bitmap, bias])
    if backend == "native" and not _native_ok(op, x.dtype):
        backend = "reference"
    if backend == "triton":
        from ..kernels.dense_gemm import BITMAP_TILE_KS

        if bw.tile_k not in BITMAP_TILE_KS:
            raise ValueError(f"{op}: the Triton kernel supports tile_k in {BITMAP_TILE_KS}, this weight has "
                             f"tile_k={bw.tile_k}; repack with BitmapWeight.from_dense(W, tile_k=128)")
    args = (x.reshape(-1, k), bw.values, bw.bitmap, bw.offsets, bias)
    route = call_route(*args)
    if route == "direct":
        y = _bitmap_impl(*args, k, bw.tile_k, backend)
    elif route == "eager":
        y = _BitmapLinearEager.apply(*args, k, bw.tile_k, backend)
    else:
        y = torch.ops.laco.bitmap_linear(*args, k, bw.tile_k, backend)
    return y.reshape(*x.shape[:-1], n)
