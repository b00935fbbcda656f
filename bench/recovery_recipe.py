"""Recovery-recipe ablations (issue 14): one row of ``bench/results/recovery.json`` per setting.

    OMP_NUM_THREADS=2 python bench/recovery_recipe.py --start sparsegpt --windows 8 \
        --nsamples 32 --seqlen 512 --set lr=3e-3 batch_size=4 epochs=2 inputs=dense
    python bench/recovery_recipe.py --start wanda --windows 32 --set ...        (confirmation)
    python bench/recovery_recipe.py --start sparsegpt --windows 32 --no-recover   (start row only)

The pruned start is the one ``laco run`` makes: ``prune_model(method, pattern 2:4, sequential=True)``
on 32 x 512 C4 windows (seed 0); it is computed once per method and kept as safetensors under
``--scratch`` (a cache: the same pruning, bit for bit, on every run). Recovery windows are
``calibration_windows(seed=1)`` (what ``laco run`` uses: seed + 1), every ``--set key=value`` is a
field of ``laco_kernels.recover.LayerwiseConfig`` (numbers parsed as such), and the recovered
model is evaluated on the first ``--windows`` WikiText-2 windows of ``--eval-seqlen``. Each row
keeps its exact command, the wall time, the machine load (``uptime``) before and after, and
checks that every pruned weight is still exactly zero.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import resource
import shlex
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from recovery import DEFAULT_OUT, _load, _record  # noqa: E402

from laco_kernels.recover._memory import PeakMemory  # noqa: E402


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_s() -> float:
    """CPU seconds of this process so far (user + system, all threads): load-independent work."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mb(mem) -> dict:
    """Peak resident set of the measured stage: above the level before it, and absolute (MB)."""
    above = mem.peak_above_baseline()
    return {"peak_rss_above_mb": round(above / 2**20, 1), "peak_rss_mb": round((above + mem.baseline) / 2**20, 1)}


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def pruned_start(model, tok, method: str, scratch: str, device: str = "cpu"):
    """A deep copy of ``model`` pruned as ``laco run`` does (cached on disk per method).

    method: ``wanda``, ``sparsegpt``, or either with ``+permute`` (``prune_model(permute=16)``:
    MLP and value channels reordered before 2:4 selection); SparseGPT also with ``+refitN``
    (``prune_model(refit=N)``, e.g. ``sparsegpt+permute+refit10``).
    """
    from safetensors.torch import load_file, save_file

    from laco_kernels.data import calibration_windows
    from laco_kernels.prune import prune_model

    path = os.path.join(scratch, f"start-{method}-2x4-32x512-seed0.safetensors")
    pruned = copy.deepcopy(model)
    if os.path.exists(path):
        pruned.load_state_dict(load_file(path), strict=False)
        return pruned, None
    calib = calibration_windows(tok, 32, 512, seed=0)
    base, *extra = method.split("+")
    refit = [int(e[5:]) for e in extra if e.startswith("refit") and e[5:].isdigit()]
    if set(extra) - {"permute"} - {f"refit{n}" for n in refit}:
        raise ValueError(f"unknown pruned start {method!r}: a method, then +permute and / or +refitN")
    rep = prune_model(pruned, base, pattern="2:4", calibration=calib, device=device, progress=False,
                      permute=16 if "permute" in extra else False, refit=refit[0] if refit else 0)
    os.makedirs(scratch, exist_ok=True)
    state = {k: v.contiguous() for k, v in pruned.state_dict().items() if ".layers." in k}
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return pruned, rep["seconds"]


def zeros_kept(dense_start, recovered) -> int:
    """Weights that were zero in the pruned start and are non-zero now (must be 0)."""
    bad = 0
    a, b = dict(dense_start.named_parameters()), dict(recovered.named_parameters())
    for k, w in a.items():
        if ".layers." in k and w.dim() == 2:
            bad += int(((w == 0) & (b[k] != 0)).sum())
    return bad


