"""SASS loop counts of the prefill (M > 16) GEMM kernels against the dense prefill kernel.

For every 16-bit prefill compile spec (no bias, output in the input dtype) of the dense, 2:4 and
bitmap kernels, compiled for each architecture it is launched on, prints and writes
(``bench/results/prefill_loops.json``) the steady-state K loop as ``kernels/_sass.py`` reads it:
instructions per warp and iteration, per K element (``/ BLOCK_K``), thread-instructions per
multiply-add of the tile (``loop x 32 x warps / (BLOCK_M BLOCK_N BLOCK_K)``, comparable across
tiles) and that figure over the dense kernel's on the same architecture and dtype (the
issue-12 budget: at most 1.25), STS / LDS outside the load pipeline, registers and spills.
Compile-only (no GPU): counts, not timings.

    python bench/prefill_loops.py                 # fp16 and bf16, sm_80 and sm_90
    python bench/prefill_loops.py --dtype fp16 --arch 90
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from laco_kernels.kernels import _sass, bitmap_gemm, dense_gemm, sparse24_gemm  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "prefill_loops.json")
_MODULES = (dense_gemm, sparse24_gemm, bitmap_gemm)


def specs(dtypes=("fp16", "bf16"), tile_k: int = 128):
    """The 16-bit prefill specs without bias whose output dtype is the input dtype (bitmap: ``tile_k`` only)."""
    out = []
    for mod in _MODULES:
        for s in mod.COMPILE_SPECS:
            dt = s.signature["x_ptr"][1:]
            if (s.regime == "prefill" and dt in dtypes and not s.constexprs["HAS_BIAS"]
                    and s.signature["y_ptr"] == s.signature["x_ptr"]
                    and (s.family != "bitmap" or s.constexprs["BLOCK_K"] == tile_k)):
                out.append(s)
    return out


def run(dtypes=("fp16", "bf16"), archs=(80, 90), out: str | None = DEFAULT_OUT, verbose=True):
    rows = []
    for s in specs(dtypes):
        for arch in archs:
            if arch not in s.archs:
                continue
            st = _sass.spec_stats(s, arch)
            c = s.constexprs
            rows.append(dict(family=s.family, config=s.config, arch=f"sm_{arch}", dtype=s.signature["x_ptr"][1:],
                             num_warps=s.num_warps, num_stages=s.num_stages,
                             tile=[c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]],
                             loop_instructions=st["loop_instructions"],
                             per_k_element=st["loop_instructions"] / c["BLOCK_K"],
                             thread_instr_per_mac=st["thread_instr_per_mac"], sts=st["sts"], lds=st["lds"],
                             ldsm=st["ldsm"], ldgsts=st["ldgsts"], registers=st["registers"],
                             spill_bytes=st["spill_bytes"], tensor_core=st["tensor_core"]))
    dense = {(r["arch"], r["dtype"]): r["thread_instr_per_mac"] for r in rows if r["family"] == "dense"}
    for r in rows:
        r["per_mac_vs_dense"] = r["thread_instr_per_mac"] / dense[(r["arch"], r["dtype"])]
    if verbose:
        print(f"{'config':44s} {'arch':6s} {'warps':>5s} {'tile MxNxK':>12s} {'loop':>5s} {'/K':>6s} "
              f"{'/MAC':>7s} {'vs dense':>8s} {'STS':>4s} {'LDS':>4s} {'regs':>4s} {'spill':>5s}")
        for r in rows:
            print(f"{r['config']:44s} {r['arch']:6s} {r['num_warps']:5d} {'x'.join(map(str, r['tile'])):>12s} "
                  f"{r['loop_instructions']:5d} {r['per_k_element']:6.2f} {r['thread_instr_per_mac']:7.4f} "
                  f"{r['per_mac_vs_dense']:8.2f} {r['sts']:4d} {r['lds']:4d} {r['registers']:4d} {r['spill_bytes']:5d}")
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, out)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    run(tuple(args.dtype), tuple(args.arch), args.out)


if __name__ == "__main__":
    main()
