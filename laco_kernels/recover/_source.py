"""Where a model's decoder blocks come from during block-by-block recovery.

- :class:`ModuleSource`: an ``nn.Module`` already in RAM (its blocks are used, and updated, in place).
- :class:`DiskSource`: a Hugging Face folder with safetensors weights, read block by block, so a
  model larger than memory can be recovered. A one-block *skeleton* of the model (embeddings,
  rotary tables, final norm and one block; no output head, which stage 1 never reaches) is built from the config; it serves the
  embedding of the calibration tokens and the per-micro-batch block keyword arguments, and block
  ``l`` is a copy of the skeleton's block loaded with ``l``'s tensors. Family-agnostic: only the
  adapter's ``blocks`` path is used.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, List

import torch
import torch.nn as nn
from safetensors import safe_open

from ..models.adapters import get_adapter, get_module, set_module


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
    """Read tensors, opening each file once (safe_open maps it; closing unmaps it)."""
    out: Dict[str, torch.Tensor] = {}
    by_file: Dict[str, List[str]] = {}
    for n in names:
        by_file.setdefault(wmap[n], []).append(n)
    for path, keys in by_file.items():
        with safe_open(path, "pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k)  # a copy: safetensors' get_tensor does not alias the mapping
    return out


class DiskSource:
    """Blocks of a safetensors model folder, materialised one at a time on the CPU.

    dtype: dtype of the skeleton (blocks keep the file's dtype unless ``dtype`` is given).
    """

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = folder
        config = AutoConfig.from_pretrained(folder)
        self.adapter = get_adapter(config)
        self.n_blocks = int(config.num_hidden_layers)
        one = copy.deepcopy(config)
        one.num_hidden_layers = 1
        if isinstance(getattr(one, "layer_types", None), list):
            one.layer_types = one.layer_types[:1]
        self.model = AutoModelForCausalLM.from_config(one, dtype=dtype).eval()
        # stage 1 never reaches the output head: drop it from the skeleton (a vocab x hidden matrix)
        head = self.adapter.lm_head
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.config.tie_word_embeddings = False
        set_module(self.model, head, nn.Identity())
        self.prefix = self.adapter.blocks + "."
        self.wmap = _weight_map(folder)
        rest = [k for k in self.wmap if not k.startswith(self.prefix) and not k.startswith(head + ".")]
        state = _read(rest, self.wmap)
        # assign: the file's tensors replace the random-init ones (no second copy)
        missing, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith(self.prefix)]
        if missing or unexpected:
            raise ValueError(f"{folder!r}: weights do not match the config (missing {missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]})")
        self.template = get_module(self.model, self.adapter.blocks)[0]

    def drop_embeddings(self) -> None:
        """Free the token embedding once the calibration stream and block kwargs exist (stage 1
        never embeds again): the skeleton then holds one block, norms and rotary tables only."""
        emb = get_module(self.model, self.adapter.embed)
        emb.weight = nn.Parameter(torch.empty(0, emb.weight.shape[1], dtype=emb.weight.dtype), requires_grad=False)

    def block_keys(self, l: int) -> List[str]:
        p = f"{self.prefix}{l}."
        return [k for k in self.wmap if k.startswith(p)]

    def load(self, l: int) -> nn.Module:
        p = f"{self.prefix}{l}."
        state = {k[len(p):]: v for k, v in _read(self.block_keys(l), self.wmap).items()}
        block = copy.deepcopy(self.template)
        block.load_state_dict(state)
        return block

    def release(self, l: int, block: nn.Module) -> None:
        del block

    def put(self, l: int, block: nn.Module) -> None:  # the checkpoint keeps recovered blocks
        pass

    def store(self, l: int, state: Dict[str, torch.Tensor]) -> None:
        """Nothing to do: recovered blocks of a disk model live in the checkpoint / output folder."""
