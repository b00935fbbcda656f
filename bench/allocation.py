"""Where to prune, on SmolLM2-135M: sparsity allocation (uniform / OWL / LSA) and block removal
(BI one-shot / iterative / iterative + compensation, LaCo collapse) by WikiText-2 perplexity.

    flock /tmp/laco_heavy.lock timeout 3000 nice -n 5 python bench/allocation.py [--only ID ...]

Writes ``bench/results/allocation.json`` (one record per run, rewritten atomically after each
run; a rerun skips the records already there) and ``bench/results/allocation.png``. Runs go in
order of importance, so a cut-off run still holds the comparisons that matter most.
Perplexity: WikiText-2 test, seqlen 1024, the first ``--windows`` windows, exp(mean NLL).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from laco_kernels.data import calibration_windows, wikitext_windows  # noqa: E402
from laco_kernels.models.adapters import get_adapter, get_module  # noqa: E402
from laco_kernels.models.loading import load_model  # noqa: E402
from laco_kernels.prune.collapse import collapse_layers  # noqa: E402
from laco_kernels.prune.layer_removal import remove_layers  # noqa: E402
from laco_kernels.prune.lsa import lsa_allocation, lsa_errors  # noqa: E402
from laco_kernels.prune.owl import outlier_ratios, owl_allocation  # noqa: E402

MODEL = "smollm2-135m"
DEVICE = "cpu"  # --device
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "allocation.json")
PLOT = os.path.join(HERE, "results", "allocation.png")
PRUNE_CALIB = dict(nsamples=32, seqlen=512, seed=0)     # Wanda / SparseGPT / LSA / OWL statistics
REMOVAL_CALIB = dict(nsamples=16, seqlen=512, seed=1)   # BI and compensation statistics
LACO_CALIB = dict(nsamples=8, seqlen=128, seed=2)      # LaCo's few calibration sentences
LACO = dict(C=3, I=2, L=1, T=0.65)                      # C=3: every merge removes 2 blocks
KS = (2, 4, 6)                                          # blocks removed (of 30)


def _run_list():
    """(ids the run records, spec) in order of importance. A removal run records k = 2, 4, 6 at once:
    iterative removal and the LaCo search pass through the smaller counts on their way to 6."""
    runs = [(["dense"], dict(kind="dense"))]
    alloc = lambda m, s, a: ([f"{m}-{int(s * 100)}-{a}"], dict(kind="prune", method=m, sparsity=s, alloc=a))
    removal = lambda how: ([f"{how}-remove{k}" for k in KS], dict(kind="removal", how=how))
    runs += [alloc("wanda", 0.7, "uniform"), alloc("wanda", 0.7, "lsa-layer")]
    runs += [removal("bi-iterative-comp"), removal("bi-iterative")]
    runs += [alloc("sparsegpt", 0.7, "uniform"), alloc("sparsegpt", 0.7, "lsa-layer")]
    runs += [alloc(m, 0.7, a) for m in ("wanda", "sparsegpt") for a in ("owl", "lsa-block", "lsa-projection")]
    runs += [removal(h) for h in ("bi-oneshot", "laco", "laco-published-code")]
    runs += [alloc(m, 0.5, a) for m in ("wanda", "sparsegpt")
             for a in ("uniform", "owl", "lsa-layer", "lsa-block", "lsa-projection")]
    runs += [alloc("wanda", 0.7, "lsa-layer-reverse")]  # ablation: larger error -> denser
    return runs


# -- I/O ----------------------------------------------------------------------------------------
def _load():
    if os.path.exists(OUT):
        with open(OUT) as f:
            return json.load(f)
    return {"meta": {}, "records": {}}


def _save(state):
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, OUT)


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def _perplexity(model, windows):
    """exp(mean over windows of the mean next-token NLL), one window at a time (windows are equal
    in length, so this is laco_kernels.eval.perplexity's exp(total NLL / tokens))."""
    dev = next(model.parameters()).device
    nll = []
    for w in windows:
        w = w.unsqueeze(0).to(dev)
        nll.append(float(model(input_ids=w, labels=w, use_cache=False).loss))
    return math.exp(sum(nll) / len(nll))


def _load_model():
    return load_model(MODEL, device=DEVICE, with_tokenizer=False)[0]


def _decoder_sparsity(model):
    adapter = get_adapter(model)
    zeros = total = 0
    for block in get_module(model, adapter.blocks):
        for name in adapter.linear_names():
            w = get_module(block, name).weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


# -- runs -----------------------------------------------------------------------------------------
def _allocation(spec, model, calib, state):
    """The sparsity argument of prune_model for an allocation name (statistics cached in meta)."""
    s, a = spec["sparsity"], spec["alloc"]
    if a == "uniform":
        return s
    if a == "owl":
        if "owl_ratios" not in state["meta"]:
            state["meta"]["owl_ratios"] = outlier_ratios(model, calib, device=DEVICE, progress=False)
            _save(state)
        return owl_allocation(model, s, ratios=state["meta"]["owl_ratios"])
    if "lsa_errors" not in state["meta"]:
        t0 = time.time()
        state["meta"]["lsa_errors"] = lsa_errors(model, calib, device=DEVICE, progress=False)
        state["meta"]["lsa_errors_seconds"] = round(time.time() - t0, 1)
        _save(state)
    granularity = a.split("-")[1]
    return lsa_allocation(model, s, errors=state["meta"]["lsa_errors"], granularity=granularity,
                          reverse=a.endswith("-reverse"))


def _evaluate(model, windows, rec, t0):
    rec["method_seconds"] = round(time.time() - t0, 1)
    t1 = time.time()
    rec["ppl"] = _perplexity(model, windows)
    rec["eval_seconds"] = round(time.time() - t1, 1)
    return rec


def _run(ids, spec, state, windows, tok):
    """Run one spec; store its record(s) in state as they finish."""
    def done(rid, rec):
        state["records"][rid] = rec
        _save(state)
        print(f"   {rid}: ppl {rec['ppl']:.2f}  ({rec['method_seconds']} s method, {rec['eval_seconds']} s eval)",
              flush=True)
        _plot(state)

    model = _load_model()
    t0 = time.time()
    if spec["kind"] == "dense":
        return done(ids[0], _evaluate(model, windows, dict(spec), t0))
    if spec["kind"] == "prune":
        from laco_kernels.prune import prune_model  # imported late: the removal runs do not need it

        rec = dict(spec, calibration=PRUNE_CALIB)
        calib = calibration_windows(tok, **PRUNE_CALIB)
        sparsity = _allocation(spec, model, calib, state)
        if isinstance(sparsity, dict):
            rec["allocation_range"] = [min(sparsity.values()), max(sparsity.values())]
        t1 = time.time()
        prune_model(model, spec["method"], sparsity, calibration=calib, device=DEVICE, progress=False)
        rec["prune_seconds"] = round(time.time() - t1, 1)
        rec["achieved_sparsity"] = _decoder_sparsity(model)
        return done(ids[0], _evaluate(model, windows, rec, t0))
    how = spec["how"]
    if how.startswith("laco"):
        return _run_laco(ids, how, model, state, windows, tok, done)
    calib = calibration_windows(tok, **REMOVAL_CALIB)
    if how == "bi-oneshot":  # one ranking of the dense model, the k lowest removed
        for rid, k in zip(ids, KS):
            if k > KS[0]:
                model = _load_model()
                t0 = time.time()
            rep = remove_layers(model, k, calib, metric="bi", iterative=False, compensate=False, device=DEVICE,
                                progress=False)
            rec = dict(spec, k=k, calibration=REMOVAL_CALIB, removed=rep["removed"], first_bi=rep["importance"][0],
                       num_layers=rep["num_layers"])
            done(rid, _evaluate(model, windows, rec, t0))
        return
    comp = how.endswith("-comp")
    alive, removed, scales, prev = list(range(model.config.num_hidden_layers)), [], [], 0
    for rid, k in zip(ids, KS):  # iterative: rounds of 2 continue the same trajectory as one run of 6
        t0 = time.time()
        rep = remove_layers(model, k - prev, calib, metric="bi", iterative=True, compensate=comp, device=DEVICE,
                            progress=False)
        prev = k
        # rep["removed"] numbers blocks as they were at this call's start: map back to the dense model's
        gone = [alive[p] for p in rep["removed"]]
        alive = [a for a in alive if a not in gone]
        removed += gone
        scales += rep["scales"]
        rec = dict(spec, k=k, calibration=REMOVAL_CALIB, removed=list(removed), scales=list(scales),
                   num_layers=rep["num_layers"])
        done(rid, _evaluate(model, windows, rec, t0))


def _run_laco(ids, how, model, state, windows, tok, done):
    """LaCo search to 6 blocks, evaluated after each accepted merge that reaches 2, 4, 6 removed.

    If the published T leaves the search short, it is rerun from the dense model with T set just
    below the best similarity rejected after the last accepted merge (recorded per attempt)."""
    calib = calibration_windows(tok, **LACO_CALIB)
    variant = "published-code" if how.endswith("published-code") else "formula"
    want = dict(zip(KS, ids))
    attempts, T = [], LACO["T"]
    t0 = [time.time()]
    while True:
        def on_merge(m, rep):
            rid = want.get(rep["removed"])
            if rid is not None and rid not in state["records"]:
                rec = dict(kind="removal", how=how, k=rep["removed"], laco=dict(LACO, T=T), calibration=LACO_CALIB,
                           merges=rep["merges"], attempts=list(attempts), num_layers=rep["num_layers"])
                done(rid, _evaluate(m, windows, rec, t0[0]))
                t0[0] = time.time()
        rep = collapse_layers(model, calib, C=LACO["C"], I=LACO["I"], L=LACO["L"], T=T, target_removed=max(KS),
                              variant=variant, on_merge=on_merge, device=DEVICE, progress=False)
        attempts.append(dict(T=T, removed=rep["removed"], merges=rep["merges"],
                             trials=[(a, round(s, 4), ok) for a, s, ok in rep["trials"]]))
        state["meta"].setdefault("laco_attempts", {})[how] = attempts
        _save(state)
        if rep["reached_target"]:
            return
        last = max([i for i, t in enumerate(rep["trials"]) if t[2]], default=-1)
        rejected = [s for _, s, ok in rep["trials"][last + 1:] if not ok] or [
            s for _, s, ok in rep["trials"] if not ok]
        if not rejected or len(attempts) >= 12:
            print(f"   {how}: the search cannot reach {max(KS)} removed blocks (attempts in meta)", flush=True)
            return
        T = max(rejected) - 1e-6
        model = _load_model()
        t0[0] = time.time()


def _plot(state):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = state["records"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    allocs = ["uniform", "owl", "lsa-layer", "lsa-block", "lsa-projection"]
    groups = [(m, s) for s in (0.5, 0.7) for m in ("wanda", "sparsegpt")]
    width = 0.16
    for j, a in enumerate(allocs):
        xs, ys = [], []
        for g, (m, s) in enumerate(groups):
            r = recs.get(f"{m}-{int(s * 100)}-{a}")
            if r:
                xs.append(g + (j - 2) * width)
                ys.append(r["ppl"])
        ax1.bar(xs, ys, width, label=a)
    ax1.set_xticks(range(len(groups)), [f"{m} {int(s * 100)}%" for m, s in groups])
    if ax1.patches:
        ax1.set_yscale("log")
    ax1.set_ylabel("WikiText-2 perplexity")
    ax1.set_title("unstructured sparsity allocation")
    if ax1.patches:
        ax1.legend(fontsize=8)
    dense = recs.get("dense", {}).get("ppl")
    for how in ("bi-oneshot", "bi-iterative", "bi-iterative-comp", "laco", "laco-published-code"):
        pts = [(k, recs[f"{how}-remove{k}"]["ppl"]) for k in (2, 4, 6) if f"{how}-remove{k}" in recs]
        if dense:
            pts = [(0, dense)] + pts
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=how)
    if ax2.lines:
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("blocks removed (of 30)")
    ax2.set_title("block removal")
    fig.suptitle("SmolLM2-135M, WikiText-2 ppl (seqlen 1024)")
    fig.tight_layout()
    tmp = PLOT + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, PLOT)


