"""Sparse checkpoints: atomic save/load of Hugging Face folders with packed weights, and the
compressed-tensors export. The format itself is :mod:`laco_kernels.hf` (docs/checkpoints.md).

``save_sparse(model, folder, tokenizer)`` is ``model.save_pretrained`` + ``tokenizer.save_pretrained``
into a sibling temporary folder that then takes ``folder``'s place whole (:mod:`._atomic`): a
failed save leaves the previous checkpoint loadable, or nothing, and no temporary behind. A model
with modules of :mod:`laco_kernels.nn` is written packed (``quant_method: laco-sparse``), any other
model as a plain Hugging Face folder. ``load_sparse(folder)`` is
``AutoModelForCausalLM.from_pretrained(folder, dtype="auto")`` plus the tokenizer, after checking
the folder so that a corrupt file is reported by name. Folders of the first format
(``laco_sparse.json`` manifest beside a plain config.json, which transformers alone loads with
random weights) still load here, with a warning; :func:`migrate_checkpoint` rewrites them.

``export_compressed_tensors(model, folder)`` writes what compressed-tensors 0.14.0.1's
``ModelCompressor`` writes for a 2:4 model (``sparse-24-bitmask``: ``<module>.compressed`` kept
values ``[N, K/2]``, ``<module>.bitmask`` uint8 ``[N, ceil(K/8)]``, ``<module>.shape`` int64
``[2, 1]``; ``dense``: plain weights), read by compressed-tensors <= 0.14 and transformers 4.x.
compressed-tensors >= 0.15, transformers 5 and vLLM >= 0.19.1 no longer read 2:4 checkpoints.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ._atomic import atomic_folder
from .formats import BitmapWeight, PackedMask, Sparse24Weight
from .nn import BitmapLinear, MaskedLinear, SparseLinear24, sparse_modules

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LEGACY_MANIFEST = "laco_sparse.json"
MANIFEST = LEGACY_MANIFEST  # the name of the first format's manifest (read, never written)
CT_FORMATS = ("sparse-24-bitmask", "dense")
CT_WRITER_VERSION = "0.14.0.1"  # the compressed-tensors release whose layout the export reproduces
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_PACKED = (SparseLinear24, BitmapLinear, MaskedLinear)

__all__ = ["export_compressed_tensors", "is_sparse_checkpoint", "load_sparse", "load_tokenizer",
           "migrate_checkpoint", "save_sparse"]


def _check_target(folder: str) -> None:
    """Refuse to replace anything but a model folder (the whole folder is swapped on save)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder!r} exists and is a file; a checkpoint is written as a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, CONFIG)):
        raise FileExistsError(f"{folder!r} exists, is not empty and holds no {CONFIG}: not a model checkpoint; "
                              "refusing to replace it (the save swaps the whole folder); choose a new folder")


def _is_hf_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(model.config, "save_pretrained")


def save_sparse(model: nn.Module, folder: str, tokenizer=None) -> dict:
    """Save a Hugging Face causal LM (packed when it holds sparse modules) atomically; returns its
    ``quantization_config`` as written in config.json (``{}`` for a model without packed modules).
    """
    if not _is_hf_model(model):
        raise TypeError(f"save_sparse needs a Hugging Face model with a .config, got {type(model).__name__}")
    if sparse_modules(model):
        from .hf import attach

        attach(model, strict=True)
    _check_target(folder)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        written = _read_config(tmp).get("quantization_config") or {}
    return written


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {CONFIG}: not a Hugging Face model folder")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON (cut short or corrupt): {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _is_laco(cfg: dict) -> bool:
    from .hf import QUANT_METHOD

    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def is_sparse_checkpoint(folder: str) -> bool:
    """True when ``folder`` holds a laco sparse checkpoint (this format or the first one)."""
    if os.path.isfile(os.path.join(folder, LEGACY_MANIFEST)):
        return True
    try:
        return _is_laco(_read_config(folder))
    except (OSError, ValueError):
        return False


