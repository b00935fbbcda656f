"""Checks shared by every pipeline, run before the first weight changes.

- :func:`check_token_ids`: calibration / evaluation token ids against the model they feed
  (integer dtype, 2-D, non-empty, ``0 <= id < vocab_size``, length within the model's positions).
- :func:`model_limits`: ``(vocab_size, max_positions)`` of a model or config.
- :func:`describe_module` / :func:`describe_folder` and :func:`check_models_match`: family, block
  count and every block's linear shapes of two models that a pipeline pairs (dense and pruned),
  from modules or from safetensors headers (no weight is read), naming the first difference.

Every error names the argument and the problem; none of these functions changes anything.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)

# (family, [per block {linear name relative to the block: weight shape (out, in)}])
ModelShapes = Tuple[str, List[Dict[str, Tuple[int, ...]]]]


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def model_limits(model_or_config) -> Tuple[Optional[int], Optional[int]]:
    """``(vocab_size, max_positions)`` of a model or config; None where the config does not say.

    Positions: ``max_position_embeddings`` (Llama, Qwen2, Mistral, OPT, GPT-NeoX) or
    ``n_positions`` (GPT-2). Rotary models can run past it numerically, but outside the trained
    range, so a longer window is refused rather than silently evaluated.
    """
    cfg = _config_of(model_or_config)
    vocab = getattr(cfg, "vocab_size", None)
    pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return (int(vocab) if vocab else None), (int(pos) if pos else None)


def check_token_ids(ids, model_or_config=None, name: str = "calibration") -> torch.Tensor:
    """Validate token ids ``[samples, seqlen]`` for a model; return them as int64 (same device).

    Raises ValueError (not an integer tensor, not 2-D, empty, an id outside ``[0, vocab_size)``,
    ``seqlen`` beyond the model's positions; ValueError for all, as the pipelines always raised),
    naming ``name`` and, for bad ids, the first offending position.
    """
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor of token ids [samples, seqlen] (see "
                         f"laco_kernels.data.calibration_windows), got {type(ids).__name__}")
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor of token ids [samples, seqlen] (int64), got dtype "
                         f"{str(ids.dtype).replace('torch.', '')}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D token ids [samples, seqlen], got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}); give at least one sample of one token")
    vocab, positions = model_limits(model_or_config) if model_or_config is not None else (None, None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = (ids < 0) if lo < 0 else (ids >= vocab)
        r, c = (int(i) for i in bad.nonzero()[0])
        limit = f"[0, {vocab})" if vocab is not None else "[0, vocab_size)"
        raise ValueError(f"{name} holds token id {int(ids[r, c])} at [{r}, {c}], outside the model's vocabulary "
                         f"{limit}; were the ids made with another model's tokenizer?")
    if positions is not None and ids.shape[1] > positions:
        raise ValueError(f"{name} has sequences of {ids.shape[1]} tokens but the model takes at most "
                         f"{positions} positions (max_position_embeddings); use shorter windows")
    return ids.long()


def check_seqlen(seqlen: int, model_or_config, name: str = "seqlen") -> None:
    """ValueError when ``seqlen`` exceeds the model's positions (before any window is built)."""
    _, positions = model_limits(model_or_config)
    if positions is not None and seqlen > positions:
        raise ValueError(f"{name}={seqlen} exceeds the model's {positions} positions (max_position_embeddings)")


def _family(cfg) -> str:
    from .models.adapters import get_adapter

    return f"{get_adapter(cfg).family} ({getattr(cfg, 'model_type', '?')})"


def describe_module(model: nn.Module) -> ModelShapes:
    """Family and per-block linear weight shapes of a causal LM in memory (packed layers included)."""
    from .models.adapters import get_adapter, get_module

    adapter = get_adapter(model)
    blocks = get_module(model, adapter.blocks)
    shapes = []
    for block in blocks:
        per = {}
        for name in adapter.linear_names():
            mod = get_module(block, name)
            if hasattr(mod, "out_features") and hasattr(mod, "in_features"):
                per[name] = (int(mod.out_features), int(mod.in_features))
            else:
                per[name] = tuple(mod.weight.shape)
        shapes.append(per)
    return _family(model.config), shapes


def describe_folder(folder: str) -> ModelShapes:
    """Like :func:`describe_module` for a Hugging Face folder, from config.json and the safetensors
    headers (shapes of ``<blocks>.<l>.<linear>.weight``); no tensor data is read."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from .models.adapters import get_adapter

    cfg = AutoConfig.from_pretrained(folder)
    adapter = get_adapter(cfg)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    found: Dict[str, Tuple[int, ...]] = {}
    for fname in files:
        try:
            with safe_open(os.path.join(folder, fname), framework="pt") as f:
                for k in f.keys():
                    if k.startswith(adapter.blocks + ".") and k.endswith(".weight"):
                        found[k] = tuple(f.get_slice(k).get_shape())
        except Exception as exc:  # safetensors raises its own error type for a torn header
            raise ValueError(f"{os.path.join(folder, fname)!r} is not a readable safetensors file ({exc})") from None
    shapes = []
    for l in range(int(cfg.num_hidden_layers)):
        shapes.append({name: found.get(f"{adapter.blocks}.{l}.{name}.weight") for name in adapter.linear_names()})
    return _family(cfg), shapes


def check_models_match(a: ModelShapes, b: ModelShapes, names: Tuple[str, str] = ("dense_model", "pruned_model")) -> None:
    """ValueError naming the first difference in family, block count or a block's linear shapes."""
    (fa, sa), (fb, sb) = a, b
    na, nb = names
    if fa != fb:
        raise ValueError(f"the models differ: {na} is {fa} but {nb} is {fb}; they must be the same family")
    if len(sa) != len(sb):
        raise ValueError(f"the models differ: {na} has {len(sa)} blocks but {nb} has {len(sb)}")
    for l, (pa, pb) in enumerate(zip(sa, sb)):
        for name in pa:
            if pa[name] != pb.get(name):
                raise ValueError(f"the models differ: block {l} {name}: {na} has weight shape {pa[name]} but "
                                 f"{nb} has {pb.get(name)}; they must have the same shapes")
