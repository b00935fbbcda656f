"""Layer-wise recovery (LaCo stage 1 and 2) on tiny random-init Llamas."""
import copy

import pytest
import torch
from _recover_util import block_state, dense_and_pruned, one_thread, tiny_llama

from laco_kernels.recover import layerwise
from laco_kernels.recover._losses import block_loss, parse_loss

CALIB = dict(samples=8, seqlen=16)


_threads = pytest.fixture(autouse=True)(one_thread)


def _ids(n=CALIB["samples"], t=CALIB["seqlen"], vocab=100, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_mask_holds_and_error_drops(pattern):
    dense, pruned = dense_and_pruned(pattern)
    zeros = {k: v == 0 for k, v in pruned.state_dict().items() if ".layers." in k and v.dim() == 2}
    before = copy.deepcopy(pruned.state_dict())
    res = layerwise(dense, pruned, _ids(), epochs=3, lr=1e-3, progress=False)
    assert res.model is pruned and len(res.blocks) == 3
    state = pruned.state_dict()
    for k, z in zeros.items():
        assert int(z.sum()) > 0
        assert torch.all(state[k][z] == 0), f"{k}: pruned weights became non-zero"
        assert not torch.equal(state[k], before[k]), f"{k} was not trained"
    norms = [k for k in state if "layernorm" in k]
    assert any(not torch.equal(state[k], before[k]) for k in norms), "norms were not trained"
    for rec in res.blocks:
        assert rec["pattern"] == pattern
        assert rec["nmse_after"] < rec["nmse_before"]


def test_2_4_groups_with_fewer_than_two_nonzeros_stay_sparse():
    """A weight that was already 0 before 2:4 pruning leaves a group with one non-zero: its empty
    value slot is a pruned weight and must not be trained back (seen on SmolLM2's GGUF weights)."""
    dense, pruned = dense_and_pruned("2:4")
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if ".layers." in name and p.dim() == 2:
                nz = p.nonzero()
                p[tuple(nz[::7].t())] = 0.0  # some kept weights become exact zeros
    zeros = {k: v == 0 for k, v in pruned.state_dict().items() if ".layers." in k and v.dim() == 2}
    layerwise(dense, pruned, _ids(), epochs=2, lr=1e-3, progress=False)
    state = pruned.state_dict()
    for k, z in zeros.items():
        assert torch.all(state[k][z] == 0), f"{k}: pruned weights became non-zero"


def test_recovery_brings_logits_closer_to_dense():
    dense, pruned = dense_and_pruned("2:4")
    ids = _ids(seed=3)
    kl = lambda: torch.nn.functional.kl_div(pruned(ids).logits.log_softmax(-1), dense(ids).logits.log_softmax(-1),
                                            log_target=True, reduction="batchmean").item()
    with torch.no_grad():
        k0 = kl()
    layerwise(dense, pruned, _ids(), epochs=4, lr=1e-3, loss="token-nmse", progress=False)
    with torch.no_grad():
        assert kl() < 0.85 * k0


def test_ebft_target_and_stage2_keep_mask():
    dense, pruned = dense_and_pruned("unstructured")
    pruned2 = copy.deepcopy(pruned)
    zeros = {k: v == 0 for k, v in pruned.state_dict().items() if ".layers." in k and v.dim() == 2}
    ids = _ids(4)
    kw = dict(epochs=1, lr=1e-3, target="ebft", loss="token-nmse+0.5*cosine", progress=False)
    layerwise(dense, pruned, ids, **kw)
    res = layerwise(dense, pruned2, ids, stage2_epochs=3, stage2_lr=3e-4, **kw)
    assert len(res.stage2) == 3

    def kl(m):
        with torch.no_grad():
            t = dense(ids).logits.div(2).log_softmax(-1)
            return (t.exp() * (t - m(ids).logits.div(2).log_softmax(-1))).sum(-1).mean().item()

    assert kl(pruned2) < kl(pruned)  # stage 2 improved on stage 1 alone
    for k, z in zeros.items():
        assert torch.all(pruned2.state_dict()[k][z] == 0)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_autocast_trains_both_stages_and_keeps_mask(pattern):
    """autocast=True (bf16 on the CPU) runs stage 1 and stage 2, keeps every pruned weight at 0,
    keeps the parameters fp32, and improves the logits about as much as fp32 does."""
    dense, pruned = dense_and_pruned(pattern)
    pruned32 = copy.deepcopy(pruned)
    zeros = {k: v == 0 for k, v in pruned.state_dict().items() if ".layers." in k and v.dim() == 2}
    ids = _ids()

    def kl(m):
        with torch.no_grad():
            t = dense(ids).logits.log_softmax(-1)
            return (t.exp() * (t - m(ids).logits.log_softmax(-1))).sum(-1).mean().item()

    k0 = kl(pruned)
    kw = dict(epochs=3, lr=1e-3, loss="token-nmse", stage2_epochs=2, stage2_lr=3e-4, progress=False)
    res = layerwise(dense, pruned, ids, autocast=True, **kw)
    layerwise(dense, pruned32, ids, **kw)
    assert len(res.stage2) == 2
    assert all(p.dtype == torch.float32 for p in pruned.parameters())
    for k, z in zeros.items():
        assert torch.all(pruned.state_dict()[k][z] == 0), f"{k}: pruned weights became non-zero"
    k16, k32 = kl(pruned), kl(pruned32)
    assert k16 < 0.85 * k0
    assert k16 < 1.25 * k32, (k16, k32)


def test_disk_models_match_in_memory(tmp_path):
    """Models given as safetensors folders (block-by-block loading) give the in-memory result."""
    from transformers import AutoModelForCausalLM

    dense, pruned = dense_and_pruned("2:4")
    dense.save_pretrained(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "pruned")
    kw = dict(epochs=2, lr=1e-3, progress=False)
    layerwise(dense, pruned, _ids(), **kw)
    res = layerwise(str(tmp_path / "dense"), str(tmp_path / "pruned"), _ids(), output_dir=str(tmp_path / "out"),
                    offload_dir=str(tmp_path / "streams"), **kw)
    assert res.model == str(tmp_path / "out")
    out = AutoModelForCausalLM.from_pretrained(res.model, use_safetensors=True)
    for k, v in pruned.state_dict().items():
        torch.testing.assert_close(out.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    assert not any((tmp_path / "streams").iterdir()), "stream files were left behind"


def test_token_nmse_is_per_token_normalised():
    p, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    t[0, 0] *= 100  # a massive token does not dominate
    want = (((p - t) ** 2).sum(-1) / (t ** 2).sum(-1)).mean()
    got = block_loss(p, t, parse_loss("token-nmse"))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    mix = block_loss(p, t, parse_loss("token-nmse+0.5*cosine"))
    cos = (1 - torch.nn.functional.cosine_similarity(p, t, dim=-1)).mean()
    torch.testing.assert_close(mix, want + 0.5 * cos, atol=1e-6, rtol=1e-5)


def test_bad_arguments_raise():
    dense, pruned = dense_and_pruned("2:4", layers=1)
    with pytest.raises(ValueError, match="target"):
        layerwise(dense, pruned, _ids(), target="teacher", progress=False)
    with pytest.raises(ValueError, match="loss kind"):
        layerwise(dense, pruned, _ids(), loss="l1", progress=False)
    with pytest.raises(ValueError, match="token ids"):
        layerwise(dense, pruned, _ids().float(), progress=False)
    with pytest.raises(ValueError, match="output_dir"):
        layerwise("a", "b", _ids(), progress=False)


def test_disk_embedding_rows_are_read_exactly_and_checked(tmp_path):
    """From a folder, only the embedding rows the calibration uses are read (pread at header
    offsets): they equal the full tensor's rows; ids outside the vocabulary raise."""
    from safetensors.torch import load_file

    from laco_kernels.recover._source import _read_rows, _weight_map

    model = tiny_llama(layers=1, vocab=300)
    model.save_pretrained(tmp_path / "m")
    wmap = _weight_map(str(tmp_path / "m"))
    full = load_file(wmap["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    rows = torch.tensor([0, 1, 2, 5, 6, 150, 299])
    assert torch.equal(_read_rows("model.embed_tokens.weight", rows, wmap), full[rows])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        _read_rows("model.embed_tokens.weight", torch.tensor([3, 300]), wmap)


def _recovered(inputs, layers, **kw):
    dense, pruned = dense_and_pruned("2:4", layers=layers)
    layerwise(dense, pruned, _ids(), epochs=2, lr=1e-3, inputs=inputs, progress=False, **kw)
    return dense, pruned


def test_inputs_dense_and_mix_train_on_the_dense_stream():
    """Block 0 sees the same embeddings in both streams: every choice of inputs trains it alike.
    Later blocks differ, and inputs="dense" fits block 1 on the dense stream better than
    inputs="pruned" does (it is what it was trained on)."""
    one = [block_state(_recovered(i, 1)[1]) for i in ("pruned", "dense", "mix")]
    for other in one[1:]:
        for k, v in one[0].items():
            torch.testing.assert_close(other[k], v, atol=0, rtol=0)
    runs = {i: _recovered(i, 2) for i in ("pruned", "dense", "mix")}
    sp, sd, sm = (block_state(runs[i][1]) for i in ("pruned", "dense", "mix"))
    assert any(not torch.equal(sp[k], sd[k]) for k in sp if "layers.1." in k)
    assert any(not torch.equal(sp[k], sm[k]) for k in sp if "layers.1." in k)
    for m in (runs["dense"][1], runs["mix"][1]):  # masks still hold
        for k, v in m.state_dict().items():
            if ".layers." in k and v.dim() == 2:
                assert int((v.view(v.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    dense = runs["pruned"][0]
    ids = _ids()
    with torch.no_grad():
        h = dense(ids, output_hidden_states=True).hidden_states
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        rope = dense.model.rotary_emb(h[1], pos)

        def err(model):
            out = model.model.layers[1](h[1], position_embeddings=rope, attention_mask=None, position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            return float(((out - h[2]) ** 2).sum())

        assert err(runs["dense"][1]) < err(runs["pruned"][1])


def test_trainable_linears_keeps_norms():
    dense, pruned = dense_and_pruned("2:4", layers=2)
    before = block_state(pruned)
    layerwise(dense, pruned, _ids(), epochs=1, lr=1e-3, trainable="linears", stage2_epochs=1, progress=False)
    after = block_state(pruned)
    for k in before:
        if "layernorm" in k:
            assert torch.equal(after[k], before[k]), f"{k} was trained with trainable='linears'"
        elif k.endswith("proj.weight"):
            assert not torch.equal(after[k], before[k]), f"{k} was not trained"


def test_set_trainable_freezes_the_rest():
    """Parameters left out of training get requires_grad=False: autograd computes no gradient for them."""
    import importlib

    from laco_kernels.models.adapters import get_adapter

    lw = importlib.import_module("laco_kernels.recover.layerwise")
    model = tiny_llama()
    block = model.model.layers[0]
    for p in block.parameters():
        p.requires_grad_(True)
    params = lw._set_trainable(block, "linears", get_adapter(model))
    ids = {id(p) for p in params}
    for name, p in block.named_parameters():
        assert p.requires_grad == (id(p) in ids), name
        assert p.requires_grad == ("proj" in name), name
    assert len(lw._set_trainable(block, "all", get_adapter(model))) == len(list(block.parameters()))


def test_warmup_schedule():
    from laco_kernels.recover.layerwise import LayerwiseConfig, _schedule

    cfg = LayerwiseConfig(lr=1e-3, lr_min=1e-6, warmup=0.25)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = _schedule(opt, 8, cfg)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # 2 warmup steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # then cosine down
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)


def test_bad_new_options_raise():
    dense, pruned = dense_and_pruned("2:4", layers=1)
    for kw, msg in ((dict(inputs="teacher"), "inputs"), (dict(inputs="dense", target="ebft"), "dense-stream"),
                    (dict(trainable="norms"), "trainable"), (dict(warmup=1.0), "warmup"),
                    (dict(stage2_epochs=1, temperature=0.0), "temperature"),
                    (dict(stage2_epochs=1, stage2_hidden=-1.0), "stage2_hidden"),
                    (dict(stage2_epochs=1, stage2_hidden=float("nan")), "stage2_hidden"),
                    (dict(stage2_epochs=1, stage2_noise=1.0), "stage2_noise"),
                    (dict(stage2_epochs=1, stage2_noise=-0.1), "stage2_noise"),
                    (dict(stage2_noise=0.1), "stage2_epochs is 0"),
                    (dict(error_samples=-1), "error_samples"), (dict(error_samples=2.5), "error_samples")):
        with pytest.raises(ValueError, match=msg):
            layerwise(dense, pruned, _ids(), progress=False, **kw)
    with pytest.raises(ValueError, match="stage2_epochs is 0"):  # its own windows for a stage that does not run
        layerwise(dense, pruned, _ids(), stage2_calibration=_ids(), progress=False)


def test_stage2_runs_on_its_own_windows(monkeypatch):
    """stage2_calibration: stage 2 trains on those windows (not the block stage's), pruned weights stay 0."""
    import importlib

    lw = importlib.import_module("laco_kernels.recover.layerwise")  # the module (the package exports the function)
    dense, pruned = dense_and_pruned("2:4", layers=1)
    seen = []
    real = lw._stage2
    monkeypatch.setattr(lw, "_stage2", lambda d, p, ids, *a: seen.append(ids.clone()) or real(d, p, ids, *a))
    ids2 = _ids()[:2].flip(1).contiguous()
    res = layerwise(dense, pruned, _ids(), stage2_calibration=ids2, epochs=1, stage2_epochs=1, progress=False)
    assert len(seen) == 1 and sorted(map(tuple, seen[0].tolist())) == sorted(map(tuple, ids2.tolist()))
    assert res.stage2_tokens == ids2.numel() and res.tokens == _ids().numel() and len(res.stage2) == 1
    zero = pruned.model.layers[0].mlp.up_proj.weight == 0
    assert zero.float().mean() == 0.5


@pytest.mark.parametrize("fault", [("replace", 1), ("replace", 3), ("save_file", 2), ("swap", 1)])
def test_output_dir_fault_keeps_old_folder_whole(tmp_path, monkeypatch, fault):
    """Issue 13: writing output_dir fails at a file, the rename or the final swap: the previous
    complete output (with its checkpoint) stays, loadable, and no temporary is left."""
    import os

    from _faults import InjectedFault, inject, leftovers, snapshot
    from transformers import AutoModelForCausalLM

    from laco_kernels import _atomic
    from laco_kernels.recover import _checkpoint

    dense, pruned = dense_and_pruned("2:4", layers=2)
    dense.save_pretrained(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "pruned")
    out = str(tmp_path / "out")
    kw = dict(epochs=1, lr=1e-3, progress=False, output_dir=out)
    layerwise(str(tmp_path / "dense"), str(tmp_path / "pruned"), _ids(), **kw)
    before = snapshot(out)
    assert "_checkpoint/progress.json" in before and "model.safetensors.index.json" in before
    if fault[0] == "swap":
        inject(monkeypatch, _atomic, "_fsync_tree", fault[1])
    elif fault[0] == "save_file":
        inject(monkeypatch, _checkpoint, "save_file", fault[1])
    else:
        inject(monkeypatch, os, fault[0], fault[1])
    with pytest.raises(InjectedFault):  # the rerun finds the run finished and rewrites the folder
        layerwise(str(tmp_path / "dense"), str(tmp_path / "pruned"), _ids(), **kw)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []
    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    res = layerwise(str(tmp_path / "dense"), str(tmp_path / "pruned"), _ids(), **kw)  # and it completes
    assert res.resumed_from == 2 and snapshot(out) == before


def test_stage2_hidden_adds_the_block_outputs_term():
    """stage2_hidden > 0: the KL stage's loss adds the weighted mean token-nmse of every block's
    output against the dense model's (so its loss is larger than KL alone at the same start and
    the model moves differently); pruned weights stay 0."""
    dense, pruned = dense_and_pruned("2:4")
    runs = {}
    for w in (0.0, 1.0):
        m = copy.deepcopy(pruned)
        res = layerwise(dense, m, _ids(), epochs=1, lr=1e-3, stage2_epochs=1, stage2_lr=3e-4, stage2_hidden=w,
                        progress=False)
        runs[w] = (res.stage2[0], m)
    assert runs[1.0][0] > runs[0.0][0]
    a, b = (dict(runs[w][1].named_parameters()) for w in (0.0, 1.0))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k, v in pruned.state_dict().items():
        if ".layers." in k and v.dim() == 2:
            assert torch.all(runs[1.0][1].state_dict()[k][v == 0] == 0), k


def test_stage2_noise_corrupts_the_same_ids_for_teacher_and_student():
    """stage2_noise=p: each KL step replaces about p of the window's ids by random ids, drawn afresh
    each pass, and the dense teacher reads exactly the ids the student reads; pruned weights stay 0."""
    dense, pruned = dense_and_pruned("2:4", layers=1)
    ids = torch.randint(0, 10, (4, 64))  # ids < 10: a random replacement almost never lands on one
    seen = {"t": [], "s": []}

    def spy(model, key):
        real = model.forward
        model.forward = lambda input_ids=None, **kw: seen[key].append(input_ids.clone()) or real(input_ids=input_ids, **kw)

    spy(dense, "t")
    spy(pruned, "s")
    layerwise(dense, pruned, ids, epochs=1, stage2_epochs=2, stage2_noise=0.25, progress=False)
    s2 = seen["s"][-8:]  # the KL stage's steps: 2 passes x 4 windows (batch 1); the block stage never calls forward
    assert len(seen["t"]) >= 8 and all(torch.equal(a, b) for a, b in zip(seen["t"][-8:], s2))
    changed = torch.cat([(x >= 10).float().flatten() for x in s2])
    assert 0.15 < changed.mean() < 0.35
    assert not torch.equal(s2[0], s2[4]) or not torch.equal(s2[1], s2[5])  # fresh noise on the second pass
    for x in s2:  # outside the replaced slots a step reads one of the calibration windows
        keep = x[0] < 10
        assert max(float((x[0][keep] == row[keep]).float().mean()) for row in ids) > 0.9
    assert (pruned.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    # a checkpoint written before the option existed (same settings) keeps its identity
    from laco_kernels.recover.layerwise import LayerwiseConfig

    assert "stage2_noise" not in LayerwiseConfig().fingerprint()
    assert LayerwiseConfig(stage2_noise=0.25).fingerprint()["stage2_noise"] == "0.25"


def test_error_samples_measures_a_head_and_leaves_training_alone():
    """error_samples=N: each block's before / after error on its first N windows only (the "before"
    pass then runs on those N); the trained weights are the same as with every window measured."""
    import importlib

    lw = importlib.import_module("laco_kernels.recover.layerwise")
    dense, pruned = dense_and_pruned("2:4", layers=2)
    twin = copy.deepcopy(pruned)
    full = layerwise(dense, pruned, _ids(), epochs=1, progress=False)
    head = layerwise(dense, twin, _ids(), epochs=1, progress=False, error_samples=3)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), twin.state_dict().values()))
    for f, h in zip(full.blocks, head.blocks):
        assert f["error_samples"] == CALIB["samples"] and h["error_samples"] == 3
        assert h["nmse_before"] > 0 and h["nmse_after"] > 0 and h["nmse_before"] != f["nmse_before"]
    # the head's figure is the whole-stream formula over the first 3 windows
    a = torch.randn(5, 4, 6)
    b = torch.randn(5, 4, 6)
    sa, sb = lw.HiddenStream(a.shape, torch.float32), lw.HiddenStream(b.shape, torch.float32)
    sa[:] = a
    sb[:] = b
    got = lw._stream_nmse(sa, sb, chunk=2, rows=3)
    want = torch.stack([((a[:3] - b[:3]).double() ** 2).sum(), (b[:3].double() ** 2).sum()])
    torch.testing.assert_close(got, want)
