"""The `laco prune` where-to-prune options: parsing and dispatch to the allocators / removal / collapse."""
import argparse

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from laco_kernels.prune._cli_options import add_where_arguments, apply_where


def _parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.5)
    add_where_arguments(p)
    return p.parse_args(list(argv))


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def test_dispatch():
    ids = torch.randint(0, 100, (2, 8))
    assert apply_where(_parse(), _llama(), None) == (0.5, {"allocation": "uniform"})
    sparsity, rep = apply_where(_parse("--allocation", "lsa-block", "--lsa-alpha", "0.05"), _llama(), ids,
                                progress=False)
    assert len(sparsity) == 28 and rep["range"][1] - rep["range"][0] == pytest.approx(0.1)
    sparsity, rep = apply_where(_parse("--allocation", "owl", "--sparsity", "0.7"), _llama(), ids, progress=False)
    assert sum(sparsity.values()) / 28 == pytest.approx(0.7)
    model = _llama()
    sparsity, rep = apply_where(_parse("--remove-layers", "2"), model, ids, progress=False)
    assert sparsity is None and rep["compensate"] and model.config.num_hidden_layers == 2
    model = _llama()
    sparsity, rep = apply_where(_parse("--collapse-layers", "2", "--laco-c", "3", "--laco-t", "-2"), model, ids,
                                progress=False)
    assert sparsity is None and rep["removed"] == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="exclude"):
        apply_where(_parse("--remove-layers", "1", "--collapse-layers", "1"), _llama(), ids)
    with pytest.raises(ValueError, match="calibration"):
        apply_where(_parse("--allocation", "owl"), _llama(), None)