def _table(state):
    print(f"{'run':36s} {'ppl':>10s} {'sparsity':>9s} {'layers':>7s} {'time s':>7s}")
    for rid, r in state["records"].items():
        sp = f"{r['achieved_sparsity']:.4f}" if "achieved_sparsity" in r else ""
        print(f"{rid:36s} {r['ppl']:10.2f} {sp:>9s} {str(r.get('num_layers', '')):>7s} "
              f"{r['method_seconds'] + r['eval_seconds']:7.0f}")


def main(argv=None):
    global DEVICE, OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--only", nargs="*", help="run ids to run (default: all, in order)")
    ap.add_argument("--skip-prune", action="store_true", help="skip the runs that need prune_model")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--device", default="cpu", help="where blocks compute and perplexity runs (cpu, cuda)")
    ap.add_argument("--out", default=OUT, help="results file (a second job can run other --only ids into "
                                               "its own file, then --merge it)")
    ap.add_argument("--merge", nargs="*", default=[], help="results files whose records are copied into --out "
                                                           "(same settings required), before anything runs")
    args = ap.parse_args(argv)
    DEVICE, OUT = args.device, args.out
    torch.manual_seed(0)
    state = _load()
    meta = dict(model=MODEL, windows=args.windows, seqlen=1024, prune_calib=PRUNE_CALIB,
                removal_calib=REMOVAL_CALIB, laco_calib=LACO_CALIB, torch_threads=torch.get_num_threads(),
                ppl="exp(mean window NLL), WikiText-2 test, non-overlapping windows, bench-local loop")
    for key in ("model", "windows", "seqlen", "prune_calib", "removal_calib", "laco_calib"):
        if key in state["meta"] and state["meta"][key] != meta[key]:
            raise SystemExit(f"{OUT} was made with {key}={state['meta'][key]}, not {meta[key]}; move it away")
    state["meta"].update(meta)
    for path in args.merge:
        with open(path) as f:
            other = json.load(f)
        for key in ("model", "windows", "seqlen", "prune_calib", "removal_calib", "laco_calib"):
            if other["meta"].get(key) != meta[key]:
                raise SystemExit(f"{path} was made with {key}={other['meta'].get(key)}, not {meta[key]}")
        state["records"].update({k: v for k, v in other["records"].items() if k not in state["records"]})
    if args.merge:
        _save(state)
    if not args.plot_only:
        _, tok = load_model(MODEL)
        windows = wikitext_windows(tok, 1024, max_windows=args.windows)
        for ids, spec in _run_list():
            if all(r in state["records"] for r in ids) or (args.only and not set(ids) & set(args.only)):
                continue
            if args.skip_prune and spec["kind"] == "prune":
                continue
            print(f"== {ids[0]} ...", flush=True)
            _run(ids, spec, state, windows, tok)
    _table(state)
    _plot(state)


if __name__ == "__main__":
    main()
