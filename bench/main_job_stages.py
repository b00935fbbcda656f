"""Main-job recipe ablations (issue 14, Goal B): `laco run`'s two recovery stages, one at a time.

    OMP_NUM_THREADS=2 python bench/main_job_stages.py --s1 seqlen=512 nsamples=32 batch_size=2
    OMP_NUM_THREADS=2 python bench/main_job_stages.py --s1 seqlen=512 nsamples=32 batch_size=2 --s2 stage2_batch_size=1
    python bench/main_job_stages.py --table

Same data and evaluation as `laco run` with its defaults: the pruned start is ``--start`` made as
``laco run`` makes it (``recovery_recipe.pruned_start``: 32 x 512 C4 windows, seed 0; ``+permute``:
channels reordered, ``+refitN``: N refit steps; cached under ``--scratch``); the layer-wise stage
trains on ``calibration_windows(tok, nsamples, seqlen, seed=1)``, the KL stage on 32 windows of 512
of its own (``seed=2``); perplexity on the first 16 WikiText-2 windows of 1024 (the main job's
report). Stage 1 (``--s1 key=value``: ``LayerwiseConfig`` fields plus ``nsamples`` / ``seqlen``) is
cached per setting, so stage-2 variants (``--s2 key=value``, ``LayerwiseConfig`` fields plus
``nsamples`` / ``seqlen`` / ``data_seed``) start from the same stage-1 model. Rows: keys
``stages/<start>/s1:<settings>[/s2:<settings>]/w16x1024`` of ``bench/results/recovery.json``
(a key present is skipped); wall seconds are of one stage on this machine, not a whole main job.
Settings are named relative to the stop-30 recipe (``S1`` / ``S2`` below, the ``default`` tag);
``laco run`` since stop 31 is ``--s1 epochs=3 --s2 stage2_lr=4e-4``. ``--s1 skip=true``: no
layer-wise stage (the KL stage starts from the pruned model).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import sys
import time
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from recovery import DEFAULT_OUT, _load, _record  # noqa: E402
from recovery_recipe import _parse_value, pruned_start, zeros_kept  # noqa: E402

S1 = dict(nsamples=32, seqlen=512, epochs=2, lr=3e-3, loss="token-nmse", batch_size=2, blocks=1,  # laco run (stop 30)
          skip=False)  # skip=true: no layer-wise stage (the KL stage starts from the pruned model)
S2 = dict(nsamples=32, seqlen=512, data_seed=2, stage2_epochs=1, stage2_lr=3e-4, stage2_batch_size=2, temperature=1.0,
          embedding=False, frozen_blocks=0)  # frozen_blocks=N: the KL stage trains blocks N.. only


class _Chain(torch.nn.Module):
    """Consecutive decoder blocks as one (``blocks=2``: cross-block windows, trained jointly)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, h, **kw):
        for b in self.blocks:
            out = b(h, **kw)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h


def _windowed_stage1(lw, dense, pruned, ids, width, **kw):
    """Stage 1 on windows of ``width`` consecutive blocks (0..w-1, w..2w-1, ...), each window trained
    jointly towards the dense window's output on the dense stream, from the pruned stream; the same
    package steps as ``layerwise`` (sparsify, ``_train_block``, densify, mask check) otherwise."""
    from laco_kernels.models.adapters import get_adapter, get_module
    from laco_kernels.models.capture import BlockRunner

    cfg = lw.LayerwiseConfig(progress=False, **kw)
    ad = get_adapter(pruned)
    db, pb = get_module(dense, ad.blocks), get_module(pruned, ad.blocks)
    runner = BlockRunner(pruned, batch_size=cfg.eval_batch_size, stream_dtype=cfg.stream_dtype, progress=False)
    pin = runner.capture(ids)
    din = runner.new_stream(pin.shape)
    din.data.copy_(pin.data)
    for l in range(0, len(pb), width):
        idx = list(range(l, min(l + width, len(pb))))
        target = runner.run_block(_Chain([db[i] for i in idx]), din)
        zeros = [lw._masks(pb[i], ad) for i in idx]
        for i in idx:
            lw._sparsify(pb[i], "2:4")
        lw._train_block(_Chain([pb[i] for i in idx]), runner, [pin], target, cfg, l, 1, ad)
        for k, i in enumerate(idx):
            lw._densify(pb[i])
            lw._check_masks(pb[i], ad, zeros[k], i)
        pout = runner.run_block(_Chain([pb[i] for i in idx]), pin)
        din.delete()
        pin.delete()
        din, pin = target, pout
    din.delete()
    pin.delete()


def _settings(pairs, base):
    out = dict(base)
    for p in pairs or []:
        k, _, v = p.partition("=")
        if k not in base and k not in _config_fields():
            raise SystemExit(f"unknown setting {k!r}")
        out[k] = _parse_value(v)
    return out


def _config_fields():
    import dataclasses
    import importlib

    return {f.name for f in dataclasses.fields(importlib.import_module("laco_kernels.recover.layerwise").LayerwiseConfig)}


