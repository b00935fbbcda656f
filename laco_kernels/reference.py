"""Plain-PyTorch oracles for every op in the package (also the CPU fallback).

Each function here defines what the matching Triton / native kernel must compute. They
accumulate in fp32 and return the input's dtype, like the kernels, and they are
differentiable through ordinary autograd, so the tests compare gradients too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import BitmapWeight, PackedMask, Sparse24Weight

RECONSTRUCTION_KINDS = ("mse", "nmse", "cosine")


def _linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight^T + bias computed in fp32, returned in x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def linear_fp32_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_w: bool,
                      need_b: bool, bias_dtype: torch.dtype | None):
    """Gradients of :func:`_linear_fp32` for 2-D ``x [M, K]``, computed as autograd computes them.

    Returns ``(dX [M, K] in x's dtype, dW [N, K] float32, db [N] in bias_dtype)``, ``None`` where
    not needed. The mm orientations are autograd's (``mm_mat1_backward`` / ``mm_mat2_backward``
    of the ``addmm`` / ``mm`` that ``F.linear`` runs), so the custom ops' reference backward gives
    the same bits as differentiating the reference through autograd (tests/test_compile.py).
    """
    g = grad_out.float()
    xf = x.float()
    dx = dw = db = None
    if need_x:
        wf = weight.float()
        if xf.dim() == 2 and xf.stride(0) == 1 and xf.stride(1) == xf.shape[0] and xf.shape[1] > 1:
            dx = wf.t().mm(g.t()).t()  # column-major x: autograd returns its gradient column-major
        else:
            dx = g.mm(wf)
        dx = dx.to(x.dtype)
    if need_w:
        dw = g.t().mm(xf)  # weight.t() is column-major: autograd's grad.t().mm(x), transposed back
    if need_b:
        db = g.sum(0).to(bias_dtype)
    return dx, dw, db


def sparse24_linear(x: torch.Tensor, w24: Sparse24Weight, bias: torch.Tensor | None = None,
                    values: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(w24)^T + bias -> ``[..., N]``; differentiable in x, values, bias.

    ``values`` overrides ``w24.values`` (a trainable ``[N, K/2]`` tensor with the same metadata).
    """
    return _linear_fp32(x, w24.to_dense(values), bias)


def bitmap_linear(x: torch.Tensor, bw: BitmapWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(bw)^T + bias -> ``[..., N]``."""
    return _linear_fp32(x, bw.to_dense(), bias)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: PackedMask | torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ (weight ⊙ mask)^T + bias; autograd gives dW = (dY^T X) ⊙ mask."""
    m = mask.to_bool() if isinstance(mask, PackedMask) else mask
    return _linear_fp32(x, weight * m.to(weight.dtype), bias)


def masked_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: PackedMask | torch.Tensor) -> torch.Tensor:
    """dW ``[N, K]`` = (dY ``[M, N]``^T @ X ``[M, K]``) ⊙ mask, accumulated in fp32, in x's dtype."""
    m = mask.to_bool() if isinstance(mask, PackedMask) else mask
    g = grad_out.reshape(-1, grad_out.shape[-1]).float()
    return ((g.t() @ x.reshape(-1, x.shape[-1]).float()) * m).to(x.dtype)


def sparse24_values_grad(grad_out: torch.Tensor, x: torch.Tensor, w24: Sparse24Weight) -> torch.Tensor:
    """dV ``[N, K/2]``: (dY^T X) gathered at the kept positions of ``w24``, in x's dtype."""
    n, k = w24.shape
    g = grad_out.reshape(-1, n).float()
    dense = g.t() @ x.reshape(-1, k).float()
    # kept positions in row-major order are the values' order (i0 < i1 in every group)
    return dense.masked_select(w24.mask()).reshape(n, k // 2).to(x.dtype)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Scalar fp32 loss between ``pred`` and ``target`` of the same shape ``[..., D]``.

    mse: mean of (pred - target)^2; nmse: ||pred - target||^2 / ||target||^2 over the whole
    tensor; cosine: mean over rows (tokens) of 1 - cos(pred_row, target_row).
    """
    if kind not in RECONSTRUCTION_KINDS:
        raise ValueError(f"unknown reconstruction loss kind {kind!r}; expected one of {RECONSTRUCTION_KINDS}")
    p, t = pred.float(), target.float().detach()
    if kind == "mse":
        return ((p - t) ** 2).mean()
    if kind == "nmse":
        return ((p - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
    p2, t2 = p.reshape(-1, p.shape[-1]), t.reshape(-1, t.shape[-1])
    dot = (p2 * t2).sum(-1)
    denom = (p2.norm(dim=-1) * t2.norm(dim=-1)).clamp_min(1e-8)
    return (1 - dot / denom).mean()
