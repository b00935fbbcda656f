"""LaCo layer collapse: RDSC merge (formula and published-code variant), search, reload, KV cache."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from laco_kernels.models.adapters import get_adapter
from laco_kernels.prune.collapse import collapse_layers, rdsc_merge
from laco_kernels.prune.layer_removal import remove_blocks, save_model

_CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, initializer_range=0.2)
_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _llama():
    return LlamaForCausalLM(LlamaConfig(**_CFG)).eval()


def _qwen2():  # q/k/v biases: merged too
    return Qwen2ForCausalLM(Qwen2Config(**_CFG)).eval()


def _ids(n=4, t=16):
    return torch.randint(0, 100, (n, t))


def _randomise_norms(model):
    """Norm weights (and biases, which init to zero) made distinct per block."""
    with torch.no_grad():
        for b in model.model.layers:
            for n in _LINEARS:
                if b.get_submodule(n).bias is not None:
                    b.get_submodule(n).bias.normal_()
            for n in ("input_layernorm", "post_attention_layernorm"):
                b.get_submodule(n).weight.uniform_(0.5, 1.5)


@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_rdsc_formula_and_published_variant(make):
    model = make()
    _randomise_norms(model)
    blocks = model.model.layers
    adapter = get_adapter(model)
    merged = rdsc_merge(blocks[1], [blocks[2], blocks[3]], adapter)
    code = rdsc_merge(blocks[1], [blocks[2], blocks[3]], adapter, variant="published-code")
    for name in _LINEARS:
        for attr in ("weight", "bias"):
            base = getattr(blocks[1].get_submodule(name), attr)
            if base is None:
                continue
            t2, t3 = (getattr(blocks[j].get_submodule(name), attr) for j in (2, 3))
            torch.testing.assert_close(getattr(merged.get_submodule(name), attr), base + (t2 - base) + (t3 - base))
            torch.testing.assert_close(getattr(code.get_submodule(name), attr), t3)
    if isinstance(model, Qwen2ForCausalLM):
        assert not torch.equal(merged.self_attn.q_proj.bias, blocks[1].self_attn.q_proj.bias)
    for n in ("input_layernorm", "post_attention_layernorm"):  # norms are the base block's
        torch.testing.assert_close(merged.get_submodule(n).weight, blocks[1].get_submodule(n).weight)
        torch.testing.assert_close(code.get_submodule(n).weight, blocks[1].get_submodule(n).weight)
    with pytest.raises(ValueError, match="variant"):
        rdsc_merge(blocks[1], [blocks[2]], adapter, variant="x")


def test_search_order_accept_all():
    model = _llama()
    seen = []
    report = collapse_layers(model, _ids(), C=2, I=2, T=-2.0, L=1, progress=False,
                             on_merge=lambda m, r: seen.append((r["removed"], len(m.model.layers))))
    # l = 6-2 = 4: merge (4,5); l = 2: merge (2,3); l = 0 < L: stop
    assert report["merges"] == [[4, 5], [2, 3]]
    assert seen == [(1, 5), (2, 4)]
    assert report["removed"] == 2 and report["num_layers"] == 4 == model.config.num_hidden_layers


def test_similarity_matches_merged_model_and_threshold_rejects():
    model = _llama()
    ids = _ids()
    manual = copy.deepcopy(model)
    with torch.no_grad():
        ref = manual(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        manual.model.layers[3] = rdsc_merge(manual.model.layers[3], [manual.model.layers[4], manual.model.layers[5]],
                                            get_adapter(manual))
        remove_blocks(manual, [4, 5])
        cand = manual(ids, output_hidden_states=True).hidden_states[-1]
    sim = float(F.cosine_similarity(cand, ref, dim=-1).mean())
    probe = copy.deepcopy(model)
    report = collapse_layers(probe, ids, C=3, I=1, T=sim + 1e-4, L=3, progress=False)
    assert report["trials"][0][0] == 3 and report["trials"][0][1] == pytest.approx(sim, abs=1e-5)
    assert report["trials"][0][2] is False and report["removed"] == 0
    report = collapse_layers(model, ids, C=3, I=1, T=sim - 1e-4, L=3, progress=False)
    assert report["merges"] == [[3, 4, 5]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, manual(ids).logits)


@pytest.mark.parametrize("make", [_llama, _qwen2])
@pytest.mark.parametrize("variant", ["formula", "published-code"])
def test_collapsed_model_reloads_and_caches(make, variant, tmp_path):
    model = make()
    ids = _ids()
    report = collapse_layers(model, ids, C=3, I=1, T=-2.0, target_removed=3, variant=variant, progress=False)
    assert report["removed"] == 3 and report["reached_target"]
    assert [len(m) for m in report["merges"]] == [3, 2]  # the last merge absorbs only what is left
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == 3
    with torch.no_grad():
        full = model(ids).logits
        pkv = model(ids[:, :9], use_cache=True).past_key_values
        inc = model(ids[:, 9:], past_key_values=pkv, use_cache=True).logits
    torch.testing.assert_close(inc, full[:, 9:], atol=1e-4, rtol=1e-4)
    save_model(model, str(tmp_path / "c"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "c")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, full, atol=0, rtol=0)


def test_bad_arguments():
    model = _llama()
    with pytest.raises(ValueError, match="C >= 2"):
        collapse_layers(model, _ids(), C=1)
    with pytest.raises(ValueError, match="target_removed"):
        collapse_layers(model, _ids(), target_removed=6)
    with pytest.raises(ValueError, match="calibration"):
        collapse_layers(model, torch.randn(2, 4))
