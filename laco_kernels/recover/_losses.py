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
