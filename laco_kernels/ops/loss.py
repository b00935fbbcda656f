"""``reconstruction_loss``: fused block-reconstruction loss, differentiable in ``pred``.

Kinds ``"mse"``, ``"nmse"``, ``"cosine"`` (definitions and eps handling: ``reference.reconstruction_loss``).
The target is treated as a constant: it is detached and never receives a gradient (recovery
compares a trainable block's output with the frozen dense block's output), the same as in the
reference.

Backends (``ops.dispatch.select_backend``): CUDA -> Triton kernels (one pass forward, one pass
backward, no difference tensor kept); CPU -> the native extension for float32 / bfloat16
when it is built, else the PyTorch reference (float16 has no native kernel: under ``auto``
the reference runs, under a forced ``LACO_BACKEND=native`` it is an error).
"""
from __future__ import annotations

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_tensor
from .dispatch import requested_backend, select_backend

_OP = "reconstruction_loss"
KINDS = reference.RECONSTRUCTION_KINDS


class _ReconLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred2, target2, kind):
        from ..kernels import recon_loss as k

        loss, stats = k.recon_loss_fwd(pred2, target2, kind)
        ctx.save_for_backward(pred2, target2, stats)
        ctx.kind = kind
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        from ..kernels import recon_loss as k

        pred2, target2, stats = ctx.saved_tensors
        return k.recon_loss_bwd(grad_out, pred2, target2, ctx.kind, stats), None, None


class _ReconLossNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, kind):
        from .. import _native

        loss, stats = _native.reconstruction_loss_forward(pred, target, kind)
        ctx.save_for_backward(pred, target, stats)
        ctx.kind = kind
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        from .. import _native

        pred, target, stats = ctx.saved_tensors
        return _native.reconstruction_loss_backward(grad_out, pred, target, ctx.kind, stats), None, None


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Scalar float32 loss of ``pred`` against ``target`` (same shape ``[..., D]``, float dtypes).

    Differentiable in ``pred`` only; ``target`` is detached (a constant).
    """
    if kind not in KINDS:
        raise ValueError(f"{_OP}: unknown kind {kind!r}; expected one of {KINDS}")
    check_tensor(pred, f"{_OP}: pred", dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(target, f"{_OP}: target", dtypes=FLOAT_DTYPES, min_ndim=1)
    if pred.shape != target.shape:
        raise ValueError(f"{_OP}: pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"{_OP}: pred is empty (shape {tuple(pred.shape)})")
    if pred.device != target.device:
        raise ValueError(f"{_OP}: pred is on {pred.device} but target is on {target.device}")
    target = target.detach()
    backend = select_backend(_OP, [pred, target])
    if backend == "native":
        from .. import _native

        if _native.supports_dtype(_OP, pred.dtype, target.dtype):
            return _ReconLossNative.apply(pred, target, kind)
        if requested_backend() == "native":
            raise TypeError(f"{_OP}: LACO_BACKEND=native but the native kernel takes float32 / bfloat16, "
                            f"got pred {pred.dtype}, target {target.dtype}")
        backend = "reference"  # documented: no native fp16 kernel
    if backend == "reference":
        return reference.reconstruction_loss(pred, target, kind)
    d = pred.shape[-1]
    return _ReconLossTriton.apply(pred.reshape(-1, d), target.reshape(-1, d), kind)
