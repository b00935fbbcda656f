"""Magnitude pruning and the prune_model driver's plumbing (validation, per-layer dicts, untouched head)."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from _tiny import FAMILIES, random_ids, tiny_model
from laco_kernels.prune import METHODS, prunable_linears, prune_model
from laco_kernels.prune.magnitude import magnitude_prune_
from laco_kernels.prune.masks import is_nm, n_pruned


def test_magnitude_prune_linear():
    lin = nn.Linear(10, 3, bias=True)
    w = lin.weight.detach().clone()
    mask = magnitude_prune_(lin, 0.4)
    assert (mask.sum(1) == 6).all()
    assert torch.equal(lin.weight, w * mask)
    for r in range(3):
        assert w[r].abs()[mask[r]].min() >= w[r].abs()[~mask[r]].max()
    lin = nn.Linear(8, 3)
    w = lin.weight.detach().clone()
    mask = magnitude_prune_(lin, 0.5, "2:4")
    assert is_nm(mask, 2, 4) and torch.equal(lin.weight, w * mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern,sparsity", [(None, 0.3), ("2:4", 0.5), ("4:8", None)])
def test_prune_model_magnitude_every_family(family, pattern, sparsity):
    model = tiny_model(family)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if n not in {f"{k}.weight" for k in prunable_linears(model)}}
    dense = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    report = prune_model(model, "magnitude", sparsity, pattern, progress=False)
    assert report["block_error"] is None and report["calibration"] is None
    for name, lin in prunable_linears(model).items():
        w = lin.weight
        if pattern:
            assert is_nm(w != 0, *map(int, pattern.split(":")))
            assert report["layers"][name] == pytest.approx(0.5)
        else:
            assert ((w == 0).sum(1) == n_pruned(w.shape[1], sparsity)).all()
        assert torch.equal(w, dense[name] * (w != 0))  # magnitude never updates kept weights
    # embeddings, LM head, norms and biases are untouched
    for n, p in model.named_parameters():
        if n in untouched:
            assert torch.equal(p, untouched[n]), n


def test_per_layer_sparsity_dict():
    model = tiny_model("llama")
    names = list(prunable_linears(model))
    spec = {names[0]: 0.25, names[5]: 0.75, "model.layers.2.mlp.down_proj": 0.5}
    report = prune_model(model, "magnitude", spec, progress=False)
    assert report["sparsity"] == "per-layer"
    for name in names:
        want = spec.get(name, 0.0)
        in_f = prunable_linears(model)[name].in_features
        assert report["layers"][name] == pytest.approx(n_pruned(in_f, want) / in_f), name


def test_magnitude_with_calibration_reports_block_errors():
    model = tiny_model("llama")
    report = prune_model(model, "magnitude", 0.5, calibration=random_ids(4, 8), progress=False)
    assert len(report["block_error"]) == 3 and all(e > 0 for e in report["block_error"])
    assert report["calibration"] == [4, 8] and report["seconds"] > 0
    assert report["overall_sparsity"] == pytest.approx(0.5)


def test_sparsity_zero_leaves_model_unchanged():
    model = tiny_model("qwen2")
    before = copy.deepcopy(model.state_dict())
    prune_model(model, "magnitude", 0.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_methods_list():
    assert set(METHODS) == {"magnitude", "wanda", "sparsegpt"}


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(method="obs"), ValueError, "unknown pruning method 'obs'"),
    (dict(method="magnitude", pattern="3:2"), ValueError, "pattern '3:2' is not N:M with N < M"),
    (dict(method="magnitude", pattern="2/4"), ValueError, "not of the form 'N:M'"),
    (dict(method="magnitude", sparsity=1.0), ValueError, r"in \[0, 1\)"),
    (dict(method="magnitude", sparsity=-0.2), ValueError, r"in \[0, 1\)"),
    (dict(method="magnitude", sparsity=0.6, pattern="2:4"), ValueError, "prunes 50.00% of the weights but sparsity=0.6"),
    (dict(method="magnitude", sparsity={"model.layers.0.mlp.up_proj": 0.5}, pattern="2:4"), ValueError, "need pattern=None"),
    (dict(method="magnitude", sparsity={"lm_head": 0.5}), ValueError, "not prunable linears"),
    (dict(method="magnitude", sparsity={"model.layers.0.mlp.up_proj": 1.2}), ValueError, "up_proj"),
    (dict(method="magnitude", sparsity=None), ValueError, "give a sparsity"),
    (dict(method="wanda"), ValueError, "wanda needs calibration"),
    (dict(method="sparsegpt", calibration=torch.rand(2, 8)), ValueError, "integer tensor of token ids"),
])
def test_prune_model_errors(kwargs, err, msg):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=msg):
        prune_model(model, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned


def test_prune_model_without_adapter():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no adapter for model_type 'gpt2'"):
        prune_model(model, "magnitude", 0.5)
