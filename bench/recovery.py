"""End-to-end recovery benchmark: LaCo layer-wise compensation against the LoRA baseline.

    python bench/recovery.py quality --device cpu --nsamples 32 --seqlen 128 --windows 16 --eval-seqlen 512 \
        --runs laco:mse:5e-5:1:2 laco:token-nmse:3e-4:4:2 lora:3e-4:4:2 --tag proxy
    python bench/recovery.py memory --method laco --model smollm2 --steps 3       (one subprocess each)
    python bench/recovery.py memory --method lora --model llama-1b --steps 2
    python bench/recovery.py plots
    python bench/recovery.py goals      (memory goal recomputed from the memory/<model>/<method> records)

Writes ``bench/results/recovery.json`` (``--out``): a dict of records keyed by name, each with the
exact configuration that produced it. Resumable: a record already present is skipped; the file
is rewritten atomically after each record. SmolLM2-135M is pruned with Wanda (one-shot dense-stream
statistics are the package's ``sequential=False``) from C4 windows disjoint from the recovery ones.

Run specs: ``laco:LOSS:LR:BATCH:EPOCHS[:stage2_epochs[:target]]`` and ``lora:LR:BATCH:EPOCHS[:samples_multiplier]``.
Memory: peak resident set above the baseline after imports (``laco_kernels.recover._memory``),
each method in its own process, same micro-batch and sequence length, a few optimizer steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository, when not installed
DEFAULT_OUT = os.path.join(HERE, "results", "recovery.json")


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _record(out, key, fn):
    data = _load(out)
    if key in data:
        print(f"skip {key} (done)")
        return data[key]
    t0 = time.time()
    rec = fn()
    rec["record_seconds"] = round(time.time() - t0, 1)
    data = _load(out)
    data[key] = rec
    _save(out, data)
    print(json.dumps({key: rec}, default=str)[:2000])
    return rec


def _pruned_model(args, tok, model, pattern):
    from laco_kernels.data import calibration_windows
    from laco_kernels.prune import prune_model

    pruned = copy.deepcopy(model)
    calib = calibration_windows(tok, args.prune_samples, args.prune_seqlen, seed=1234, offset_docs=500)
    pat = "2:4" if pattern == "2:4" else None
    prune_model(pruned, "wanda", sparsity=0.5, pattern=pat, calibration=calib, device=args.device,
                sequential=False, progress=False)
    return pruned


def _ppl(model, tok, args):
    from laco_kernels.eval.perplexity import perplexity

    r = perplexity(model, tok, seqlen=args.eval_seqlen, max_windows=args.windows, device=args.device,
                   batch_size=args.eval_batch, progress=False)
    model.to("cpu")
    return round(r["ppl"], 3)


def quality(args):
    from laco_kernels.data import calibration_windows
    from laco_kernels.models.loading import load_model
    from laco_kernels.recover import layerwise, lora

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    evalcfg = dict(eval_seqlen=args.eval_seqlen, windows=args.windows, device=args.device)
    base = f"{args.tag}/{args.pattern}"
    dense_ppl = _record(args.out, f"{args.tag}/dense", lambda: dict(ppl=_ppl(model, tok, args), **evalcfg))["ppl"]
    pruned = _pruned_model(args, tok, model, args.pattern)
    pr = _record(args.out, f"{base}/wanda", lambda: dict(ppl=_ppl(pruned, tok, args), prune_samples=args.prune_samples,
                                                        prune_seqlen=args.prune_seqlen, **evalcfg))["ppl"]
    for spec in args.runs:
        parts = spec.split(":")
        key = f"{base}/n{args.nsamples}x{args.seqlen}/{spec}" + ("/no-error-tracking" if args.no_track else "")

        def run(parts=parts, spec=spec):
            m = copy.deepcopy(pruned)
            t0 = time.time()
            if parts[0] == "laco":
                loss, lr, bs, ep = parts[1], float(parts[2]), int(parts[3]), int(parts[4])
                st2 = int(parts[5]) if len(parts) > 5 else 0
                target = parts[6] if len(parts) > 6 else "dense-stream"
                ids = calibration_windows(tok, args.nsamples, args.seqlen, seed=0)
                cfg = dict(loss=loss, lr=lr, batch_size=bs, epochs=ep, stage2_epochs=st2, stage2_lr=args.stage2_lr,
                           stage2_batch_size=bs, target=target, device=args.device, progress=False,
                           eval_batch_size=16, track_errors=not args.no_track)
                res = layerwise(model, m, ids, **cfg)
                secs = time.time() - t0
                extra = dict(config=dict(cfg, weight_decay=1e-5, lr_min=1e-7, clip=1.0, train_dtype="fp32",
                                         stream_dtype="fp16"),
                             blocks=res.blocks, stage2=res.stage2)
                samples = args.nsamples
            else:
                lr, bs, ep = float(parts[1]), int(parts[2]), int(parts[3])
                mult = int(parts[4]) if len(parts) > 4 else 1
                samples = args.nsamples * mult
                ids = calibration_windows(tok, samples, args.seqlen, seed=0)
                cfg = dict(r=8, alpha=16, dropout=0.05, lr=lr, batch_size=bs, epochs=ep, device=args.device,
                           progress=False)
                res = lora(m, ids, **cfg)
                secs = time.time() - t0
                extra = dict(config=cfg, losses=res.losses, merged=False)
            ppl = _ppl(m, tok, args)
            return dict(method=parts[0], spec=spec, ppl_before=pr, ppl_after=ppl, ppl_dense=dense_ppl,
                        gap_closed=round((pr - ppl) / (pr - dense_ppl), 4), wall_s=round(secs, 1),
                        calibration_samples=samples, seqlen=args.seqlen, calibration_tokens=samples * args.seqlen,
                        torch_threads=torch.get_num_threads(), **evalcfg, **extra)

        _record(args.out, key, run)


def _random_dirs(root, config=None):
    """Random-init model (``config`` json, default ~1.1B Llama with TinyLlama shapes), dense and
    magnitude-2:4-pruned, saved as safetensors folders. Memory depends on shapes only, not values."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    dense_dir, pruned_dir = os.path.join(root, "dense"), os.path.join(root, "pruned")
    if os.path.exists(os.path.join(pruned_dir, "config.json")):
        return dense_dir, pruned_dir
    torch.manual_seed(0)
    if config:
        cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(config)))
    else:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    m = AutoModelForCausalLM.from_config(cfg)
    m.save_pretrained(dense_dir)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".layers." in n and p.dim() == 2:
                w = p.view(p.shape[0], -1, 4)
                w.scatter_(-1, w.abs().topk(2, -1, largest=False).indices, 0)
    m.save_pretrained(pruned_dir)
    return dense_dir, pruned_dir


