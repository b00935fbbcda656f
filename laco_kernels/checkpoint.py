"""Sparse checkpoints: a ``save_pretrained``-style folder with packed weights, and compressed-tensors export.

``save_sparse(model, folder, tokenizer)`` writes

    config.json            the Hugging Face config (the model is rebuilt from it, no hub access)
    model.safetensors      every tensor: packed modules as ``<name>.values`` / ``.meta`` (2:4) or
                           ``.values`` / ``.bitmap`` / ``.offsets`` (bitmap) or ``.weight`` / ``.mask``
                           (masked, training form), plus ``<name>.bias``; every other parameter and
                           persistent buffer under its usual state_dict key
    laco_sparse.json       the manifest: format version, dtype, and per packed module its format,
                           shape, tile_k, trainable flag; tied (shared) tensors stored once
    tokenizer files        when a tokenizer is given

Every file is written to a temporary name and renamed; the manifest is written last, so a folder
with a manifest is complete. ``load_sparse(folder)`` rebuilds the model from config.json, swaps
in the packed modules and loads the tensors (logits identical to the saved model's).

``export_compressed_tensors(model, folder)`` writes the compressed-tensors layout that serving
engines (vLLM) read for 2:4 models: ``quantization_config.sparsity_config`` in config.json and, per
2:4 linear, ``<name>.weight.compressed`` (kept values ``[N, K/2]``), ``<name>.weight.bitmask``
(uint8 ``[N, ceil(K/8)]``, bit-packed by compressed-tensors' own ``pack_bitmasks``) and
``<name>.weight.shape``. compressed-tensors >= 0.15 dropped its sparse-24 compressor class (the
installed 0.20 keeps the config schema and the bitmask helpers), so the layout is written here
from that schema; ``format="dense"`` writes the dense weights with a ``dense`` sparsity config
(decompressed by the library's ``DenseCompressor``).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .formats import BitmapWeight, PackedMask, Sparse24Weight
from .nn import BitmapLinear, MaskedLinear, SparseLinear24, sparse_modules

MANIFEST = "laco_sparse.json"
WEIGHTS = "model.safetensors"
MANIFEST_VERSION = 1
CT_FORMATS = ("sparse-24-bitmask", "dense")

__all__ = ["export_compressed_tensors", "is_sparse_checkpoint", "load_sparse", "load_tokenizer", "save_sparse"]


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _atomic_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)  # readable like the other files of the folder
    os.replace(tmp, path)


def _save_config(model: nn.Module, folder: str) -> None:
    config = model.config
    tmp = os.path.join(folder, f".config-tmp-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    config.save_pretrained(tmp)
    os.replace(os.path.join(tmp, "config.json"), os.path.join(folder, "config.json"))
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _packed_entry(name: str, mod: nn.Module) -> Tuple[dict, Dict[str, torch.Tensor]]:
    shape = [mod.out_features, mod.in_features]
    if isinstance(mod, SparseLinear24):
        entry = {"format": Sparse24Weight.FORMAT, "shape": shape, "trainable": mod.trainable}
        tensors = {"values": mod.values, "meta": mod.meta}
    elif isinstance(mod, BitmapLinear):
        entry = {"format": BitmapWeight.FORMAT, "shape": shape, "tile_k": mod.tile_k}
        tensors = {"values": mod.values, "bitmap": mod.bitmap, "offsets": mod.offsets}
    else:
        entry = {"format": PackedMask.FORMAT, "shape": shape}
        tensors = {"weight": mod.weight, "mask": mod.mask_bits}
    entry["bias"] = mod.bias is not None
    if mod.bias is not None:
        tensors["bias"] = mod.bias
    return entry, {f"{name}.{k}": v for k, v in tensors.items()}


def save_sparse(model: nn.Module, folder: str, tokenizer=None) -> dict:
    """Save a (sparsified) Hugging Face causal LM with its packed weights; returns the manifest.

    model: a ``transformers`` model (it needs ``.config``), with or without modules of
    :mod:`laco_kernels.nn`; tokenizer: saved alongside when given.
    """
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"save_sparse needs a Hugging Face model with a .config, got {type(model).__name__}")
    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, MANIFEST)
    if os.path.exists(stale):  # the folder is incomplete until the new manifest lands
        os.remove(stale)
    packed = sparse_modules(model)
    modules, tensors = {}, {}
    for name, mod in packed.items():
        modules[name], t = _packed_entry(name, mod)
        tensors.update(t)
    skip = tuple(f"{n}." for n in packed)
    aliases: Dict[str, str] = {}
    seen: Dict[Tuple[int, int, tuple], str] = {}
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update({n: b for n, b in model.named_buffers(remove_duplicate=False)})
    persistent = set(model.state_dict(keep_vars=True))
    for key, t in state.items():
        if key.startswith(skip) or key not in persistent:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:  # tied weights (lm_head = embed_tokens): stored once, re-tied on load
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t
    manifest = {"version": MANIFEST_VERSION, "dtype": str(_model_dtype(model)).replace("torch.", ""),
                "model_type": getattr(model.config, "model_type", None), "modules": modules, "aliases": aliases}
    _save_config(model, folder)
    _atomic_safetensors(os.path.join(folder, WEIGHTS), tensors, {"format": "pt", "laco_manifest": MANIFEST})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _atomic_json(os.path.join(folder, MANIFEST), manifest)
    return manifest


def is_sparse_checkpoint(folder: str) -> bool:
    """True when ``folder`` was written by :func:`save_sparse`."""
    return os.path.isfile(os.path.join(folder, MANIFEST))


def _build_module(entry: dict, t: Dict[str, torch.Tensor]) -> nn.Module:
    shape = tuple(entry["shape"])
    bias = t.get("bias")
    fmt = entry["format"]
    if fmt == Sparse24Weight.FORMAT:
        return SparseLinear24(Sparse24Weight(t["values"], t["meta"], shape), bias, trainable=entry.get("trainable", False))
    if fmt == BitmapWeight.FORMAT:
        return BitmapLinear(BitmapWeight(t["values"], t["bitmap"], t["offsets"], shape, int(entry["tile_k"])), bias)
    if fmt == PackedMask.FORMAT:
        return MaskedLinear(t["weight"], PackedMask(t["mask"], shape), bias)
    raise ValueError(f"unknown packed module format {fmt!r} in {MANIFEST}")


def load_sparse(folder: str, device: str = "cpu", with_tokenizer: bool = True):
    """Rebuild the model saved by :func:`save_sparse` (from config.json, no hub) -> ``(model, tokenizer)``.

    The model is in eval mode on ``device``; tokenizer is None when the folder has none (or
    ``with_tokenizer=False``).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sparse checkpoint folder {folder!r} does not exist")
    if not is_sparse_checkpoint(folder):
        raise FileNotFoundError(f"{folder!r} has no {MANIFEST}: not a complete laco sparse checkpoint "
                                "(write one with laco_kernels.checkpoint.save_sparse)")
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{MANIFEST} version {manifest.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
    dtype = getattr(torch, manifest["dtype"])
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with safe_open(os.path.join(folder, WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    packed_keys = set()
    for name, entry in manifest["modules"].items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")
               and "." not in k[len(name) + 1:]}
        packed_keys.update(f"{name}.{k}" for k in own)
        mod = _build_module(entry, own)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, mod)
    rest = {k: v for k, v in tensors.items() if k not in packed_keys}
    result = model.load_state_dict(rest, strict=False)
    expected_missing = {f"{n}.{p}" for n, e in manifest["modules"].items() for p in (("weight", "bias") if e["bias"]
                                                                                    else ("weight",))}
    expected_missing |= set(manifest.get("aliases", {}))
    missing = set(result.missing_keys) - expected_missing
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: checkpoint does not match the model built from config.json: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    for key, target in manifest.get("aliases", {}).items():  # re-tie shared tensors
        if model.get_parameter(key) is not model.get_parameter(target):
            owner, _, leaf = key.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(target))
    model.to(device).eval()
    tok = load_tokenizer(folder) if with_tokenizer else None
    return model, tok


