"""``masked_linear``: a linear layer whose weight is multiplied by a fixed bit-packed mask.

    y = x (W ⊙ M)^T + b,  dX = dY (W ⊙ M),  dW = (dY^T X) ⊙ M,  db = sum dY

Differentiable in x, weight and bias. dW is exactly zero wherever the mask is, so an optimizer
without weight decay never makes a pruned weight nonzero (weight decay of a zero weight is
zero too, so AdamW keeps it at zero as well). On the Triton path no tensor of W's size is
created besides dW (the mask is expanded tile by tile in registers).

Backends (``ops.dispatch.select_backend``): CUDA tensors -> Triton, or ``F.linear(x, W * M)``
with autograd where the SASS audit predicts the Triton kernels slower (``ops/train_dispatch.py``;
``LACO_TRAIN_PATH`` / ``path=`` override; the torch path materialises W ⊙ M); CPU -> the PyTorch
reference (the native extension has no masked_linear; forcing ``LACO_BACKEND=native`` raises
in the dispatcher); ``LACO_BACKEND=triton`` with ``TRITON_INTERPRET=1`` runs the kernels on CPU.
"""
from __future__ import annotations

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_linear_inputs, check_tensor
from ..formats import PackedMask
from .dispatch import select_backend
from .train_dispatch import choose_train_path, masked_linear_torch, requested_train_path

_OP = "masked_linear"


def _as_packed(mask, shape, device) -> PackedMask:
    """PackedMask (validated) from a PackedMask or a bool ``[N, K]`` tensor."""
    if isinstance(mask, PackedMask):
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{_OP}: mask has shape {tuple(mask.shape)} but weight has shape {tuple(shape)}")
        mask.validate()
    elif isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"{_OP}: mask tensor has dtype {mask.dtype}; pass a bool tensor or a PackedMask")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{_OP}: mask has shape {tuple(mask.shape)} but weight has shape {tuple(shape)}")
        mask = PackedMask.from_bool(mask)
    else:
        raise TypeError(f"{_OP}: mask must be a PackedMask or a bool tensor, got {type(mask).__name__}")
    if mask.bits.device != device:
        raise ValueError(f"{_OP}: mask is on {mask.bits.device} but weight is on {device}")
    return mask


class _MaskedLinearTriton(torch.autograd.Function):
    """Thin autograd wrapper over kernels.masked_gemm (x already 2-D)."""

    @staticmethod
    def forward(ctx, x2, weight, bits, bias):
        from ..kernels import masked_gemm as k

        ctx.save_for_backward(x2, weight, bits)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return k.masked_linear_fwd(x2, weight, bits, bias)

    @staticmethod
    def backward(ctx, dy):
        from ..kernels import masked_gemm as k

        x2, weight, bits = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad
        dx = k.masked_linear_dx(dy, weight, bits) if need_x else None
        dw = db = None
        if need_w:  # db rides along in the dW pass (no extra read of dY)
            dw, db = k.masked_linear_dw(dy, x2, bits, want_bias=need_b, bias_dtype=ctx.bias_dtype)
        elif need_b:
            db = dy.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, None, db


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: PackedMask | torch.Tensor,
                  bias: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ (weight ``[N, K]`` ⊙ mask)^T + bias ``[N]`` -> ``[..., N]`` in x's dtype.

    mask: a :class:`PackedMask` of shape ``(N, K)`` or a bool ``[N, K]`` tensor (True = kept;
    packed here; pack it once with ``PackedMask.from_bool`` when calling in a loop). x and
    weight share a float dtype (fp16 / bf16 / fp32) and device; any strides are accepted.
    path: ``"auto"`` / ``"triton"`` / ``"torch"`` (default ``LACO_TRAIN_PATH``, else ``auto``): where
    the Triton backend is selected, run the Triton kernels or ``F.linear(x, W * M)`` + autograd
    (see ``ops/train_dispatch.py``).
    """
    check_tensor(weight, f"{_OP}: weight", dtypes=FLOAT_DTYPES, ndim=2)
    n, k = weight.shape
    check_linear_inputs(x, k, n, weight.dtype, weight.device, bias, _OP)
    pm = _as_packed(mask, (n, k), weight.device)
    requested_train_path(path)  # a bad path / LACO_TRAIN_PATH fails on every backend
    backend = select_backend(_OP, [x, weight, pm.bits, bias])
    if backend == "reference":
        return reference.masked_linear(x, weight, pm, bias)
    if backend == "native":  # unreachable today: the dispatcher only picks ops the extension declares
        raise RuntimeError(f"{_OP}: the native extension declares this op but the ops layer has no binding for it")
    x2 = x.reshape(-1, k)
    if choose_train_path(_OP, x2.shape[0], n, k, x.dtype, x.device, path) == "torch":
        return masked_linear_torch(x, weight, pm, bias)
    y = _MaskedLinearTriton.apply(x2, weight, pm.bits, bias)
    return y.reshape(*x.shape[:-1], n)
