"""One table of model-family knowledge: where the blocks, attention and MLP projections are.

Adding a family is adding a row to ``ADAPTERS``; no other file branches on the model type.
Paths are dotted attribute paths: model-level ones from the ``*ForCausalLM`` object,
block-level ones relative to one decoder block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn


@dataclass(frozen=True)
class ModelAdapter:
    """Where things live in one model family.

    blocks: the ModuleList of decoder blocks; embed: token embedding; final_norm: last norm
    before the head; lm_head: the output projection. q/k/v/o: attention projections (``qkv``
    for families with one fused projection); gate/up/down: MLP projections (``gate`` None
    for non-gated MLPs). norms: the block's norm modules. heads: config attribute names.
    """

    family: str
    model_types: Tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    lm_head: str = "lm_head"
    q: Optional[str] = "self_attn.q_proj"
    k: Optional[str] = "self_attn.k_proj"
    v: Optional[str] = "self_attn.v_proj"
    qkv: Optional[str] = None
    o: str = "self_attn.o_proj"
    gate: Optional[str] = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    norms: Tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    extra_embeds: Tuple[str, ...] = field(default_factory=tuple)

    def attention_linears(self) -> List[str]:
        """Block-relative names of the attention projections, in execution order."""
        names = [self.qkv] if self.qkv else [self.q, self.k, self.v]
        return [n for n in names if n] + [self.o]

    def mlp_linears(self) -> List[str]:
        return [n for n in (self.gate, self.up) if n] + [self.down]

    def linear_names(self) -> List[str]:
        """Block-relative names of every prunable linear of a block, in execution order."""
        return self.attention_linears() + self.mlp_linears()

    def mergeable_names(self) -> List[str]:
        """Block-relative names whose weights (and biases) layer collapse merges (norms excluded)."""
        return self.linear_names()


_LLAMA_LIKE = dict(blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm")

ADAPTERS: Tuple[ModelAdapter, ...] = (
    ModelAdapter("llama", ("llama",), **_LLAMA_LIKE),
    ModelAdapter("mistral", ("mistral",), **_LLAMA_LIKE),
    ModelAdapter("qwen2", ("qwen2",), **_LLAMA_LIKE),
    ModelAdapter("qwen3", ("qwen3",), **_LLAMA_LIKE),
    ModelAdapter("opt", ("opt",), blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
                 final_norm="model.decoder.final_layer_norm", o="self_attn.out_proj", gate=None,
                 up="fc1", down="fc2", norms=("self_attn_layer_norm", "final_layer_norm"),
                 extra_embeds=("model.decoder.embed_positions",)),
    ModelAdapter("gpt_neox", ("gpt_neox",), blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
                 final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", q=None, k=None, v=None,
                 qkv="attention.query_key_value", o="attention.dense", gate=None, up="mlp.dense_h_to_4h",
                 down="mlp.dense_4h_to_h", norms=("input_layernorm", "post_attention_layernorm")),
)
_BY_TYPE: Dict[str, ModelAdapter] = {t: a for a in ADAPTERS for t in a.model_types}


def get_adapter(model_or_config) -> ModelAdapter:
    """Adapter for a model (or its config); ValueError naming the model_type if none exists."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_TYPE:
        raise ValueError(f"no adapter for model_type {model_type!r}; supported: {sorted(_BY_TYPE)}. "
                         "Add a row to laco_kernels.models.adapters.ADAPTERS")
    return _BY_TYPE[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted attribute path (``model.layers``) under ``root``."""
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, new)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, through its adapter."""
    return get_module(model, get_adapter(model).blocks)


def block_linears(block: nn.Module, adapter: ModelAdapter) -> Dict[str, nn.Linear]:
    """``{block-relative name: module}`` of the block's prunable linears, in execution order."""
    return {name: get_module(block, name) for name in adapter.linear_names()}
