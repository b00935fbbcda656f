"""RestoreLCC benchmark: SmolLM2-135M pruned by Wanda (50% unstructured and 2:4), WikiText-2 perplexity
before and after RestoreLCC, trainable parameters, peak memory and wall time.

    flock /tmp/laco_heavy.lock nice -n 5 python bench/restore_lcc.py --n-prompts 256 --max-prompt-tokens 128
    # writes bench/results/restore_lcc.json

Each row runs in a fresh child process, so its peak resident memory is its own: ``peak_rss_above_imports``
is the kernel's high-water mark of the child's resident set above the one right after the imports
(both models, pruning, evaluation and RestoreLCC included); ``peak_rss_restore_lcc`` is the high-water
mark during ``restore_lcc`` above the resident set when it started (what the method adds to the two
loaded models). Resumes: rows already in the JSON (same arguments) are skipped, and an interrupted
row resumes its RestoreLCC stages from ``--work-dir``; the JSON is rewritten atomically after each row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = {"wanda:unstructured": ("wanda", None), "wanda:2:4": ("wanda", "2:4")}
_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _settings(args) -> dict:
    """Everything that defines a row's result (the resume key)."""
    return {"model": args.model, "seqlen": args.seqlen, "windows": args.windows,
            "calibration": {"source": "c4-sample.jsonl", "samples": args.calib_nsamples, "seqlen": args.calib_seqlen,
                            "seed": args.seed},
            "restore_lcc": {"data": args.data or "c4-sample.jsonl", "n_prompts": args.n_prompts,
                            "max_prompt_tokens": args.max_prompt_tokens,
                            "max_response_tokens": args.max_response_tokens, "top_k": args.top_k, "rank": args.rank,
                            "epochs": args.epochs, "lr": args.lr, "probe_epochs": args.probe_epochs,
                            "batch_size": args.batch_size, "seed": args.seed}}


def _write(path: str, records: list) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


