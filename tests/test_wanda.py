"""Wanda: score |W| * ||X_j||, per-row groups, statistics from the pruned stream block by block."""
import copy

import pytest
import torch
import torch.nn as nn

from _tiny import random_ids, tiny_model
from laco_kernels.models.adapters import block_linears, get_adapter
from laco_kernels.models.capture import BlockRunner
from laco_kernels.prune import prunable_linears, prune_model
from laco_kernels.prune.magnitude import magnitude_prune_
from laco_kernels.prune.masks import is_nm, n_pruned
from laco_kernels.prune.wanda import SqNormAccumulator, wanda_prune_, wanda_score


def test_accumulator_and_score():
    acc = SqNormAccumulator()
    xs = [torch.randn(2, 5, 6), torch.randn(3, 6)]
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 6) for x in xs])
    torch.testing.assert_close(acc.result(), (flat ** 2).sum(0))
    assert acc.tokens == 13
    w = torch.randn(4, 6)
    torch.testing.assert_close(wanda_score(w, acc.result()), w.abs() * flat.norm(dim=0))
    with pytest.raises(ValueError, match="sq_norm must have shape"):
        wanda_score(w, torch.ones(5))
    with pytest.raises(RuntimeError, match="no inputs"):
        SqNormAccumulator().result()


def test_wanda_equals_magnitude_iff_input_norms_equal():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8, bias=False)
    for pattern in (None, "2:4"):
        a, b = copy.deepcopy(lin), copy.deepcopy(lin)
        assert torch.equal(wanda_prune_(a, torch.full((16,), 3.0), 0.5, pattern), magnitude_prune_(b, 0.5, pattern))
        # channels 2, 3 of every 4 are 10^12 times louder: Wanda keeps exactly them, magnitude does not
        loud = torch.tensor([False, False, True, True]).repeat(4)
        sq_norm = torch.where(loud, 1e12, 1e-12)
        a, b = copy.deepcopy(lin), copy.deepcopy(lin)
        mw, mm = wanda_prune_(a, sq_norm, 0.5, pattern), magnitude_prune_(b, 0.5, pattern)
        assert torch.equal(mw, loud.expand(8, 16))
        assert not torch.equal(mw, mm)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), ("2:4", 0.5), ("4:8", 0.5), (None, 0.7)])
def test_prune_model_wanda_sparsity(family, pattern, sparsity):
    model = tiny_model(family)
    report = prune_model(model, "wanda", sparsity, pattern, random_ids(4, 8), batch_size=3, progress=False)
    assert len(report["block_error"]) == 3
    for name, lin in prunable_linears(model).items():
        w = lin.weight
        if pattern:
            assert is_nm(w != 0, *map(int, pattern.split(":"))), name
        assert ((w == 0).sum(1) == n_pruned(w.shape[1], sparsity)).all(), name


def test_wanda_differs_from_magnitude_on_a_model():
    ids = random_ids(4, 8)
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    prune_model(a, "wanda", 0.5, calibration=ids, progress=False)
    prune_model(b, "magnitude", 0.5, calibration=ids, progress=False)
    masks_a = [lin.weight != 0 for lin in prunable_linears(a).values()]
    masks_b = [lin.weight != 0 for lin in prunable_linears(b).values()]
    assert any(not torch.equal(x, y) for x, y in zip(masks_a, masks_b))


def _manual_wanda(model, ids, sequential):
    """Wanda by hand: block-1 masks from the pruned (sequential) or dense stream."""
    adapter = get_adapter(model)
    runner = BlockRunner(model, batch_size=4, stream_dtype=torch.float32, progress=False)
    stream = runner.capture(ids)
    masks = []
    for block in runner.blocks[:2]:
        accs = {n: SqNormAccumulator() for n in adapter.linear_names()}
        hs = [lin.register_forward_hook(lambda m, a, o, acc=accs[n]: acc.add(a[0]))
              for n, lin in block_linears(block, adapter).items()]
        dense_out = runner.run_block(block, stream)
        for h in hs:
            h.remove()
        masks.append({n: wanda_prune_(lin, accs[n].result(), 0.5)
                      for n, lin in block_linears(block, adapter).items()})
        stream = runner.run_block(block, stream) if sequential else dense_out
    return masks


def test_sequential_uses_pruned_stream_inputs():
    ids = random_ids(4, 8)
    base = tiny_model("llama")
    seq, one = copy.deepcopy(base), copy.deepcopy(base)
    prune_model(seq, "wanda", 0.5, calibration=ids, batch_size=2, progress=False)
    report = prune_model(one, "wanda", 0.5, calibration=ids, batch_size=2, sequential=False, progress=False)
    assert report["sequential"] is False
    want_seq = _manual_wanda(copy.deepcopy(base), ids, sequential=True)
    want_one = _manual_wanda(copy.deepcopy(base), ids, sequential=False)
    adapter = get_adapter(base)
    for i in range(2):
        got_seq = {n: lin.weight != 0 for n, lin in block_linears(seq.model.layers[i], adapter).items()}
        got_one = {n: lin.weight != 0 for n, lin in block_linears(one.model.layers[i], adapter).items()}
        for n in adapter.linear_names():
            assert torch.equal(got_seq[n], want_seq[i][n]), (i, n)
            assert torch.equal(got_one[n], want_one[i][n]), (i, n)
    # block 0 sees the same (embedding) input either way; block 1's statistics differ
    assert all(torch.equal(want_seq[0][n], want_one[0][n]) for n in adapter.linear_names())
    assert any(not torch.equal(want_seq[1][n], want_one[1][n]) for n in adapter.linear_names())


def test_block_error_is_mse_to_dense_block_on_same_input():
    ids = random_ids(3, 8)
    dense = tiny_model("llama", layers=1)
    pruned = copy.deepcopy(dense)
    report = prune_model(pruned, "wanda", 0.5, calibration=ids, progress=False)
    runner = BlockRunner(dense, batch_size=8, stream_dtype=torch.float32, progress=False)
    x = runner.capture(ids)
    y_dense = runner.run_block(dense.model.layers[0], x).data
    y_pruned = runner.run_block(pruned.model.layers[0], x).data
    assert report["block_error"][0] == pytest.approx(float(((y_dense - y_pruned) ** 2).mean()), rel=1e-5)
