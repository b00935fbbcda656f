"""SparseGPT: OBS reconstruction beats mask-only pruning, exact sparsity, valid N:M, block driver."""
import copy

import pytest
import torch

from _tiny import random_ids, tiny_model
from laco_kernels.prune import prunable_linears, prune_model
from laco_kernels.prune.masks import is_nm, nm_mask, unstructured_mask
from laco_kernels.prune.sparsegpt import HessianAccumulator, SharedInputGram, refit_masked, sparsegpt_prune
from laco_kernels.prune.wanda import wanda_score


def _layer(rows=24, cols=40, n=300, seed=0):
    """A weight and correlated inputs with uneven channel scales (where reconstruction matters)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return w, x


def _err(w, w_new, x):
    return float(((x @ w.t() - x @ w_new.t()) ** 2).mean())


def test_hessian_accumulator():
    acc = HessianAccumulator()
    xs = [torch.randn(2, 3, 5), torch.randn(4, 5)]
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 5) for x in xs])
    torch.testing.assert_close(acc.result(), 2 / 10 * flat.t() @ flat)
    with pytest.raises(RuntimeError, match="no inputs"):
        HessianAccumulator().result()


@pytest.mark.parametrize("pattern,sparsity,cols", [(None, 0.5, 40), (None, 0.3, 37), ("2:4", 0.5, 40),
                                                   ("4:8", 0.5, 40), ("1:3", None, 39)])
def test_sparsity_pattern_and_mask_agree(pattern, sparsity, cols):
    w, x = _layer(cols=cols)
    h = 2 / len(x) * x.t() @ x
    new, mask, loss = sparsegpt_prune(w, h, sparsity, pattern, blocksize=16)
    assert torch.equal(new != 0, mask) and loss > 0
    if pattern:
        n, m = map(int, pattern.split(":"))
        assert is_nm(mask, n, m) and int(mask.sum()) == w.numel() * n // m
    else:  # per block of 16 columns, round(rows * b * s) weights pruned
        blocks = [min(16, cols - i) for i in range(0, cols, 16)]
        want = sum(int(24 * b * sparsity + 0.5) for b in blocks)
        assert int((~mask).sum()) == want


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_reconstruction_beats_magnitude_and_wanda(pattern):
    w, x = _layer()
    h = 2 / len(x) * x.t() @ x
    new, mask, _ = sparsegpt_prune(w, h, 0.5, pattern)
    sq = (x * x).sum(0)
    if pattern:
        mag, wan = nm_mask(w.abs(), 2, 4), nm_mask(wanda_score(w, sq), 2, 4)
    else:
        mag, wan = unstructured_mask(w.abs(), 0.5), unstructured_mask(wanda_score(w, sq), 0.5)
    e_sgpt, e_mag, e_wanda = _err(w, new, x), _err(w, w * mag, x), _err(w, w * wan, x)
    assert e_sgpt < (0.7 if pattern else 0.95) * e_wanda < e_mag
    # the weight update matters: SparseGPT's own mask without the update is worse
    assert e_sgpt < _err(w, w * mask, x)


def test_obs_update_is_the_least_squares_optimum_for_one_column():
    """Pruning only the first column: OBS compensates with every other column, i.e. exact least squares."""
    w, x = _layer(rows=5, cols=12)
    w[:, 0] *= 1e-4  # the first column is the cheapest to drop in every row
    h = 2 / len(x) * x.t() @ x
    new, mask, loss = sparsegpt_prune(w.double(), h.double(), 1 / 12, percdamp=0.0)
    assert (~mask[:, 0]).all() and mask[:, 1:].all()
    want = torch.linalg.lstsq(x[:, 1:].double(), (x.double() @ w.double().t())).solution.t()
    torch.testing.assert_close(new[:, 1:].double(), want, atol=1e-4, rtol=1e-3)
    # the reported loss is the layer error it reaches: ||X w - X w'||^2 / n summed over rows
    err = ((x.double() @ (w.double() - new.double()).t()) ** 2).sum() / len(x)
    assert loss == pytest.approx(float(err), rel=1e-3)


def test_nothing_pruned_keeps_weight_and_dead_inputs_zeroed():
    w, x = _layer(cols=16)
    h = 2 / len(x) * x.t() @ x
    new, mask, loss = sparsegpt_prune(w, h, 0.0)
    assert mask.all() and loss == 0 and torch.allclose(new, w)
    x[:, 3] = 0  # a channel that is never active: its weights are useless and dropped
    h = 2 / len(x) * x.t() @ x
    new, mask, _ = sparsegpt_prune(w, h, 0.0)
    assert (new[:, 3] == 0).all() and torch.allclose(new[:, :3], w[:, :3])


def test_scale_invariant_and_dtype():
    w, x = _layer()
    h = 2 / len(x) * x.t() @ x
    a = sparsegpt_prune(w, h, 0.5, "2:4")
    b = sparsegpt_prune(w.half(), h * 10, 0.5, "2:4")
    assert b[0].dtype == torch.float32
    assert (a[1] != b[1]).float().mean() < 0.02  # fp16 weights round, the masks stay essentially equal


def test_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"hessian must be \[8, 8\]"):
        sparsegpt_prune(w, torch.eye(7), 0.5)
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), 0.5, "2:4")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        sparsegpt_prune(w, torch.eye(8), 1.0)
    with pytest.raises(RuntimeError, match="not positive definite"):
        sparsegpt_prune(w, -torch.eye(8), 0.5, percdamp=0.0)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prune_model_sparsegpt_beats_magnitude(family, pattern):
    ids = random_ids(8, 16)
    base = tiny_model(family)
    sg, mag = copy.deepcopy(base), copy.deepcopy(base)
    r_sg = prune_model(sg, "sparsegpt", 0.5, pattern, ids, batch_size=4, blocksize=32, progress=False)
    r_mag = prune_model(mag, "magnitude", 0.5, pattern, ids, batch_size=4, progress=False)
    assert r_sg["overall_sparsity"] == pytest.approx(0.5)
    for name, lin in prunable_linears(sg).items():
        if pattern:
            assert is_nm(lin.weight != 0, 2, 4), name
    # block 0 sees the same input in both runs: a like-for-like layer reconstruction comparison
    assert r_sg["block_error"][0] < r_mag["block_error"][0]
    assert sum(r_sg["block_error"]) < sum(r_mag["block_error"])
    emb = base.get_input_embeddings().weight
    assert torch.equal(sg.get_input_embeddings().weight, emb)
    assert torch.equal(sg.get_output_embeddings().weight, base.get_output_embeddings().weight)


def test_half_precision_model_and_offloaded_streams(tmp_path):
    """fp16 weights stay fp16 with exact 2:4 masks; memory-mapped streams are cleaned up."""
    model = tiny_model("qwen2").half()
    report = prune_model(model, "sparsegpt", 0.5, "2:4", random_ids(4, 8), batch_size=2,
                         offload_dir=str(tmp_path), progress=False)
    assert all(e == e and e > 0 for e in report["block_error"])  # finite, positive
    for name, lin in prunable_linears(model).items():
        assert lin.weight.dtype == torch.float16 and is_nm(lin.weight != 0, 2, 4), name
    assert list(tmp_path.iterdir()) == []


def test_per_layer_dict_sparsegpt():
    model = tiny_model("llama")
    names = list(prunable_linears(model))
    spec = {n: (0.25 if "mlp" in n else 0.6) for n in names}
    report = prune_model(model, "sparsegpt", spec, calibration=random_ids(4, 8), progress=False)
    for n in names:  # one 128-column block per linear here: round(rows * cols * s) pruned exactly
        w = prunable_linears(model)[n].weight
        assert int((w == 0).sum()) == int(w.numel() * spec[n] + 0.5), n
    assert report["sparsity"] == "per-layer"


def test_shared_input_gram_matches_separate_accumulators():
    """Linears reading one tensor share its X^T X; a different tensor (even one allocated where a
    freed one was) or the same tensor changed in place is never mistaken for the cached one."""
    shared = SharedInputGram()
    accs = [HessianAccumulator(shared) for _ in range(3)]
    alone = HessianAccumulator()
    xs = []
    for s in range(4):
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(s))
        for a in accs:
            a.add(x)
        alone.add(x)
        xs.append(x.clone())
        del x  # the next tensor may reuse this memory: the cache holds the old one, so it cannot
    y = torch.randn(3, 8)
    accs[0].add(y)
    y.mul_(2)  # in place: a new version, recomputed
    accs[1].add(y)
    expect = sum(x.reshape(-1, 8).t() @ x.reshape(-1, 8) for x in xs)
    torch.testing.assert_close(accs[2].result(), alone.result())
    torch.testing.assert_close(accs[2].result(), expect * (2.0 / 40))
    torch.testing.assert_close(accs[0].xtx, expect + y.t() @ y / 4)
    torch.testing.assert_close(accs[1].xtx, expect + y.t() @ y)
    assert accs[0].result() is not accs[1].result() and accs[0].tokens == 43


def test_prune_model_sparsegpt_shares_grams_without_changing_the_result(monkeypatch):
    """prune_model shares one Gram matrix among q/k/v and gate/up; the pruned weights are the same
    as with one accumulator per linear, and the Gram matrices are computed 4 times a block, not 7."""
    import laco_kernels.prune.sequential as seq

    ids = random_ids(4, 16, seed=2)
    shared_model, plain_model = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    calls = []
    real = SharedInputGram.gram
    monkeypatch.setattr(SharedInputGram, "gram", lambda self, x: (calls.append(x is not self._x), real(self, x))[1])
    prune_model(shared_model, "sparsegpt", pattern="2:4", calibration=ids, batch_size=4, progress=False)
    assert len(calls) == 3 * 7 and sum(calls) == 3 * 4  # 3 blocks x 7 linears; 4 distinct inputs a block
    monkeypatch.setattr(seq, "HessianAccumulator", lambda shared=None: HessianAccumulator())
    prune_model(plain_model, "sparsegpt", pattern="2:4", calibration=ids, batch_size=4, progress=False)
    for (n, a), b in zip(prunable_linears(shared_model).items(), prunable_linears(plain_model).values()):
        torch.testing.assert_close(a.weight, b.weight, msg=n)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_refit_reaches_the_per_row_least_squares_optimum_on_the_mask(pattern):
    w, x = _layer(rows=12, cols=32)
    h = 2 / len(x) * x.t() @ x
    new, mask, _ = sparsegpt_prune(w, h, 0.5, pattern)
    hd = h.double().clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    exact = torch.zeros(w.shape, dtype=torch.float64)
    for i in range(w.shape[0]):  # the exact minimum: one solve per row on its kept columns
        s = mask[i]
        exact[i, s] = torch.linalg.solve(hd[s][:, s], hd[s] @ w[i].double())

    def f(v):
        d = v.double() - w.double()
        return float(((d @ hd) * d).sum())

    fitted, before, after = refit_masked(new, w, h, mask, iters=40)
    assert before == pytest.approx(f(new), rel=1e-4) and after == pytest.approx(f(fitted), rel=1e-4)
    assert f(fitted) == pytest.approx(f(exact), rel=1e-4)
    assert f(fitted) <= f(new) * (1 + 1e-6)  # never worse than SparseGPT's own weights
    assert bool((fitted[~mask] == 0).all())  # the mask is kept exactly
    one, _, after1 = refit_masked(new, w, h, mask, iters=1)
    assert f(exact) <= after1 <= before  # one step already moves towards the optimum
    same, b0, a0 = refit_masked(new, w, h, mask, iters=0)
    assert torch.equal(same, new * mask) and a0 == b0


def test_refit_keeps_dead_inputs_zero_and_checks_shapes():
    w, x = _layer(rows=6, cols=16)
    x[:, 3] = 0
    h = 2 / len(x) * x.t() @ x
    new, mask, _ = sparsegpt_prune(w, h, 0.5, "2:4")
    fitted, _, _ = refit_masked(new, w, h, mask, iters=5)
    assert bool((fitted[:, 3] == 0).all()) and torch.isfinite(fitted).all()
    with pytest.raises(ValueError, match="do not fit"):
        refit_masked(new, w, h[:8, :8], mask, iters=5)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        refit_masked(new, w, h, mask, iters=-1)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prune_model_refit_lowers_every_layer_objective_and_keeps_the_masks(pattern):
    ids = random_ids(8, 16)
    base = tiny_model("llama")
    plain, fitted = copy.deepcopy(base), copy.deepcopy(base)
    r0 = prune_model(plain, "sparsegpt", 0.5, pattern, ids, batch_size=4, blocksize=32, progress=False)
    r1 = prune_model(fitted, "sparsegpt", 0.5, pattern, ids, batch_size=4, blocksize=32, progress=False, refit=8)
    assert "refit" not in r0 and r1["refit"]["steps"] == 8
    layers = r1["refit"]["layers"]
    assert set(layers) == set(prunable_linears(fitted))
    assert all(after <= before * (1 + 1e-5) for before, after in layers.values())
    assert sum(a for _, a in layers.values()) < sum(b for b, _ in layers.values())
    # block 0 sees the same input in both runs: its linears keep SparseGPT's masks exactly
    for name, lin in prunable_linears(fitted).items():
        if ".0." in name:
            assert torch.equal(lin.weight != 0, prunable_linears(plain)[name].weight != 0), name
        if pattern:
            assert is_nm(lin.weight != 0, 2, 4), name
    assert r1["block_error"][0] <= r0["block_error"][0] * (1 + 1e-5)
    assert r1["overall_sparsity"] == pytest.approx(0.5)


def test_prune_model_refit_errors_before_any_change():
    model = tiny_model("llama")
    before = {n: lin.weight.clone() for n, lin in prunable_linears(model).items()}
    with pytest.raises(ValueError, match="needs method='sparsegpt'"):
        prune_model(model, "wanda", 0.5, "2:4", random_ids(4, 8), progress=False, refit=4)
    with pytest.raises(ValueError, match="refit must be"):
        prune_model(model, "sparsegpt", 0.5, "2:4", random_ids(4, 8), progress=False, refit=-1)
    with pytest.raises(ValueError, match="refit must be"):
        prune_model(model, "sparsegpt", 0.5, "2:4", random_ids(4, 8), progress=False, refit=True)
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_linears(model).items())


def _sweep(fn, w, h, nm, blocksize):
    from laco_kernels.prune import sparsegpt as sg

    w = w.clone().float()
    hh, dead = sg._live_hessian(h, w.device)
    w[:, dead] = 0
    u = sg._upper_cholesky_of_inverse(hh, 0.01)
    mask = torch.ones_like(w, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64)
    if fn == "columns":
        sg._prune_columns(w, u, mask, loss, None, nm, blocksize)
    else:
        sg._prune_columns_nm(w, u, mask, loss, nm[0], nm[1], blocksize)
    return w, mask, float(loss)


@pytest.mark.parametrize("rows,cols,nm,blocksize", [(24, 40, (2, 4), 16), (7, 36, (2, 4), 128), (1, 12, (2, 4), 4),
                                                    (33, 48, (4, 8), 16), (5, 39, (1, 3), 9)])
def test_group_sweep_matches_the_column_by_column_sweep(rows, cols, nm, blocksize):
    """The N:M fast path (group updates, W^T layout) is the reference sweep up to rounding:
    same masks, same weights, same loss; partial last blocks, one row, one group per block."""
    w, x = _layer(rows=rows, cols=cols)
    h = 2 / len(x) * x.t() @ x
    ref, ref_mask, ref_loss = _sweep("columns", w, h, nm, blocksize)
    new, mask, loss = _sweep("groups", w, h, nm, blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_group_sweep_ties_keep_exactly_n_per_group():
    """Dead inputs score 0 in every row: tied groups still keep exactly N (the lower columns)."""
    w, x = _layer(rows=6, cols=16)
    x[:, 4:8] = 0  # a whole group of dead inputs: four tied scores of 0 in every row
    x[:, 9:11] = 0  # two dead columns in the next group
    h = 2 / len(x) * x.t() @ x
    new, mask, _ = sparsegpt_prune(w, h, 0.5, "2:4")
    assert is_nm(mask, 2, 4) and int(mask.sum()) == w.numel() // 2
    assert mask[:, 4:6].all() and not mask[:, 6:8].any()  # ties: the lower columns are kept
    assert (new[:, 4:8] == 0).all() and (new[:, 9:11] == 0).all()
    assert (new[:, [8, 11]] != 0).all()  # the live pair of the second group is what it keeps


@pytest.mark.parametrize("cols,parts", [(576, 4), (513, 4), (1536, 4), (300, 2), (64, 4)])
def test_gram_by_strips_is_the_full_gram(cols, parts):
    """The strip-wise X^T X (upper strips computed, the rest mirrored) equals the full GEMM and is
    exactly symmetric; odd widths split into unequal strips; narrow inputs take the full GEMM."""
    from laco_kernels.prune.sparsegpt import _gram

    x = torch.randn(3, 37, cols)
    flat = x.reshape(-1, cols)
    g = _gram(x, parts)
    torch.testing.assert_close(g, flat.t() @ flat, rtol=1e-5, atol=1e-3)
    assert torch.equal(g, g.t())
