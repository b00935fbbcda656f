"""In-process A/B of two builds of the native CPU extension (``laco_kernels._C``) against ``F.linear``.

A kernel change on a shared machine is hard to judge from two separate runs: the same unchanged kernel
moves by 30% between runs here. This loads a second build of the extension (``--old``, e.g. one built
in a worktree of the previous commit) beside the current one and times both kernels and ``F.linear``
round-robin in one process, after checking that the two builds give bit-identical outputs.

    git worktree add /tmp/oldtree HEAD~1 && (cd /tmp/oldtree && python setup.py build_ext --inplace)
    OMP_NUM_THREADS=1 python bench/native_ab.py --old /tmp/oldtree/laco_kernels/_C*.so --op bitmap_linear

Writes ``bench/results/native_ab.json`` (``--out``): per cell the medians in ms and the ratios.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_kernels import PATHS, _forced, cpu_model  # noqa: E402

from laco_kernels import _C as new  # noqa: E402
from laco_kernels._atomic import atomic_file  # noqa: E402
from laco_kernels.formats import BitmapWeight, Sparse24Weight  # noqa: E402

SHAPES = {"7b_up": (11008, 4096), "7b_down": (4096, 11008), "smollm2_up": (1536, 576), "smollm2_down": (576, 1536)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_build(path: str):
    """The extension module at ``path`` under a name of its own (its init symbol is ``PyInit__C``)."""
    matches = glob.glob(path)
    if len(matches) != 1:
        raise SystemExit(f"--old {path!r}: expected one extension file, found {matches}")
    spec = importlib.util.spec_from_file_location("laco_old_build._C", matches[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Setters:
    """The threshold setters of one build with the ``laco_kernels._native`` signatures (None restores the
    measured default), so ``cpu_kernels._forced`` can force a path in either build."""

    def __init__(self, build):
        self._build = build

    def __getattr__(self, name: str):
        fn = getattr(self._build, name)  # AttributeError for setters an older build lacks (_forced checks)
        if name == "set_panel_split":
            return lambda on: fn(-1 if on is None else int(on))
        return lambda m: fn(-1 if m is None else m)


def packed_weight(op: str, w: torch.Tensor):
    """(the kernel's weight arguments after x, the dense weight F.linear multiplies) for ``w`` [N, K]."""
    n, k = w.shape
    if op == "bitmap_linear":
        bw = BitmapWeight.from_dense(w)
        return (bw.values, bw.bitmap, bw.offsets, bw.tile_k, None, n, k), w
    w24 = Sparse24Weight.from_dense(w, prune=True)
    return (w24.values, w24.meta, None, n, k), w24.to_dense()


def _choices(text: str, allowed, name: str) -> list:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"--{name} {text!r}: unknown {bad or 'empty'}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="path (glob) of the other build's _C*.so")
    ap.add_argument("--op", default="bitmap_linear", choices=("bitmap_linear", "sparse24_linear"))
    ap.add_argument("--shapes", default="7b_up,7b_down")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--sparsities", default="0.7,0.5", help="bitmap only (2:4 is 0.5)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa", default="auto", choices=("auto", "scalar", "avx2", "avx512"),
                    help="cap both builds' vector ISA (set_isa), e.g. avx2 to time the AVX2 kernels on an AVX-512 CPU")
    ap.add_argument("--path", default="auto", choices=("auto",) + PATHS,
                    help="force one path in both builds (bench/cpu_kernels.py's forced paths) instead of each build's "
                         "dispatch")
    ap.add_argument("--reordered", action="store_true",
                    help="the new build sums in another order: accept outputs within the dtype's rounding "
                         "(fp32 1e-5, bf16 2e-2 relative) and record the largest difference, instead of bit-identity")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "native_ab.json"))
    args = ap.parse_args(argv)
    shapes, dtypes = _choices(args.shapes, SHAPES, "shapes"), _choices(args.dtypes, DTYPES, "dtypes")
    try:
        ms = [int(v) for v in args.ms.split(",")]
        sparsities = [float(s) for s in args.sparsities.split(",")] if args.op == "bitmap_linear" else [0.5]
    except ValueError as exc:
        raise SystemExit(f"--ms / --sparsities: {exc}") from None
    if any(m < 1 for m in ms) or any(not 0.0 <= s < 1.0 for s in sparsities) or args.rounds < 1 or args.threads < 1:
        raise SystemExit("--ms must be >= 1, --sparsities in [0, 1), --rounds and --threads >= 1")
    old = load_build(args.old)
    for build in (old, new):
        build.set_isa(args.isa)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for dname in dtypes:
        dt = DTYPES[dname]
        for sname in shapes:
            n, k = SHAPES[sname]
            for sp in sparsities:
                w = torch.randn(n, k)
                if args.op == "bitmap_linear":
                    w = w * (torch.rand(n, k) >= sp)
                wargs, wdense = packed_weight(args.op, w.to(dt))  # packed once, timed at every M
                for m in ms:
                    x = torch.randn(m, k).to(dt)
                    call = (x, *wargs)
                    fns = {"dense": lambda: F.linear(x, wdense), "old": lambda: getattr(old, args.op)(*call),
                           "new": lambda: getattr(new, args.op)(*call)}
                    if args.path != "auto":
                        fns["old"] = _forced(_Setters(old), args.path, fns["old"])
                        fns["new"] = _forced(_Setters(new), args.path, fns["new"])
                    y_old, y_new = fns["old"](), fns["new"]()
                    same = torch.equal(y_old, y_new)
                    tol = 1e-5 if dt == torch.float32 else 2e-2
                    if not same and not (args.reordered and torch.allclose(y_new.float(), y_old.float(), rtol=tol,
                                                                           atol=tol * float(y_old.float().abs().max()))):
                        raise SystemExit(f"{sname} {dname} M={m}: the two builds disagree"
                                         + ("" if args.reordered else " (--reordered accepts a new order of sums)"))
                    ts = {a: [] for a in fns}
                    for f in fns.values():
                        f()
                    for _ in range(args.rounds):
                        for a, f in fns.items():
                            t0 = time.perf_counter()
                            f()
                            ts[a].append(time.perf_counter() - t0)
                    md = {a: statistics.median(v) * 1e3 for a, v in ts.items()}
                    row = dict(op=args.op, shape=sname, n=n, k=k, dtype=dname, m=m, sparsity=sp, threads=args.threads,
                               ms_dense=md["dense"], ms_old=md["old"], ms_new=md["new"], old_vs_dense=md["dense"] / md["old"],
                               new_vs_dense=md["dense"] / md["new"], new_vs_old=md["old"] / md["new"],
                               bit_identical=same, max_abs_diff=float((y_new.float() - y_old.float()).abs().max()))
                    rows.append(row)
                    print(f"{args.op} {sname:12s} {dname} sparsity {sp} M={m:<4d} dense {md['dense']:7.2f} ms  "
                          f"old {row['old_vs_dense']:.2f}x  new {row['new_vs_dense']:.2f}x  new/old {row['new_vs_old']:.2f}",
                          flush=True)
    out = dict(cpu=cpu_model(), torch=torch.__version__, load=os.getloadavg()[0], rounds=args.rounds, isa=args.isa, old=args.old,
               path=args.path, command="python bench/native_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_file(args.out) as tmp, open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
