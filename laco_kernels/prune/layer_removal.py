"""Prune&Comp (arXiv 2507.18212): remove whole decoder blocks, compensate the magnitude gap.

Removing block l hands block l+1 the hidden state x_l instead of x_{l+1} = block_l(x_l), which is
usually smaller (the residual stream grows with depth). Compensation scales the stream entering
the gap by ``s = mean_d( mean|x_{l+1,d}| / mean|x_{l,d}| )`` (means over calibration tokens, then
over channels d) offline: the embedding (and positional embeddings) and the output projections
(o_proj, down_proj: weights and biases) of every block before l are multiplied by s. Since every
block reads the stream through a scale-invariant norm (RMSNorm, LayerNorm), the earlier blocks
then write s times their output and the stream entering the gap is exactly s * x_l. A tied
lm_head is untied first (it must not be scaled with the embedding).

Importance metrics (higher = more important; the least important block goes):
``"bi"`` block influence, mean over tokens of 1 - cos(x_in, x_out); ``"magnitude"`` sum of |W|
over the block's linears; ``"taylor"`` sum of |W * dL/dW| (LM loss on calibration data);
``"perplexity"`` the calibration LM loss of the model without the block.

    report = remove_layers(model, 4, calibration, metric="bi", iterative=True, compensate=True)
    save_model(model, "out/", tokenizer)        # plain Hugging Face checkpoint, fewer layers
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._atomic import atomic_folder
from ..models.adapters import get_adapter, get_module
from ..models.capture import BlockRunner
from ._allocation import check_calibration

METRICS = ("bi", "magnitude", "taylor", "perplexity")


# -- structural edits -----------------------------------------------------------------------------
def untie_lm_head(model: nn.Module) -> bool:
    """Give the output head its own copy of the weights if it shares them with the embedding.

    Sets ``config.tie_word_embeddings = False`` so a saved checkpoint keeps both matrices.
    Returns True if something was untied.
    """
    adapter = get_adapter(model)
    head = get_module(model, adapter.lm_head)
    embed = get_module(model, adapter.embed)
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys") and tied:
        model._tied_weights_keys = {}  # nothing is tied any more (transformers re-ties on save otherwise)
    return tied


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> None:
    """Delete decoder blocks in place; update the config (``num_hidden_layers`` and per-layer lists
    such as ``layer_types``) and renumber every ``layer_idx`` attribute so KV caching works."""
    adapter = get_adapter(model)
    blocks = get_module(model, adapter.blocks)
    n = len(blocks)
    drop = sorted(set(int(i) for i in indices))
    if any(i < 0 or i >= n for i in drop):
        raise ValueError(f"block indices {drop} out of range for {n} blocks")
    if len(drop) >= n:
        raise ValueError(f"cannot remove all {n} blocks")
    keep = [i for i in range(n) if i not in drop]
    new = nn.ModuleList([blocks[i] for i in keep])
    parent, _, name = adapter.blocks.rpartition(".")
    setattr(get_module(model, parent) if parent else model, name, new)
    _update_config(model.config, keep, n)
    renumber_layers(model)


def _update_config(config, keep: List[int], old_n: int) -> None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key, value in list(vars(cfg).items()):
            # per-layer lists (layer_types, ...) have one entry per block
            if key != "architectures" and isinstance(value, (list, tuple)) and len(value) == old_n and old_n > 1:
                setattr(cfg, key, type(value)(value[i] for i in keep))
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(keep)


def renumber_layers(model: nn.Module) -> None:
    """Set every ``layer_idx`` attribute inside block i to i (the KV cache is indexed by it)."""
    for i, block in enumerate(get_module(model, get_adapter(model).blocks)):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = i


def save_model(model: nn.Module, out_dir: str, tokenizer=None) -> str:
    """Write a plain Hugging Face checkpoint (config.json + safetensors) atomically to ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with atomic_folder(out_dir) as tmp:  # the old folder stays whole until the new one is complete
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


