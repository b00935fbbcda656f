"""``masked_linear``: a linear layer whose weight is multiplied by a fixed bit-packed mask.

    y = x (W ⊙ M)^T + b,  dX = dY (W ⊙ M),  dW = (dY^T X) ⊙ M,  db = sum dY

Differentiable in x, weight and bias. dW is exactly zero wherever the mask is, so an optimizer
without weight decay never makes a pruned weight nonzero (weight decay of a zero weight is
zero too, so AdamW keeps it at zero as well). On the Triton path no tensor of W's size is
created besides dW (the mask is expanded tile by tile in registers).

Triton path, >= ``kernels.masked_gemm.GUARD_MIN_ROWS`` tokens: the forward first checks on the
device whether W is zero at every pruned slot (``kernels.masked_gemm.pruned_nonzero``: one read of
W and its bits, no host sync) and the forward and dX kernels then run the plain GEMM loop (W ⊙ M
== W) or, if the check fails, the masked loop: exact either way. Recovery keeps the check passing:
a zero weight gets an exact zero gradient, and no standard optimizer moves it. The backward's dX
reuses the forward's verdict (autograd's version check on the saved weight keeps it valid).

Backends (``ops.dispatch.select_backend``): CUDA tensors -> the training path measured fastest on an
H200 at the nearest measured shape: the fused Triton kernels, the expand path (transient dense W +
cuBLAS) or ``F.linear(x, W * M)`` with autograd (``ops/train_dispatch.py``; ``LACO_TRAIN_PATH`` /
``path=`` override; the torch path materialises W ⊙ M); CPU -> the native
extension (csrc/masked_linear.cpp: the mask applied block by block in one vector pass, every
product through the BLAS of ``F.linear``; fp32 / bf16, fp16 runs the reference) when built, else
the PyTorch reference; ``LACO_BACKEND=triton`` with ``TRITON_INTERPRET=1`` runs the kernels on CPU.

torch.compile: :func:`masked_linear` validates and picks the backend in Python, then calls the
custom op ``torch.ops.laco.masked_linear`` (2-D x, the mask's int32 words, the backend as a
string); its backward is the custom op ``laco::masked_linear_backward``. Both are opaque to
inductor, with fake implementations (docs/torch_compile.md).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_linear_inputs, check_tensor
from ..formats import PackedMask
from .dispatch import call_direct, call_route, eager_function, grad_or_empty, requested_backend, select_backend
from .train_dispatch import EXPAND, choose_train_path, masked_linear_torch, requested_train_path

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


def _guarded(backend: str, m: int) -> bool:
    """Whether the Triton kernels run guarded (kernels/masked_gemm.pruned_nonzero) at m tokens."""
    from ..kernels.masked_gemm import GUARD_MIN_ROWS

    return backend == "triton" and m >= GUARD_MIN_ROWS


def _masked_impl(x: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor, bias: Optional[torch.Tensor],
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]`` @ (weight ``[N, K]`` ⊙ bits int32 ``[N, ceil(K/32)]``)^T + bias -> (``[M, N]``, flag).

    Arguments already checked by :func:`masked_linear`; ``backend``: triton / native / reference.
    flag: int32 ``[1]``, the guard's verdict (``kernels.masked_gemm.pruned_nonzero``: 0 when weight
    is zero at every pruned slot, so the kernels skip the mask) on the guarded Triton path (>=
    ``GUARD_MIN_ROWS`` tokens), reused by the backward's dX; int32 ``[0]`` (no guard) otherwise.
    """
    none = x.new_empty(0, dtype=torch.int32)
    if backend == "reference":
        return reference.masked_linear(x, weight, PackedMask(bits, tuple(weight.shape)), bias), none
    if backend == "native":
        from .. import _native

        return _native.masked_linear_forward(x, weight, bits, bias), none
    if backend == EXPAND:  # training "expand" path: W ⊙ M written once, then cuBLAS (kernels/weight_expand.py)
        from ..kernels.weight_expand import masked_to_dense

        b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        return torch.nn.functional.linear(x, masked_to_dense(weight, bits), b), none
    from ..kernels import masked_gemm as k

    flag = k.pruned_nonzero(weight, bits) if _guarded(backend, x.shape[0]) else None
    return k.masked_linear_fwd(x, weight, bits, bias, flag=flag), (none if flag is None else flag)


_masked_op = torch.library.custom_op("laco::masked_linear", _masked_impl, mutates_args=())


@_masked_op.register_fake
def _(x, weight, bits, bias, backend):
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(1 if _guarded(backend, x.shape[0]) else 0, dtype=torch.int32))