def memory_child(args):
    """One method, one process: peak resident memory above the post-import baseline."""
    # every library either method imports lazily is imported before the baseline, for both
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from laco_kernels.models.loading import load_model, resolve_model_path
    from laco_kernels.recover import layerwise, lora
    from laco_kernels.recover._memory import PeakMemory

    if args.model == "smollm2" and not args.dense_dir:
        dense_dir = resolve_model_path("smollm2-135m")
        pruned_dir = args.pruned_dir
    else:
        dense_dir, pruned_dir = args.dense_dir, args.pruned_dir
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(pruned_dir).vocab_size
    ids = torch.randint(0, vocab, (args.mem_samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    mem = PeakMemory()
    t0 = time.time()
    if args.method == "laco":
        out = os.path.join(args.scratch, f"laco-{args.model}")
        layerwise(dense_dir, pruned_dir, ids, batch_size=1, epochs=1, max_steps_per_block=args.steps,
                  output_dir=out, offload_dir=os.path.join(args.scratch, "streams"), progress=False,
                  eval_batch_size=1, track_errors=False)
    else:
        model, _ = load_model(pruned_dir, with_tokenizer=False)
        lora(model, ids, batch_size=1, epochs=1, max_steps=args.steps, progress=False)
    print("RESULT " + json.dumps(dict(peak_above_baseline_bytes=mem.peak_above_baseline(),
                                      baseline_rss_bytes=mem.baseline, seconds=round(time.time() - t0, 1))))


def memory(args):
    """Spawn one child per method; record peak resident memory and the configuration."""
    scratch = args.scratch
    os.makedirs(scratch, exist_ok=True)
    if args.model == "smollm2" and not args.random_init_config:
        pruned_dir = os.path.join(scratch, "smollm2-wanda24")
        if not os.path.exists(os.path.join(pruned_dir, "config.json")):
            from laco_kernels.models.loading import load_model

            model, tok = load_model("smollm2-135m")
            pruned = _pruned_model(args, tok, model, "2:4")
            pruned.save_pretrained(pruned_dir)
            tok.save_pretrained(pruned_dir)
        extra = ["--pruned-dir", pruned_dir]
    else:
        d, p = _random_dirs(os.path.join(scratch, args.model), args.random_init_config)
        extra = ["--dense-dir", d, "--pruned-dir", p]
    key = f"memory/{args.model}/{args.method}"

    def run():
        cmd = [sys.executable, __file__, "memory-child", "--method", args.method, "--model", args.model,
               "--steps", str(args.steps), "--seqlen", str(args.seqlen), "--mem-samples", str(args.mem_samples),
               "--scratch", scratch] + extra
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        res = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
        return dict(res, method=args.method, model=args.model, micro_batch=1, seqlen=args.seqlen,
                    optimizer_steps=args.steps if args.method == "lora" else f"{args.steps} per block",
                    samples=args.mem_samples, malloc_mmap_threshold=65536, command=" ".join(cmd[1:]),
                    weights=("random-init, shapes of " + args.random_init_config) if args.random_init_config
                    else ("random-init ~1.1B Llama" if args.model == "llama-1b" else "SmolLM2-135M Wanda 2:4"),
                    compute="cpu", cpu_threads=torch.get_num_threads(), host=os.uname().nodename)

    _record(args.out, key, run)


def goals(args):
    """Recompute ``_goals.memory_ratio_laco_over_lora`` from the ``memory/<model>/<method>`` records
    (the final code, measured on this machine); the quality goals are kept as they are."""
    data = _load(args.out)
    targets = {"smollm2": 1 / 7, "llama-1b": 1 / 10}
    mem = {}
    for model, target in targets.items():
        laco, lora = data.get(f"memory/{model}/laco"), data.get(f"memory/{model}/lora")
        if not (laco and lora):
            mem[model] = {"met": None, "why": "memory/<model>/laco and /lora records missing"}
            continue
        ratio = laco["peak_above_baseline_bytes"] / lora["peak_above_baseline_bytes"]
        mem[model] = {"laco_bytes": laco["peak_above_baseline_bytes"], "lora_bytes": lora["peak_above_baseline_bytes"],
                      "ratio": round(ratio, 4), "target": round(target, 4), "met": ratio <= target,
                      "host": laco.get("host"), "cpu_threads": laco.get("cpu_threads")}
    g = data.setdefault("_goals", {})
    g["memory_ratio_laco_over_lora"] = mem
    _save(args.out, data)
    print(json.dumps(mem, indent=1))


def plots(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _load(args.out)
    laco = {k: v for k, v in data.items() if v.get("method") == "laco" and v.get("blocks")}
    if laco:
        k, v = max(laco.items(), key=lambda kv: kv[1]["gap_closed"])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        b = [r["block"] for r in v["blocks"]]
        ax.semilogy(b, [r["nmse_before"] for r in v["blocks"]], "o-", label="before (pruned block, pruned input)")
        ax.semilogy(b, [r["nmse_after"] for r in v["blocks"]], "o-", label="after layer-wise recovery")
        ax.set_xlabel("block")
        ax.set_ylabel("||out - target||² / ||target||²")
        ax.set_title(k, fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "results", "recovery_block_error.png"), dpi=120)
    # comparable points only: Wanda 2:4, WikiText-2 at seqlen 1024 with 32 windows
    runs = [v for k, v in data.items() if v.get("method") in ("laco", "lora") and "calibration_tokens" in v
            and "/2:4/" in k and v.get("eval_seqlen") == 1024 and v.get("windows") == 32]
    if runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in ("laco", "lora"):
            pts = sorted((v["calibration_tokens"], v["ppl_after"]) for v in runs if v["method"] == method)
            if pts:
                ax.plot(*zip(*pts), "o", label=method, alpha=0.7)
        ax.set_title("SmolLM2-135M Wanda 2:4; each point one recipe (bench/results/recovery.json)", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("calibration tokens")
        ax.set_ylabel("WikiText-2 perplexity after recovery")
        ax.legend()
        fig.tight_layout()
        # not recovery_ppl_vs_tokens.png: that is the data-efficiency plot of bench/recovery_tokens.py
        fig.savefig(os.path.join(HERE, "results", "recovery_wanda_recipes.png"), dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "memory", "memory-child", "plots", "goals"])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="main")
    ap.add_argument("--pattern", default="2:4", choices=["2:4", "unstructured"])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-batch", type=int, default=1)
    ap.add_argument("--prune-samples", type=int, default=32)
    ap.add_argument("--prune-seqlen", type=int, default=512)
    ap.add_argument("--stage2-lr", type=float, default=1e-5)
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--method", choices=["laco", "lora"])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mem-samples", type=int, default=4)
    ap.add_argument("--scratch", default=os.path.join("/tmp", "laco_recovery_bench"))
    ap.add_argument("--dense-dir")
    ap.add_argument("--random-init-config", help="memory: random-init model with this config.json's shapes")
    ap.add_argument("--pruned-dir")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-track", action="store_true", help="LaCo: skip the per-block error passes (timing)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"quality": quality, "memory": memory, "memory-child": memory_child, "plots": plots,
     "goals": goals}[args.what](args)


if __name__ == "__main__":
    main()
