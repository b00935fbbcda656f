"""OWL allocation: outlier ratios from the dense inputs, the spread around the target."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from laco_kernels.prune.owl import outlier_ratios, owl_allocation

_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def _ids(n=4, t=16):
    return torch.randint(0, 100, (n, t))


def test_outlier_ratios_match_full_model_hooks():
    model = _llama()
    ids = _ids()
    ratios = outlier_ratios(model, ids, M=3.0, batch_size=3, progress=False)
    inputs = {}
    handles = [model.model.layers[2].get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.update({n: a[0].reshape(-1, a[0].shape[-1])})) for n in _NAMES]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    scores = torch.cat([(model.model.layers[2].get_submodule(n).weight.abs() * inputs[n].norm(dim=0)).flatten()
                        for n in _NAMES])
    assert ratios[2] == pytest.approx(float((scores > 3.0 * scores.mean()).float().mean()), abs=1e-6)
    assert len(ratios) == 4 and all(0 <= r < 1 for r in ratios)


def test_allocation_follows_outliers():
    model = _llama()
    ratios = [0.01, 0.04, 0.02, 0.03]
    alloc = owl_allocation(model, 0.7, ratios=ratios, lam=0.08)
    per_block = [alloc[f"model.layers.{i}.mlp.up_proj"] for i in range(4)]
    assert per_block == pytest.approx([0.78, 0.62, 0.7 + 0.08 - 0.16 / 3, 0.7 + 0.08 - 0.32 / 3])
    assert sum(per_block) / 4 == pytest.approx(0.7)
    assert all(alloc[f"model.layers.1.{n}"] == per_block[1] for n in _NAMES)


def test_opt_family_end_to_end():
    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                                     vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    alloc = owl_allocation(model, 0.5, _ids(), progress=False)
    assert "model.decoder.layers.0.fc1" in alloc and len(alloc) == 3 * 6
    assert sum(alloc.values()) / len(alloc) == pytest.approx(0.5)


def test_bad_arguments():
    model = _llama()
    with pytest.raises(ValueError, match="M must"):
        outlier_ratios(model, _ids(), M=0)
    with pytest.raises(ValueError, match="4 blocks"):
        owl_allocation(model, 0.5, ratios=[0.1, 0.2])
    with pytest.raises(ValueError, match="calibration"):
        owl_allocation(model, 0.5)
