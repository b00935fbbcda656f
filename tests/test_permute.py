"""Channel permutation before N:M selection (laco_kernels.prune.permute)."""
import pytest
import torch

from laco_kernels.models.adapters import get_adapter, get_module
from laco_kernels.prune import prune_model
from laco_kernels.prune.masks import is_nm
from laco_kernels.prune.permute import group_cost, nm_channel_permutation, permute_block_
from laco_kernels.prune.sparsegpt import HessianAccumulator
from laco_kernels.prune.wanda import SqNormAccumulator

from _tiny import FAMILIES, random_ids, tiny_model


def _brute_group_cost(sal, n, m):
    g = sal.reshape(sal.shape[0], -1, m)
    return g.sort(-1).values[..., : m - n].double().sum(dim=(0, 2))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_group_cost_matches_sorting(nm):
    sal = torch.rand(7, 5 * nm[1])
    torch.testing.assert_close(group_cost(sal, *nm), _brute_group_cost(sal, *nm))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("rows", [1, 33])
def test_permutation_is_a_permutation_and_never_worse(nm, rows):
    torch.manual_seed(0)
    cols = 12 * nm[1]
    sal = torch.rand(rows, cols) ** 2 * (torch.rand(cols) ** 4 * 50)  # outlier columns, as real inputs have
    perm = nm_channel_permutation(sal, *nm, rounds=8)
    assert sorted(perm.tolist()) == list(range(cols))
    before, after = group_cost(sal, *nm).sum(), group_cost(sal[:, perm], *nm).sum()
    assert after < before * 0.95  # outlier columns spread out: clearly better than the identity


def test_permutation_keeps_a_perfect_order():
    # every group already holds two zero columns: the identity is optimal and must be kept
    sal = torch.tensor([[0.0, 0.0, 1.0, 1.0] * 4])
    perm = nm_channel_permutation(sal, 2, 4, rounds=4)
    assert float(group_cost(sal[:, perm], 2, 4).sum()) == 0.0


def test_swaps_improve_on_the_start():
    torch.manual_seed(1)
    sal = torch.rand(64, 256) ** 3
    c0 = group_cost(sal[:, nm_channel_permutation(sal, rounds=0)], 2, 4).sum()
    c8 = group_cost(sal[:, nm_channel_permutation(sal, rounds=8)], 2, 4).sum()
    assert c8 < c0


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 6), "multiple of m=4"),
    (torch.rand(8), "2-D float"),
    (torch.ones(4, 8, dtype=torch.long), "2-D float"),
    (-torch.rand(4, 8), "non-negative"),
    (torch.full((4, 8), float("nan")), "finite"),
])
def test_bad_saliency_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        nm_channel_permutation(bad, 2, 4)


@pytest.mark.parametrize("family", [f for f in FAMILIES])
@pytest.mark.parametrize("acc_type", [HessianAccumulator, SqNormAccumulator])
def test_permute_block_keeps_the_function(family, acc_type):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = random_ids(2, 16)
    before = model(input_ids=ids).logits
    block = get_module(model, adapter.blocks)[1]
    stats = {}
    handles = []
    for name in (adapter.down, adapter.o):
        stats[name] = acc = acc_type()
        handles.append(get_module(block, name).register_forward_hook(lambda _m, a, _o, acc=acc: acc.add(a[0])))
    model(input_ids=ids)
    for h in handles:
        h.remove()
    old = {n: s.result().clone() for n, s in stats.items()}
    out = permute_block_(block, adapter, model.config, stats, 2, 4, rounds=4)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert "down" in out and out["down"][1] <= out["down"][0]
    # the statistics follow the new order: recomputing them on the permuted block gives the same
    fresh = {n: acc_type() for n in stats}
    handles = [get_module(block, n).register_forward_hook(lambda _m, a, _o, acc=acc: acc.add(a[0]))
               for n, acc in fresh.items()]
    model(input_ids=ids)
    for h in handles:
        h.remove()
    for n in stats:
        torch.testing.assert_close(stats[n].result(), fresh[n].result(), rtol=1e-4, atol=1e-4)
    if adapter.v:  # families with a separate value projection reorder the value channels too
        assert "o" in out and out["o"][1] <= out["o"][0]
    else:
        assert "o" not in out


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_model_with_permutation_is_2_4_and_not_worse(method):
    ids = random_ids(8, 32, seed=3)
    plain, perm = tiny_model("llama", seed=5), tiny_model("llama", seed=5)
    r0 = prune_model(plain, method, pattern="2:4", calibration=ids, progress=False)
    r1 = prune_model(perm, method, pattern="2:4", calibration=ids, progress=False, permute=8)
    for lin in (get_module(b, n) for b in get_module(perm, "model.layers") for n in get_adapter(perm).linear_names()):
        assert is_nm(lin.weight != 0, 2, 4)
    assert len(r1["permutation"]) == 3 and all(d["down"]["after"] <= d["down"]["before"] for d in r1["permutation"])
    assert "permutation" not in r0
    # a better grouping loses less of the block outputs in total (tiny models: not per block)
    assert sum(r1["block_error"]) < sum(r0["block_error"]) * 1.05


