"""Compose the README's CPU speed-up table from several ``bench/cpu_kernels.py`` result files.

Each cell (shape, dtype, threads, M) comes from the LAST file given that measured it, so list the
files oldest first: a later file re-timed a cell after a code change replaces the earlier figure. With
``--median-of-runs`` the files are repeated runs of the same code instead: each cell is the median of its
speed-ups over the files that measured it, and every file's own count of cells at the goal is printed too
(on this shared machine single parity cells move by 0.1 between runs).
Prints, for one and two threads, rows ``weight, dtype`` x M of "2:4 / bitmap 70%" medians over
``F.linear`` (as dispatched, never a forced path), then how many cells of every format (2:4, bitmap
50%, bitmap 70%) are at 0.95x or better and the ones that are not, each with its file.

    python bench/cpu_table.py bench/results/cpu_kernels_epyc_zen4_smollm2_stop36_final.json ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

SHAPE_LABEL = {"7b_up": "11008 x 4096", "7b_down": "4096 x 11008", "smollm2_up": "1536 x 576",
               "smollm2_down": "576 x 1536"}
MS = (1, 2, 4, 8, 16, 32, 64, 256, 1024)
GOAL = 0.95


def cells(paths, median_of_runs: bool = False):
    """{(shape, dtype, threads, m, impl): (speed-up, file)}: dispatched rows only, later files win (or, with
    median_of_runs, the median over the files, "file" then naming how many runs it is the median of)."""
    if median_of_runs:
        return median_cells([cells([p]) for p in paths])
    out = {}
    for p in paths:
        with open(p) as f:
            rows = json.load(f)["kernels"]
        for r in rows:
            if r["impl"] == "dense" or "/" in r["impl"] or r["m"] not in MS:  # forced paths are evidence, not cells
                continue
            out[(r["shape"], r["dtype"], r["threads"], r["m"], r["impl"])] = (r["speedup_vs_dense"], os.path.basename(p))
    return out


def median_cells(runs):
    """Each cell of several runs' cells() maps: the median speed-up over the runs that measured it."""
    out = {}
    for key in sorted(set().union(*runs)):
        vals = sorted(r[key][0] for r in runs if key in r)
        out[key] = (statistics.median(vals), f"median of {len(vals)} runs, {vals[0]:.2f}-{vals[-1]:.2f}")
    return out


def table(c, threads: int) -> str:
    lines = []
    for shape in SHAPE_LABEL:
        for dtype in ("fp32", "bf16"):
            row = []
            for m in MS:
                a, b = c.get((shape, dtype, threads, m, "2:4")), c.get((shape, dtype, threads, m, "bitmap70"))
                row.append(f"{a[0]:.2f} / {b[0]:.2f}" if a and b else "-")
            lines.append(f"| {SHAPE_LABEL[shape]} {dtype} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="cpu_kernels.py result files, oldest first")
    ap.add_argument("--median-of-runs", action="store_true",
                    help="the files are repeated runs of the same code: each cell is its median over them")
    args = ap.parse_args()
    if args.median_of_runs:
        runs = [cells([p]) for p in args.files]  # each file parsed once
        for p, own in zip(args.files, runs):
            print(f"{os.path.basename(p)}: {sum(v[0] >= GOAL for v in own.values())} of {len(own)} cells at {GOAL}x or better")
        c = median_cells(runs)
    else:
        c = cells(args.files)
    for t in (1, 2):
        print(f"threads = {t}\n{table(c, t)}\n")
    for group in (("7b_up", "7b_down"), ("smollm2_up", "smollm2_down")):
        mine = {k: v for k, v in c.items() if k[0] in group}
        low = sorted((k, v) for k, v in mine.items() if v[0] < GOAL)
        print(f"{'/'.join(group)}: {len(mine) - len(low)} of {len(mine)} cells at {GOAL}x or better")
        for k, (s, f) in low:
            print(f"  {k[4]:8s} {k[0]} {k[1]} M={k[3]} t={k[2]}: {s:.2f}x ({f})")


if __name__ == "__main__":
    main()
