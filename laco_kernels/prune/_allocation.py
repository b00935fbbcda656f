"""Shared plumbing of the sparsity allocators (LSA, OWL): block-by-block input statistics and
the min-max spread of per-unit importances into per-module sparsities.

Allocators return ``{full module name: sparsity}`` (e.g. ``"model.layers.3.mlp.up_proj"``),
the dict form :func:`laco_kernels.prune.prune_model` accepts.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .._validation import check_token_ids
from ..models.adapters import block_linears, get_adapter
from ..models.capture import BlockRunner

# a block's statistics callback: (block index, {block-relative name: linear}, {name: statistic}) -> None
BlockCallback = Callable[[int, Dict[str, nn.Linear], Dict[str, torch.Tensor]], None]


def check_calibration(input_ids: torch.Tensor, model: Optional[nn.Module] = None) -> torch.Tensor:
    """Token ids ``[samples, seqlen]`` as int64, checked against ``model`` (``_validation.check_token_ids``)."""
    return check_token_ids(input_ids, model, "calibration")


@torch.no_grad()
def dense_input_statistics(model: nn.Module, input_ids: torch.Tensor, kind: str, callback: BlockCallback, *,
                           batch_size: int = 8, device: str | torch.device = "cpu",
                           progress: bool = True) -> None:
    """Run calibration data through the dense model block by block; per block, accumulate a
    statistic of every linear's input and hand it to ``callback`` before moving on.

    kind="hessian": ``H = (2/n) X^T X`` ``[in, in]`` fp32 (n = tokens seen);
    kind="sq_norm": ``sum_n x_n^2`` ``[in]`` fp32 (Wanda's squared column norms). Statistics are on
    the compute device.
    Only one block's statistics live at a time. The model is not modified.
    """
    if kind not in ("hessian", "sq_norm"):
        raise ValueError(f"kind must be 'hessian' or 'sq_norm', got {kind!r}")
    input_ids = check_calibration(input_ids, model)
    runner = BlockRunner(model, device=device, batch_size=batch_size, stream_dtype=torch.float32,
                         progress=False)
    adapter = runner.adapter
    stream = runner.capture(input_ids)
    blocks = runner.blocks
    it = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"input statistics ({kind})")
    for i in it:
        linears = block_linears(blocks[i], adapter)
        stats: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}

        def make_hook(name):
            def hook(_mod, args, _out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if kind == "hessian":
                    upd = x.t() @ x
                else:
                    upd = (x * x).sum(0)
                stats[name] = stats[name] + upd if name in stats else upd
                counts[name] = counts.get(name, 0) + x.shape[0]
            return hook

        handles = [lin.register_forward_hook(make_hook(n)) for n, lin in linears.items()]
        try:
            runner.run_block(blocks[i], stream, stream, desc=f"block {i}")
        finally:
            for h in handles:
                h.remove()
        if kind == "hessian":  # left on the compute device: the OBS error is computed there
            stats = {n: s.mul_(2.0 / counts[n]) for n, s in stats.items()}
        callback(i, linears, stats)
    stream.delete()


def spread(importance: Sequence[float], target: float, half_range: float,
           weights: Optional[Sequence[float]] = None, higher_is_denser: bool = True) -> List[float]:
    """Per-unit sparsities around ``target``: min-max scale the scores into ``[0, 2*half_range]``,
    subtract them from the target (``higher_is_denser``: a higher score -> denser) or add them
    (a higher score -> sparser), and shift so that the
    ``weights``-weighted mean (parameter counts: the model's overall sparsity) equals ``target``.

    Raises ValueError when a sparsity would leave ``[0, 1)``.
    """
    imp = torch.tensor(list(importance), dtype=torch.float64)
    if imp.numel() == 0:
        raise ValueError("no units to allocate sparsity to")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {target}")
    if half_range < 0:
        raise ValueError(f"half_range (alpha / lambda) must be >= 0, got {half_range}")
    w = torch.ones_like(imp) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    if w.shape != imp.shape or bool((w <= 0).any()):
        raise ValueError("weights must be positive, one per unit")
    span = imp.max() - imp.min()
    scaled = (imp - imp.min()) / span * (2 * half_range) if span > 0 else torch.zeros_like(imp)
    sign = -1.0 if higher_is_denser else 1.0
    sparsity = target + sign * (scaled - (scaled * w).sum() / w.sum())
    if bool((sparsity < 0).any()) or bool((sparsity >= 1).any()):
        raise ValueError(f"allocation leaves [0, 1): min {sparsity.min():.3f}, max {sparsity.max():.3f} "
                         f"(target {target}, half range {half_range}); use a smaller alpha / lambda")
    return sparsity.tolist()


def module_name(model: nn.Module, block: int, name: str) -> str:
    """Full module name of a block-relative linear name."""
    return f"{get_adapter(model).blocks}.{block}.{name}"