def test_prune_model_permute_bad_arguments():
    model = tiny_model("llama")
    w0 = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="N:M pattern"):
        prune_model(model, "wanda", 0.5, calibration=random_ids(), progress=False, permute=True)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_model(model, "magnitude", pattern="2:4", progress=False, permute=True)
    with pytest.raises(ValueError, match="swap rounds"):
        prune_model(model, "wanda", pattern="2:4", calibration=random_ids(), progress=False, permute=-1)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_permute_parts_and_the_config_mark():
    ids = random_ids(4, 16, seed=2)
    model = tiny_model("llama", seed=6)
    rep = prune_model(model, "sparsegpt", pattern="2:4", calibration=ids, progress=False, permute=2,
                      permute_parts=("mlp",))
    assert all(set(b) == {"down"} for b in rep["permutation"])
    assert model.config.laco_channels_permuted == ["mlp"]
    assert model.config.to_dict()["laco_channels_permuted"] == ["mlp"]  # saved with the model
    both = tiny_model("llama", seed=6)
    prune_model(both, "wanda", pattern="2:4", calibration=ids, progress=False, permute=2)
    assert both.config.laco_channels_permuted == ["mlp", "value"]
    plain = tiny_model("llama", seed=6)
    prune_model(plain, "wanda", pattern="2:4", calibration=ids, progress=False)
    assert getattr(plain.config, "laco_channels_permuted", None) is None


@pytest.mark.parametrize("parts", [(), ("mlp", "heads"), "mlp", 3])
def test_bad_permute_parts_raise_before_any_change(parts):
    model = tiny_model("llama")
    w0 = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="permute_parts must be"):
        prune_model(model, "wanda", pattern="2:4", calibration=random_ids(), progress=False, permute=True,
                    permute_parts=parts)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_consumers_that_compare_channels_refuse_a_permuted_model():
    """RestoreLCC compares o-projection inputs with the dense model's, layer collapse merges the
    weights of adjacent blocks: both would be silently wrong on reordered channels, so they raise."""
    from laco_kernels.prune.collapse import collapse_layers
    from laco_kernels.recover.restore_lcc import restore_lcc

    ids = random_ids(4, 16, seed=2)
    dense = tiny_model("llama", seed=6)
    mlp_only = tiny_model("llama", seed=6)
    prune_model(mlp_only, "wanda", pattern="2:4", calibration=ids, progress=False, permute=2, permute_parts=["mlp"])
    with pytest.raises(ValueError, match="layer collapse .* reordered by prune_model"):
        collapse_layers(mlp_only, ids, C=2, progress=False)
    value = tiny_model("llama", seed=6)
    prune_model(value, "wanda", pattern="2:4", calibration=ids, progress=False, permute=2)
    with pytest.raises(ValueError, match="RestoreLCC .* value channels"):
        restore_lcc(dense, value, pairs=[("a", "b")] * 4)


@pytest.mark.parametrize("kw, match", [(dict(rounds=-1), "rounds must be"), (dict(rounds=1.5), "rounds must be"),
                                       (dict(max_rows=0), "max_rows must be"), (dict(n=2, m=2), "0 < n < m")])
def test_bad_search_arguments_raise(kw, match):
    args = dict(n=2, m=4)
    args.update({k: kw.pop(k) for k in ("n", "m") if k in kw})
    with pytest.raises(ValueError, match=match):
        nm_channel_permutation(torch.rand(4, 8), args["n"], args["m"], **kw)


@pytest.mark.parametrize("bad, match", [("nan-o", "finite"), ("parts", "parts must be"), ("nm", "0 < n < m")])
def test_permute_block_checks_everything_before_moving_a_weight(bad, match):
    """A failure in the value part (a NaN weight in o) comes after the MLP order is chosen: the MLP
    weights must not have moved either."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    block = get_module(model, adapter.blocks)[0]
    if bad == "nan-o":
        with torch.no_grad():
            get_module(block, adapter.o).weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in block.state_dict().items()}
    kw = dict(parts=("mlp", "heads")) if bad == "parts" else {}
    n, m = (4, 4) if bad == "nm" else (2, 4)
    with pytest.raises(ValueError, match=match):
        permute_block_(block, adapter, model.config, {}, n, m, rounds=2, **kw)
    for k, v in block.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert getattr(model.config, "laco_channels_permuted", None) is None
