"""Where a model's decoder blocks come from during block-by-block recovery.

- :class:`ModuleSource`: an ``nn.Module`` already in RAM (its blocks are used, and updated, in place).
- :class:`DiskSource`: a Hugging Face folder with safetensors weights, read block by block, so a
  model larger than memory can be recovered. A one-block *skeleton* of the model (rotary tables,
  final norm, the embedding rows the calibration tokens use, and one block on the meta device; no
  output head, which stage 1 never reaches) is built from the config; it serves the embedding of
  the calibration tokens and the per-micro-batch block keyword arguments, and block ``l`` is a
  copy of the skeleton's block given ``l``'s tensors. Family-agnostic: only the adapter's
  ``blocks`` and ``embed`` paths are used.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, List

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors import safe_open

from ..models.adapters import get_adapter, get_module, set_module
from ._checkpoint import _header


class ModuleSource:
    """Blocks of an in-memory model; ``load`` returns the model's own block (no copy)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = get_adapter(model)
        self.blocks = get_module(model, self.adapter.blocks)
        self.n_blocks = len(self.blocks)

    def load(self, l: int) -> nn.Module:
        return self.blocks[l]

    def release(self, l: int, block: nn.Module) -> None:  # the block stays in the model
        pass

    def put(self, l: int, block: nn.Module) -> None:
        """Make ``block`` the model's block ``l`` (sparsify/densify may return new modules)."""
        if self.blocks[l] is not block:
            self.blocks[l] = block

    def store(self, l: int, state: Dict[str, torch.Tensor]) -> None:
        """Write recovered weights into block ``l`` of the model."""
        self.blocks[l].load_state_dict(state)


def _weight_map(folder: str) -> Dict[str, str]:
    """tensor name -> safetensors file, for single-file and sharded checkpoints."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(folder, v) for k, v in wm.items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder!r} holds neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _read(names: List[str], wmap: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Read tensors with safetensors, one ``safe_open`` per tensor.

    ``safe_open`` memory-maps the file and ``get_tensor`` copies out of the mapping; the pages it
    touched count in the resident set until the file is closed. Closing after each tensor keeps
    that transient to one tensor instead of a whole block (or a whole single-file model).
    """
    out: Dict[str, torch.Tensor] = {}
    for n in names:
        with safe_open(wmap[n], "pt") as f:
            out[n] = f.get_tensor(n)
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_rows(name: str, rows: torch.Tensor, wmap: Dict[str, str]) -> torch.Tensor:
    """Rows ``rows`` (sorted, unique int64) of the 2-D float tensor ``name``, one ``pread`` per run
    of consecutive rows.

    Not through ``safe_open``: its memory map makes the kernel map 64 KB around every touched
    page (fault-around), so a few thousand scattered embedding rows would put tens of MB of the
    file in the resident set. The offsets come from the file's safetensors header.
    """
    path = wmap[name]
    head = _header(path)
    meta = head[name]
    if meta["dtype"] not in _DTYPES or len(meta["shape"]) != 2:
        raise ValueError(f"{path!r}: {name!r} is {meta['dtype']} {meta['shape']}, expected a 2-D float tensor")
    if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= meta["shape"][0]):
        raise ValueError(f"token ids must lie in [0, {meta['shape'][0]}) for {name!r}; got "
                         f"{int(rows[0])}..{int(rows[-1])}")
    dtype, width = _DTYPES[meta["dtype"]], meta["shape"][1]
    row_bytes = width * torch.empty(0, dtype=dtype).element_size()
    base = head["__data_start__"] + meta["data_offsets"][0]
    out = torch.empty(len(rows), width, dtype=dtype)
    buf = out.view(torch.uint8).numpy().reshape(-1)  # read straight into the output tensor
    breaks = (torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1).tolist()
    fd = os.open(path, os.O_RDONLY)
    try:
        for a, b in zip([0] + breaks, breaks + [len(rows)]):
            want = (b - a) * row_bytes
            got = os.preadv(fd, [memoryview(buf[a * row_bytes:b * row_bytes])], base + int(rows[a]) * row_bytes)
            if got != want:
                raise IOError(f"{path!r}: short read of {name!r} rows {int(rows[a])}..{int(rows[b - 1])}")
    finally:
        os.close(fd)
    return out


