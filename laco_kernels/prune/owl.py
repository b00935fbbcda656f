"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2024), the comparator of LSA.

Per decoder block, the Wanda scores ``|W_ij| * ||X_j||_2`` of all its linears (inputs from the
dense model on calibration data) are pooled; the block's outlier ratio D_l is the fraction of
scores above ``M`` times their mean. D is min-max scaled into ``[0, 2*lambda]`` and the block's
density follows it (more outliers -> denser), shifted so the mean sparsity equals the target.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..models.adapters import get_adapter, get_module
from ._allocation import dense_input_statistics, module_name, spread


def outlier_ratios(model: nn.Module, calibration: torch.Tensor, *, M: float = 5.0, batch_size: int = 8,
                   device: str | torch.device = "cpu", progress: bool = True) -> List[float]:
    """Per decoder block, the fraction of its Wanda scores above ``M`` x their mean (in [0, 1])."""
    if M <= 0:
        raise ValueError(f"M must be > 0, got {M}")
    ratios: Dict[int, float] = {}

    def on_block(i, linears, sq_norms):
        scores = [(lin.weight.detach().float().abs() * sq_norms[n].to(lin.weight.device).sqrt().unsqueeze(0)).flatten()
                  for n, lin in linears.items()]
        pooled = torch.cat(scores)
        ratios[i] = float((pooled > M * pooled.mean()).float().mean())

    dense_input_statistics(model, calibration, "sq_norm", on_block, batch_size=batch_size, device=device,
                           progress=progress)
    return [ratios[i] for i in range(len(ratios))]


def owl_allocation(model: nn.Module, sparsity: float, calibration: Optional[torch.Tensor] = None, *,
                   M: float = 5.0, lam: float = 0.08, ratios: Optional[List[float]] = None,
                   batch_size: int = 8, device: str | torch.device = "cpu",
                   progress: bool = True) -> Dict[str, float]:
    """``{full module name: sparsity}``: every linear of block l gets block l's OWL sparsity.

    calibration: int64 token ids ``[samples, seqlen]`` (or precomputed ``ratios`` from
    :func:`outlier_ratios`); M: outlier threshold; lam: half range of the spread.
    """
    adapter = get_adapter(model)
    n_blocks = len(get_module(model, adapter.blocks))
    if ratios is None:
        if calibration is None:
            raise ValueError("owl_allocation needs calibration token ids or precomputed ratios")
        ratios = outlier_ratios(model, calibration, M=M, batch_size=batch_size, device=device,
                                progress=progress)
    if len(ratios) != n_blocks:
        raise ValueError(f"{len(ratios)} outlier ratios for {n_blocks} blocks")
    per_block = spread(ratios, sparsity, lam)  # blocks are equal in size: plain mean == target
    return {module_name(model, i, n): per_block[i] for i in range(n_blocks) for n in adapter.linear_names()}
