"""``laco prune`` options for where to prune: sparsity allocation (LSA, OWL), block removal
(Prune&Comp) and layer collapse (LaCo). Kept here so the CLI needs a two-line edit:

    add_where_arguments(prune_parser)                       # when building the parser
    sparsity, where = apply_where(args, model, calibration)  # before prune_model(...); skip
                                                            # prune_model when sparsity is None
"""
from __future__ import annotations

import argparse
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .layer_removal import METRICS

ALLOCATIONS = ("uniform", "owl", "lsa-layer", "lsa-block", "lsa-projection")


def add_where_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("where to prune (allocation, block removal, layer collapse)")
    g.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="per-layer sparsity: uniform, OWL, or LSA at layer / block / projection granularity")
    g.add_argument("--lsa-alpha", type=float, default=None,
                   help="LSA half range (default: published 0.04 at 50%%, 0.15 at 70%%)")
    g.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    g.add_argument("--owl-lambda", type=float, default=0.08, help="OWL half range lambda")
    g.add_argument("--remove-layers", type=int, default=0, metavar="N",
                   help="Prune&Comp: remove N decoder blocks instead of pruning weights")
    g.add_argument("--removal-metric", choices=METRICS, default="bi")
    g.add_argument("--one-shot", action="store_true", help="rank the blocks once (default: iterative)")
    g.add_argument("--no-compensation", action="store_true", help="skip Prune&Comp magnitude compensation")
    g.add_argument("--collapse-layers", type=int, default=0, metavar="N",
                   help="LaCo: collapse until N blocks are gone instead of pruning weights")
    g.add_argument("--laco-variant", choices=("formula", "published-code"), default="formula")
    g.add_argument("--laco-c", type=int, default=4, help="LaCo C: blocks per merge")
    g.add_argument("--laco-i", type=int, default=2, help="LaCo I: minimum interval between merges")
    g.add_argument("--laco-t", type=float, default=0.65, help="LaCo T: similarity threshold")
    g.add_argument("--laco-l", type=int, default=1, help="LaCo L: lowest block that may merge")


def apply_where(args: argparse.Namespace, model: nn.Module, calibration: Optional[torch.Tensor], *,
                batch_size: int = 8, device: str = "cpu",
                progress: bool = True) -> Tuple[Optional[Union[float, dict]], dict]:
    """Carry out the options on ``model``. Returns ``(sparsity for prune_model, report)``:
    sparsity is None when blocks were removed or collapsed (no weight pruning follows)."""
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    if args.remove_layers and args.collapse_layers:
        raise ValueError("--remove-layers and --collapse-layers exclude each other")
    if args.remove_layers:
        from .layer_removal import remove_layers
        return None, remove_layers(model, args.remove_layers, calibration, metric=args.removal_metric,
                                   iterative=not args.one_shot, compensate=not args.no_compensation, **kw)
    if args.collapse_layers:
        from .collapse import collapse_layers
        rep = collapse_layers(model, calibration, C=args.laco_c, I=args.laco_i, T=args.laco_t, L=args.laco_l,
                              target_removed=args.collapse_layers, variant=args.laco_variant, **kw)
        return None, rep
    sparsity = float(args.sparsity)
    if args.allocation == "uniform":
        return sparsity, {"allocation": "uniform"}
    if calibration is None:
        raise ValueError(f"--allocation {args.allocation} needs calibration data")
    if args.allocation == "owl":
        from .owl import owl_allocation
        alloc = owl_allocation(model, sparsity, calibration, M=args.owl_m, lam=args.owl_lambda, **kw)
    else:
        from .lsa import lsa_allocation
        alloc = lsa_allocation(model, sparsity, calibration, granularity=args.allocation.split("-", 1)[1],
                               alpha=args.lsa_alpha, **kw)
    return alloc, {"allocation": args.allocation, "range": [min(alloc.values()), max(alloc.values())]}
