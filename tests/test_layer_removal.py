"""Prune&Comp layer removal: metrics, compensation, structural edits, plain-transformers reload."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from laco_kernels.prune.layer_removal import (apply_compensation, block_statistics, compensation_scale,
                                              layer_importance, remove_blocks, remove_layers, save_model,
                                              untie_lm_head)

_CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, initializer_range=0.2, rms_norm_eps=1e-8)


def _llama(tied=True):
    return LlamaForCausalLM(LlamaConfig(**_CFG, tie_word_embeddings=tied)).eval()


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**_CFG)).eval()


def _ids(n=4, t=16):
    return torch.randint(0, 100, (n, t))


def _kv_consistent(model, ids, split=10):
    """Incremental decoding through the KV cache reproduces the full forward."""
    with torch.no_grad():
        full = model(ids).logits
        pkv = model(ids[:, :split], use_cache=True).past_key_values
        inc = model(ids[:, split:], past_key_values=pkv, use_cache=True).logits
    torch.testing.assert_close(inc, full[:, split:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_compensation_without_removal_keeps_logits(make):
    model = make()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        apply_compensation(model, 3.7, upto=len(model.model.layers))
        out = model(ids).logits
        # the stream really was scaled (the test would pass trivially otherwise)
        assert not torch.allclose(model.model.embed_tokens.weight, model.lm_head.weight)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_untie_lm_head_keeps_weights_and_config():
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert untie_lm_head(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False
    assert not untie_lm_head(model)


def test_block_statistics_match_hidden_states():
    model = _llama()
    ids = _ids()
    st = block_statistics(model, ids, progress=False)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[i]: input of block i (last is normed)
    for i in range(4):
        bi = (1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean()
        assert abs(float(st["bi"][i]) - float(bi)) < 1e-5
        torch.testing.assert_close(st["abs_mean"][i].float(), hs[i].abs().mean((0, 1)), atol=1e-5, rtol=1e-5)


def test_compensation_scale_formula():
    abs_mean = torch.tensor([[1.0, 2.0], [3.0, 2.0], [6.0, 8.0]], dtype=torch.float64)
    assert compensation_scale(abs_mean, 0) == pytest.approx((3.0 + 1.0) / 2)
    assert compensation_scale(abs_mean, 1) == pytest.approx((2.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="mean"):
        compensation_scale(torch.zeros(2, 2), 0)


def test_removal_with_compensation_scales_the_gap_input():
    """After removing block l with compensation, block l+1 receives exactly s * x_l."""
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    report = remove_layers(model, 1, ids, metric="magnitude", iterative=True, compensate=True, progress=False)
    (pos,), (s,) = report["removed"], report["scales"]
    assert s > 0 and s != 1.0
    with torch.no_grad():
        new = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(new[pos], s * hs[pos], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_iterative_bi_removes_least_influential_and_reloads(make, tmp_path):
    model = make()
    ids = _ids()
    bi0 = layer_importance(model, ids, "bi", progress=False)
    report = remove_layers(model, 2, ids, metric="bi", iterative=True, compensate=True, progress=False)
    assert report["removed"][0] == int(torch.tensor(bi0).argmin())
    assert len(report["importance"]) == 2 and len(report["importance"][1]) == 4
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    _kv_consistent(model, ids)
    save_model(model, str(tmp_path / "m"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_one_shot_uses_initial_ranking():
    model = _llama()
    ids = _ids()
    imp = layer_importance(model, ids, "bi", progress=False)
    report = remove_layers(model, 2, ids, metric="bi", iterative=False, compensate=False, progress=False)
    assert sorted(report["removed"]) == sorted(torch.tensor(imp).argsort()[:2].tolist())
    assert report["scales"] == [None, None]


def test_perplexity_and_taylor_metrics():
    model = _llama()
    ids = _ids()
    ppl = layer_importance(model, ids, "perplexity", progress=False)
    manual = copy.deepcopy(model)
    remove_blocks(manual, [2])
    with torch.no_grad():
        assert ppl[2] == pytest.approx(float(manual(ids, labels=ids).loss), rel=1e-5)
    taylor = layer_importance(model, ids, "taylor", batch_size=2, progress=False)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    blk = model.model.layers[3]
    expect = sum(float((blk.get_submodule(n).weight.detach() * blk.get_submodule(n).weight.grad).abs().sum()) for n in names)
    assert taylor[3] == pytest.approx(expect, rel=1e-4)
    mag = layer_importance(model, None, "magnitude")
    assert mag[0] == pytest.approx(sum(float(model.model.layers[0].get_submodule(n).weight.abs().sum())
                                       for n in names), rel=1e-5)


def test_bad_input():
    model = _llama()
    with pytest.raises(ValueError, match="metric"):
        layer_importance(model, _ids(), "nope")
    with pytest.raises(ValueError, match="n_remove"):
        remove_layers(model, 5, _ids())
    with pytest.raises(ValueError, match="calibration"):
        remove_layers(model, 1, torch.randn(2, 8))
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(model, [7])
    with pytest.raises(ValueError, match="scale"):
        apply_compensation(model, -1.0, 2)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fault", ["weights", "tokenizer", "swap"])
def test_save_model_fault_keeps_old_folder_or_nothing(tmp_path, monkeypatch, existing, fault):
    """Issue 13: a save that fails at the weights, the tokenizer or the swap leaves the old
    complete folder (or no folder) and no temporary."""
    from _faults import InjectedFault, inject, leftovers, snapshot
    from _tiny import tiny_model, tiny_tokenizer

    from laco_kernels import _atomic

    model, tok = tiny_model(layers=2), tiny_tokenizer()
    out = str(tmp_path / "m")
    if existing:
        save_model(model, out, tok)
    before = snapshot(out)
    if fault == "weights":
        real = type(model).save_pretrained

        def half_then_fail(self, folder, **kw):
            real(self, folder, **kw)
            raise InjectedFault("disk full after the weights")
        monkeypatch.setattr(type(model), "save_pretrained", half_then_fail)
    elif fault == "tokenizer":
        monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(InjectedFault("x")))
    else:
        inject(monkeypatch, _atomic, "_fsync_tree", 1)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the new save would differ
    with pytest.raises(InjectedFault):
        save_model(model, out, tok)
    monkeypatch.undo()
    assert snapshot(out) == before and leftovers(tmp_path) == []
