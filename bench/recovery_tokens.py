"""Data-efficiency table (issue 14, item 3): layer-wise recovery vs LoRA at equal calibration tokens.

    OMP_NUM_THREADS=2 python bench/recovery_tokens.py --tokens 16384 65536 --methods laco lora
    python bench/recovery_tokens.py --table          (markdown table of the rows, no run)
    python bench/recovery_tokens.py --plot           (bench/results/recovery_ppl_vs_tokens.png)

Every row starts from the same pruned model, the SparseGPT 2:4 start that ``laco run`` makes
(``recovery_recipe.pruned_start``: 32 x 512 C4 windows, seed 0, cached under ``--scratch``), and
uses the same C4 sample: ``calibration_windows(tok, tokens // seqlen, seqlen, seed=1)``, what
``laco run`` draws for recovery. It is evaluated on the same first ``--windows`` WikiText-2 windows
of 1024 tokens. Methods (same number of passes ``--epochs`` over the sample):

- ``laco``: ``laco_kernels.recover.layerwise``, the ``laco run`` stage-1 recipe (token-nmse,
  lr 3e-3, batch 8); every pruned weight stays exactly zero (checked, ``pruned_weights_made_nonzero``).
- ``laco+kl``: the same, then ``--stage2-epochs`` of end-to-end KL to the dense logits
  (``--stage2-lr``), continuing from the ``laco`` row's model (its wall/CPU seconds include stage 1).
- ``lora``: ``laco_kernels.recover.lora``, the package's LoRA baseline (r 8, lr 1e-3, batch 4, the
  ``laco recover --method lora`` defaults), causal-LM loss, adapter unmerged: the base weights
  keep their zeros but the effective weights ``W + BA`` are dense (merging would break 2:4).

Each row: wall seconds, CPU seconds (user + system of this process; load-independent), the
kernel's peak resident set during the recovery (above the level before it, and absolute),
the load average before and after. Rows are keys ``tokens/<start>/<method>/n<N>x<seqlen>/...`` of
``bench/results/recovery.json`` (resumable: a key present is skipped).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shlex
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from recovery import DEFAULT_OUT, _load, _record  # noqa: E402
from recovery_recipe import _cpu_s, _load_avg, _peak_mb, pruned_start, zeros_kept  # noqa: E402

from laco_kernels.recover._memory import PeakMemory  # noqa: E402

PLOT = os.path.join(HERE, "results", "recovery_ppl_vs_tokens.png")
LABELS = {"laco": "layer-wise (LaCo, stage 1)", "laco+kl": "layer-wise + end-to-end KL", "kl": "end-to-end KL only",
          "lora": "LoRA r=8 (unmerged)"}


def _rows(path: str, windows: int):
    data = _load(path)
    return {k: v for k, v in data.items() if k.startswith("tokens/") and "ppl_after" in v and v.get("windows") == windows}


def _start(v: dict) -> str:
    """The pruned start of a row (rows from before the option have none: the plain SparseGPT start)."""
    return v.get("start", "sparsegpt")


def _recipe(v: dict) -> str:
    """Passes, KL stage and precision of a row, for the table."""
    c = v.get("config", {})
    prec = "bf16" if c.get("autocast") else "fp32"
    text = f"{c.get('epochs', v.get('epochs'))} passes" + (
        f" on {c['inputs']}-stream inputs" if c.get("inputs", "pruned") != "pruned" else "")
    if v["method"] in ("laco+kl", "kl"):
        kl = (f"KL {c.get('stage2_epochs')} x lr {c.get('stage2_lr'):g}, T = {c.get('temperature', 2.0):g}"
              + (f", batch {c['stage2_batch_size']}" if c.get("stage2_batch_size") else "")
              + (f", windows of {c['stage2_seqlen']}" if c.get("stage2_seqlen") else "")
              + (f", + {c['stage2_hidden']:g} x block-output token-nmse" if c.get("stage2_hidden") else "")
              + (f", {c['stage2_noise']:g} of input ids random" if c.get("stage2_noise")
                 and c.get("stage2_noise_source", "uniform") == "uniform" else "")
              + (f", {c['stage2_noise']:g} of input ids drawn from the dense model's top 16 (d8061d4 only)"
                 if c.get("stage2_noise_source") == "teacher" else "")
              + (f", + {v['stage2_generated']} windows sampled from the dense model" if v.get("stage2_generated")
                 else ""))
        text = kl if v["method"] == "kl" else f"{text} + {kl}"
    return f"{text}, {prec}" + (f", **{_start(v)} start**" if _start(v) != "sparsegpt" else "")


def _wall(v: dict) -> float:
    """Wall seconds of a row, sampling from the dense model (``--stage2-generated``) included."""
    return round(v["wall_s"] + v.get("generate_wall_s", 0.0), 1)


def table(path: str, windows: int = 32) -> str:
    lines = ["| method | tokens | recipe | ppl (dense / pruned) | gap closed | wall s | CPU s | peak RSS MB (above start) "
             "| load | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, v in sorted(_rows(path, windows).items(), key=lambda kv: (kv[1]["method"], kv[1]["calibration_tokens"],
                                                                      kv[1]["seqlen"], kv[0])):
        toks = f"{v['calibration_tokens']} ({v['calibration_samples']} x {v['seqlen']})"
        lines.append(f"| {v['method']} | {toks} | {_recipe(v)} | **{v['ppl_after']}** ({v['ppl_dense']} / "
                     f"{v['ppl_before']}) | {v['gap_closed']:.1%} | {_wall(v)} | {v['cpu_s']} | "
                     f"{v['peak_rss_mb']} ({v['peak_rss_above_mb']}) | {v['load_before'].split()[0]} | "
                     f"`{v['command']}` |")
    return "\n".join(lines)


def summary(path: str, windows: int = 32) -> str:
    """The best row of each (method, tokens, start), best first within a token count: the README's table."""
    best = {}
    for v in _rows(path, windows).values():
        key = (v["calibration_tokens"], _start(v), v["method"])
        if key not in best or v["ppl_after"] < best[key]["ppl_after"]:
            best[key] = v
    lines = ["| tokens | start (ppl) | method | recipe | ppl | wall s | command |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (t, start, method), v in sorted(best.items(), key=lambda kv: (kv[0][0], kv[1]["ppl_after"])):
        recipe = _recipe(v).split(", **")[0]  # the start has its own column
        lines.append(f"| {t:,} | {start} ({v['ppl_before']}) | {LABELS[method]} | {recipe} | **{v['ppl_after']}** "
                     f"| {_wall(v)} | `{v['command']}` |")
    return "\n".join(lines)


def plot(path: str, windows: int = 32, out: str = PLOT) -> None:
    """Perplexity against tokens, one line per method: the best row of each token count (windows of
    128 tokens only; the table lists every row with its recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from laco_kernels._atomic import atomic_file

    # one start for every point (the table's common SparseGPT 2:4 start; other starts are table rows)
    rows = [v for v in _rows(path, windows).values() if v["seqlen"] == 128 and _start(v) == "sparsegpt"]
    if not rows:
        raise SystemExit("no tokens/ rows to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, style in (("laco", "o-"), ("laco+kl", "s-"), ("kl", "d:"), ("lora", "^--")):
        best = {}
        for v in rows:
            if v["method"] == method:
                t = v["calibration_tokens"]
                if t not in best or v["ppl_after"] < best[t]["ppl_after"]:
                    best[t] = v
        pts = sorted((t, v["ppl_after"]) for t, v in best.items())
        if pts:
            ax.plot(*zip(*pts), style, label=LABELS[method])
            for t, v in best.items():
                ax.annotate(f"{v['ppl_after']:.1f}", (t, v["ppl_after"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.axhline(rows[0]["ppl_dense"], color="gray", lw=0.8, ls=":", label=f"dense {rows[0]['ppl_dense']}")
    ax.axhline(rows[0]["ppl_before"], color="gray", lw=0.8, ls="--", label=f"SparseGPT 2:4 start {rows[0]['ppl_before']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({v["calibration_tokens"] for v in rows})
    ax.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
    ax.set_xlabel("calibration tokens (C4, windows of 128)")
    ax.set_ylabel(f"WikiText-2 perplexity (seqlen 1024, {windows} windows)")
    ax.set_title("SmolLM2-135M 2:4, same start and sample; best row per point (bench/recovery_tokens.py)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _save_blocks(model, path: str) -> None:
    """The decoder blocks of ``model`` as safetensors (the stage-1 cache; written atomically)."""
    from safetensors.torch import save_file

    from laco_kernels._atomic import atomic_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if ".layers." in k}, tmp)


HELDOUT_DOCS = 600  # C4 documents skipped for held-out windows: runs of <= 65k tokens draw from the first ~480


@torch.no_grad()
def kl_on(teacher, student, ids: torch.Tensor, autocast: bool, batch: int = 2) -> float:
    """Mean token KL(teacher || student) over the windows ``ids`` [n, seqlen] (T = 1): the KL stage's
    fit on its own windows against held-out ones tells whether it is data-bound."""
    from laco_kernels.recover._losses import distill_kl

    was = student.training
    student.eval()
    total = 0.0
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            t = teacher(input_ids=x, use_cache=False).logits
            s = student(input_ids=x, use_cache=False).logits
        total += float(distill_kl(s.float(), t.float(), 1.0)) * len(x)
    student.train(was)
    return round(total / len(ids), 4)


GEN_PROMPT = 16  # ids of a calibration window that start each teacher-sampled sequence
GEN_CHUNK = 128  # length of each sampled sequence: HF's cache makes longer ones cost more per token


def teacher_windows(teacher, windows: torch.Tensor, n: int, autocast: bool, scratch: str, batch: int = 64) -> torch.Tensor:
    """``n`` windows of ``windows.shape[1]`` ids sampled from ``teacher`` (T = 1, top-p 0.95), int64 ``[n, seqlen]``.

    Each window is ``seqlen / GEN_CHUNK`` sequences of ``GEN_CHUNK`` ids laid end to end (as C4 windows
    span documents); sequence k continues ``GEN_PROMPT`` ids of ``windows[k % len(windows)]`` taken at
    offset ``(k // len(windows)) * GEN_CHUNK`` (mod the window), so no C4 ids beyond ``windows`` are read.
    Cached under ``scratch`` by (prompts, n): sampling is seeded, so the cache only saves time."""
    from safetensors.torch import load_file, save_file

    from laco_kernels._atomic import atomic_file

    w, seqlen = windows.shape
    if seqlen % GEN_CHUNK:
        raise SystemExit(f"--stage2-generated needs windows that are a multiple of {GEN_CHUNK} ids, got {seqlen}")
    per = seqlen // GEN_CHUNK
    k = torch.arange(n * per)
    offs = (k // w * GEN_CHUNK) % (seqlen - GEN_PROMPT + 1)
    prompts = torch.stack([windows[i % w, o:o + GEN_PROMPT] for i, o in zip(k.tolist(), offs.tolist())])
    key = hashlib.sha1(prompts.numpy().tobytes() + f"{n},{seqlen},{autocast}".encode()).hexdigest()[:16]
    path = os.path.join(scratch, f"teacher-windows-{key}.safetensors")
    if os.path.exists(path):
        return load_file(path)["ids"]
    out = []
    for i in range(0, len(prompts), batch):
        torch.manual_seed(1_000 + i)
        p = prompts[i:i + batch]
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            g = teacher.generate(p, attention_mask=torch.ones_like(p), do_sample=True, top_p=0.95, temperature=1.0,
                                 top_k=0, max_new_tokens=GEN_CHUNK - GEN_PROMPT, min_new_tokens=GEN_CHUNK - GEN_PROMPT,
                                 pad_token_id=0)
        out.append(g[:, :GEN_CHUNK].cpu())
        print(f"teacher sequences {i + len(p)}/{len(prompts)}", flush=True)
    ids = torch.cat(out).reshape(n, seqlen)
    os.makedirs(scratch, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({"ids": ids.contiguous()}, tmp)
    return ids


def _stage1_model(start, cache: str, run, recorded_ppl: float, ppl):
    """The recorded stage-1 model of a ``laco`` row: from its cache, or recomputed (the run is
    deterministic; the recomputed model must give the recorded perplexity, else this stops)."""
    from safetensors.torch import load_file

    m = copy.deepcopy(start)
    if os.path.exists(cache):
        m.load_state_dict(load_file(cache), strict=False)
        return m
    print(f"stage-1 cache {cache} missing: recomputing the recorded laco row", flush=True)
    run(m)
    got = ppl(m)
    if abs(got - recorded_ppl) > 1e-3 * recorded_ppl:
        raise SystemExit(f"recomputed stage 1 gives ppl {got}, the recorded row {recorded_ppl}: not the same model")
    _save_blocks(m, cache)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--start", default="sparsegpt", choices=["wanda", "sparsegpt", "sparsegpt+permute"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--methods", nargs="+", default=["laco", "lora"], choices=["laco", "laco+kl", "kl", "lora"])
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--laco-lr", type=float, default=3e-3)
    ap.add_argument("--laco-batch", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--laco-epochs", type=int, default=None, help="passes of the layer-wise stage (default: --epochs)")
    ap.add_argument("--autocast", action="store_true",
                    help="train under bf16 autocast (both methods; AMX / AVX512-BF16 CPUs); keys end in ,bf16")
    ap.add_argument("--stage2-epochs", type=int, default=1)
    ap.add_argument("--stage2-lr", type=float, default=1e-4)
    ap.add_argument("--stage2-seqlen", type=int, default=None,
                    help="window length of the KL stage's own windows (same token count; default: the layer-wise windows)")
    ap.add_argument("--stage2-batch", type=int, default=None,
                    help="windows per KL step (default: --laco-batch); fewer means more optimizer steps")
    ap.add_argument("--temperature", type=float, default=2.0, help="KL stage temperature (default: 2)")
    ap.add_argument("--stage2-hidden", type=float, default=0.0,
                    help="KL stage: + this x the mean token-nmse of the block outputs (LayerwiseConfig.stage2_hidden)")
    ap.add_argument("--stage2-noise", type=float, default=0.0,
                    help="KL stage: fraction of input ids replaced by random ids each step (default 0)")
    ap.add_argument("--calib-data", default=None, metavar="FILE",
                    help="recovery windows from this .jsonl / plain text file instead of the C4 sample "
                         "(laco_kernels.data.calibration_windows(path=...); the pruned start stays C4's)")
    ap.add_argument("--stage2-generated", type=int, default=0,
                    help="KL stage: + this many windows sampled from the dense model, each continuing the first "
                         f"{GEN_PROMPT} ids of a KL window per {GEN_CHUNK}-id sequence (no C4 ids beyond the calibration ones)")
    ap.add_argument("--inputs", default="pruned", choices=["pruned", "dense", "mix"],
                    help="layer-wise stage: what each block trains on (LayerwiseConfig.inputs); keys add ,in<inputs>")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--scratch", default="/tmp/laco_recipe")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--summary", action="store_true", help="print the best row per method, tokens and start")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()
    if args.stage2_generated < 0 or (args.stage2_generated and not {"laco+kl", "kl"} & set(args.methods)):
        ap.error(f"--stage2-generated {args.stage2_generated}: needs a count >= 0 and a KL method (laco+kl or kl)")
    if args.table or args.plot or args.summary:
        if args.table:
            print(table(args.out, args.windows))
        if args.summary:
            print(summary(args.out, args.windows))
        if args.plot:
            plot(args.out, args.windows)
        return

    from laco_kernels.data import calibration_windows
    from laco_kernels.eval.perplexity import perplexity
    from laco_kernels.models.loading import load_model
    from laco_kernels.recover import layerwise, lora

    cmd = "python bench/recovery_tokens.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    model, tok = load_model("smollm2-135m")

    def ppl(m):
        return round(perplexity(m, tok, seqlen=1024, max_windows=args.windows, progress=False)["ppl"], 3)

    ev = f"w{args.windows}x1024"
    dense = _record(args.out, f"tokens/dense/{ev}", lambda: dict(ppl=ppl(model), command=cmd))["ppl"]
    start, _ = pruned_start(model, tok, args.start, args.scratch)
    before = _record(args.out, f"tokens/{args.start}-2:4/{ev}", lambda: dict(ppl=ppl(start), command=cmd))["ppl"]

    def measured(fn):
        load0, mem = _load_avg(), PeakMemory()
        t0, c0 = time.time(), _cpu_s()
        out = fn()
        return out, dict(wall_s=round(time.time() - t0, 1), cpu_s=round(_cpu_s() - c0, 1), **_peak_mb(mem),
                         load_before=load0, load_after=_load_avg())

    bf = ",bf16" if args.autocast else ""
    # calibration text of one's own (--calib-data): the recovery windows come from it, the pruned start and the
    # held-out KL windows stay C4's; keys add ,data=<file name>
    dsfx = f",data={os.path.basename(args.calib_data)}" if args.calib_data else ""
    for n_tok in args.tokens:
        n = n_tok // args.seqlen
        ids = calibration_windows(tok, n, args.seqlen, seed=1, path=args.calib_data)
        common = dict(ppl_dense=dense, ppl_before=before, calibration_samples=n, seqlen=args.seqlen,
                      calibration_tokens=n * args.seqlen,
                      calibration_data=args.calib_data or "c4-sample", windows=args.windows, eval_seqlen=1024, start=args.start,
                      epochs=args.epochs, threads=torch.get_num_threads(), compute="cpu, package path", command=cmd)

        def gap(p):
            return round((before - p) / (before - dense), 4)

        laco_model = None
        s2bs = args.stage2_batch or args.laco_batch

        # the KL stage's settings in a row key (laco+kl and kl rows), each only where it is not the default
        kl_suffix = ((f",s2len{args.stage2_seqlen}" if args.stage2_seqlen else "")
                     + (f",hid{args.stage2_hidden:g}" if args.stage2_hidden else "")
                     + (f",noise{args.stage2_noise:g}" if args.stage2_noise else "")
                     + (f",gen{args.stage2_generated}" if args.stage2_generated else ""))

        def kl_stage(student):
            """The KL stage on ``student`` (in place): (loss per pass, measurements, its settings)."""
            from laco_kernels.models.adapters import get_adapter
            from laco_kernels.recover.layerwise import LayerwiseConfig, _stage2

            s2 = dict(stage2_epochs=args.stage2_epochs, stage2_lr=args.stage2_lr, stage2_batch_size=s2bs,
                      temperature=args.temperature, stage2_hidden=args.stage2_hidden)
            if args.stage2_noise:
                s2["stage2_noise"] = args.stage2_noise
            c = LayerwiseConfig(**dict(cfg_l, **s2))
            ids2 = ids if not args.stage2_seqlen else calibration_windows(
                tok, n_tok // args.stage2_seqlen, args.stage2_seqlen, seed=1, path=args.calib_data)
            gen_s = None
            if args.stage2_generated:
                t0 = time.time()
                gen = teacher_windows(model, ids2, args.stage2_generated, args.autocast, args.scratch)
                gen_s = round(time.time() - t0, 1)
                ids2 = torch.cat([ids2, gen])
            hist, meas = measured(lambda: _stage2(model, student, ids2, c, get_adapter(student), 1))
            # generalisation of the KL stage: its KL on 16 of its own windows and on 16 held-out ones
            held = calibration_windows(tok, 16, ids2.shape[1], seed=2, offset_docs=HELDOUT_DOCS)
            if gen_s is not None:
                meas.update(generate_wall_s=gen_s, stage2_generated=args.stage2_generated,
                            generate_note=f"windows sampled from the dense model (T = 1, top-p 0.95, bf16 autocast "
                                          f"{args.autocast}) as sequences of {GEN_CHUNK} ids laid end to end, each continuing {GEN_PROMPT} ids"
                                          f" of a KL window;"
                                          f" generate_wall_s is only the load time when they came from the scratch cache")
            meas.update(kl_fit_windows=kl_on(model, student, ids2[:16], args.autocast),
                        kl_heldout_windows=kl_on(model, student, held, args.autocast),
                        kl_heldout_note=f"16 windows of {ids2.shape[1]} from C4 documents {HELDOUT_DOCS}+ (seed 2)")
            return hist, meas, dict(s2, stage2_seqlen=args.stage2_seqlen)

        for method in args.methods:
            if method == "laco+kl" and "laco" not in args.methods:
                raise SystemExit("laco+kl continues from the laco row: list laco before it")
            lep = args.laco_epochs or args.epochs
            cfg_l = dict(loss="token-nmse", lr=args.laco_lr, batch_size=args.laco_batch, epochs=lep, autocast=args.autocast,
                         progress=False, track_errors=False, inputs=args.inputs)
            inp = (f",in{args.inputs}" if args.inputs != "pruned" else "") + dsfx
            if method == "laco":
                key = f"tokens/{args.start}-2:4/laco/n{n}x{args.seqlen}/lr{args.laco_lr:g},bs{args.laco_batch},ep{lep}{bf}{inp}/{ev}"

                cache = os.path.join(args.scratch, "tokens-" + hashlib.sha1(key.encode()).hexdigest()[:16]
                                     + ".safetensors")

                def run_laco():
                    nonlocal laco_model
                    laco_model = copy.deepcopy(start)
                    _, meas = measured(lambda: layerwise(model, laco_model, ids, **cfg_l))
                    _save_blocks(laco_model, cache)
                    p = ppl(laco_model)
                    return dict(common, method="laco", epochs=lep, config=cfg_l, ppl_after=p, gap_closed=gap(p), **meas,
                                pruned_weights_made_nonzero=zeros_kept(start, laco_model))

                rec_laco = _record(args.out, key, run_laco)
                if laco_model is None and "laco+kl" in args.methods:
                    laco_model = _stage1_model(start, cache, lambda m: layerwise(model, m, ids, **cfg_l),
                                               rec_laco["ppl_after"], ppl)
            elif method == "laco+kl":
                key = (f"tokens/{args.start}-2:4/laco+kl/n{n}x{args.seqlen}/lr{args.laco_lr:g},bs{args.laco_batch},"
                       f"ep{lep},s2ep{args.stage2_epochs},s2lr{args.stage2_lr:g}{bf}{inp}"
                       + (f",T{args.temperature:g}" if args.temperature != 2.0 else "")
                       + (f",s2bs{s2bs}" if s2bs != args.laco_batch else "")
                       + kl_suffix + f"/{ev}")

                def run_kl():
                    hist, meas, s2 = kl_stage(laco_model)
                    p = ppl(laco_model)
                    meas.update(stage2_wall_s=meas["wall_s"], stage2_cpu_s=meas["cpu_s"],
                                wall_s=round(meas["wall_s"] + rec_laco["wall_s"], 1),
                                cpu_s=round(meas["cpu_s"] + rec_laco["cpu_s"], 1),
                                peak_rss_mb=max(meas["peak_rss_mb"], rec_laco["peak_rss_mb"]),
                                peak_rss_above_mb=max(meas["peak_rss_above_mb"], rec_laco["peak_rss_above_mb"]))
                    return dict(common, method="laco+kl", epochs=lep, config=dict(cfg_l, **s2),
                                ppl_after=p, ppl_after_stage1=rec_laco["ppl_after"], gap_closed=gap(p), stage2=hist,
                                **meas, pruned_weights_made_nonzero=zeros_kept(start, laco_model))

                _record(args.out, key, run_kl)
            elif method == "kl":  # the KL stage alone, straight from the pruned start
                key = (f"tokens/{args.start}-2:4/kl/n{n}x{args.seqlen}/s2ep{args.stage2_epochs},s2lr{args.stage2_lr:g}{bf}"
                       + (f",T{args.temperature:g}" if args.temperature != 2.0 else "")
                       + (f",s2bs{args.stage2_batch}" if args.stage2_batch else "")
                       + kl_suffix + f"/{ev}")

                def run_kl_only():
                    m = copy.deepcopy(start)
                    hist, meas, s2 = kl_stage(m)
                    p = ppl(m)
                    return dict(common, method="kl", epochs=args.stage2_epochs,
                                config=dict(autocast=args.autocast, epochs=0, **s2),
                                ppl_after=p, gap_closed=gap(p), stage2=hist, **meas,
                                pruned_weights_made_nonzero=zeros_kept(start, m))

                _record(args.out, key, run_kl_only)
            else:
                key = f"tokens/{args.start}-2:4/lora/n{n}x{args.seqlen}/lr{args.lora_lr:g},bs{args.lora_batch},ep{args.epochs}{bf}{dsfx}/{ev}"
                cfg_r = dict(r=8, alpha=16, dropout=0.05, lr=args.lora_lr, batch_size=args.lora_batch, autocast=args.autocast,
                             epochs=args.epochs, progress=False)

                def run_lora():
                    m = copy.deepcopy(start)
                    res, meas = measured(lambda: lora(m, ids, **cfg_r))
                    p = ppl(res.model)
                    return dict(common, method="lora", config=cfg_r, ppl_after=p, gap_closed=gap(p), losses=res.losses,
                                merged=False, **meas)

                _record(args.out, key, run_lora)


if __name__ == "__main__":
    main()
