"""Hugging Face integration: ``from_pretrained`` / ``save_pretrained`` of sparse models.

After ``import laco_kernels`` (which registers the method with transformers' public hooks
``register_quantization_config`` / ``register_quantizer``)::

    model = AutoModelForCausalLM.from_pretrained("pruned/")   # SparseLinear24 / BitmapLinear modules
    model.save_pretrained("again/")                            # same format

On disk a checkpoint is an ordinary ``save_pretrained`` folder whose ``config.json`` carries
``"quantization_config": {"quant_method": "laco-sparse", "version": 1, "modules": {...}}``, one
entry per packed linear: ``{"format": "sparse24" | "bitmap" | "masked", "shape": [N, K],
"bias": bool, "trainable": bool (sparse24), "tile_k": int (bitmap)}``. Tensors of a packed module
``<m>`` in ``model.safetensors``:

    sparse24   <m>.weight          kept values [N, K/2] (float)   <m>.weight_meta     int32 [N, ceil(K/32)]
    bitmap     <m>.weight          nonzeros [nnz] (float)          <m>.weight_bitmap   int32 [N, ceil(K/32)]
                                                                   <m>.weight_offsets  int32 [N, ceil(K/tile_k)]
    masked     <m>.weight          kept entries [nnz] (float)      <m>.weight_mask     int32 [N, ceil(K/32)]
    all        <m>.bias            [N] when the module has one

The packed values sit under the ``weight`` key on purpose: transformers without this package
ignores an unknown ``quant_method`` (it only logs a warning) and would otherwise initialise the
missing dense weights randomly; with the values under ``weight`` the shapes differ from
``nn.Linear``'s and it raises a size-mismatch error instead. (The ``masked`` training form stores
its kept entries the same way and rebuilds its dense weight, zeros elsewhere, on load.)

Loading never materialises a dense weight: before the weights load, the quantizer swaps every
listed ``nn.Linear`` for a shell whose buffers have exactly the on-disk names and shapes (read
from the safetensors header, so a missing or malformed tensor is reported with its file before
anything loads); transformers fills them; after loading each shell becomes the real module.
Saving goes through :meth:`LacoSparseHfQuantizer.get_state_dict_and_metadata`, which writes the
packed tensors. The modules' own ``state_dict()`` keeps the dense ``nn.Linear`` convention of
:mod:`laco_kernels.nn`, so ordinary ``load_state_dict`` still works both ways.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import BitmapWeight, PackedMask, Sparse24Weight
from .nn import BitmapLinear, MaskedLinear, SparseLinear24, sparse_modules

QUANT_METHOD = "laco-sparse"
FORMAT_VERSION = 1
KINDS = ("sparse24", "bitmap", "masked")

__all__ = ["FORMAT_VERSION", "LacoSparseConfig", "LacoSparseHfQuantizer", "QUANT_METHOD", "attach", "register"]

# safetensors header dtype names -> torch dtypes (the ones a packed module may hold)
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32}
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


class LacoSparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a laco sparse checkpoint (see the module docstring).

    modules: ``{module name: entry}``; filled from the model when it is saved.
    """

    def __init__(self, modules: Optional[Dict[str, dict]] = None, version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **unknown):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LacoSparseConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if unknown:
            raise ValueError(f"config.json quantization_config ({QUANT_METHOD}): unknown keys {sorted(unknown)}")
        if version != FORMAT_VERSION:
            raise ValueError(f"config.json quantization_config ({QUANT_METHOD}): format version {version!r} is not "
                             f"supported by this laco_kernels (it reads version {FORMAT_VERSION}); upgrade it")
        self.quant_method = QUANT_METHOD
        self.version = version
        self.modules = {}
        for name, entry in (modules or {}).items():
            self.modules[name] = _check_entry(name, entry)


def _check_entry(name: str, entry) -> dict:
    where = f"config.json quantization_config.modules[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    kind = entry.get("format")
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown format {kind!r} (known: {', '.join(KINDS)})")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{where}: shape must be [out_features, in_features], got {shape!r}")
    if not isinstance(entry.get("bias"), bool):
        raise ValueError(f"{where}: bias must be true or false, got {entry.get('bias')!r}")
    if kind == "sparse24" and shape[1] % 4:
        raise ValueError(f"{where}: a 2:4 module needs in_features divisible by 4, got shape {shape}")
    if kind == "bitmap":
        tile_k = entry.get("tile_k")
        if not (isinstance(tile_k, int) and tile_k > 0 and tile_k % 32 == 0):
            raise ValueError(f"{where}: tile_k must be a positive multiple of 32, got {tile_k!r}")
    if kind == "sparse24" and not isinstance(entry.get("trainable", False), bool):
        raise ValueError(f"{where}: trainable must be true or false, got {entry.get('trainable')!r}")
    return dict(entry)


