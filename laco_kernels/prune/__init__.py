"""Pruning pipelines: magnitude, Wanda, SparseGPT (block by block on the pruned stream).

    from laco_kernels.prune import prune_model
    report = prune_model(model, "wanda", pattern="2:4", calibration=calibration_windows(tok, 128, 512))

``sparsity`` may also be a dict ``{full module name: sparsity}`` (what the sparsity allocators
produce) to prune each linear at its own rate.
"""
from .masks import nm_mask, parse_pattern, unstructured_mask
from .sequential import METHODS, prunable_linears, prune_model

__all__ = ["METHODS", "nm_mask", "parse_pattern", "prunable_linears", "prune_model", "unstructured_mask"]
