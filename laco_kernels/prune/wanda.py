"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

Score of weight ``W_ij``: ``|W_ij| * ||X_j||_2`` where ``||X_j||_2 = sqrt(sum_n x_nj^2)`` is the norm
of input channel j over every calibration token. Weights are compared within each output row
(per-output comparison groups, as in the paper) or within each group of M columns for N:M.
No weight update.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .masks import make_mask


class SqNormAccumulator:
    """Running ``sum_n x_n^2`` ``[in]`` (fp32) over the inputs ``x`` ``[..., in]`` a linear sees."""

    def __init__(self):
        self.sq_norm: Optional[torch.Tensor] = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = (x * x).sum(0)
        self.sq_norm = s if self.sq_norm is None else self.sq_norm + s
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.sq_norm is None:
            raise RuntimeError("no inputs were recorded for this linear (was the block run?)")
        return self.sq_norm


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_norm)`` broadcast over rows; weight ``[out, in]``, sq_norm ``[in]``; fp32."""
    if sq_norm.dim() != 1 or sq_norm.shape[0] != weight.shape[1]:
        raise ValueError(f"sq_norm must have shape ({weight.shape[1]},) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(sq_norm.shape)}")
    return weight.detach().float().abs() * sq_norm.to(weight.device).float().sqrt().unsqueeze(0)


@torch.no_grad()
def wanda_prune_(linear: nn.Linear, sq_norm: torch.Tensor, sparsity: float,
                 pattern: Optional[str] = None) -> torch.Tensor:
    """Prune ``linear`` in place by the Wanda score; return the keep-mask ``[out, in]`` (bool)."""
    mask = make_mask(wanda_score(linear.weight, sq_norm), sparsity, pattern)
    linear.weight.mul_(mask.to(linear.weight.device, linear.weight.dtype))
    return mask
