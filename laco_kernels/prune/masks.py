"""Pure mask helpers: from a score matrix to a keep-mask, and validation of sparsity / N:M patterns.

Conventions used by every pruning method here:

- a score matrix ``[N, K]`` has one row per output feature and one column per input feature
  (the layout of ``nn.Linear.weight``); higher score = more important;
- a mask is a bool tensor of the same shape, ``True`` = keep the weight;
- unstructured masks compare weights within each output row (per-row groups, as Wanda does) and
  prune ``round(K * sparsity)`` weights of every row, so the achieved sparsity is exact up to that
  rounding;
- an ``"N:M"`` pattern keeps ``N`` weights out of every ``M`` consecutive weights along K
  (``"2:4"`` keeps 2 of 4: 50% sparsity); K must be a multiple of M.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> Tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``. ValueError unless the string is ``N:M`` with ``1 <= N < M``."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string like '2:4', got {type(pattern).__name__}")
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(f"pattern {pattern!r} is not of the form 'N:M' (e.g. '2:4', '4:8')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"pattern {pattern!r} is not N:M with N < M (and N >= 1): it must keep at least one "
                         "and prune at least one weight of every M")
    return n, m


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float; ValueError unless ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(sparsity).__name__}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{name} must be in [0, 1) (the fraction of weights removed), got {sparsity}")
    return s


def pattern_sparsity(pattern: str) -> float:
    """Fraction of weights an N:M pattern removes (``"2:4"`` -> 0.5)."""
    n, m = parse_pattern(pattern)
    return 1.0 - n / m


def n_pruned(k: int, sparsity: float) -> int:
    """How many of ``k`` weights a row loses at ``sparsity`` (nearest integer, halves rounded up)."""
    return min(k, int(math.floor(k * sparsity + 0.5)))


def _check_score(score: torch.Tensor) -> None:
    if not isinstance(score, torch.Tensor) or score.dim() != 2:
        raise ValueError(f"score must be a 2-D tensor [out_features, in_features], got "
                         f"{getattr(score, 'shape', type(score).__name__)}")
    if not score.is_floating_point():
        raise TypeError(f"score must be a floating tensor, got {score.dtype}")


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask ``[N, K]`` pruning the ``round(K * sparsity)`` lowest-scoring weights of every row."""
    _check_score(score)
    s = check_sparsity(sparsity)
    k = n_pruned(score.shape[1], s)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        # topk on the negated score picks the k smallest; ties broken deterministically by topk
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask ``[N, K]`` keeping the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    _check_score(score)
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern {n}:{m} is not N:M with N < M")
    rows, k = score.shape
    if k % m:
        raise ValueError(f"in_features={k} is not a multiple of M={m}: an {n}:{m} pattern needs whole groups")
    groups = score.reshape(rows, k // m, m)
    idx = torch.topk(groups, n, dim=2, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, k)


def make_mask(score: torch.Tensor, sparsity: float, pattern: Optional[str] = None) -> torch.Tensor:
    """Unstructured per-row mask at ``sparsity`` (pattern None) or an N:M mask (sparsity ignored)."""
    if pattern is None:
        return unstructured_mask(score, sparsity)
    n, m = parse_pattern(pattern)
    return nm_mask(score, n, m)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive columns of every row keeps at most ``n`` weights."""
    rows, k = mask.shape
    if k % m:
        return False
    return bool((mask.reshape(rows, k // m, m).sum(-1) <= n).all())


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of zeros (of a weight) or of ``False`` entries (of a keep-mask)."""
    if tensor.dtype == torch.bool:
        return 1.0 - tensor.float().mean().item()
    return (tensor == 0).float().mean().item()
