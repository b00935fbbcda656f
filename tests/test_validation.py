"""_validation.py and its use at every pipeline entry (issue 13 classes 2, 3 and 4).

Each bad input must fail with an error naming the argument, before any weight changes.
"""

import pytest
import torch
from _recover_util import dense_and_pruned, tiny_llama
from _tiny import tiny_model

from laco_kernels._validation import (check_models_match, check_token_ids, describe_folder, describe_module,
                                      model_limits)
from laco_kernels.prune import prune_model
from laco_kernels.recover import layerwise


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return all(torch.equal(after[k], v) for k, v in before.items())


# -- check_token_ids -----------------------------------------------------------------------------
BAD_IDS = [
    ([[1, 2]], "integer tensor of token ids.*got list"),
    (torch.rand(2, 8), "integer tensor of token ids.*float32"),
    (torch.ones(8, dtype=torch.long), "2-D"),
    (torch.ones(2, 3, 4, dtype=torch.long), "2-D"),
    (torch.ones(0, 8, dtype=torch.long), "empty"),
    (torch.ones(2, 0, dtype=torch.long), "empty"),
    (torch.full((2, 8), 100), r"token id 100 at \[0, 0\].*\[0, 100\)"),
    (torch.tensor([[1, 2, 3], [4, 5, -1]]), r"token id -1 at \[1, 2\]"),
    (torch.ones(1, 129, dtype=torch.long), "129 tokens.*at most 128 positions"),
]


@pytest.mark.parametrize("ids,msg", BAD_IDS)
def test_check_token_ids_rejects(ids, msg):
    model = tiny_model(layers=1)  # vocab 100, 128 positions
    with pytest.raises(ValueError, match=f"calibration.*{msg}|{msg}"):
        check_token_ids(ids, model)


def test_check_token_ids_accepts_and_widens():
    model = tiny_model(layers=1)
    out = check_token_ids(torch.tensor([[0, 99]], dtype=torch.int32), model)
    assert out.dtype == torch.int64 and out.tolist() == [[0, 99]]
    assert model_limits(tiny_model("gpt_neox", layers=1)) == (100, 128)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("ids,msg", [(b[0], b[1]) for b in BAD_IDS[4:]])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_rejects_bad_calibration_before_any_change(family, ids, msg, method):
    model = tiny_model(family, layers=2)
    before = _state(model)
    with pytest.raises(ValueError, match=msg):
        prune_model(model, method, sparsity=0.5, calibration=ids, progress=False)
    assert _unchanged(model, before)


@pytest.mark.parametrize("ids,msg", [(b[0], b[1]) for b in BAD_IDS])
def test_layerwise_rejects_bad_calibration_before_any_change(ids, msg):
    dense, pruned = dense_and_pruned("2:4", layers=1)
    pruned.config.max_position_embeddings = 128
    before = _state(pruned)
    with pytest.raises(ValueError, match=msg.replace("100", "100")):
        layerwise(dense, pruned, ids, epochs=1, progress=False)
    assert _unchanged(pruned, before)


def test_other_pipelines_reject_bad_ids():
    from laco_kernels.eval.perplexity import window_nll
    from laco_kernels.prune.collapse import collapse_layers
    from laco_kernels.prune.layer_removal import layer_importance, remove_layers
    from laco_kernels.recover import lora

    model = tiny_model(layers=3)
    before = _state(model)
    big = torch.full((2, 8), 100)
    long = torch.ones(1, 200, dtype=torch.long)
    for call in (lambda ids: remove_layers(model, 1, ids, progress=False),
                 lambda ids: layer_importance(model, ids, progress=False),
                 lambda ids: collapse_layers(model, ids, C=2, I=1, progress=False),
                 lambda ids: window_nll(model, ids, progress=False),
                 lambda ids: lora(model, ids, progress=False)):
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            call(big)
        with pytest.raises(ValueError, match="at most 128 positions"):
            call(long)
    assert _unchanged(model, before)


def test_perplexity_checks_seqlen_before_reading_data():
    from laco_kernels.eval import perplexity

    with pytest.raises(ValueError, match="seqlen=4096 exceeds the model's 128 positions"):
        perplexity(tiny_model(layers=1), tokenizer=None, seqlen=4096)