def table(path: str) -> str:
    """The ``recipe/`` rows of ``path`` as a markdown table (docs/recovery.md)."""
    data = _load(path)
    lines = ["| row | ppl before -> after (dense) | gap closed | wall s (load) | CPU s | pruned weights made non-zero |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k, v in sorted(data.items()):
        if not k.startswith("recipe/") or "ppl_after" not in v:
            continue
        load = v.get("load_before", "?").split()[0]
        lines.append(f"| `{k}` | {v['ppl_before']} -> **{v['ppl_after']}** ({v['ppl_dense']}) | {v['gap_closed']:.1%} | "
                     f"{v['wall_s']} ({load}) | {v.get('cpu_s', '-')} | {v.get('pruned_weights_made_nonzero')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--tag", default="recipe")
    ap.add_argument("--start", default="sparsegpt", choices=["wanda", "sparsegpt", "magnitude", "sparsegpt+permute"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--set", nargs="*", default=[], help="LayerwiseConfig fields, key=value")
    ap.add_argument("--no-recover", action="store_true", help="only the dense and pruned-start rows")
    ap.add_argument("--scratch", default="/tmp/laco_recipe")
    ap.add_argument("--label", default="", help="suffix of the record key")
    ap.add_argument("--table", action="store_true", help="print the recipe rows as markdown and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return

    from laco_kernels.data import calibration_windows
    from laco_kernels.eval.perplexity import perplexity
    from laco_kernels.models.loading import load_model
    from laco_kernels.recover import layerwise

    cmd = "python bench/recovery_recipe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    model, tok = load_model("smollm2-135m")

    def ppl(m):
        r = perplexity(m, tok, seqlen=args.eval_seqlen, max_windows=args.windows, progress=False)
        return round(r["ppl"], 3)

    ev = f"w{args.windows}x{args.eval_seqlen}"
    dense = _record(args.out, f"{args.tag}/dense/{ev}", lambda: dict(ppl=ppl(model), command=cmd))["ppl"]
    start, prune_s = pruned_start(model, tok, args.start, args.scratch)
    before = _record(args.out, f"{args.tag}/{args.start}-2:4/{ev}",
                     lambda: dict(ppl=ppl(start), prune_seconds=prune_s, command=cmd,
                                  prune="prune_model(pattern='2:4', sequential=True) on 32 x 512 C4, seed 0"))["ppl"]
    if args.no_recover:
        return
    cfg = {kv.split("=", 1)[0]: _parse_value(kv.split("=", 1)[1]) for kv in args.set}
    cfg.setdefault("progress", False)
    cfg.setdefault("track_errors", False)
    s2 = {k: cfg.pop(k) for k in ("stage2_epochs", "stage2_lr", "stage2_batch_size", "temperature") if k in cfg}

    def key_of(c):
        spec = ",".join(f"{k}={v}" for k, v in sorted(c.items()) if k not in ("progress",))
        return (f"{args.tag}/{args.start}-2:4/n{args.nsamples}x{args.seqlen}/{spec}/{ev}"
                + (f"/{args.label}" if args.label else ""))

    ids = calibration_windows(tok, args.nsamples, args.seqlen, seed=1)
    common = dict(method="laco", ppl_dense=dense, ppl_before=before, calibration_samples=args.nsamples,
                  seqlen=args.seqlen, calibration_tokens=args.nsamples * args.seqlen, windows=args.windows,
                  eval_seqlen=args.eval_seqlen, start=args.start, threads=env, compute="cpu, package path")
    # stage 1 (block by block); its recovered blocks are cached so stage-2 variants start from them
    key1 = key_of(cfg)
    cache = os.path.join(args.scratch, "stage1-" + hashlib.sha1(key1.encode()).hexdigest()[:16] + ".safetensors")
    m = copy.deepcopy(start)

    def stage1():
        from safetensors.torch import save_file

        load0 = _load_avg()
        mem = PeakMemory()
        t0, c0 = time.time(), _cpu_s()
        res = layerwise(model, m, ids, **cfg)
        secs, cpu = time.time() - t0, _cpu_s() - c0
        peak = _peak_mb(mem)
        save_file({k: v.contiguous() for k, v in m.state_dict().items() if ".layers." in k}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        after = ppl(m)
        return dict(common, ppl_after=after, gap_closed=round((before - after) / (before - dense), 4),
                    wall_s=round(secs, 1), cpu_s=round(cpu, 1), **peak, blocks=res.blocks, config=cfg, load_before=load0, load_after=_load_avg(),
                    pruned_weights_made_nonzero=zeros_kept(start, m), command=cmd)

    rec1 = _record(args.out, key1, stage1)
    if not s2 or not s2.get("stage2_epochs"):
        return
    if not os.path.exists(cache):
        raise SystemExit(f"{key1} is recorded but its recovered model {cache} is gone; delete the record")

    def stage2():
        from safetensors.torch import load_file

        from laco_kernels.models.adapters import get_adapter
        from laco_kernels.recover.layerwise import LayerwiseConfig, _stage2

        m.load_state_dict(load_file(cache), strict=False)
        c = LayerwiseConfig(**dict(cfg, **s2))
        load0 = _load_avg()
        mem = PeakMemory()
        t0, c0 = time.time(), _cpu_s()
        hist = _stage2(model, m, ids, c, get_adapter(m), 1)
        secs, cpu = time.time() - t0, _cpu_s() - c0
        peak = _peak_mb(mem)
        after = ppl(m)
        return dict(common, ppl_after=after, gap_closed=round((before - after) / (before - dense), 4),
                    ppl_after_stage1=rec1["ppl_after"], wall_s=round(rec1["wall_s"] + secs, 1),
                    cpu_s=round(rec1["cpu_s"] + cpu, 1) if rec1.get("cpu_s") is not None else None,
                    stage2_wall_s=round(secs, 1), stage2_cpu_s=round(cpu, 1), stage2_peak=peak, stage2=hist, config=dict(cfg, **s2), load_before=load0,
                    load_after=_load_avg(), pruned_weights_made_nonzero=zeros_kept(start, m), command=cmd)

    _record(args.out, key_of(dict(cfg, **s2)), stage2)


if __name__ == "__main__":
    main()