# ----------------------------------------------------------------------------------------
def _expected(entry: dict) -> Dict[str, Tuple[Optional[tuple], str]]:
    """On-disk tensors of one module: ``{suffix: (shape or None for [nnz], "float" | "int32")}``."""
    n, k = entry["shape"]
    words = (k + 31) // 32
    if entry["format"] == "sparse24":
        out = {"weight": ((n, k // 2), "float"), "weight_meta": ((n, (k // 4 + 7) // 8), "int32")}
    elif entry["format"] == "bitmap":
        tiles = (k + entry["tile_k"] - 1) // entry["tile_k"]
        out = {"weight": (None, "float"), "weight_bitmap": ((n, words), "int32"),
               "weight_offsets": ((n, tiles), "int32")}
    else:
        out = {"weight": (None, "float"), "weight_mask": ((n, words), "int32")}
    if entry["bias"]:
        out["bias"] = ((n,), "float")
    return out


def packed_tensors(mod: nn.Module) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(config entry, {suffix: tensor})`` of one packed module, in the on-disk layout."""
    shape = [mod.out_features, mod.in_features]
    if isinstance(mod, SparseLinear24):
        entry = {"format": "sparse24", "shape": shape, "trainable": bool(mod.trainable)}
        t = {"weight": mod.values, "weight_meta": mod.meta}
    elif isinstance(mod, BitmapLinear):
        entry = {"format": "bitmap", "shape": shape, "tile_k": int(mod.tile_k)}
        t = {"weight": mod.values, "weight_bitmap": mod.bitmap, "weight_offsets": mod.offsets}
    elif isinstance(mod, MaskedLinear):
        # the kept entries only: masked-out entries never reach the output (they come back as 0)
        entry = {"format": "masked", "shape": shape}
        t = {"weight": mod.weight[mod.mask.to_bool()], "weight_mask": mod.mask_bits}
    else:
        raise TypeError(f"{type(mod).__name__} is not a packed module of laco_kernels.nn")
    entry["bias"] = mod.bias is not None
    if mod.bias is not None:
        t["bias"] = mod.bias
    return entry, {k: v.detach() for k, v in t.items()}


def packed_state_dict(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """The model's state dict with every packed module in the on-disk layout (no dense copy)."""
    state: Dict[str, torch.Tensor] = {}
    entries: Dict[str, dict] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(mod, (SparseLinear24, BitmapLinear, MaskedLinear)):
            entries[name], t = packed_tensors(mod)
            state.update({prefix + k: v for k, v in t.items()})
        else:  # this module's own parameters and persistent buffers, as nn.Module.state_dict does
            mod._save_to_state_dict(state, prefix, False)
    return state, entries


class _Shell(nn.Module):
    """Placeholder for one packed module while transformers loads the tensors into it.

    Its buffers carry the on-disk names and shapes, so transformers' loader fills them as it
    would an ``nn.Linear``'s weight; it never runs (it becomes the real module after loading).
    """

    def __init__(self, entry: dict, specs: Dict[str, Tuple[tuple, torch.dtype]]):
        super().__init__()
        self.entry = entry
        for key, (shape, dtype) in specs.items():
            self.register_buffer(key, torch.empty(shape, dtype=dtype, device="meta"))

    def forward(self, x):  # pragma: no cover - replaced before the model is returned
        raise RuntimeError("laco-sparse: a packed module was not finalised after loading")


def _build(entry: dict, shell: _Shell) -> nn.Module:
    shape = tuple(entry["shape"])
    bias = shell.bias if entry["bias"] else None
    if entry["format"] == "sparse24":
        return SparseLinear24(Sparse24Weight(shell.weight, shell.weight_meta, shape), bias,
                              trainable=entry.get("trainable", False))
    if entry["format"] == "bitmap":
        return BitmapLinear(BitmapWeight(shell.weight, shell.weight_bitmap, shell.weight_offsets, shape,
                                         entry["tile_k"]), bias)
    mask = PackedMask(shell.weight_mask, shape)
    mask.validate()
    keep = mask.to_bool()
    if int(keep.sum()) != shell.weight.numel():
        raise ValueError(f"weight_mask has {int(keep.sum())} set bits but weight holds {shell.weight.numel()} values")
    dense = torch.zeros(shape, dtype=shell.weight.dtype, device=shell.weight.device).masked_scatter(keep, shell.weight)
    return MaskedLinear(nn.Parameter(dense), mask, bias)


def read_headers(files: List[str]) -> Dict[str, Tuple[str, str, list]]:
    """``{tensor name: (file, safetensors dtype, shape)}`` from the headers only (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for path in files:
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: a {QUANT_METHOD} checkpoint holds its weights in .safetensors files only")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (path, sl.get_dtype(), list(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own error type without the path
            raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                             "the file is truncated or corrupt") from None
    return out


class LacoSparseHfQuantizer(HfQuantizer):
    """Loads and saves laco sparse checkpoints inside ``from_pretrained`` / ``save_pretrained``."""

    requires_calibration = True  # only checkpoints written sparse; sparsify with laco_kernels.nn.sparsify

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError(f"{QUANT_METHOD}: disk offload is not supported for packed sparse modules")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        modules = self.quantization_config.modules
        if not modules:
            return model
        if not checkpoint_files:
            raise ValueError(f"{QUANT_METHOD}: from_pretrained found no weight files to load the packed modules from")
        headers = read_headers(list(checkpoint_files))
        folder = os.path.dirname(checkpoint_files[0])
        for name, entry in modules.items():
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{folder}/config.json: packed module {name!r} does not exist in the "
                                 f"{type(model).__name__} built from config.json") from None
            if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != tuple(entry["shape"]):
                raise ValueError(f"{folder}/config.json: packed module {name!r} has shape {entry['shape']} but the "
                                 f"model's {type(lin).__name__} there is "
                                 f"{[getattr(lin, 'out_features', '?'), getattr(lin, 'in_features', '?')]}")
            float_dtype = lin.weight.dtype
            specs = {}
            for suffix, (shape, kind) in _expected(entry).items():
                key = f"{name}.{suffix}"
                if key not in headers:
                    raise ValueError(f"{folder}: packed tensor {key!r} ({entry['format']} module) is missing from "
                                     f"{', '.join(sorted({os.path.basename(f) for f in checkpoint_files}))}")
                path, st_dtype, st_shape = headers[key]
                dtype = _ST_DTYPES.get(st_dtype)
                if kind == "int32" and dtype is not torch.int32 or kind == "float" and dtype not in _FLOAT:
                    raise ValueError(f"{path}: tensor {key!r} has dtype {st_dtype}, expected "
                                     f"{'I32' if kind == 'int32' else 'F16, BF16 or F32'}")
                if shape is None:  # kept values [nnz]: checked against the bitmap / mask after loading
                    if len(st_shape) != 1:
                        raise ValueError(f"{path}: tensor {key!r} has shape {st_shape}, expected 1-D [nnz]")
                    shape = tuple(st_shape)
                if list(shape) != st_shape:
                    raise ValueError(f"{path}: tensor {key!r} has shape {st_shape}, expected {list(shape)}")
                specs[suffix] = (shape, float_dtype if kind == "float" else torch.int32)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, _Shell(entry, specs))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, shell in [(n, m) for n, m in model.named_modules() if isinstance(m, _Shell)]:
            if any(b.is_meta for b in shell.buffers()):
                raise ValueError(f"{QUANT_METHOD}: packed module {name!r} was not loaded (its tensors stayed on meta)")
            try:
                mod = _build(shell.entry, shell)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{QUANT_METHOD} checkpoint {model.config.name_or_path!r}: packed module {name!r} "
                                 f"is corrupt: {exc}") from None
            mod.train(shell.training)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, mod)
        # the modules are ordinary torch modules: .to(dtype), .half(), training all work
        model.is_quantized = False
        return model

    def get_state_dict_and_metadata(self, model):
        """save_pretrained: the packed layout and a config entry per packed module (refreshed now)."""
        state, entries = packed_state_dict(model)
        if not entries:  # densified since: an ordinary dense checkpoint
            if isinstance(getattr(model.config, "quantization_config", None), LacoSparseConfig):
                del model.config.quantization_config
            return None, {}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
        if tied and any(model.get_submodule(n) is head for n in entries):
            raise ValueError(f"{QUANT_METHOD}: the output projection is packed but config.tie_word_embeddings is "
                             "True (it would be re-tied to the embedding on load); set "
                             "model.config.tie_word_embeddings = False before saving")
        self.quantization_config.modules = entries
        model.config.quantization_config = self.quantization_config
        return state, {"laco_format": str(FORMAT_VERSION)}

    def _dequantize(self, model, dtype=None):
        from .nn import densify

        densify(model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True

    @property
    def is_compileable(self):
        return True


def attach(model: nn.Module, strict: bool = False) -> bool:
    """Make ``model.save_pretrained`` write the laco-sparse format (a no-op for non-HF modules).

    Called by :func:`laco_kernels.nn.sparsify` and :func:`laco_kernels.checkpoint.save_sparse`;
    returns True when the model is (now) handled. A model that another quantization method
    loaded is left alone (False), or refused with ``strict=True`` when it holds packed modules.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    register()
    hq = getattr(model, "hf_quantizer", None)
    if hq is None:
        model.hf_quantizer = LacoSparseHfQuantizer(LacoSparseConfig(), pre_quantized=True)
    elif not isinstance(hq, LacoSparseHfQuantizer):
        if strict and sparse_modules(model):
            raise ValueError(f"the model is quantized with {hq.quantization_config.quant_method!r}; laco sparse "
                             "modules cannot be saved inside another quantization method's checkpoint")
        return False
    return True


def register() -> None:
    """Register ``laco-sparse`` with transformers (idempotent; done by ``import laco_kernels``)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(LacoSparseConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(LacoSparseHfQuantizer)


register()  # importing this module registers the method (laco_kernels/_hf_register.py imports it lazily)