def load_tokenizer(folder: str):
    """The tokenizer saved in ``folder`` (None if there is none).

    A plain ``tokenizers``-backed tokenizer is loaded as exactly that class: transformers'
    AutoTokenizer would otherwise pick the model family's tokenizer class from config.json and
    re-tokenise differently.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(cfg_path) and not os.path.exists(os.path.join(folder, "tokenizer.json")):
        return None
    cls = None
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cls = json.load(f).get("tokenizer_class")
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------
def _is_24(w: torch.Tensor) -> bool:
    n, k = w.shape
    return k % 4 == 0 and bool(((w.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


def export_compressed_tensors(model: nn.Module, folder: str, format: str = "sparse-24-bitmask",
                              tokenizer=None) -> dict:
    """Write ``model`` (sparsified or a pruned dense model) as a compressed-tensors checkpoint.

    Every linear whose weight is 2:4 (the output projection excepted) is a target; the others
    (and lm_head) are listed in ``ignore``. format ``"sparse-24-bitmask"`` stores the targets
    compressed; ``"dense"`` stores plain weights with a 2:4 ``dense`` sparsity config.
    Returns the ``sparsity_config`` written into config.json.
    """
    import compressed_tensors
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import pack_bitmasks

    if format not in CT_FORMATS:
        raise ValueError(f"format must be one of {CT_FORMATS}, got {format!r}")
    if not hasattr(model, "config"):
        raise TypeError(f"export needs a Hugging Face model with a .config, got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear24, BitmapLinear,
                                                                        MaskedLinear))}
    targets, ignore = [], []
    state = model.state_dict()  # dense weights for every module of laco_kernels.nn
    for name, mod in linears.items():
        w = state[f"{name}.weight"]
        (targets if mod is not head and _is_24(w) else ignore).append(name)
    if not targets:
        raise ValueError("no linear of the model is 2:4 sparse: nothing to export as a 2:4 compressed-tensors model")
    zeros = sum(int((state[f"{n}.weight"] == 0).sum()) for n in targets)
    total = sum(state[f"{n}.weight"].numel() for n in linears)
    cfg = SparsityCompressionConfig.load_from_registry(
        format, targets=["Linear"], ignore=ignore, global_sparsity=zeros / total, sparsity_structure="2:4")
    tensors: Dict[str, torch.Tensor] = {}
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        tied = {n for n, m in model.named_modules() if m is head}
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if module in tied:
            continue
        if format == "sparse-24-bitmask" and module in targets and leaf == "weight":
            mask = Sparse24Weight.from_dense(t).mask()  # exactly 2 kept positions per group of 4
            tensors[f"{key}.compressed"] = t[mask].reshape(t.shape[0], t.shape[1] // 2)
            tensors[f"{key}.bitmask"] = pack_bitmasks(mask.cpu())
            tensors[f"{key}.shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        else:
            tensors[key] = t
    os.makedirs(folder, exist_ok=True)
    _save_config(model, folder)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    sparsity = cfg.model_dump()
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": format,
                                     "version": compressed_tensors.__version__, "sparsity_config": sparsity}
    _atomic_safetensors(os.path.join(folder, WEIGHTS), tensors, {"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _atomic_json(config_path, config)
    return sparsity
