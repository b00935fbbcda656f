"""The pruning driver: magnitude, Wanda or SparseGPT over every linear of a causal LM's decoder blocks.

Block by block, as the published methods do (``sequential=True``): the calibration tokens are
embedded once (:class:`~laco_kernels.models.capture.BlockRunner`), then for block l

1. the dense block l runs on its input stream (the outputs of the *already pruned* blocks
   0..l-1); forward hooks on its linears accumulate the statistics (Wanda: squared input norms,
   SparseGPT: ``H = (2/n) X^T X``), and its outputs are kept as the dense reference;
2. every linear of the block is pruned from those statistics (all from the same inputs, as
   published: SparseGPT and Wanda prune the whole block from the inputs of the unpruned block);
3. the pruned block runs on the same input stream; its outputs are the next block's input and
   their MSE to the dense outputs of step 1 is the block's reconstruction error.

``sequential=False`` gives the "one-shot" variant for comparison: statistics of every block from
the dense model's own stream. Embeddings and the LM head are never touched.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._validation import check_token_ids
from ..formats import check_finite
from ..models.adapters import get_adapter, get_module
from ..models.capture import BlockRunner, HiddenStream
from .magnitude import magnitude_prune_
from .masks import check_sparsity, parse_pattern, sparsity_of
from .permute import PERMUTE_PARTS, permute_block_
from .sparsegpt import HessianAccumulator, SharedInputGram, refit_masked, sparsegpt_prune
from .wanda import SqNormAccumulator, wanda_prune_

METHODS = ("magnitude", "wanda", "sparsegpt")
_NEEDS_CALIBRATION = ("wanda", "sparsegpt")


def prunable_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """``{full module name: linear}`` of every prunable linear of the decoder blocks, in execution order."""
    adapter = get_adapter(model)
    blocks = get_module(model, adapter.blocks)
    return {f"{adapter.blocks}.{i}.{name}": get_module(block, name)
            for i, block in enumerate(blocks) for name in adapter.linear_names()}


def resolve_sparsity(model: nn.Module, sparsity: Union[float, Dict[str, float], None],
                     pattern: Optional[str] = None) -> Dict[str, float]:
    """Target sparsity of every prunable linear (``{full module name: sparsity}``), validated.

    A float applies to every linear; a dict gives per-module sparsities keyed by full module
    name (modules it omits stay dense; unknown names raise). With an N:M pattern the sparsity is
    ``1 - N/M`` for every linear: ``sparsity`` must be None or equal to it, and not a dict.
    """
    names = list(prunable_linears(model))
    if pattern is not None:
        n, m = parse_pattern(pattern)
        s_pat = 1.0 - n / m
        if isinstance(sparsity, dict):
            raise ValueError(f"pattern {pattern!r} fixes every layer's sparsity at {s_pat:g}; per-layer "
                             "sparsities (a dict) need pattern=None (unstructured)")
        if sparsity is not None and abs(check_sparsity(sparsity) - s_pat) > 1e-9:
            raise ValueError(f"pattern {pattern!r} prunes {s_pat:.2%} of the weights but sparsity={sparsity}; "
                             f"pass sparsity={s_pat:g} (or None) with this pattern, or pattern=None")
        return {name: s_pat for name in names}
    if sparsity is None:
        raise ValueError("give a sparsity in [0, 1) or an N:M pattern")
    if isinstance(sparsity, dict):
        unknown = [k for k in sparsity if k not in names]
        if unknown:
            raise ValueError(f"sparsity dict names modules that are not prunable linears of the decoder blocks: "
                             f"{unknown[:5]}; expected full names like {names[0]!r}")
        return {name: check_sparsity(sparsity.get(name, 0.0), f"sparsity[{name!r}]") for name in names}
    s = check_sparsity(sparsity)
    return {name: s for name in names}


def check_prunable(model: nn.Module, targets: Dict[str, float], pattern: Optional[str]) -> None:
    """Everything about the weights that can fail, checked before the first one changes: an N:M
    pattern needs every pruned linear's in_features divisible by M, and weights must be finite
    (a NaN has no magnitude to rank). ValueError naming the first offending layer."""
    m = parse_pattern(pattern)[1] if pattern is not None else None
    for name, linear in prunable_linears(model).items():
        if targets.get(name, 0.0) <= 0:
            continue
        w = linear.weight
        if m is not None and w.shape[1] % m:
            raise ValueError(f"pattern {pattern!r} needs in_features divisible by {m}, but {name} has weight "
                             f"{tuple(w.shape)} (in_features={w.shape[1]}); nothing was pruned. Exclude it "
                             "with a per-layer sparsity dict or prune unstructured")
        check_finite(w, f"{name}.weight")


def _stream_mse(a: HiddenStream, b: HiddenStream, chunk: int = 16) -> float:
    total, count = 0.0, 0
    for start in range(0, len(a), chunk):
        diff = a[start:start + chunk].double() - b[start:start + chunk].double()
        total += float((diff * diff).sum())
        count += diff.numel()
    return total / count


@torch.no_grad()
def _prune_linear(method: str, linear: nn.Linear, sparsity: float, pattern: Optional[str], stats,
                  device: torch.device, blocksize: int, percdamp: float, refit: int = 0) -> Optional[tuple]:
    if method == "magnitude":
        magnitude_prune_(linear, sparsity, pattern)
    elif method == "wanda":
        wanda_prune_(linear, stats.result(), sparsity, pattern)
    else:
        h = stats.result().to(device)
        new, mask, _ = sparsegpt_prune(linear.weight.to(device), h, sparsity, pattern,
                                       blocksize=blocksize, percdamp=percdamp)
        fit = None
        if refit:
            new, before, after = refit_masked(new, linear.weight.to(device), h, mask, refit, percdamp)
            fit = (before, after)
        linear.weight.copy_(new.to(linear.weight.device, linear.weight.dtype))
        return fit
    return None


def prune_model(model: nn.Module, method: str, sparsity: Union[float, Dict[str, float], None] = 0.5,
                pattern: Optional[str] = None, calibration: Optional[torch.Tensor] = None, *,
                batch_size: int = 8, device: Union[str, torch.device] = "cpu", progress: bool = True,
                sequential: bool = True, stream_dtype: torch.dtype = torch.float32,
                offload_dir: Optional[str] = None, blocksize: int = 128, percdamp: float = 0.01,
                permute: Union[bool, int] = False, permute_parts: Sequence[str] = PERMUTE_PARTS,
                refit: int = 0) -> dict:
    """Prune every linear of the decoder blocks of ``model`` in place.

    method: ``"magnitude"`` (no calibration needed), ``"wanda"`` or ``"sparsegpt"``.
    sparsity: fraction of weights removed, in [0, 1): one float for every linear, or a dict
    ``{full module name: sparsity}`` (e.g. ``"model.layers.3.mlp.up_proj"``; names omitted stay
    dense): the per-layer form the sparsity allocators (LSA, OWL) produce.
    pattern: None (unstructured, compared per output row) or ``"N:M"`` (``"2:4"``, ``"4:8"``):
    keep N of every M consecutive input weights; sparsity must then be ``1 - N/M`` or None.
    calibration: int64 token ids ``[S, T]`` (``laco_kernels.data.calibration_windows``); required
    by Wanda and SparseGPT; with magnitude it only serves the reconstruction-error report.
    batch_size: calibration samples per micro-batch; device: where blocks compute (the model
    stays where it is); sequential: statistics from the pruned stream (True, published) or from
    the dense stream (False, one-shot); stream_dtype / offload_dir: how block inputs are stored
    (see BlockRunner); blocksize / percdamp: SparseGPT's column block and dampening.
    permute: with an N:M pattern and calibration, reorder each block's MLP hidden channels and
    value channels first (``prune.permute``: the block computes the same function) so that the
    inputs of ``down`` and ``o`` group well under N:M; True = 16 swap rounds, an int = that many.
    permute_parts: which to reorder, ``"mlp"`` (hidden channels: gate / up rows, down columns) and
    ``"value"`` (v rows, o columns). The model's config records what was reordered
    (``laco_channels_permuted``); RestoreLCC (value) and layer collapse (both) refuse such models.
    refit: SparseGPT only: after each linear is pruned, this many conjugate-gradient steps of the
    exact least-squares refit of its kept weights on the fixed mask (``sparsegpt.refit_masked``;
    SparseGPT never revisits a decided column). 0: plain SparseGPT.

    Returns a report: ``method``, ``pattern``, ``sparsity`` (target: float, or "per-layer"),
    ``layers`` ``{full name: achieved sparsity}``, ``overall_sparsity`` (parameter-weighted),
    ``block_error`` (per block: MSE between the pruned and the dense block's outputs on the same
    input, or None without calibration), ``calibration`` (shape or None), ``seconds``; with refit,
    ``refit`` ``{"steps": refit, "layers": {full name: [objective before, after]}}``.
    """
    t0 = time.perf_counter()
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {list(METHODS)}")
    method = method.lower()
    adapter = get_adapter(model)  # ValueError for a family without an adapter row
    targets = resolve_sparsity(model, sparsity, pattern)
    if calibration is None and method in _NEEDS_CALIBRATION:
        raise ValueError(f"{method} needs calibration token ids [samples, seqlen] "
                         "(laco_kernels.data.calibration_windows)")
    if calibration is not None:
        calibration = check_token_ids(calibration, model, "calibration")
    check_prunable(model, targets, pattern)
    if not isinstance(permute, (bool, int)) or permute < 0:
        raise ValueError(f"permute must be a bool or a number of swap rounds >= 0, got {permute!r}")
    if permute is not False and pattern is None:
        raise ValueError("permute=... reorders channels for an N:M pattern; pass pattern='2:4' (or another N:M)")
    if permute is not False and calibration is None:
        raise ValueError("permute=... needs calibration token ids (it runs inside the block-by-block pass)")
    parts = tuple(permute_parts) if isinstance(permute_parts, (list, tuple, set, frozenset)) else ()
    if not parts or not set(parts) <= set(PERMUTE_PARTS):
        raise ValueError(f"permute_parts must be a non-empty subset of {PERMUTE_PARTS}, got {permute_parts!r}")
    if isinstance(refit, bool) or not isinstance(refit, int) or refit < 0:
        raise ValueError(f"refit must be a number of refit steps >= 0, got {refit!r}")
    if refit and method != "sparsegpt":
        raise ValueError(f"refit={refit} refits on SparseGPT's Hessians; it needs method='sparsegpt', not {method!r}")
    rounds = 16 if permute is True else int(permute) if permute is not False else None
    device = torch.device(device)
    blocks = get_module(model, adapter.blocks)
    prefix = adapter.blocks
    report = {"method": method, "pattern": pattern,
              "sparsity": "per-layer" if isinstance(sparsity, dict) else float(next(iter(targets.values()))),
              "sequential": sequential if calibration is not None else None,
              "calibration": None, "layers": {}, "block_error": None}
    if rounds is not None:
        report["permutation"] = []
    if refit:
        report["refit"] = {"steps": refit, "layers": {}}

    was_training = model.training
    model.eval()
    try:
        if calibration is None:  # magnitude without data: weights only
            for name, linear in prunable_linears(model).items():
                if targets[name] > 0:
                    magnitude_prune_(linear, targets[name], pattern)
        else:
            report["calibration"] = list(calibration.shape)
            report["block_error"] = _prune_blocks(model, blocks, prefix, adapter, method, targets, pattern,
                                                  calibration, batch_size, device, progress, sequential,
                                                  stream_dtype, offload_dir, blocksize, percdamp,
                                                  rounds, report.get("permutation"), parts, refit,
                                                  report["refit"]["layers"] if refit else None)
    finally:
        model.train(was_training)

    linears = prunable_linears(model)
    report["layers"] = {name: sparsity_of(lin.weight) for name, lin in linears.items()}
    total = sum(lin.weight.numel() for lin in linears.values())
    report["overall_sparsity"] = sum(report["layers"][n] * lin.weight.numel() for n, lin in linears.items()) / total
    report["seconds"] = time.perf_counter() - t0
    return report


def _prune_blocks(model, blocks, prefix, adapter, method, targets, pattern, calibration, batch_size, device,
                  progress, sequential, stream_dtype, offload_dir, blocksize, percdamp, rounds=None, perm_log=None,
                  parts=PERMUTE_PARTS, refit=0, refit_log=None):
    runner = BlockRunner(model, device=device, batch_size=batch_size, stream_dtype=stream_dtype,
                         offload_dir=offload_dir, progress=False)
    stream = runner.capture(calibration)
    errors = []
    bar = tqdm(range(len(blocks)), desc=f"{method} {pattern or 'unstructured'}", disable=not progress)
    try:
        for i in bar:
            block = blocks[i]
            todo = {name: get_module(block, name) for name in adapter.linear_names()
                    if targets[f"{prefix}.{i}.{name}"] > 0}
            stats = {}
            handles = []
            shared = SharedInputGram()  # q/k/v (gate/up) read one tensor: its X^T X is computed once
            if method != "magnitude":
                for name, linear in todo.items():
                    stats[name] = acc = SqNormAccumulator() if method == "wanda" else HessianAccumulator(shared)
                    handles.append(linear.register_forward_hook(lambda _m, args, _o, acc=acc: acc.add(args[0])))
            try:  # 1. dense block on this block's input: statistics + dense reference outputs
                dense_out = runner.run_block(block, stream, desc=f"block {i} dense")
            finally:
                for h in handles:
                    h.remove()
                shared.clear()
            if rounds is not None:  # reorder channels (function unchanged): better N:M groups for down / o
                n, m = parse_pattern(pattern)
                costs = permute_block_(block, adapter, model.config, stats, n, m, names=todo, parts=parts,
                                       rounds=rounds, seed=i)
                perm_log.append({k: {"before": b, "after": a} for k, (b, a) in costs.items()})
            for name, linear in todo.items():  # 2. prune every linear from the same inputs
                fit = _prune_linear(method, linear, targets[f"{prefix}.{i}.{name}"], pattern, stats.get(name),
                                    device, blocksize, percdamp, refit)
                if fit is not None:
                    refit_log[f"{prefix}.{i}.{name}"] = list(fit)
            stats.clear()
            if sequential:  # 3. pruned block on the same input: the next block's input
                runner.run_block(block, stream, stream, desc=f"block {i} pruned")
                errors.append(_stream_mse(stream, dense_out))
                dense_out.delete()
            else:
                pruned_out = runner.run_block(block, stream, desc=f"block {i} pruned")
                errors.append(_stream_mse(pruned_out, dense_out))
                pruned_out.delete()
                stream.delete()
                stream = dense_out
            bar.set_postfix(mse=f"{errors[-1]:.3g}")
    finally:
        stream.delete()
    return errors