def _tag(d, base):
    diff = {k: v for k, v in sorted(d.items()) if base.get(k, object()) != v}
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "default"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="sparsegpt+permute")
    ap.add_argument("--s1", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--s2", nargs="*", default=None, metavar="KEY=VALUE", help="run the KL stage (omit: stage 1 only)")
    ap.add_argument("--scratch", default="/tmp/laco_recipe")  # shared with recovery_tokens.py
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        for k, v in sorted(_load(args.out).items()):
            if k.startswith("stages/"):
                print(f"| `{k}` | {v.get('ppl_stage1')} | {v.get('ppl_after', '-')} | {v.get('stage1_s')} / "
                      f"{v.get('stage2_s', '-')} | `{v['command']}` |")
        return
    import importlib

    from safetensors.torch import load_file, save_file

    from laco_kernels import cli
    from laco_kernels._atomic import atomic_file
    from laco_kernels.data import calibration_windows
    from laco_kernels.eval import perplexity
    from laco_kernels.models.adapters import get_adapter

    lw = importlib.import_module("laco_kernels.recover.layerwise")
    s1, s2 = _settings(args.s1, S1), (_settings(args.s2, S2) if args.s2 is not None else None)
    key = f"stages/{args.start}/s1:{_tag(s1, S1)}" + (f"/s2:{_tag(s2, S2)}" if s2 else "") + "/w16x1024"
    command = "python bench/main_job_stages.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--out"))

    def run():
        dense, tok = cli._load("smollm2-135m")
        start, _ = pruned_start(dense, tok, args.start, args.scratch)
        pruned = copy.deepcopy(start)
        ppl = lambda m: perplexity(m, tok, seqlen=1024, max_windows=16, progress=False)["ppl"]  # noqa: E731
        cache = os.path.join(args.scratch, "s1-" + args.start + "-" + _tag(s1, S1).replace("=", "") + ".safetensors")
        rec = {"command": command, "start": args.start, "stage1": s1, "stage2": s2, "windows": 16,
               "threads": torch.get_num_threads()}
        if s1["skip"]:
            rec.update({"stage1_s": 0.0, "ppl_stage1": None})
        elif os.path.exists(cache + ".json"):
            pruned.load_state_dict(load_file(cache), strict=False)
            rec.update(json.load(open(cache + ".json")))
        else:
            kw = dict(s1)
            kw.pop("skip")
            ids = calibration_windows(tok, kw.pop("nsamples"), kw.pop("seqlen"), seed=1)
            width = kw.pop("blocks")
            t0 = time.perf_counter()
            if width == 1:
                lw.layerwise(dense, pruned, ids, progress=False, **kw)
            else:
                _windowed_stage1(lw, dense, pruned, ids, width, **kw)
            info = {"stage1_s": round(time.perf_counter() - t0, 1), "ppl_stage1": round(ppl(pruned), 3)}
            with atomic_file(cache) as tmp:
                save_file({k: v.contiguous() for k, v in pruned.state_dict().items() if ".layers." in k}, tmp)
            with atomic_file(cache + ".json") as tmp, open(tmp, "w") as f:
                json.dump(info, f)
            rec.update(info)
        if s2:
            kw = dict(s2)
            ids2 = calibration_windows(tok, kw.pop("nsamples"), kw.pop("seqlen"), seed=kw.pop("data_seed"))
            embedding = kw.pop("embedding")
            frozen = kw.pop("frozen_blocks")
            cfg = lw.LayerwiseConfig(progress=False, **kw)
            with contextlib.ExitStack() as patches:  # the stage's helpers, replaced for this variant only
                if frozen:  # the first `frozen` blocks stay fixed: no gradient flows below block `frozen`
                    real_trainable, seen = lw._set_trainable, [0]

                    def _set_trainable(block, which="all", adapter=None):
                        seen[0] += 1
                        return [] if seen[0] <= frozen else real_trainable(block, which, adapter)

                    patches.enter_context(mock.patch.object(lw, "_set_trainable", _set_trainable))
                if embedding:  # the KL stage also trains the (tied) input embedding / lm_head
                    emb, real = pruned.get_input_embeddings().weight, lw._adamw

                    def _adamw(params, lr, wd):
                        emb.requires_grad_(True)
                        params.append(emb)  # the stage's own list: clipped with the rest
                        return real(params, lr, wd)

                    patches.enter_context(mock.patch.object(lw, "_adamw", _adamw))
                t0 = time.perf_counter()
                rec["kl_per_pass"] = lw._stage2(dense, pruned, ids2, cfg, get_adapter(pruned), 1)
            rec["stage2_s"] = round(time.perf_counter() - t0, 1)
            rec["ppl_after"] = round(ppl(pruned), 3)
        rec["pruned_weights_made_nonzero"] = zeros_kept(start, pruned)
        return rec

    _record(args.out, key, run)


if __name__ == "__main__":
    main()
