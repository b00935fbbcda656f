"""Compile every Triton kernel at every configuration it can launch for sm_80 and sm_90 (no GPU needed).

Collects ``COMPILE_SPECS`` from every module of ``laco_kernels.kernels``, compiles each spec
for each architecture (``laco_kernels.kernels._compile.compile_spec``), writes
``bench/results/compile.json`` (a list of ``{kernel, config, arch, registers, spill_bytes,
shared_bytes, tensor_core, ...}``) and prints a table. Exit status 1 when any compiled kernel
spills or a GEMM expected on tensor cores has no mma / wgmma in its PTX.

    python bench/compile_report.py                 # everything (a few minutes on 2 cores)
    python bench/compile_report.py --subset        # the representative subset the test compiles
    python bench/compile_report.py --only sparse24 # specs whose kernel or config name contains it
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
from typing import List

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from laco_kernels.kernels._compile import ARCHS, CompileSpec, collect_specs, compile_spec  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.json")


def kernel_modules():
    import laco_kernels.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_")]


def all_specs(subset: bool = False, only: str | None = None) -> List[CompileSpec]:
    specs = collect_specs(kernel_modules())
    if subset:
        specs = [s for s in specs if s.representative]
    if only:
        specs = [s for s in specs if only in s.name or only in s.config]
    return specs


def violations(records) -> List[str]:
    bad = []
    for r in records:
        if r["spill_bytes"] > 0:
            bad.append(f"{r['kernel']} [{r['config']}] {r['arch']}: {r['spill_bytes']} bytes of spills")
        if r["expect_tensor_core"] and r["tensor_core"] == "none":
            bad.append(f"{r['kernel']} [{r['config']}] {r['arch']}: GEMM without mma/wgmma in its PTX")
    return bad


def run(specs, archs=ARCHS, out: str | None = DEFAULT_OUT, verbose: bool = True):
    records = []
    try:
        from tqdm import tqdm
        jobs = tqdm([(s, a) for s in specs for a in archs if a in s.archs], disable=not verbose, desc="compile")
    except ImportError:
        jobs = [(s, a) for s in specs for a in archs if a in s.archs]
    t0 = time.time()
    for spec, arch in jobs:
        records.append(compile_spec(spec, arch))
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, out)
    if verbose:
        print(f"{'kernel':28s} {'config':44s} {'arch':6s} {'regs':>4s} {'spill':>5s} {'smem':>7s} tc")
        for r in records:
            print(f"{r['kernel']:28s} {r['config']:44s} {r['arch']:6s} {r['registers']:4d} {r['spill_bytes']:5d} "
                  f"{r['shared_bytes']:7d} {r['tensor_core']}")
        print(f"{len(records)} compiles in {time.time() - t0:.0f} s" + (f"; wrote {out}" if out else ""))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", action="store_true", help="only the representative specs (what the test compiles)")
    ap.add_argument("--only", default=None, help="substring of kernel or config names")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    records = run(all_specs(args.subset, args.only), tuple(args.arch), args.out)
    bad = violations(records)
    for b in bad:
        print("FAIL:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
