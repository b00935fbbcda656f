"""Markdown tables of a GPU loan's measurements (no GPU needed): reads the JSON files the prepared runs
(``bench/gpu_suite.sh``, ``bench/gpu_followup.sh``) wrote under ``bench/results/`` and prints the
tables that ``docs/gpu_results.md`` holds, so every figure there can be regenerated from its file.

    python bench/gpu_report.py > /tmp/tables.md
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def gemm_table(doc, dtype="float16") -> list:
    """us and speed-up over cuBLAS per (shape, M) for each method of ``gpu_gemm.py --graph``."""
    cells = defaultdict(dict)
    for r in doc["records"]:
        if r["dtype"] == dtype and r["us"]:
            cells[(r["N"], r["K"], r["M"])][r["method"]] = r["us"]
    methods = ["cublas", "sparse24", "bitmap50", "bitmap70", "torch_semi_structured"]
    out = [f"| N x K | M | " + " | ".join(methods) + " |", "|" + " --- |" * (len(methods) + 2)]
    for (n, k, m), row in sorted(cells.items()):
        cub = row.get("cublas")
        vals = [f"{row[x]:.1f}" + (f" ({cub / row[x]:.2f}x)" if x != "cublas" and cub else "") if x in row else "-"
                for x in methods]
        out.append(f"| {n} x {k} | {m} | " + " | ".join(vals) + " |")
    return out


def mma_table(doc, warps=2, unroll=4, stages=1) -> list:
    """2:4 decode (``sparse24_mma``) at the shipped configuration: each measured K-slice count."""
    recs = [r for r in doc["records"] if r.get("part") == "mma" and r.get("us")]
    cub = {(r["N"], r["K"], r["M"]): r["us"] for r in recs if r["method"] == "cublas"}
    out = ["| N x K | M | cuBLAS us | 2:4 us by K slices (warps %d, unroll %d) | best of every configuration |"
           % (warps, unroll), "| --- | --- | --- | --- | --- |"]
    for n, k in SHAPES:
        for m in sorted({r["M"] for r in recs if r["N"] == n and r["K"] == k}):
            rows = [r for r in recs if r["N"] == n and r["K"] == k and r["M"] == m and r["method"] == "sparse24_mma"]
            mine = sorted((r["splits"], r["us"]) for r in rows
                          if (r["warps"], r["unroll"], r.get("stages", 1)) == (warps, unroll, stages))
            best = min(rows, key=lambda r: r["us"])
            out.append(f"| {n} x {k} | {m} | {cub[(n, k, m)]:.1f} | " + ", ".join(f"{s}: {us:.1f}" for s, us in mine)
                       + f" | {best['us']:.1f} (w{best['warps']} u{best['unroll']} st{best.get('stages', 1)} "
                       f"s{best['splits']}) |")
    return out


def expand_table(doc) -> list:
    recs = [r for r in doc["records"] if r.get("part") == "expand" and r.get("us")]
    cells = defaultdict(dict)
    for r in recs:
        cells[(r["dtype"], r["N"], r["K"], r["M"])][r["method"]] = r["us"]
    methods = ["cublas", "sparse24_linear", "sparse24_expand", "bitmap50_linear", "bitmap50_expand_scatter",
               "bitmap50_expand_kernel"]
    out = ["| dtype | N x K | M | " + " | ".join(methods) + " |", "|" + " --- |" * (len(methods) + 3)]
    for (dt, n, k, m), row in sorted(cells.items()):
        out.append(f"| {dt} | {n} x {k} | {m} | " + " | ".join(f"{row[x]:.1f}" if x in row else "-" for x in methods)
                   + " |")
    only = [r for r in doc["records"] if r.get("part") == "expand_only" and r.get("us")]
    out += ["", "| dtype | N x K | expansion alone | us |", "| --- | --- | --- | --- |"]
    out += [f"| {r['dtype']} | {r['N']} x {r['K']} | {r['method']} | {r['us']:.1f} |" for r in only]
    return out


def training_table(*docs) -> list:
    out = ["| dtype | tokens, N, K | F.linear(x, W*M) + autograd | masked: triton / expand / torch | "
           "2:4: triton / expand / torch |", "| --- | --- | --- | --- | --- |"]
    for doc in docs:
        for r in doc["timing"] if doc else []:
            out.append(f"| {r['dtype'].replace('torch.', '')} | {tuple(r['shape'])} | {r['ms_torch_W_times_M_autograd']:.3f} | "
                       + " / ".join(f"{r[f'ms_masked_{p}_path']:.3f}" for p in ("triton", "expand", "torch")) + " | "
                       + " / ".join(f"{r[f'ms_sparse24_{p}_path']:.3f}" for p in ("triton", "expand", "torch")) + " |")
    return out


def main() -> int:
    graph, sweep = _load("gpu_gemm_graph.json"), _load("gpu_decode_sweep.json")
    if graph:
        print(f"## Inference GEMMs, fp16, CUDA graphs (us; x = speed-up over cuBLAS) - {graph['meta']['device']}\n")
        print("\n".join(gemm_table(graph)) + "\n")
    if sweep:
        print(f"## 2:4 decode by K slices - {sweep['meta']['device']}\n")
        print("\n".join(mma_table(sweep)) + "\n")
        print("## Transient-dense prefill paths (us)\n")
        print("\n".join(expand_table(sweep)) + "\n")
    small, big = _load("gpu_training.json"), _load("gpu_training_7b.json")
    if small or big:
        print("## Training paths, one forward + backward through the op (ms, do_bench, eager)\n")
        print("\n".join(training_table(small, big)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
