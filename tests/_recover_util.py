"""Tiny random-init Llama models pruned in place, shared by the recovery tests (no hub access)."""
from __future__ import annotations

import copy

import torch


def tiny_llama(layers: int = 3, hidden: int = 64, inter: int = 128, vocab: int = 100, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def prune_blocks(model, pattern: str = "2:4") -> None:
    """Magnitude-prune every block linear in place: 2 smallest of each 4 inputs, or 50% per row."""
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            with torch.no_grad():
                if pattern == "2:4":
                    w = p.view(p.shape[0], -1, 4)
                    w.scatter_(-1, w.abs().topk(2, -1, largest=False).indices, 0)
                else:
                    p.scatter_(-1, p.abs().topk(p.shape[1] // 2, -1, largest=False).indices, 0)


def dense_and_pruned(pattern: str = "2:4", **kw):
    dense = tiny_llama(**kw)
    pruned = copy.deepcopy(dense)
    prune_blocks(pruned, pattern)
    return dense, pruned


def block_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".layers." in k}


def one_thread():
    """Fixture body: tiny models run far faster on one thread of a shared CPU; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