def load_sparse(folder: str, device: str = "cpu", with_tokenizer: bool = True):
    """Load a laco sparse checkpoint -> ``(model, tokenizer)``, the model in eval mode on ``device``.

    The model keeps the dtype it was saved in (``dtype="auto"``); tokenizer is None when the
    folder has none (or ``with_tokenizer=False``).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sparse checkpoint folder {folder!r} does not exist")
    if os.path.isfile(os.path.join(folder, LEGACY_MANIFEST)):
        warnings.warn(f"{folder}: first laco sparse format ({LEGACY_MANIFEST}); transformers cannot load it "
                      "without laco_kernels.checkpoint.load_sparse. Rewrite it once with "
                      "laco_kernels.checkpoint.migrate_checkpoint(folder).", FutureWarning, stacklevel=2)
        model, tok = _load_legacy(folder, with_tokenizer)
        return model.to(device).eval(), tok
    cfg = _read_config(folder)
    if not _is_laco(cfg):
        raise FileNotFoundError(f"{folder!r}: {CONFIG} has no laco-sparse quantization_config and there is no "
                                f"{LEGACY_MANIFEST}: not a laco sparse checkpoint (write one with save_sparse)")
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"{os.path.join(folder, CONFIG)}: unknown dtype {dtype!r} (expected one of {sorted(_DTYPES)})")
    if not os.path.isfile(os.path.join(folder, WEIGHTS)) and not os.path.isfile(
            os.path.join(folder, WEIGHTS + ".index.json")):
        raise FileNotFoundError(f"{folder!r} has no {WEIGHTS}: the checkpoint is incomplete")
    from transformers import AutoModelForCausalLM

    from .hf import register

    register()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True)
    model.to(device).eval()
    return model, (load_tokenizer(folder) if with_tokenizer else None)


def migrate_checkpoint(folder: str, out: Optional[str] = None) -> str:
    """Rewrite a first-format folder (``laco_sparse.json``) in the from_pretrained format; returns
    the folder written (``out``, default ``folder`` itself, replaced atomically)."""
    if not os.path.isfile(os.path.join(folder, LEGACY_MANIFEST)):
        raise FileNotFoundError(f"{folder!r} has no {LEGACY_MANIFEST}: nothing to migrate")
    model, tok = _load_legacy(folder, with_tokenizer=True)
    save_sparse(model, out or folder, tok)
    return out or folder


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
        try:
            with open(cfg_path) as f:
                cls = json.load(f).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ValueError(f"{cfg_path}: not a valid tokenizer config ({exc})") from None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------
# the first format (read only)
def _load_legacy(folder: str, with_tokenizer: bool):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(folder, LEGACY_MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON (cut short or corrupt): {exc}") from None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if version != 1:
        raise ValueError(f"{path}: manifest version {version!r} is not supported (expected 1)")
    dtype = _DTYPES.get(manifest.get("dtype"))
    if dtype is None:
        raise ValueError(f"{path}: unknown dtype {manifest.get('dtype')!r} (expected one of {sorted(_DTYPES)})")
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{path}: 'modules' must be an object")
    _read_config(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    weights = os.path.join(folder, WEIGHTS)
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own errors name no file
        raise ValueError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    packed_keys = set()
    for name, entry in modules.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items()
               if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        packed_keys.update(f"{name}.{k}" for k in own)
        try:
            mod = _legacy_module(entry, own)
        except KeyError as exc:
            raise ValueError(f"{weights}: packed tensor '{name}.{exc.args[0]}' of module {name!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{folder}: packed module {name!r} is corrupt: {exc}") from None
        parent, _, leaf = name.rpartition(".")
        try:
            setattr(model.get_submodule(parent) if parent else model, leaf, mod)
        except AttributeError:
            raise ValueError(f"{path}: module {name!r} does not exist in the model built from {CONFIG}") from None
    rest = {k: v for k, v in tensors.items() if k not in packed_keys}
    result = model.load_state_dict(rest, strict=False)
    expected_missing = {f"{n}.{p}" for n, e in modules.items() for p in ("weight", "bias")}
    expected_missing |= set(manifest.get("aliases", {}))
    missing = set(result.missing_keys) - expected_missing
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: checkpoint does not match the model built from {CONFIG}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    for key, target in manifest.get("aliases", {}).items():  # re-tie shared tensors
        if model.get_parameter(key) is not model.get_parameter(target):
            owner, _, leaf = key.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(target))
    return model.eval(), (load_tokenizer(folder) if with_tokenizer else None)


def _legacy_module(entry: dict, t: Dict[str, torch.Tensor]) -> nn.Module:
    if not isinstance(entry, dict) or "format" not in entry or "shape" not in entry:
        raise ValueError(f"manifest entry {entry!r} needs 'format' and 'shape'")
    shape = tuple(entry["shape"])
    bias = t["bias"] if entry.get("bias") else None
    fmt = entry["format"]
    if fmt == Sparse24Weight.FORMAT:
        return SparseLinear24(Sparse24Weight(t["values"], t["meta"], shape), bias,
                              trainable=entry.get("trainable", False))
    if fmt == BitmapWeight.FORMAT:
        return BitmapLinear(BitmapWeight(t["values"], t["bitmap"], t["offsets"], shape, int(entry["tile_k"])), bias)
    if fmt == PackedMask.FORMAT:
        return MaskedLinear(t["weight"], PackedMask(t["mask"], shape), bias)
    raise ValueError(f"unknown packed module format {fmt!r}")


# ----------------------------------------------------------------------------------------
def _is_24(w: torch.Tensor) -> bool:
    n, k = w.shape
    return k % 4 == 0 and bool(((w.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[N, K]`` -> uint8 ``[N, ceil(K/8)]``, bit j of byte b = column 8b + j (LSB first),
    the layout of compressed-tensors' ``pack_bitmasks`` (numpy packbits, little bit order)."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def _ct_tensors(model: nn.Module, fmt: str) -> Tuple[Dict[str, torch.Tensor], list, list, float]:
    """The export's tensors, one module at a time (one dense weight in memory at a time)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None
    tensors: Dict[str, torch.Tensor] = {}
    targets, ignore, zeros, total = [], [], 0, 0
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if not isinstance(mod, (nn.Linear,) + _PACKED):
            mod._save_to_state_dict(tensors, prefix, False)
            continue
        w = (mod.dense_weight() if isinstance(mod, _PACKED) else mod.weight).detach().cpu()
        total += w.numel()
        is_target = mod is not head and _is_24(w)
        (targets if is_target else ignore).append(name)
        if is_target:
            zeros += int((w == 0).sum())
        if mod.bias is not None:
            tensors[prefix + "bias"] = mod.bias.detach()
        if tied and mod is head:
            continue  # stored once, as the input embedding
        if is_target and fmt == "sparse-24-bitmask":
            mask = Sparse24Weight.from_dense(w).mask()  # exactly 2 kept positions per group of 4
            tensors[prefix + "compressed"] = w[mask].reshape(w.shape[0], w.shape[1] // 2)
            tensors[prefix + "bitmask"] = _pack_bitmask(mask)
            tensors[prefix + "shape"] = torch.tensor(list(w.shape), dtype=torch.int64).reshape(-1, 1)
        else:
            tensors[prefix + "weight"] = w
    return tensors, targets, ignore, (zeros / total if total else 0.0)


def export_compressed_tensors(model: nn.Module, folder: str, format: str = "sparse-24-bitmask",
                              tokenizer=None) -> dict:
    """Write ``model`` (sparsified or a pruned dense model) as a compressed-tensors 2:4 checkpoint.

    Every linear whose weight is 2:4 (the output projection excepted) is a target; the others
    (and lm_head) are listed in ``ignore``. format ``"sparse-24-bitmask"`` stores the targets
    compressed; ``"dense"`` stores plain weights with a 2:4 ``dense`` sparsity config. config.json
    gets the model's current dtype. The folder is replaced atomically. Returns the
    ``sparsity_config`` written into config.json.
    """
    from safetensors.torch import save_file

    if format not in CT_FORMATS:
        raise ValueError(f"format must be one of {CT_FORMATS}, got {format!r}")
    if not _is_hf_model(model):
        raise TypeError(f"export needs a Hugging Face model with a .config, got {type(model).__name__}")
    _check_target(folder)
    tensors, targets, ignore, sparsity = _ct_tensors(model, format)
    if not targets:
        raise ValueError("no linear of the model is 2:4 sparse: nothing to export as a 2:4 compressed-tensors model")
    # compressed-tensors 0.14.0.1's ModelCompressor.update_config writes exactly these keys
    sc = {"registry_requires_subclass": False, "format": format, "targets": ["Linear"], "ignore": ignore,
          "global_sparsity": sparsity, "sparsity_structure": "2:4"}
    qc = {"version": CT_WRITER_VERSION, "quant_method": "compressed-tensors", "sparsity_config": sc,
          "transform_config": {}}
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = _model_dtype(model)  # the parameters' dtype now, as save_pretrained writes it
    config.architectures = [type(model).__name__]
    with atomic_folder(folder) as tmp:
        config.save_pretrained(tmp)
        path = os.path.join(tmp, CONFIG)
        with open(path) as f:
            data = json.load(f)
        data["quantization_config"] = qc
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return sc