def _masked_backward_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor,
                          flag: torch.Tensor, backend: str, need_x: bool, need_w: bool, need_b: bool,
                          bias_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX ``[M, K]``, dW ``[N, K]``, db ``[N]``) of :func:`_masked_op`; an empty tensor where not needed.

    flag: the forward's guard verdict (int32 ``[1]``), or int32 ``[0]`` (unguarded). Autograd's
    version check on the saved weight guarantees it still describes weight."""
    dx = dw = db = None
    if backend == "reference":  # what autograd through reference.masked_linear gives, bit for bit
        mask = PackedMask(bits, tuple(weight.shape)).to_bool().to(weight.dtype)
        dx, dwf, db = reference.linear_fp32_grads(dy, x, weight * mask if need_x else weight, need_x, need_w,
                                                  need_b, bias_dtype)
        if need_w:
            dw = dwf.to(weight.dtype) * mask
    elif backend == "native":  # csrc/masked_linear.cpp: BLAS GEMMs, dW masked in place (pruned entries 0)
        from .. import _native

        dx = _native.masked_linear_grad_input(dy, weight, bits) if need_x else None
        dw = _native.masked_linear_grad_weight(dy, x, bits) if need_w else None
        db = dy.float().sum(0).to(bias_dtype) if need_b else None
    else:  # kernels/masked_gemm.py: the mask is expanded tile by tile; db rides along in the dW pass
        from ..kernels import masked_gemm as k

        if need_x and backend == EXPAND:  # re-expanded (nothing of W's size is kept from the forward)
            from ..kernels.weight_expand import masked_to_dense

            dx = torch.mm(dy, masked_to_dense(weight, bits))
        elif need_x:
            dx = k.masked_linear_dx(dy, weight, bits, flag=flag if flag.numel() else None)
        if need_w:
            dw, db = k.masked_linear_dw(dy, x, bits, want_bias=need_b, bias_dtype=bias_dtype)
        elif need_b:
            db = dy.float().sum(0).to(bias_dtype)
    return grad_or_empty(dx, dy), grad_or_empty(dw, weight), grad_or_empty(db, dy)


_masked_backward_op = torch.library.custom_op("laco::masked_linear_backward", _masked_backward_impl, mutates_args=())


@_masked_backward_op.register_fake
def _(dy, x, weight, bits, flag, backend, need_x, need_w, need_b, bias_dtype):
    return (dy.new_empty(dy.shape[0], x.shape[1]) if need_x else dy.new_empty(0),
            x.new_empty(weight.shape) if need_w else weight.new_empty(0),
            dy.new_empty(weight.shape[0], dtype=bias_dtype) if need_b else dy.new_empty(0))


def _masked_setup(ctx, inputs, output):
    x, weight, bits, bias, backend = inputs
    ctx.save_for_backward(x, weight, bits, output[1])
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _masked_backward(ctx, dy, _dflag):
    x, weight, bits, flag = ctx.saved_tensors
    need_x, need_w, _, need_b, _ = ctx.needs_input_grad
    bwd = _masked_backward_impl if call_direct(dy, x, weight, bits) else torch.ops.laco.masked_linear_backward
    dx, dw, db = bwd(dy, x, weight, bits, flag, ctx.backend, need_x, need_w, need_b, ctx.bias_dtype)
    return (dx if need_x else None), (dw if need_w else None), None, (db if need_b else None), None


_masked_op.register_autograd(_masked_backward, setup_context=_masked_setup)
# CPU autocast (bf16) casts x, weight and bias to bf16 like F.linear (layer-wise recovery's autocast)
torch.library.register_autocast("laco::masked_linear", "cpu", torch.bfloat16)
# eager training calls: the same impl / setup / backward without the custom op's dispatch (ops/dispatch.py)
_MaskedLinearEager = eager_function("_MaskedLinearEager", _masked_impl, _masked_setup, _masked_backward)


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
    # under CPU autocast x and weight may differ in dtype: the op's autocast rule casts both to bf16
    autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    check_linear_inputs(x, k, n, x.dtype if autocast else weight.dtype, weight.device, bias, _OP)
    pm = _as_packed(mask, (n, k), weight.device)
    requested_train_path(path)  # a bad path / LACO_TRAIN_PATH fails on every backend
    backend = select_backend(_OP, [x, weight, pm.bits, bias])
    if backend == "native":
        from .. import _native

        if not _native.supports_dtype(_OP, x.dtype):  # fp16: no native kernel
            if requested_backend() == "native":
                raise TypeError(f"{_OP}: LACO_BACKEND=native but the native kernels do not take dtype {x.dtype} "
                                "(float32 / bfloat16 only)")
            backend = "reference"
    x2 = x.reshape(-1, k)
    if backend == "triton":
        train_path = choose_train_path(_OP, x2.shape[0], n, k, x.dtype, x.device, path)
        if train_path == "torch":
            return masked_linear_torch(x, weight, pm, bias)
        if train_path == "expand":
            backend = EXPAND
    args = (x2, weight, pm.bits, bias)
    route = call_route(*args)
    if route == "direct":
        y, _ = _masked_impl(*args, backend)
    elif route == "eager":
        y, _ = _MaskedLinearEager.apply(*args, backend)
    else:
        y, _ = torch.ops.laco.masked_linear(*args, backend)
    return y.reshape(*x.shape[:-1], n)
