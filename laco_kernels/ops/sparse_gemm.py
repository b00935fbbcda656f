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

cuSPARSELt / CUTLASS (``torch.sparse.to_sparse_semi_structured``) is NOT dispatched to yet: it
needs the weight re-compressed into its own layout (a second copy of every weight, cached per
weight) and pads M to 32 rows. Measured on an H100 (``bench/results/gpu_gemm_graph.json``, fp16,
CUDA-graph timing) it beats our prefill kernel 7.9-8.5x and cuBLAS 1.37-1.59x at M = 4096, and at
M <= 16 it is slower than cuBLAS on 5 of the 6 shape/M pairs (0.31-0.93x; 1.03x at 11008x4096,
M = 16); wiring it in for M >= 256 with a cached compressed copy is the obvious next step for prefill.

Gradients: on the triton / native paths ``sparse24_linear`` is a small autograd Function whose
backward gives x, the packed values (``w24.values`` if it requires grad) and bias their gradients:
on triton through ``kernels/sparse24_grad.py`` (dX from the compressed weight, dV ``[N, K/2]``
gathered in registers), on native through :func:`_sparse24_grads_cpu` (row blocks of the weight,
torch ops). To train the values, wrap an ``nn.Parameter`` ``[N, K/2]`` with the
metadata buffer: ``sparse24_linear(x, Sparse24Weight(param, meta, shape), bias)`` (what
``nn.SparseLinear24(trainable=True)`` does); the optimizer then holds state for the kept half only. ``bitmap_linear`` gives x and
bias gradients; its packed values are not trainable (use ``masked_linear`` to train).
"""
from __future__ import annotations

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_linear_inputs, check_tensor
from ..formats import BitmapWeight, Sparse24Weight, _row_chunks
from .dispatch import requested_backend, select_backend
from .train_dispatch import choose_train_path, requested_train_path, sparse24_linear_torch


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


# ----------------------------------------------------------------------------------------
# 2:4
# ----------------------------------------------------------------------------------------
def _sparse24_forward(x2, values, w24, bias, backend):
    if backend == "triton":
        from ..kernels import sparse24_gemm as k

        return k.sparse24_linear(x2, values, w24.meta, w24.shape, _bias_for_kernel(bias, x2.dtype))
    from .. import _native

    return _native.sparse24_linear(x2, w24, bias, values=values)


_BACKWARD_CHUNK = 1 << 21  # weight elements the CPU backward decompresses at once


def _sparse24_grads_cpu(dy: torch.Tensor, x2: torch.Tensor, w24: Sparse24Weight, values: torch.Tensor,
                        need_x: bool, need_v: bool):
    """(dX [M, K] in dY's dtype or None, dV [N, K/2] in x's dtype or None), fp32 accumulation.

    dX = dY @ dense(values, meta) and dV = (dY^T X) at the kept positions, one row block of the
    weight at a time (about ``_BACKWARD_CHUNK`` elements): no dense ``[N, K]`` weight or gradient
    exists, which in block-by-block recovery would sit on top of the parameters, gradients and
    AdamW state (a 4096 x 11008 fp32 weight is 180 MB). Each block's mask is decoded once, for both.
    """
    n, k = w24.shape
    dyf = dy.float()
    xf = x2.float() if need_v else None
    dx = torch.zeros(dy.shape[0], k, dtype=torch.float32, device=dy.device) if need_x else None
    dv = torch.empty(n, k // 2, dtype=x2.dtype, device=x2.device) if need_v else None
    for rows in _row_chunks(n, k, _BACKWARD_CHUNK):
        part = w24.row_block(rows, values)
        mask = part.mask()
        if need_x:
            dense = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            dx.addmm_(dyf[:, rows], dense.masked_scatter_(mask, part.values.float()))
        if need_v:
            # kept positions in row-major order are the values' order (i0 < i1 in every group)
            dv[rows] = (dyf[:, rows].t() @ xf).masked_select(mask).reshape(-1, k // 2)
    return (dx.to(dy.dtype) if need_x else None), dv


def _bias_grad(dy: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    return dy.float().sum(0).to(bias_dtype)


class _Sparse24Linear(torch.autograd.Function):
    """y = x2 @ dense(values, w24.meta)^T + bias for 2-D x2, on the triton or native backend."""

    @staticmethod
    def forward(ctx, x2, values, bias, w24, backend):
        ctx.w24 = w24
        ctx.backend = backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2, values)
        return _sparse24_forward(x2, values, w24, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        x2, values = ctx.saved_tensors
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        if ctx.backend == "triton":  # kernels/sparse24_grad.py: compressed weight only, db fused into dV
            from ..kernels import sparse24_grad as g

            w24 = ctx.w24
            dx = g.sparse24_grad_input(dy, values, w24.meta, w24.shape) if need_x else None
            dv = db = None
            if need_v:
                dv, db = g.sparse24_values_grad(dy, x2, w24.meta, w24.shape, want_bias=need_b,
                                                bias_dtype=ctx.bias_dtype)
            elif need_b:
                db = _bias_grad(dy, ctx.bias_dtype)
            return dx, dv, db, None, None
        dx, dv = _sparse24_grads_cpu(dy, x2, ctx.w24, values, need_x, need_v)
        db = _bias_grad(dy, ctx.bias_dtype) if need_b else None
        return dx, dv, db, None, None


def sparse24_linear(x: torch.Tensor, w24: Sparse24Weight, bias: torch.Tensor | None = None,
                    path: str | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(w24)^T + bias ``[N]`` -> ``[..., N]`` in x's dtype.

    w24: a :class:`Sparse24Weight` of shape ``(N, K)`` (its tensors' shapes, dtypes and device are
    checked here; ``from_dense`` already refused any non-2:4 weight).
    Differentiable in x, bias and ``w24.values`` (when it requires grad).
    path: when the values are trained on the Triton backend, ``"auto"`` / ``"triton"`` / ``"torch"``
    (default ``LACO_TRAIN_PATH``, else ``auto``): the Triton kernels or ``F.linear(x, dense(w24))``
    + autograd, chosen by ``ops/train_dispatch.py`` (the audit's predictions) under ``auto``.
    """
    op = "sparse24_linear"
    if not isinstance(w24, Sparse24Weight):
        raise TypeError(f"{op}: w24 must be a Sparse24Weight (Sparse24Weight.from_dense(W)), got {type(w24).__name__}")
    n, k = w24.shape
    if k % 4:
        raise ValueError(f"{op}: 2:4 weight shape {tuple(w24.shape)} has K not divisible by 4")
    _check_layout(op, w24.shape, **{"w24.values": (w24.values, FLOAT_DTYPES, (n, k // 2)),
                                    "w24.meta": (w24.meta, (torch.int32,), (n, (k // 4 + 7) // 8))})
    check_linear_inputs(x, k, n, w24.values.dtype, w24.values.device, bias, op)
    if w24.meta.device != x.device:
        raise ValueError(f"{op}: w24.meta is on {w24.meta.device} but x is on {x.device}")
    requested_train_path(path)  # a bad path / LACO_TRAIN_PATH fails on every backend
    backend = select_backend(op, [x, w24.values, w24.meta, bias])
    if backend == "native" and not _native_ok(op, x.dtype):
        backend = "reference"
    if backend == "reference":
        return reference.sparse24_linear(x, w24, bias)
    x2 = x.reshape(-1, k)
    if (backend == "triton" and w24.values.requires_grad and torch.is_grad_enabled()
            and choose_train_path(op, x2.shape[0], n, k, x.dtype, x.device, path) == "torch"):
        return sparse24_linear_torch(x, w24, bias)
    y = _Sparse24Linear.apply(x2, w24.values, bias, w24, backend)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------
# bitmap
# ----------------------------------------------------------------------------------------
class _BitmapLinear(torch.autograd.Function):
    """y = x2 @ dense(bw)^T + bias for 2-D x2, on the triton or native backend (grads: x, bias)."""

    @staticmethod
    def forward(ctx, x2, bias, bw, backend):
        ctx.bw = bw
        ctx.bias_dtype = None if bias is None else bias.dtype
        if backend == "triton":
            from ..kernels import bitmap_gemm as k

            return k.bitmap_linear(x2, bw.values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k,
                                   _bias_for_kernel(bias, x2.dtype))
        from .. import _native

        return _native.bitmap_linear(x2, bw, bias)

    @staticmethod
    def backward(ctx, dy):
        need_x, need_b = ctx.needs_input_grad[:2]
        dx = (dy.float() @ ctx.bw.to_dense().float()).to(dy.dtype) if need_x else None
        db = _bias_grad(dy, ctx.bias_dtype) if need_b else None
        return dx, db, None, None


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
    if backend == "reference":
        return reference.bitmap_linear(x, bw, bias)
    if backend == "triton":
        from ..kernels.dense_gemm import BITMAP_TILE_KS

        if bw.tile_k not in BITMAP_TILE_KS:
            raise ValueError(f"{op}: the Triton kernel supports tile_k in {BITMAP_TILE_KS}, this weight has "
                             f"tile_k={bw.tile_k}; repack with BitmapWeight.from_dense(W, tile_k=128)")
    x2 = x.reshape(-1, k)
    y = _BitmapLinear.apply(x2, bias, bw, backend)
    return y.reshape(*x.shape[:-1], n)
