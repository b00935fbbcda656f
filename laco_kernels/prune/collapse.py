"""LaCo layer collapse (Yang et al., arXiv 2402.11187): merge runs of adjacent blocks into one.

RDSC merge (reserving-differences-while-seeking-common): block l absorbs the m blocks after it,
``theta*_l = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l)`` for every linear the adapter names
(q, k, v, o, gate, up, down: weights and biases); norms stay block l's. The m absorbed blocks go.

``variant="published-code"``: the authors' code applies the same update in place, so each
difference is taken against the already updated weights and the result is ``theta_{l+m}``
(plain dropping of blocks l..l+m-1 with block l's norms kept). Offered for comparison; the
formula is the default.

Search (Algorithm 1): ``l = H - C``; while ``l >= L``: merge block l with the C-1 blocks after it
in the current model; if the cosine similarity of the final hidden states (after the last norm,
mean over the tokens of the calibration sentences) between the candidate and the original model
exceeds T, accept it and step down by I (clamped so that l + C stays inside the model), else step
down by 1. ``target_removed`` stops once that many blocks are gone (the last merge absorbs fewer
blocks if needed).
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.adapters import ModelAdapter, get_adapter, get_module
from ..models.capture import BlockRunner
from ._allocation import check_calibration
from .permute import check_not_permuted
from .layer_removal import remove_blocks

VARIANTS = ("formula", "published-code")


@torch.no_grad()
def rdsc_merge(base: nn.Module, following: List[nn.Module], adapter: ModelAdapter,
               variant: str = "formula") -> nn.Module:
    """A new block: ``base`` with its mergeable linears replaced by the RDSC merge with ``following``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    merged = copy.deepcopy(base)
    for name in adapter.mergeable_names():
        target = get_module(merged, name)
        for attr in ("weight", "bias"):
            p = getattr(target, attr, None)
            if p is None:
                continue
            others = [getattr(get_module(b, name), attr) for b in following]
            if any(o is None or o.shape != p.shape for o in others):
                raise ValueError(f"cannot merge {name}.{attr}: shapes differ or a block lacks it")
            if variant == "formula":
                theta_l = p.detach().clone()
                p.add_(sum(o.to(p.dtype) - theta_l for o in others))
            else:  # the published in-place recurrence: ends at theta_{l+m}
                for o in others:
                    p.add_(o.to(p.dtype) - p)
    return merged


def _final_states(runner: BlockRunner, blocks, final_norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        h = runner.forward_block(b, h)
    return final_norm(h.to(next(final_norm.parameters()).dtype)).float()


@torch.no_grad()
def collapse_layers(model: nn.Module, calibration: torch.Tensor, *, C: int = 4, I: int = 2, T: float = 0.65,
                    L: int = 1, H: Optional[int] = None, target_removed: Optional[int] = None,
                    variant: str = "formula", on_merge: Optional[Callable[[nn.Module, dict], None]] = None,
                    batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Collapse blocks of ``model`` in place by LaCo's search; returns a report.

    calibration: int64 token ids ``[sentences, seqlen]`` (a few sentences suffice). C: blocks per
    merge (the base + C-1 absorbed); I: minimum step after an accepted merge; T: similarity
    threshold; [L, H): blocks that may take part (H defaults to the block count). on_merge(model,
    report) is called after every accepted merge (e.g. to evaluate the intermediate models).
    Report: ``merges`` (original indices per accepted merge, base first), ``trials``
    (``(original base index, similarity, accepted)``), ``removed``, ``num_layers``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_not_permuted(model, ["mlp", "value"], "layer collapse (weights of adjacent blocks)")
    adapter = get_adapter(model)
    blocks = get_module(model, adapter.blocks)
    n = len(blocks)
    H = n if H is None else H
    if C < 2 or I < 1 or not 0 <= L < H <= n or H - L < C:
        raise ValueError(f"need C >= 2, I >= 1, 0 <= L < H <= {n} and H - L >= C; got C={C} I={I} L={L} H={H}")
    if target_removed is not None and not 0 < target_removed < n:
        raise ValueError(f"target_removed must be in [1, {n - 1}], got {target_removed}")
    calibration = check_calibration(calibration, model)
    runner = BlockRunner(model, device=device, batch_size=batch_size, stream_dtype=torch.float32, progress=False)
    final_norm = get_module(model, adapter.final_norm).to(runner.device)

    # inputs of every original block on the calibration sentences, and the original final states
    inputs = [runner.capture(calibration)]
    for b in blocks:
        inputs.append(runner.run_block(b, inputs[-1]))
    reference = final_norm(inputs[-1].data.to(runner.device)).float()

    alive = list(range(n))  # original index of each current block
    report = {"variant": variant, "C": C, "I": I, "T": T, "L": L, "H": H, "merges": [], "trials": []}
    removed = 0
    l = H - C
    while l >= L and (target_removed is None or removed < target_removed):
        cur = get_module(model, adapter.blocks)
        m = C - 1 if target_removed is None else min(C - 1, target_removed - removed)
        merged = rdsc_merge(cur[l], [cur[l + k] for k in range(1, m + 1)], adapter, variant)
        rest = [merged] + [cur[j] for j in range(l + m + 1, len(cur))]
        home = next(merged.parameters()).device
        for b in rest:
            b.to(runner.device)
        sims = []
        for idx, h in runner.iter_batches(inputs[alive[l]]):  # blocks below l are still the original ones
            out = _final_states(runner, rest, final_norm, h)
            sims.append(F.cosine_similarity(out, reference[idx], dim=-1).flatten())
        for b in rest:
            b.to(home)
        sim = float(torch.cat(sims).mean())
        accepted = sim > T
        report["trials"].append((alive[l], sim, accepted))
        if accepted:
            report["merges"].append(alive[l:l + m + 1])
            cur[l] = merged
            remove_blocks(model, list(range(l + 1, l + m + 1)))
            del alive[l + 1:l + m + 1]
            removed += m
            if on_merge is not None:
                on_merge(model, dict(report, removed=removed, num_layers=len(alive)))
            l -= I
            if l + C > len(alive):
                l = len(alive) - C
        else:
            l -= 1
    for s in inputs:
        s.delete()
    report["removed"] = removed
    report["num_layers"] = len(alive)
    report["reached_target"] = target_removed is None or removed == target_removed
    return report
