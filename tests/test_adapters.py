"""The adapter table: every row resolves on a tiny random-init model of its family."""
import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from _tiny import FAMILIES, VOCAB, random_ids, tiny_model
from laco_kernels.models.adapters import (ADAPTERS, block_linears, get_adapter, get_blocks, get_module,
                                          set_module)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_row_resolves(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.family == family
    assert get_adapter(model.config) is adapter
    blocks = get_module(model, adapter.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 3
    assert get_blocks(model) is blocks
    embed = get_module(model, adapter.embed)
    assert isinstance(embed, nn.Embedding) and embed.num_embeddings == VOCAB
    assert isinstance(get_module(model, adapter.final_norm), nn.Module)
    head = get_module(model, adapter.lm_head)
    assert isinstance(head, nn.Linear) and head.out_features == VOCAB
    assert head is model.get_output_embeddings()
    hidden = embed.embedding_dim
    for block in blocks:
        linears = block_linears(block, adapter)
        assert list(linears) == adapter.linear_names()
        assert all(isinstance(lin, nn.Linear) for lin in linears.values())
        for norm in adapter.norms:
            assert isinstance(get_module(block, norm), nn.Module)
        # attention projections read the hidden state; o and down write it
        for name in adapter.attention_linears()[:-1]:
            assert linears[name].in_features == hidden
        assert linears[adapter.o].out_features == hidden
        assert linears[adapter.up].in_features == hidden
        assert linears[adapter.down].out_features == hidden
        assert linears[adapter.down].in_features == linears[adapter.up].out_features
        if adapter.gate:
            assert linears[adapter.gate].weight.shape == linears[adapter.up].weight.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_names_in_execution_order(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    seen = []
    block = get_blocks(model)[1]
    handles = [lin.register_forward_hook(lambda m, a, o, n=name: seen.append(n))
               for name, lin in block_linears(block, adapter).items()]
    with torch.no_grad():
        model(random_ids(1, 8))
    for h in handles:
        h.remove()
    assert seen == adapter.linear_names()


def test_every_row_has_unique_model_types():
    types = [t for a in ADAPTERS for t in a.model_types]
    assert len(types) == len(set(types))


def test_unknown_family_raises():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no adapter for model_type 'gpt2'"):
        get_adapter(model)
    with pytest.raises(ValueError, match="no adapter"):
        get_blocks(model)


def test_set_module_replaces_in_place():
    model = tiny_model("llama")
    new = nn.Linear(64, 64, bias=False)
    set_module(model, "model.layers.0.self_attn.q_proj", new)
    assert model.model.layers[0].self_attn.q_proj is new
    with pytest.raises(AttributeError):
        get_module(model, "model.layers.0.nope")
