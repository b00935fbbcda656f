"""LSA sparsity allocation: the second-order error, the statistics path, the spread per granularity."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from laco_kernels.prune._allocation import spread
from laco_kernels.prune.lsa import _obs_prune, lsa_allocation, lsa_errors, reconstruction_error, resolve_alpha

_CFG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, initializer_range=0.2)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**_CFG)).eval()


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**_CFG)).eval()


def _ids(n=4, t=16):
    return torch.randint(0, 100, (n, t))


@pytest.mark.parametrize("cols,blocksize", [(200, 64), (37, 128), (1, 128)])
def test_error_is_the_quadratic_form_of_the_update(cols, blocksize):
    x = torch.randn(300, cols) * (torch.rand(cols) * 3 + 0.1)
    w = torch.randn(9, cols)
    h = 2 / 300 * x.t() @ x
    err, pruned, h_damped = _obs_prune(w, h, 0.5, blocksize, 0.01)
    d = (w - pruned).double()
    assert err == pytest.approx(0.5 * float(torch.einsum("ri,ij,rj->", d, h_damped.double(), d)), rel=1e-4)
    for i1 in range(0, cols, blocksize):  # half of every row of every column block is zero
        n = min(blocksize, cols - i1)
        assert bool(((pruned[:, i1:i1 + n] == 0).sum(1) == n // 2).all())
    # the OBS update makes it no worse than zeroing the same weights without an update
    zeroed = torch.where(pruned == 0, torch.zeros_like(w), w).double() - w.double()
    assert err <= 0.5 * float(torch.einsum("ri,ij,rj->", zeroed, h_damped.double(), zeroed)) * (1 + 1e-6)


def test_error_bad_shapes():
    with pytest.raises(ValueError, match="hessian"):
        reconstruction_error(torch.randn(4, 8), torch.randn(7, 7))
    with pytest.raises(ValueError, match="ratio"):
        reconstruction_error(torch.randn(4, 8), torch.eye(8), ratio=1.0)


@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_errors_use_dense_inputs_of_every_linear(make):
    model = make()
    ids = _ids()
    errors = lsa_errors(model, ids, batch_size=3, progress=False)
    assert len(errors) == 3 * 7 and all(e > 0 for e in errors.values())
    assert list(errors)[0] == "model.layers.0.self_attn.q_proj"
    # the Hessian of block 1's down_proj from hooks on the full model
    lin = model.model.layers[1].mlp.down_proj
    xs = []
    handle = lin.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat(xs)
    h = 2 / x.shape[0] * x.t() @ x
    assert errors["model.layers.1.mlp.down_proj"] == pytest.approx(reconstruction_error(lin.weight, h), rel=1e-3)


def _fake_errors(model, rng):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    return {n: float(v) for n, v in zip(names, torch.rand(len(names), generator=rng) + 0.1)}


@pytest.mark.parametrize("granularity,units", [("layer", 3), ("block", 6), ("projection", 21)])
def test_allocation_spread(granularity, units):
    model = _llama()
    errors = _fake_errors(model, torch.Generator().manual_seed(1))
    alloc = lsa_allocation(model, 0.7, errors=errors, granularity=granularity)
    assert len(alloc) == 21
    sizes = {n: model.get_submodule(n).weight.numel() for n in alloc}
    overall = sum(alloc[n] * sizes[n] for n in alloc) / sum(sizes.values())
    assert overall == pytest.approx(0.7, abs=1e-9)
    values = sorted(set(round(v, 12) for v in alloc.values()))
    assert len(values) == units
    assert values[-1] - values[0] == pytest.approx(2 * 0.15)
    # importance 1 - E/sum(E): the unit with the smallest error is the densest, the largest the sparsest
    reverse = lsa_allocation(model, 0.7, errors=errors, granularity=granularity, reverse=True)
    if granularity == "projection":
        assert alloc[min(errors, key=errors.get)] == pytest.approx(values[0])
        assert alloc[max(errors, key=errors.get)] == pytest.approx(values[-1])
        assert reverse[max(errors, key=errors.get)] == pytest.approx(min(reverse.values()))
    if granularity == "layer":
        per_layer = [sum(v for n, v in errors.items() if f"layers.{i}." in n) for i in range(3)]
        worst = max(range(3), key=lambda i: per_layer[i])
        assert alloc[f"model.layers.{worst}.mlp.up_proj"] == pytest.approx(values[-1])
        assert reverse[f"model.layers.{worst}.mlp.up_proj"] == pytest.approx(min(reverse.values()))


def test_allocation_end_to_end_and_alpha():
    model = _qwen2()
    alloc = lsa_allocation(model, 0.5, _ids(), granularity="block", progress=False)
    assert set(alloc) == {f"model.layers.{i}.{n}" for i in range(3) for n in
                          ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    assert max(alloc.values()) - min(alloc.values()) == pytest.approx(0.08)
    assert resolve_alpha(0.7, None) == 0.15 and resolve_alpha(0.6, 0.1) == 0.1
    with pytest.raises(ValueError, match="alpha"):
        resolve_alpha(0.6, None)
    with pytest.raises(ValueError, match="granularity"):
        lsa_allocation(model, 0.5, errors={}, granularity="row")
    with pytest.raises(ValueError, match="calibration"):
        lsa_allocation(model, 0.5)


def test_spread_rules():
    s = spread([0.0, 1.0, 0.5], 0.5, 0.1)
    assert s == pytest.approx([0.6, 0.4, 0.5])
    assert spread([2.0, 2.0], 0.3, 0.1) == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match="leaves"):
        spread([0.0, 1.0], 0.95, 0.2)
    with pytest.raises(ValueError, match="target"):
        spread([0.0, 1.0], 1.5, 0.1)


def test_allocation_feeds_prune_model():
    from laco_kernels.prune import prune_model

    model = _llama()
    ids = _ids()
    alloc = lsa_allocation(model, 0.7, ids, granularity="projection", progress=False)
    report = prune_model(model, "wanda", alloc, calibration=ids, progress=False)
    for name, target in alloc.items():
        assert abs(report["layers"][name] - target) < 1.5 / model.get_submodule(name).weight.shape[1]
    assert abs(report["overall_sparsity"] - 0.7) < 0.01