class DiskSource:
    """Blocks of a safetensors model folder, materialised one at a time on the CPU.

    The skeleton (config-built model with one block) is created on the meta device, so no
    random-init weights ever exist; its block is the *template* that :meth:`load` fills with
    block ``l``'s tensors. ``with_rest=False`` (the dense model, which only lends blocks) reads
    nothing else; otherwise the small non-block tensors (final norm) are read, and the token
    embedding is read only for the token ids that the calibration set uses
    (:meth:`embed_calibration`), never whole.

    dtype: dtype of the skeleton (blocks keep the file's dtype unless ``dtype`` is given).
    """

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32, with_rest: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = folder
        config = AutoConfig.from_pretrained(folder)
        self.adapter = get_adapter(config)
        self.n_blocks = int(config.num_hidden_layers)
        one = copy.deepcopy(config)
        one.num_hidden_layers = 1
        if isinstance(getattr(one, "layer_types", None), list):
            one.layer_types = one.layer_types[:1]
        with init_empty_weights():  # parameters on meta; buffers (rotary tables) real
            self.model = AutoModelForCausalLM.from_config(one, dtype=dtype).eval()
        # stage 1 never reaches the output head: drop it from the skeleton (a vocab x hidden matrix)
        head = self.adapter.lm_head
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.config.tie_word_embeddings = False
        set_module(self.model, head, nn.Identity())
        self.prefix = self.adapter.blocks + "."
        self.wmap = _weight_map(folder)
        self.embed_key = self.adapter.embed + ".weight"
        if self.embed_key not in self.wmap:
            raise ValueError(f"{folder!r} has no tensor {self.embed_key!r} (the token embedding)")
        if with_rest:
            rest = [k for k in self.wmap if not k.startswith((self.prefix, head + ".")) and k != self.embed_key]
            missing, unexpected = self.model.load_state_dict(_read(rest, self.wmap), strict=False, assign=True)
            missing = [m for m in missing if not m.startswith(self.prefix) and m != self.embed_key]
            if missing or unexpected:
                raise ValueError(f"{folder!r}: weights do not match the config (missing {missing[:5]}, "
                                 f"unexpected {list(unexpected)[:5]})")
        self.template = get_module(self.model, self.adapter.blocks)[0]

    def embed_calibration(self, ids: torch.Tensor) -> torch.Tensor:
        """Give the skeleton an embedding holding only the rows ``ids`` use; return ``ids``
        renumbered into it (same shape). Embedding a renumbered id gives the same vector."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = _read_rows(self.embed_key, uniq, self.wmap)
        emb = get_module(self.model, self.adapter.embed)
        emb.weight = nn.Parameter(rows.to(emb.weight.dtype), requires_grad=False)
        return inverse.reshape(ids.shape)

    def drop_embeddings(self) -> None:
        """Free the token embedding once the calibration stream and block kwargs exist (stage 1
        never embeds again): the skeleton then holds one block, norms and rotary tables only."""
        emb = get_module(self.model, self.adapter.embed)
        emb.weight = nn.Parameter(torch.empty(0, emb.weight.shape[1], dtype=emb.weight.dtype), requires_grad=False)

    def block_keys(self, l: int) -> List[str]:
        p = f"{self.prefix}{l}."
        return [k for k in self.wmap if k.startswith(p)]

    def load(self, l: int) -> nn.Module:
        """Block ``l`` with the file's tensors (the meta template's copy takes them by assignment)."""
        p = f"{self.prefix}{l}."
        state = {k[len(p):]: v for k, v in _read(self.block_keys(l), self.wmap).items()}
        block = copy.deepcopy(self.template)
        block.load_state_dict(state, assign=True)
        return block

    def release(self, l: int, block: nn.Module) -> None:
        del block

    def put(self, l: int, block: nn.Module) -> None:  # the checkpoint keeps recovered blocks
        pass

    def store(self, l: int, state: Dict[str, torch.Tensor]) -> None:
        """Nothing to do: recovered blocks of a disk model live in the checkpoint / output folder."""
