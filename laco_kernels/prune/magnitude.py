"""Magnitude pruning: score ``|W|``, no calibration data.

The comparison group is the output row for unstructured sparsity (the same groups as Wanda,
so the two differ only by the score) and each group of M columns of a row for N:M.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .masks import make_mask


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in fp32, ``[out, in]``."""
    return weight.detach().float().abs()


@torch.no_grad()
def magnitude_prune_(linear: nn.Linear, sparsity: float, pattern: Optional[str] = None) -> torch.Tensor:
    """Zero the lowest-magnitude weights of ``linear`` in place; return the keep-mask ``[out, in]`` (bool)."""
    mask = make_mask(magnitude_score(linear.weight), sparsity, pattern)
    linear.weight.mul_(mask.to(linear.weight.device, linear.weight.dtype))
    return mask