def _child(args) -> None:
    """One row, in this process; writes the record to ``args.result_file``."""
    import torch

    from laco_kernels.data import calibration_windows
    from laco_kernels.eval import perplexity
    from laco_kernels.models.loading import load_model
    from laco_kernels.prune import prune_model
    from laco_kernels.recover._memory import PeakMemory
    from laco_kernels.recover.restore_lcc import restore_lcc

    mem = PeakMemory()
    method, pattern = ROWS[args.child]
    s = _settings(args)
    rec = {"row": args.child, "method": "restore-lcc", "pruning": method, "pattern": pattern, "sparsity": 0.5, **s,
           "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    dense, tok = load_model(args.model)
    pruned, _ = load_model(args.model, with_tokenizer=False)
    calib = calibration_windows(tok, args.calib_nsamples, args.calib_seqlen, seed=args.seed)
    report = prune_model(pruned, method, 0.5, pattern, calib, batch_size=4)
    rec.update(prune_seconds=report["seconds"], achieved_sparsity=report["overall_sparsity"])
    zeros = {n: (p == 0) for n, p in pruned.named_parameters() if p.dim() == 2 and n in
             {f"{k}.weight" for k in report["layers"]}}
    t = time.perf_counter()
    with torch.no_grad():
        rec["ppl_before"] = perplexity(pruned, tok, args.seqlen, args.windows)["ppl"]
    rec["eval_seconds_before"] = time.perf_counter() - t
    peak_before = mem.peak_above_baseline()
    m2 = PeakMemory()
    res = restore_lcc(dense, pruned, tok, n_prompts=args.n_prompts, max_prompt_tokens=args.max_prompt_tokens,
                      max_response_tokens=args.max_response_tokens, data_path=args.data, top_k=args.top_k,
                      rank=args.rank, probe_epochs=args.probe_epochs, lr=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed,
                      checkpoint_dir=os.path.join(args.work_dir, args.child.replace(":", "_")))
    rec["peak_rss_restore_lcc"] = m2.peak_above_baseline()
    del dense
    t = time.perf_counter()
    with torch.no_grad():
        rec["ppl_after"] = perplexity(pruned, tok, args.seqlen, args.windows)["ppl"]
    rec["eval_seconds_after"] = time.perf_counter() - t
    params = dict(pruned.named_parameters())
    rec["pruned_weights_still_zero"] = all(bool((params[n][z] == 0).all()) for n, z in zeros.items())
    rec.update(n_pairs=res.n_pairs, top_k=len(res.heads), heads=res.heads, trainable_params=res.trainable_params,
               train_losses=res.losses, config_route=res.config_route,
               probe_accuracy_top=float(res.probe_accuracy.max()),
               probe_accuracy_mean=float(res.probe_accuracy.mean()),
               restore_lcc_seconds=res.seconds["total"], restore_lcc_stage_seconds=res.seconds,
               peak_rss_above_imports=max(peak_before, m2.baseline - mem.baseline + m2.peak_above_baseline()),
               seconds=time.perf_counter() - t0)
    _write(args.result_file, [rec])


def merge_into_recovery(records: list, path: str) -> None:
    """Copy the rows into ``bench/results/recovery.json`` (keys ``restore-lcc/<pruning>/<pattern>``)
    so that RestoreLCC stands beside LaCo and LoRA there; rewritten atomically."""
    state = json.load(open(path)) if os.path.exists(path) else {}
    for r in records:
        key = f"restore-lcc/{r['pattern'] or 'unstructured'}/{r['pruning']}/n{r['n_pairs']}"
        state[key] = {k: r[k] for k in ("method", "pruning", "pattern", "sparsity", "ppl_before", "ppl_after",
                                         "trainable_params", "peak_rss_above_imports", "peak_rss_restore_lcc",
                                         "restore_lcc_seconds", "seconds", "threads", "n_pairs", "top_k",
                                         "pruned_weights_still_zero", "restore_lcc", "windows", "seqlen")}
        state[key]["source"] = "bench/restore_lcc.py (bench/results/restore_lcc.json)"
    _write(path, state)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    ap.add_argument("--seqlen", type=int, default=1024, help="perplexity window length")
    ap.add_argument("--windows", type=int, default=32, help="WikiText-2 windows evaluated")
    ap.add_argument("--calib-nsamples", type=int, default=32, help="C4 windows for Wanda")
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--data", default=None, help="prompt/response JSON(L) file (default: the C4 sample)")
    ap.add_argument("--n-prompts", type=int, default=1000)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--max-response-tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=None, help="heads compensated (default: a quarter)")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--probe-epochs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "laco_restore_lcc_bench"),
                    help="RestoreLCC stage checkpoints (resume an interrupted row)")
    ap.add_argument("--out", default=os.path.join(_RESULTS, "restore_lcc.json"))
    ap.add_argument("--recovery-json", default=os.path.join(_RESULTS, "recovery.json"),
                    help="also copy the rows into this recovery results file ('' to skip)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records = json.load(open(args.out)) if os.path.exists(args.out) else []
    key = json.dumps(_settings(args), sort_keys=True)
    for row in rows:
        if any(r["row"] == row and json.dumps({k: r[k] for k in _settings(args)}, sort_keys=True) == key
               for r in records):
            print(f"skip {row}: already in {args.out}")
            continue
        fd, result = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--child", row, "--result-file", result]
        subprocess.run(cmd, check=True)
        with open(result) as f:
            records.extend(json.load(f))
        os.remove(result)
        _write(args.out, records)
    if args.recovery_json:
        merge_into_recovery(records, args.recovery_json)

    print(f"\n{'row':20s} {'ppl before':>10s} {'ppl after':>10s} {'params':>8s} {'peak MB':>8s} {'LCC s':>7s}"
          "  pairs x tokens")
    for r in records:
        lcc = r["restore_lcc"]
        print(f"{r['row']:20s} {r['ppl_before']:10.2f} {r['ppl_after']:10.2f} {r['trainable_params']:8d} "
              f"{r['peak_rss_above_imports'] / 2**20:8.0f} {r['restore_lcc_seconds']:7.0f}  "
              f"{r['n_pairs']} x ({lcc['max_prompt_tokens']}+{lcc['max_response_tokens']})")


if __name__ == "__main__":
    main()