# -- statistics ------------------------------------------------------------------------------------
@torch.no_grad()
def block_statistics(model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8,
                     device: str | torch.device = "cpu", progress: bool = True) -> Dict[str, torch.Tensor]:
    """One pass over the blocks: ``bi`` ``[L]`` (mean over tokens of 1 - cos(x_in, x_out)) and
    ``abs_mean`` ``[L+1, D]`` (per-channel mean |x| of every block's input; row L: the final
    stream before the last norm), fp64 on the CPU."""
    runner = BlockRunner(model, device=device, batch_size=batch_size, stream_dtype=torch.float32,
                         progress=False)
    stream = runner.capture(check_calibration(calibration, model))
    n_blocks = len(runner.blocks)
    s, t, d = stream.shape
    bi = torch.zeros(n_blocks, dtype=torch.float64)
    abs_mean = torch.zeros(n_blocks + 1, d, dtype=torch.float64)
    it = range(n_blocks)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="block statistics")
    for i in it:
        block = runner.blocks[i]
        home = next(block.parameters()).device
        block.to(runner.device)
        try:
            for idx, h in runner.iter_batches(stream):
                out = runner.forward_block(block, h).float()
                h = h.float()
                abs_mean[i] += h.abs().sum((0, 1)).double().cpu()
                bi[i] += (1 - F.cosine_similarity(h, out, dim=-1)).sum().double().cpu()
                stream[idx] = out
        finally:
            block.to(home)
    abs_mean[n_blocks] = stream.data.float().abs().sum((0, 1)).double()
    stream.delete()
    return {"bi": bi / (s * t), "abs_mean": abs_mean / (s * t)}


def _lm_loss(model: nn.Module, calibration: torch.Tensor, batch_size: int) -> float:
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, calibration.shape[0], batch_size):
        ids = calibration[start:start + batch_size].to(dev)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        total += float(out.loss) * ids.shape[0]
        count += ids.shape[0]
    return total / count


