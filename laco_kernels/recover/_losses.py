"""Reconstruction losses of layer-wise recovery, built on the fused ``reconstruction_loss`` op.

A loss spec is a ``+``-separated sum of optionally weighted kinds, e.g. ``"mse"``,
``"token-nmse+0.5*cosine"``. Kinds: ``mse``, ``nmse``, ``cosine`` (the op's kinds) and
``token-nmse``: the mean over tokens of ``||p - t||^2 / ||t||^2``, i.e. every token weighs the
same whatever its norm (a few massive-activation tokens dominate a plain MSE in some blocks).
It is the op's ``mse`` of ``p / rms(t)`` and ``t / rms(t)`` (rms per token, no gradient through
it), so it runs on the same fused kernel.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

KINDS = ("mse", "nmse", "cosine", "token-nmse")


def parse_loss(spec: str) -> List[Tuple[float, str]]:
    """``"token-nmse+0.5*cosine"`` -> ``[(1.0, "token-nmse"), (0.5, "cosine")]``; ValueError if unknown."""
    terms = []
    for part in str(spec).split("+"):
        part = part.strip()
        w, _, kind = part.rpartition("*")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"bad weight {w!r} in loss spec {spec!r}") from None
        if not (math.isfinite(weight) and weight > 0):  # a NaN / inf / negative weight ruins a block
            raise ValueError(f"bad weight {w!r} in loss spec {spec!r}: term weights must be finite and > 0")
        if kind not in KINDS:
            raise ValueError(f"unknown loss kind {kind!r} in {spec!r}; expected terms of {KINDS}")
        terms.append((weight, kind))
    return terms


def block_loss(pred: torch.Tensor, target: torch.Tensor, terms: List[Tuple[float, str]]) -> torch.Tensor:
    """Scalar fp32 loss of ``pred`` ``[b, T, D]`` against ``target`` (same shape, no gradient)."""
    from ..ops.loss import reconstruction_loss

    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.detach()
    total = None
    for weight, kind in terms:
        if kind == "token-nmse":
            inv = torch.rsqrt(target.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12))
            val = reconstruction_loss(pred * inv.to(pred.dtype), (target * inv.to(target.dtype)), "mse")
        else:
            val = reconstruction_loss(pred, target, kind)
        total = weight * val if total is None else total + weight * val
    return total


def _kl_rows(vocab: int) -> int:
    """Rows per chunk: about 1 M logits (4 MB in fp32), so that a chunk's temporaries stay in cache
    instead of streaming [n, V] fp32 tensors through memory several times."""
    return max(1, (1 << 20) // max(vocab, 1))


class _DistillKL(torch.autograd.Function):
    """Mean over rows of ``T^2 KL(softmax(t / T) || softmax(s / T))``, computed chunk by chunk.

    The same value as ``(p_t * (log p_t - log_softmax(s / T))).sum(-1).mean() * T^2`` with
    ``p_t = softmax(t / T)``, and its gradient ``T / n * (softmax(s / T) - p_t)``, but each chunk of
    rows is read once per pass: no [n, V] fp32 temporaries besides the gradient. Saves only the two
    logit tensors the caller holds anyway and two floats per row.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        n, v = s.shape
        rows = _kl_rows(v)
        acc = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)  # fp32, or fp64 for fp64
        lse_s = torch.empty(n, dtype=acc, device=s.device)
        lse_t = torch.empty(n, dtype=acc, device=s.device)
        total = torch.zeros((), dtype=acc, device=s.device)
        for i in range(0, n, rows):
            ss = s[i:i + rows].to(acc) / temperature
            ts = t[i:i + rows].to(acc) / temperature
            lse_s[i:i + rows] = torch.logsumexp(ss, -1)
            lt = torch.logsumexp(ts, -1)
            lse_t[i:i + rows] = lt
            p = torch.exp(ts - lt[:, None])
            # sum_v p (log p_t - log p_s) = sum_v p (ts - ss) - lse_t + lse_s
            total += ((p * (ts - ss)).sum(-1) - lt + lse_s[i:i + rows]).sum()
        ctx.save_for_backward(s, t, lse_s, lse_t)
        ctx.temperature = temperature
        return total * (temperature * temperature / n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, t, lse_s, lse_t = ctx.saved_tensors
        T = ctx.temperature
        n, v = s.shape
        rows = _kl_rows(v)
        out = torch.empty_like(s)
        acc = lse_s.dtype
        scale = grad.to(acc) * (T / n)
        for i in range(0, n, rows):
            q = torch.exp(s[i:i + rows].to(acc) / T - lse_s[i:i + rows, None])
            p = torch.exp(t[i:i + rows].to(acc) / T - lse_t[i:i + rows, None])
            out[i:i + rows] = ((q - p) * scale).to(s.dtype)
        return out, None, None


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Knowledge-distillation loss: the mean over tokens of ``T^2 KL(p_teacher || p_student)``.

    student_logits, teacher_logits: ``[..., V]`` of the same shape, any float dtype (the loss
    computes in fp32, fp64 for fp64 logits); the teacher gets no gradient. Returns a scalar tensor
    of that precision. Equal to
    :func:`distill_kl_reference` (see ``tests/test_recover_losses.py``) but chunked over tokens.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"logits need a vocabulary dimension, got shape {tuple(student_logits.shape)}")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    t = teacher_logits.detach().reshape(-1, v)
    if s.shape[0] == 0:
        raise ValueError("distill_kl got no tokens (empty logits)")
    return _DistillKL.apply(s, t, float(temperature))


def distill_kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`distill_kl` (the stage-2 loss before it was fused)."""
    T = temperature
    acc = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    t_logp = torch.log_softmax(teacher_logits.detach().to(acc) / T, -1)
    s_logp = torch.log_softmax(student_logits.to(acc) / T, -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * T * T
