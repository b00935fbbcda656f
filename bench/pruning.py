"""Pruning benchmark: WikiText-2 perplexity of SmolLM2-135M, dense and pruned by magnitude, Wanda and
SparseGPT at 2:4 and at 50% unstructured (sequential, block by block on the pruned stream).

    flock /tmp/laco_heavy.lock nice -n 5 python bench/pruning.py            # writes bench/results/pruning.json
    python bench/pruning.py --methods sparsegpt:2:4 --windows 16 --permute 16  # channels reordered first

Resumes: records already in the JSON (same method, pattern, sparsity, calibration, windows) are
skipped; the file is rewritten atomically after every record. Prints a table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from laco_kernels.data import calibration_windows  # noqa: E402
from laco_kernels.eval import perplexity  # noqa: E402
from laco_kernels.models.loading import load_model  # noqa: E402
from laco_kernels.prune import prune_model  # noqa: E402

# most informative first (the job resumes, so a cut-short run still leaves the key records)
RUNS = [("dense", None, 0.0), ("wanda", "2:4", 0.5), ("magnitude", "2:4", 0.5), ("sparsegpt", "2:4", 0.5),
        ("wanda", None, 0.5), ("sparsegpt", None, 0.5), ("magnitude", None, 0.5)]


def _key(rec: dict) -> tuple:
    return (rec["model"], rec["method"], rec["pattern"], rec["sparsity"], json.dumps(rec["calibration"]),
            rec["seqlen"], rec["windows"], rec.get("permute", 0), rec.get("permute_parts"), rec.get("batch_size", 4))


def _write(path: str, records: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=1024, help="perplexity window length")
    ap.add_argument("--windows", type=int, default=32, help="WikiText-2 windows evaluated")
    ap.add_argument("--nsamples", type=int, default=32, help="C4 calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="where blocks and the evaluation compute (cpu, cuda)")
    ap.add_argument("--methods", default="", help="comma list of method[:pattern] to run (default: all)")
    ap.add_argument("--permute", type=int, default=0,
                    help="N:M runs: reorder MLP / value channels first with this many swap rounds (default: 0, off)")
    ap.add_argument("--permute-parts", default="mlp,value", help="with --permute: mlp, value or both (default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "pruning.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    records = json.load(open(args.out)) if os.path.exists(args.out) else []
    done = {_key(r) for r in records}
    calib_desc = {"source": "c4-sample.jsonl", "samples": args.nsamples, "seqlen": args.calib_seqlen,
                  "seed": args.seed}
    wanted = [r for r in RUNS if not args.methods or f"{r[0]}:{r[1] or 'unstructured'}" in args.methods.split(",")
              or r[0] in args.methods.split(",")]
    _, tok = load_model(args.model, with_tokenizer=True)
    calibration = None
    for method, pattern, sparsity in wanted:
        rec = {"model": args.model, "method": method, "pattern": pattern, "sparsity": sparsity,
               "calibration": None if method in ("dense", "magnitude") else calib_desc,
               "seqlen": args.seqlen, "windows": args.windows}
        if args.permute and pattern is not None and method != "dense":
            rec["permute"] = args.permute
            if args.permute_parts != "mlp,value":
                rec["permute_parts"] = args.permute_parts
        if args.batch_size != 4:
            rec["batch_size"] = args.batch_size
        if _key(rec) in done:
            print(f"skip {method} {pattern or 'unstructured'}: already in {args.out}")
            continue
        model, _ = load_model(args.model, with_tokenizer=False, device=args.device)
        t0 = time.perf_counter()
        if method != "dense":
            if rec["calibration"] is not None and calibration is None:
                calibration = calibration_windows(tok, args.nsamples, args.calib_seqlen, seed=args.seed)
            report = prune_model(model, method, sparsity, pattern,
                                 calibration if rec["calibration"] is not None else None,
                                 batch_size=args.batch_size, device=args.device, permute=rec.get("permute", False),
                                 permute_parts=tuple(args.permute_parts.split(",")))
            rec["prune_seconds"] = report["seconds"]
            if "permutation" in report:
                rec["permutation"] = report["permutation"]
            rec["achieved_sparsity"] = report["overall_sparsity"]
            rec["block_error"] = report["block_error"]
        t1 = time.perf_counter()
        ppl = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.windows, batch_size=1, device=args.device)
        rec.update(ppl=ppl["ppl"], nll=ppl["nll"], tokens=ppl["tokens"], eval_seconds=time.perf_counter() - t1,
                   seconds=time.perf_counter() - t0, threads=torch.get_num_threads(),
                   device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
        print(f"{method:10s} {pattern or 'unstructured':12s} ppl {ppl['ppl']:10.2f}  ({rec['seconds']:.0f} s)",
              flush=True)
        records.append(rec)
        _write(args.out, records)
        del model

    print(f"\n{'method':10s} {'pattern':12s} {'sparsity':>8s} {'ppl':>10s} {'seconds':>8s}  calibration")
    for r in records:
        cal = r["calibration"]
        cal_s = f"C4 {cal['samples']}x{cal['seqlen']}" if cal else "-"
        perm = f", permute {r['permute']} ({r.get('permute_parts', 'mlp,value')})" if r.get("permute") else ""
        print(f"{r['method']:10s} {r['pattern'] or 'unstructured':12s} {r['sparsity']:8.2f} {r['ppl']:10.2f} "
              f"{r['seconds']:8.0f}  {cal_s}{perm}, {r['windows']} windows")


if __name__ == "__main__":
    main()
