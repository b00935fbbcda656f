"""Old vs new SASS audit of the training kernels, as Markdown (for docs/gpu_training_kernels.md).

    python bench/sass_audit_compare.py OLD.json NEW.json [--arch sm_90]

OLD / NEW: two ``bench/results/sass_audit.json`` files, e.g. an earlier commit's
(``git show REV:bench/results/sass_audit.json > /tmp/old.json``). Prints, per training spec, the
loop instructions per warp and iteration, its tile, thread-instructions per multiply-add and that
over the dense prefill GEMM's (same dtype and arch; the issue-17 budget is 1.3), and the
predicted recovery steps (torch path, masked, 2:4) of both files. Everything is a prediction or
a static count; nothing here was measured on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys

TRAIN_REGIMES = ("train-fwd", "train-dx", "train-dw")


def _rows(doc, arch):
    return {(r["kernel"], r["config"]): r for r in doc["specs"]
            if r["arch"] == arch and r.get("regime") in TRAIN_REGIMES}


def kernel_table(old, new, arch) -> str:
    o, n = _rows(old, arch), _rows(new, arch)
    out = [f"| kernel | config | loop instr old -> new | thread-instr/MAC old -> new | x dense old -> new |",
           "|---|---|---|---|---|"]
    for key in sorted(n, key=lambda k: (k[0], k[1])):
        a, b = o.get(key), n[key]

        def f(r, field, fmt):
            return "-" if r is None or r.get(field) is None else format(r[field], fmt)
        out.append(f"| {key[0]} | {key[1]} | {f(a, 'loop_instructions', 'd')} -> {f(b, 'loop_instructions', 'd')} "
                   f"| {f(a, 'thread_instr_per_mac', '.4f')} -> {f(b, 'thread_instr_per_mac', '.4f')} "
                   f"| {f(a, 'mac_ratio_vs_dense_prefill', '.2f')} -> {f(b, 'mac_ratio_vs_dense_prefill', '.2f')} |")
    return "\n".join(out)


def step_table(old, new) -> str:
    o = {(s["block"], s["tokens"], s["dtype"]): s for s in old.get("training", [])}
    out = ["| block | tokens | dtype | torch us | masked us old -> new | x torch old -> new "
           "| 2:4 us old -> new | x torch old -> new |", "|---|---|---|---|---|---|---|---|"]
    for s in new.get("training", []):
        a = o.get((s["block"], s["tokens"], s["dtype"]))
        t, x = s["predicted_step_us"], s["predicted_speedup_vs_torch"]
        ta = a["predicted_step_us"] if a else {}
        xa = a["predicted_speedup_vs_torch"] if a else {}
        out.append(f"| {s['block']} | {s['tokens']} | {s['dtype']} | {t['torch']:.0f} "
                   f"| {ta.get('masked', float('nan')):.0f} -> {t['masked']:.0f} "
                   f"| {xa.get('masked', float('nan')):.2f} -> {x['masked']:.2f} "
                   f"| {ta.get('sparse24', float('nan')):.0f} -> {t['sparse24']:.0f} "
                   f"| {xa.get('sparse24', float('nan')):.2f} -> {x['sparse24']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args(argv)
    with open(args.old) as f:
        old = json.load(f)
    with open(args.new) as f:
        new = json.load(f)
    print(f"### Training loops ({args.arch}; x dense = thread-instructions per MAC over the dense prefill GEMM's)\n")
    print(kernel_table(old, new, args.arch))
    print("\n### Predicted recovery steps (one MLP block, forward + backward of its three linears; sm_90 model)\n")
    print(step_table(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
