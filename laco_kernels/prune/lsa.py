"""LSA: layer-wise sparsity allocation from second-order reconstruction errors (ICLR 2026).

For every linear of the decoder blocks, with ``H = (2/n) X^T X`` from calibration inputs of the
dense model, LSA measures the minimal linear reconstruction error of removing 50% of its
weights: greedily, per row, over input-column blocks of 128 (the 50% of a block's columns with
the smallest ``w^2 / [H^-1]_jj^2`` in each row), with the optimal second-order update of the
remaining weights (and hence of their scores) after every column. A unit's error E_u is the
mean of its projections' errors; importance ``I_u = 1 - E_u / sum(E)``; sparsities are spread
around the target by min-max scaling I into ``[0, 2*alpha]`` (more important -> denser, as in
OWL): the unit with the smallest error is the densest, the largest error the sparsest, 2*alpha
apart. On SmolLM2 the errors grow with depth (the residual stream grows), so early blocks stay
denser. The opposite sign (larger error -> denser) is ``reverse=True``, kept as an ablation.

Granularity: ``"layer"`` (one unit per decoder block), ``"block"`` (attention and MLP of each
decoder block), ``"projection"`` (every linear). The overall (parameter-weighted) sparsity
equals the target; for ``"layer"`` this is the plain mean of the per-layer sparsities.

    errors = lsa_errors(model, calibration)                       # {full name: error}
    sparsity = lsa_allocation(model, 0.7, errors=errors, granularity="block")
    prune_model(model, "wanda", sparsity, calibration=calibration)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.adapters import get_adapter, get_module
from ._allocation import dense_input_statistics, module_name, spread

GRANULARITIES = ("layer", "block", "projection")
# alpha (half range of the spread) per target sparsity, as published
DEFAULT_ALPHA = {0.5: 0.04, 0.7: 0.15}


def reconstruction_error(weight: torch.Tensor, hessian: torch.Tensor, ratio: float = 0.5,
                         blocksize: int = 128, percdamp: float = 0.01) -> float:
    """Second-order error of pruning ``ratio`` of every row of ``weight`` greedily.

    weight: ``[out, in]``; hessian: ``[in, in]`` = (2/n) X^T X. Returns
    ``sum 1/2 * w_q^2 / [H^-1]_qq`` over the pruned weights q (each measured after the updates
    of the earlier columns), i.e. the increase of ``||W X - W' X||^2 / n`` the OBS updates reach.
    """
    return _obs_prune(weight, hessian, ratio, blocksize, percdamp)[0]


def _obs_prune(weight, hessian, ratio, blocksize, percdamp):
    """(error, pruned and updated weight fp32, damped hessian fp32) of :func:`reconstruction_error`."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight [out, in] and hessian [in, in] expected, got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    H = hessian.detach().to(torch.float32).clone()  # computed on the hessian's device
    W = weight.detach().to(H.device, torch.float32).clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    total = torch.zeros((), dtype=torch.float64, device=H.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        n = i2 - i1
        W1 = W[:, i1:i2].clone()
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diag(h1)
        k = int(n * ratio)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if k > 0:  # per row, the k columns of this block with the smallest OBS score
            idx = torch.topk(W1 ** 2 / d.unsqueeze(0) ** 2, k, dim=1, largest=False).indices
            prune.scatter_(1, idx, True)
        err1 = torch.zeros_like(W1)
        for i in range(n):
            w = W1[:, i]
            e = torch.where(prune[:, i], w, torch.zeros_like(w)) / d[i]
            total += 0.5 * (e * e).sum().double()
            W1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            W1[:, i].masked_fill_(prune[:, i], 0.0)  # exactly zero, not w - (w/d)*d
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return float(total), W, H


def lsa_errors(model: nn.Module, calibration: torch.Tensor, *, ratio: float = 0.5, blocksize: int = 128,
               batch_size: int = 8, device: str | torch.device = "cpu",
               progress: bool = True) -> Dict[str, float]:
    """``{full module name: reconstruction error of pruning ratio of it}`` for every decoder linear.

    calibration: int64 token ids ``[samples, seqlen]``. The model is not modified.
    """
    adapter = get_adapter(model)
    errors: Dict[str, float] = {}

    def on_block(i, linears, hessians):
        for name, lin in linears.items():
            errors[module_name(model, i, name)] = reconstruction_error(
                lin.weight, hessians[name], ratio=ratio, blocksize=blocksize)

    dense_input_statistics(model, calibration, "hessian", on_block, batch_size=batch_size, device=device,
                           progress=progress)
    # keep execution order (blocks, then the adapter's linear order)
    order = [module_name(model, i, n) for i in range(len(get_module(model, adapter.blocks)))
             for n in adapter.linear_names()]
    return {k: errors[k] for k in order}


def _units(model: nn.Module, granularity: str) -> List[Tuple[str, List[str]]]:
    """``[(unit label, [full module names])]`` for a granularity."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    adapter = get_adapter(model)
    n_blocks = len(get_module(model, adapter.blocks))
    units: List[Tuple[str, List[str]]] = []
    for i in range(n_blocks):
        if granularity == "layer":
            units.append((str(i), [module_name(model, i, n) for n in adapter.linear_names()]))
        elif granularity == "block":
            units.append((f"{i}.attn", [module_name(model, i, n) for n in adapter.attention_linears()]))
            units.append((f"{i}.mlp", [module_name(model, i, n) for n in adapter.mlp_linears()]))
        else:
            units += [(module_name(model, i, n), [module_name(model, i, n)]) for n in adapter.linear_names()]
    return units


def resolve_alpha(sparsity: float, alpha: Optional[float]) -> float:
    if alpha is not None:
        return float(alpha)
    for t, a in DEFAULT_ALPHA.items():
        if abs(sparsity - t) < 1e-9:
            return a
    raise ValueError(f"no published alpha for target sparsity {sparsity}; pass alpha= "
                     f"(published: {DEFAULT_ALPHA})")


def lsa_allocation(model: nn.Module, sparsity: float, calibration: Optional[torch.Tensor] = None, *,
                   granularity: str = "layer", alpha: Optional[float] = None,
                   errors: Optional[Dict[str, float]] = None, reverse: bool = False, batch_size: int = 8,
                   device: str | torch.device = "cpu", progress: bool = True) -> Dict[str, float]:
    """``{full module name: sparsity}`` for every decoder linear, by LSA.

    sparsity: target overall sparsity in (0, 1); alpha: half range of the spread (default: the
    published 0.04 at 50%, 0.15 at 70%); errors: precomputed :func:`lsa_errors` (else computed
    from ``calibration``, int64 ``[samples, seqlen]``); reverse: larger error -> denser (ablation).
    """
    units = _units(model, granularity)
    a = resolve_alpha(sparsity, alpha)
    if errors is None:
        if calibration is None:
            raise ValueError("lsa_allocation needs calibration token ids or precomputed errors")
        errors = lsa_errors(model, calibration, batch_size=batch_size, device=device, progress=progress)
    missing = [n for _, names in units for n in names if n not in errors]
    if missing:
        raise ValueError(f"errors lack {len(missing)} modules, e.g. {missing[:3]}")
    e = torch.tensor([sum(errors[n] for n in names) / len(names) for _, names in units], dtype=torch.float64)
    if not bool(torch.isfinite(e).all()) or float(e.sum()) <= 0:
        raise ValueError("reconstruction errors must be finite with a positive sum")
    importance = (1.0 - e / e.sum()).tolist()
    sizes = [sum(get_module(model, n).weight.numel() for n in names) for _, names in units]
    per_unit = spread(importance, sparsity, a, weights=sizes, higher_is_denser=not reverse)
    return {n: s for (_, names), s in zip(units, per_unit) for n in names}
