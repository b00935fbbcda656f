"""``reconstruction_loss``: fused block-reconstruction loss, differentiable in ``pred``.

Kinds ``"mse"``, ``"nmse"``, ``"cosine"`` (definitions and eps handling: ``reference.reconstruction_loss``).
The target is treated as a constant: it is detached and never receives a gradient (recovery
compares a trainable block's output with the frozen dense block's output), the same as in the
reference.

Backends (``ops.dispatch.select_backend``): CUDA -> Triton kernels (one pass forward, one pass
backward, no difference tensor kept); CPU -> the native extension for float32 / bfloat16
when it is built, else the PyTorch reference (float16 has no native kernel: under ``auto``
the reference runs, under a forced ``LACO_BACKEND=native`` it is an error).

torch.compile: :func:`reconstruction_loss` validates and picks the backend in Python, then calls
the custom op ``torch.ops.laco.reconstruction_loss`` -> ``(loss, stats)`` (stats: what the fused
backward reads, see ``_stats_shape``), differentiated by ``laco::reconstruction_loss_backward``.
Both are opaque to inductor, with fake implementations (docs/torch_compile.md).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_tensor
from .dispatch import call_direct, call_route, eager_function, requested_backend, select_backend

_OP = "reconstruction_loss"
KINDS = reference.RECONSTRUCTION_KINDS


def _stats_shape(pred: torch.Tensor, kind: str, backend: str) -> tuple:
    """Shape of the stats the forward op returns: ``[1]`` clamped sum t^2 (nmse), ``[R, 3]`` per-row
    dot, |p|, |t| (cosine), ``[0]`` otherwise (mse, and the reference, whose backward needs none)."""
    if backend == "reference" or kind == "mse":
        return (0,)
    if kind == "nmse":
        return (1,)
    return (pred.numel() // pred.shape[-1], 3)


def _loss_impl(pred: torch.Tensor, target: torch.Tensor, kind: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss float32 0-dim, stats float32 of :func:`_stats_shape`) for pred, target ``[..., D]``."""
    if backend == "reference":
        return reference.reconstruction_loss(pred, target, kind), pred.new_empty(0, dtype=torch.float32)
    if backend == "native":
        from .. import _native

        loss, stats = _native.reconstruction_loss_forward(pred, target, kind)
    else:
        from ..kernels import recon_loss as k

        d = pred.shape[-1]
        loss, stats = k.recon_loss_fwd(pred.reshape(-1, d), target.reshape(-1, d), kind)
    return loss, (stats.reshape(0) if kind == "mse" else stats)  # mse: no stats ([0] natively, [0, 3] in Triton)


_loss_op = torch.library.custom_op("laco::reconstruction_loss", _loss_impl, mutates_args=())


@_loss_op.register_fake
def _(pred, target, kind, backend):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(_stats_shape(pred, kind, backend),
                                                                   dtype=torch.float32)


def _loss_backward_impl(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                      kind: str, backend: str) -> torch.Tensor:
    """d loss / d pred, shaped like pred and in its dtype."""
    if backend == "reference":  # autograd through the reference: today's numerics, bit for bit
        _, vjp = torch.func.vjp(lambda p: reference.reconstruction_loss(p, target, kind), pred)
        return vjp(grad_out)[0]
    if backend == "native":
        from .. import _native

        return _native.reconstruction_loss_backward(grad_out, pred, target, kind, stats)
    from ..kernels import recon_loss as k

    d = pred.shape[-1]
    if kind == "mse":
        stats = stats.new_empty(0, 3)
    return k.recon_loss_bwd(grad_out, pred.reshape(-1, d), target.reshape(-1, d), kind, stats).reshape(pred.shape)


_loss_backward_op = torch.library.custom_op("laco::reconstruction_loss_backward", _loss_backward_impl, mutates_args=())


@_loss_backward_op.register_fake
def _(grad_out, pred, target, stats, kind, backend):
    return torch.empty_like(pred)


def _loss_setup(ctx, inputs, output):
    pred, target, kind, backend = inputs
    ctx.save_for_backward(pred, target, output[1])
    ctx.kind, ctx.backend = kind, backend


def _loss_backward(ctx, grad_loss, grad_stats):
    pred, target, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        bwd = (_loss_backward_impl if call_direct(grad_loss, pred, target, stats)
               else torch.ops.laco.reconstruction_loss_backward)
        grad = bwd(grad_loss, pred, target, stats, ctx.kind, ctx.backend)
    return grad, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)
_LossEager = eager_function("_LossEager", _loss_impl, _loss_setup, _loss_backward)


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

        if not _native.supports_dtype(_OP, pred.dtype, target.dtype):
            if requested_backend() == "native":
                raise TypeError(f"{_OP}: LACO_BACKEND=native but the native kernel takes float32 / bfloat16, "
                                f"got pred {pred.dtype}, target {target.dtype}")
            backend = "reference"  # documented: no native fp16 kernel
    route = call_route(pred, target)
    if route == "direct":
        return _loss_impl(pred, target, kind, backend)[0]
    if route == "eager":
        return _LossEager.apply(pred, target, kind, backend)[0]
    return torch.ops.laco.reconstruction_loss(pred, target, kind, backend)[0]