# -- class 2: mismatched model pairs --------------------------------------------------------------
def _mismatches():
    _, pruned = dense_and_pruned("2:4", layers=2)
    return pruned, {
        "intermediate size": (tiny_llama(layers=2, inter=96), r"block 0 mlp.gate_proj: dense_model has weight "
                                                              r"shape \(96, 64\) but pruned_model has \(128, 64\)"),
        "hidden size": (tiny_llama(layers=2, hidden=32), r"block 0 self_attn.q_proj"),
        "block count": (tiny_llama(layers=3), "dense_model has 3 blocks but pruned_model has 2"),
        "family": (tiny_model("opt", layers=2), "dense_model is opt.*pruned_model is llama"),
    }


@pytest.mark.parametrize("case", ["intermediate size", "hidden size", "block count", "family"])
def test_layerwise_rejects_mismatched_models_in_memory(case):
    pruned, cases = _mismatches()
    dense, msg = cases[case]
    before = _state(pruned)
    with pytest.raises(ValueError, match=msg):
        layerwise(dense, pruned, torch.ones(2, 8, dtype=torch.long), epochs=1, progress=False)
    assert _unchanged(pruned, before)


def test_layerwise_rejects_mismatched_models_on_disk(tmp_path):
    pruned, cases = _mismatches()
    pruned.save_pretrained(tmp_path / "pruned")
    dense, msg = cases["intermediate size"]
    dense.save_pretrained(tmp_path / "dense")
    assert describe_folder(str(tmp_path / "pruned")) == describe_module(pruned)
    with pytest.raises(ValueError, match=msg):
        layerwise(str(tmp_path / "dense"), str(tmp_path / "pruned"), torch.ones(2, 8, dtype=torch.long),
                  output_dir=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_check_models_match_names_a_later_block():
    a = ("llama (llama)", [{"q": (4, 4)}, {"q": (4, 4)}])
    b = ("llama (llama)", [{"q": (4, 4)}, {"q": (4, 8)}])
    with pytest.raises(ValueError, match=r"block 1 q: dense_model has weight shape \(4, 4\) but pruned_model has \(4, 8\)"):
        check_models_match(a, b)


def test_restore_lcc_rejects_mismatched_models():
    from laco_kernels.recover.restore_lcc import restore_lcc

    pruned, cases = _mismatches()
    dense, msg = cases["intermediate size"]
    with pytest.raises(ValueError, match=msg):
        restore_lcc(dense, pruned, None, progress=False)


# -- class 4: half-applied operations -------------------------------------------------------------
def _odd_in_features_model():
    model = tiny_model(layers=3)
    blk = model.model.layers[2]
    # 6 input features: not a multiple of 4 (a hand-modified projection)
    blk.mlp.down_proj = torch.nn.Linear(126, 64, bias=False)
    blk.mlp.up_proj = torch.nn.Linear(64, 126, bias=False)
    blk.mlp.gate_proj = torch.nn.Linear(64, 126, bias=False)
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_2_4_names_the_layer_and_changes_nothing(method):
    model = _odd_in_features_model()
    before = _state(model)
    calib = torch.randint(0, 100, (2, 8)) if method != "magnitude" else None
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.down_proj has weight \(64, 126\).*nothing was pruned"):
        prune_model(model, method, pattern="2:4", calibration=calib, progress=False)
    assert _unchanged(model, before)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_rejects_non_finite_weights_and_changes_nothing(method):
    model = tiny_model(layers=2)
    model.model.layers[1].self_attn.o_proj.weight.data[5, 7] = float("nan")
    before = _state(model)
    calib = torch.randint(0, 100, (2, 8)) if method != "magnitude" else None
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj.weight holds 1 non-finite.*\(5, 7\)"):
        prune_model(model, method, sparsity=0.5, calibration=calib, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())


@pytest.mark.parametrize("spec", ["nan*mse", "inf*mse", "-1*mse", "0*mse", "mse+nan*cosine", "1e400*token-nmse"])
def test_bad_loss_weights_rejected_before_any_change(spec):
    dense, pruned = dense_and_pruned("2:4", layers=1)
    before = _state(pruned)
    with pytest.raises(ValueError, match="finite and > 0"):
        layerwise(dense, pruned, torch.randint(0, 100, (2, 8)), loss=spec, epochs=1, progress=False)
    assert _unchanged(pruned, before)