def layer_importance(model: nn.Module, calibration: Optional[torch.Tensor], metric: str = "bi", *,
                     batch_size: int = 8, device: str | torch.device = "cpu",
                     progress: bool = True) -> List[float]:
    """Per-block importance (higher = keep) by ``metric`` in :data:`METRICS`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    adapter = get_adapter(model)
    blocks = get_module(model, adapter.blocks)
    if metric == "magnitude":
        return [float(sum(get_module(b, n).weight.detach().abs().sum() for n in adapter.linear_names()))
                for b in blocks]
    calibration = check_calibration(calibration, model)
    if metric == "bi":
        return block_statistics(model, calibration, batch_size=batch_size, device=device,
                                progress=progress)["bi"].tolist()
    if metric == "taylor":
        params = [get_module(b, n).weight for b in blocks for n in adapter.linear_names()]
        saved = [p.requires_grad for p in params]
        model.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                for start in range(0, calibration.shape[0], batch_size):
                    ids = calibration[start:start + batch_size]
                    out = model(input_ids=ids, labels=ids, use_cache=False)
                    (out.loss * ids.shape[0] / calibration.shape[0]).backward()
            scores = [float(sum((get_module(b, n).weight.detach() * get_module(b, n).weight.grad).abs().sum()
                                for n in adapter.linear_names())) for b in blocks]
        finally:
            model.zero_grad(set_to_none=True)
            for p, r in zip(params, saved):
                p.requires_grad_(r)
        return scores
    # perplexity: the calibration loss of the model with block i skipped
    parent, _, name = adapter.blocks.rpartition(".")
    holder = get_module(model, parent) if parent else model
    losses = []
    with torch.no_grad():
        for i in range(len(blocks)):
            setattr(holder, name, nn.ModuleList([b for j, b in enumerate(blocks) if j != i]))
            try:
                losses.append(_lm_loss(model, calibration, batch_size))
            finally:
                setattr(holder, name, blocks)
    return losses


# -- compensation ------------------------------------------------------------------------------------
def compensation_scale(abs_mean: torch.Tensor, index: int) -> float:
    """``s`` for removing block ``index``: channel mean of mean|x_{index+1}| / mean|x_index|."""
    a, b = abs_mean[index], abs_mean[index + 1]
    if bool((a <= 0).any()):
        raise ValueError(f"block {index} has channels whose mean |input| is 0: the scale is undefined")
    return float((b / a).mean())


@torch.no_grad()
def apply_compensation(model: nn.Module, scale: float, upto: int) -> None:
    """Multiply the embedding(s) and blocks ``[0, upto)``'s o_proj / down_proj (weight and bias) by
    ``scale``: the stream entering block ``upto`` becomes ``scale`` times what it was. Unties the head."""
    if not scale > 0:
        raise ValueError(f"compensation scale must be > 0, got {scale}")
    adapter = get_adapter(model)
    untie_lm_head(model)
    for path in (adapter.embed,) + tuple(adapter.extra_embeds):
        get_module(model, path).weight.mul_(scale)
    blocks = get_module(model, adapter.blocks)
    if not 0 <= upto <= len(blocks):
        raise ValueError(f"upto={upto} out of range for {len(blocks)} blocks")
    for b in list(blocks)[:upto]:
        for n in (adapter.o, adapter.down):
            lin = get_module(b, n)
            lin.weight.mul_(scale)
            if getattr(lin, "bias", None) is not None:
                lin.bias.mul_(scale)


def remove_layers(model: nn.Module, n_remove: int, calibration: Optional[torch.Tensor] = None, *,
                  metric: str = "bi", iterative: bool = True, compensate: bool = False,
                  batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Remove ``n_remove`` decoder blocks in place; returns a report.

    iterative=True: ``n_remove`` rounds of (metric on the current, already compensated model ->
    drop the least important block -> compensate). iterative=False: the metric once, the
    ``n_remove`` least important blocks dropped (highest index first, each compensated on the
    current model when ``compensate``). Report: ``removed`` (original indices, in removal order),
    ``scales``, ``importance`` (per round, over the blocks then present), ``num_layers``.
    """
    adapter = get_adapter(model)
    n_blocks = len(get_module(model, adapter.blocks))
    if not 0 < n_remove < n_blocks:
        raise ValueError(f"n_remove must be in [1, {n_blocks - 1}], got {n_remove}")
    if compensate or metric != "magnitude":
        calibration = check_calibration(calibration, model)
    alive = list(range(n_blocks))
    report = {"metric": metric, "iterative": iterative, "compensate": compensate, "removed": [],
              "scales": [], "importance": []}

    def stats_and_importance():
        stats = None
        if metric == "bi" or compensate:
            stats = block_statistics(model, calibration, batch_size=batch_size, device=device, progress=progress)
        imp = stats["bi"].tolist() if metric == "bi" else layer_importance(
            model, calibration, metric, batch_size=batch_size, device=device, progress=progress)
        return stats, imp

    def drop(pos: int, stats) -> None:
        scale = None
        if compensate:
            scale = compensation_scale(stats["abs_mean"], pos)
            apply_compensation(model, scale, pos)
        remove_blocks(model, [pos])
        report["removed"].append(alive.pop(pos))
        report["scales"].append(scale)

    if iterative:
        for _ in range(n_remove):
            stats, imp = stats_and_importance()
            report["importance"].append(imp)
            drop(int(torch.tensor(imp).argmin()), stats)
    else:
        stats, imp = stats_and_importance()
        report["importance"].append(imp)
        chosen = sorted(torch.tensor(imp).argsort()[:n_remove].tolist(), reverse=True)
        for k, pos in enumerate(chosen):  # descending: earlier positions stay valid
            if compensate and k > 0:
                stats = block_statistics(model, calibration, batch_size=batch_size, device=device,
                                         progress=progress)
            drop(pos, stats)
    report["num_layers"] = len(get_module(model, adapter.blocks))
    return report
