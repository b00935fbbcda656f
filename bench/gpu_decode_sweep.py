"""GPU follow-up measurements for the dispatch of the 2:4 and bitmap inference paths (needs CUDA).

Three parts, each timed with ``triton.testing.do_bench_cudagraph`` (GPU time, L2 not flushed between
replays, the same timer as ``gpu_gemm.py --graph``), every candidate checked against ``F.linear``
on the same sparse weight before it is timed:

1. ``mma``: the sparse tensor-core decode kernel (``kernels/sparse24_mma.py``) over its launch
   configuration: warps per program (16 weight rows each), unrolled 32-column tiles per loop
   step, and K slices (the automatic choice, or a multiple of it), for M in {1, 4, 16}, fp16,
   the three Llama-7B projection shapes, beside cuBLAS on the pruned weight stored dense.
2. ``bitmap``: the bitmap decode GEMV on its chunk layout (``kernels/bitmap_chunks.py``) at 50 / 70 %
   sparsity with its K slices (the automatic choice and 2, 4, 8 times it), M in {1, 4}.
3. ``expand``: the transient-dense paths of prefill against the kernels that run there today:
   2:4 ``sparse24_to_dense`` + cuBLAS against ``sparse24_linear``; bitmap (50 / 70 %) with the
   torch ``masked_scatter`` expansion, the Triton ``bitmap_to_dense`` (when present) and
   ``bitmap_linear``; M in {4, 8, 16, 32, 64, 256, 4096}; plus the expansion alone.

    python bench/gpu_decode_sweep.py --out bench/results/gpu_decode_sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DEV = "cuda"
MMA_MS, EXPAND_MS = (1, 4, 16), (4, 8, 16, 32, 64, 256, 4096)
# (warps, unroll, num_stages, prefetch); --configs prefetch: the register double-buffered loop against the plain one
CONFIGS = [(w, u, 1, False) for w in (2, 4, 8) for u in (2, 4, 8)] + [(4, 4, 3, False), (4, 8, 3, False),
                                                                      (8, 4, 3, False), (2, 8, 3, False)]
PREFETCH_CONFIGS = [(2, 4, 1, False), (2, 4, 1, True), (2, 8, 1, True), (4, 4, 1, True), (2, 2, 1, True)]
MULTS = (0.5, 1, 2, 4, 8, 16)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_decode_sweep.json")


_SAVE = [lambda: None]  # main() installs the writer; each printed line is also saved (a time limit loses little)


def _saved_print(*a, **kw):
    print(*a, **kw)
    _SAVE[0]()


def _timer(fn):
    import triton

    if DEV == "cpu":  # --dry-run: one call, no timing (checks the script's plumbing in the interpreter)
        fn()
        return 1.0
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3  # us


def _ok(got, want, dtype):
    tol = {torch.float16: 3e-2, torch.float32: 1e-2}.get(dtype, 1e-1)
    return bool(torch.allclose(got.float(), want.float(), atol=tol * max(1.0, want.abs().max().item()) / 8, rtol=tol))


def sweep_mma(gen, records):
    from laco_kernels.formats import Sparse24Weight
    from laco_kernels.kernels import sparse24_mma as mm

    base = dict(mm._CFG)
    dtype = torch.float16
    for n, k in SHAPES:
        w24 = Sparse24Weight.from_dense(torch.randn(n, k, device=DEV, generator=gen).to(dtype), prune=True)
        wd = w24.to_dense()
        for m in MMA_MS:
            x = torch.randn(m, k, device=DEV, generator=gen).to(dtype)
            want = F.linear(x, wd)
            cub = _timer(lambda: F.linear(x, wd))
            records.append(dict(part="mma", method="cublas", M=m, N=n, K=k, us=cub))
            best = None
            for warps, unroll, stages, prefetch in CONFIGS:
                mm._CFG.update(WARPS=warps, UNROLL=unroll, STAGES=stages, PREFETCH=prefetch)
                try:
                    _, s_auto, _ = mm.launch_geometry(m, n, k, x.device)
                    for mult in MULTS:
                        s = max(1, int(s_auto * mult))
                        if mult != 1 and s == s_auto:
                            continue
                        splits = None if mult == 1 else s
                        fn = (lambda sp: lambda: mm.sparse24_mma(x, w24.values, w24.meta, w24.shape, None, splits=sp))(splits)
                        ok = _ok(fn(), want, dtype)
                        us = _timer(fn) if ok else None
                        rec = dict(part="mma", method="sparse24_mma", M=m, N=n, K=k, warps=warps, unroll=unroll, stages=stages,
                                   prefetch=prefetch,
                                   splits=s, auto_splits=mult == 1, ok=ok, us=us, vs_cublas=(cub / us) if us else None)
                        records.append(rec)
                        if us and (best is None or us < best["us"]):
                            best = rec
                except Exception as ex:  # a config the kernel cannot build: record it, keep sweeping
                    records.append(dict(part="mma", method="sparse24_mma", M=m, N=n, K=k, warps=warps, unroll=unroll,
                                        stages=stages, prefetch=prefetch, error=f"{type(ex).__name__}: {str(ex)[:200]}"))
                finally:
                    mm._CFG.clear()
                    mm._CFG.update(base)
            dflt = next((r["us"] for r in records if r.get("part") == "mma" and r.get("M") == m and r["N"] == n
                         and r["K"] == k and r.get("warps") == base["WARPS"] and r.get("unroll") == base["UNROLL"]
                         and r.get("stages") == base["STAGES"] and r.get("prefetch") == base["PREFETCH"]
                         and r.get("auto_splits")), None)
            _saved_print(f"mma N={n:5d} K={k:5d} M={m:2d}: cublas {cub:6.1f} us  default {dflt} us  best "
                  + (f"{best['us']:6.1f} us (warps {best['warps']}, unroll {best['unroll']}, stages {best['stages']}, prefetch {best['prefetch']}, splits {best['splits']})"
                     if best else "none"), flush=True)


def sweep_bitmap(gen, records):
    """The bitmap decode GEMV on the chunk layout (``kernels/bitmap_chunks.py``) over its K slices."""
    from laco_kernels.formats import BitmapWeight
    from laco_kernels.kernels import bitmap_chunks as bc

    dtype = torch.float16
    for n, k in SHAPES:
        w = torch.randn(n, k, device=DEV, generator=gen).to(dtype)
        for sp in (50, 70):
            bw = BitmapWeight.from_dense(w * (torch.rand(n, k, device=DEV, generator=gen) >= sp / 100))
            wd = bw.to_dense()
            auto = bc.build_layout(bw.values, bw.bitmap, bw.shape)
            for m in MMA_MS:
                if m > bc.gemv_max_m() if hasattr(bc, "gemv_max_m") else m > 13:
                    continue
                x = torch.randn(m, k, device=DEV, generator=gen).to(dtype)
                want = F.linear(x, wd)
                cub = _timer(lambda: F.linear(x, wd))
                records.append(dict(part="bitmap", method="cublas", sparsity=sp, M=m, N=n, K=k, us=cub))
                line = []
                for mult in (1, 2, 4, 8):
                    s = auto.splits * mult if hasattr(auto, "splits") else None
                    lay = auto if mult == 1 else bc.build_layout(bw.values, bw.bitmap, bw.shape, splits=s)
                    fn = (lambda la: lambda: bc.chunks_gemv(x, la))(lay)
                    ok = _ok(fn(), want, dtype)
                    us = _timer(fn) if ok else None
                    records.append(dict(part="bitmap", method="chunks_gemv", sparsity=sp, M=m, N=n, K=k, splits=s,
                                        auto_splits=mult == 1, ok=ok, us=us, vs_cublas=(cub / us) if us else None))
                    line.append(f"s={s}:{us if us is None else round(us, 1)}")
                _saved_print(f"bitmap{sp} N={n:5d} K={k:5d} M={m:2d}: cublas {cub:6.1f} us  " + " ".join(line), flush=True)


def sweep_expand(gen, records):
    from laco_kernels.formats import BitmapWeight, Sparse24Weight
    from laco_kernels.kernels import weight_expand as we
    from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear

    has_bitmap_kernel = hasattr(we, "bitmap_to_dense")
    for dtype in (torch.float16, torch.float32):
        dname = str(dtype).replace("torch.", "")
        for n, k in (SHAPES if dtype == torch.float16 else SHAPES[:1]):  # fp32: one shape (the crossover)
            w = torch.randn(n, k, device=DEV, generator=gen).to(dtype)
            w24 = Sparse24Weight.from_dense(w, prune=True)
            wd24 = w24.to_dense()
            bws = {s: BitmapWeight.from_dense(w * (torch.rand(n, k, device=DEV, generator=gen) >= s / 100))
                   for s in (50, 70)}
            expand_only = {"sparse24_to_dense": lambda: we.sparse24_to_dense(w24.values, w24.meta, w24.shape)}
            for s, bw in bws.items():
                expand_only[f"bitmap{s}_masked_scatter"] = bw.to_dense
                if has_bitmap_kernel:
                    expand_only[f"bitmap{s}_to_dense"] = (
                        lambda b: lambda: we.bitmap_to_dense(b.values, b.bitmap, b.offsets, b.shape, b.tile_k))(bw)
            for name, fn in expand_only.items():
                want = wd24 if name.startswith("sparse24") else bws[int(name[6:8])].to_dense()
                ok = torch.equal(fn(), want)
                us = _timer(fn) if ok else None
                records.append(dict(part="expand_only", method=name, N=n, K=k, dtype=dname, ok=ok, us=us))
                _saved_print(f"expand {dname} N={n:5d} K={k:5d} {name:26s} {us if us is None else round(us, 1)} us ok={ok}",
                      flush=True)
            for m in EXPAND_MS:
                x = torch.randn(m, k, device=DEV, generator=gen).to(dtype)
                meths = {"cublas": (lambda: F.linear(x, wd24), wd24),
                         "sparse24_linear": (lambda: sparse24_linear(x, w24), wd24),
                         "sparse24_expand": (lambda: F.linear(x, we.sparse24_to_dense(w24.values, w24.meta, w24.shape)),
                                             wd24)}
                for s, bw in bws.items():
                    wd = bws[s].to_dense()
                    meths[f"bitmap{s}_linear"] = ((lambda b: lambda: bitmap_linear(x, b))(bw), wd)
                    meths[f"bitmap{s}_expand_scatter"] = ((lambda b: lambda: F.linear(x, b.to_dense()))(bw), wd)
                    if has_bitmap_kernel:
                        meths[f"bitmap{s}_expand_kernel"] = ((lambda b: lambda: F.linear(x, we.bitmap_to_dense(
                            b.values, b.bitmap, b.offsets, b.shape, b.tile_k)))(bw), wd)
                row = {}
                for name, (fn, wd) in meths.items():
                    try:
                        ok = _ok(fn(), F.linear(x.float(), wd.float()), dtype)
                        row[name] = _timer(fn) if ok else None
                    except Exception as ex:
                        ok, row[name] = f"{type(ex).__name__}: {str(ex)[:160]}", None
                    records.append(dict(part="expand", method=name, M=m, N=n, K=k, dtype=dname, ok=ok, us=row[name]))
                _saved_print(f"{dname} N={n:5d} K={k:5d} M={m:4d} us: "
                      + " ".join(f"{kk}={v:.1f}" if v else f"{kk}=n/a" for kk, v in row.items()), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--parts", nargs="+", default=["mma", "bitmap", "expand"], choices=["mma", "bitmap", "expand"])
    ap.add_argument("--configs", choices=["launch", "prefetch"], default="launch",
                    help="mma part: the launch-configuration grid, or the prefetch loop against the plain one")
    ap.add_argument("--ms", type=int, nargs="+", help="M values of the mma part (default 1 4 16)")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes, no timing")
    args = ap.parse_args(argv)
    global DEV, SHAPES, MMA_MS, EXPAND_MS, CONFIGS, MULTS
    if args.configs == "prefetch":
        CONFIGS, MULTS = PREFETCH_CONFIGS, (0.5, 1, 2)
    if args.ms:
        MMA_MS = tuple(args.ms)
    if args.dry_run:
        DEV, SHAPES, MMA_MS, EXPAND_MS, CONFIGS = "cpu", [(70, 200)], (1, 11), (4, 40), CONFIGS[:1] + [(2, 1, 3, True)]
    elif not torch.cuda.is_available():
        print("bench/gpu_decode_sweep.py needs a CUDA GPU")
        return 2
    import triton

    gen = torch.Generator(device=DEV).manual_seed(0)
    records, t0 = [], time.time()
    meta = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", torch=torch.__version__, triton=triton.__version__,
                timer="do_bench_cudagraph")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write():
        meta["seconds"] = round(time.time() - t0, 1)
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, records=records), f, indent=1)
        os.replace(tmp, args.out)

    _SAVE[0] = write
    for part in args.parts:
        try:
            dict(mma=sweep_mma, bitmap=sweep_bitmap, expand=sweep_expand)[part](gen, records)
        finally:
            write()  # whatever was measured survives a time limit in the next part
    print(f"wrote {args.out} ({len(records)} records, {meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
