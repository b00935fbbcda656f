"""GPU microbenchmark of the sparse linear kernels against cuBLAS and PyTorch's 2:4 path.

For Llama-7B projection shapes (N x K = 4096 x 4096, 11008 x 4096, 4096 x 11008), fp16 and bf16,
M in {1, 2, 4, ..., 8192}, times with ``triton.testing.do_bench`` (median, L2 flushed):

- ``cublas``: ``F.linear`` with the dense weight (the pruned weight, stored dense);
- ``dense_triton``: ``kernels.dense_gemm.dense_linear`` (our tiling without decompression);
- ``sparse24``: ``laco_kernels.sparse24_linear`` (2:4, Triton);
- ``bitmap50`` / ``bitmap70``: ``laco_kernels.bitmap_linear`` at 50% / 70% unstructured sparsity;
- ``torch_semi_structured``: ``F.linear`` with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS).

Before timing, each method's output is checked against ``F.linear`` on the same (sparse) weight at
M = 1 and M = 256 (``max_abs_err`` in the JSON). Writes ``bench/results/gpu_gemm.json`` and prints
a table of microseconds and speed-ups over cuBLAS. Needs a CUDA GPU (exits with a message otherwise).

    python bench/gpu_gemm.py                 # everything (about 2 minutes on an H100)
    python bench/gpu_gemm.py --quick         # M in {1, 16, 256, 4096}, 4096 x 4096 only
    python bench/gpu_gemm.py --graph         # GPU time only (CUDA graph), no Python launch overhead
    python bench/gpu_gemm.py --check         # correctness of the ops on CUDA (awkward shapes, 3 dtypes)
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

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_gemm.json")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) of q/o, gate/up, down projections
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
METHODS = ["cublas", "dense_triton", "sparse24", "bitmap50", "bitmap70", "torch_semi_structured",
           "sparse24_semi_dispatch"]


def _methods(n, k, dtype, gen):
    """name -> (callable x -> y, dense weight it computes with)."""
    from laco_kernels.formats import BitmapWeight, Sparse24Weight
    from laco_kernels.kernels.dense_gemm import dense_linear
    from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear

    dev = "cuda"
    w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.float32).to(dtype)
    w24 = Sparse24Weight.from_dense(w, prune=True)
    w24_dense = w24.to_dense()
    out = {"cublas": (lambda x: F.linear(x, w24_dense), w24_dense),
           "dense_triton": (lambda x: dense_linear(x, w24_dense), w24_dense),
           "sparse24": (lambda x: sparse24_linear(x, w24), w24_dense)}
    for s in (50, 70):
        keep = torch.rand(n, k, device=dev, generator=gen) >= s / 100
        wd = w * keep
        bw = BitmapWeight.from_dense(wd)
        out[f"bitmap{s}"] = ((lambda bw_: lambda x: bitmap_linear(x, bw_))(bw), wd)
    try:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w24_dense)
        out["torch_semi_structured"] = (lambda x: F.linear(x, ws), w24_dense)
    except Exception as e:  # not every build / GPU has cuSPARSELt or CUTLASS 2:4
        out["torch_semi_structured"] = (e, w24_dense)
    try:  # SparseLinear24 with the opt-in dispatch (semi-structured at M >= SEMI_STRUCTURED_MIN_M)
        from laco_kernels.nn import SparseLinear24

        mod = SparseLinear24(w24)
        mod.enable_semi_structured()
        out["sparse24_semi_dispatch"] = (mod, w24_dense)
    except Exception as e:
        out["sparse24_semi_dispatch"] = (e, w24_dense)
    return out


_TOL = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 5e-2), torch.float32: (1e-4, 1e-4)}


def check(gen) -> int:
    """Ops vs reference on CUDA for awkward shapes (M = 1..256, N, K off the tiles, 3-D, strided x)."""
    from laco_kernels import reference
    from laco_kernels.formats import BitmapWeight, Sparse24Weight
    from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear

    bad = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        atol, rtol = _TOL[dtype]
        for lead, n, k in [((1,), 37, 72), ((3,), 70, 1028), ((16,), 45, 100), ((67,), 130, 200), ((256,), 70, 136),
                           ((2, 5), 96, 4096), ((1, 8), 4096, 256), ((2,), 300, 4100), ((1,), 1000, 11008)]:
            w = torch.randn(n, k, device="cuda", generator=gen)
            w24 = Sparse24Weight.from_dense(w.to(dtype), prune=True)
            bw = BitmapWeight.from_dense((w * (torch.rand(n, k, device="cuda", generator=gen) > 0.6)).to(dtype))
            x = torch.randn(k, *lead, device="cuda", generator=gen).to(dtype).movedim(0, -1)  # strided last dim
            b = torch.randn(n, device="cuda", generator=gen).to(dtype)
            for name, got, want in (("sparse24", sparse24_linear(x, w24, b), reference.sparse24_linear(x, w24, b)),
                                    ("bitmap", bitmap_linear(x, bw), reference.bitmap_linear(x, bw))):
                ok = got.dtype == dtype and got.shape == want.shape and torch.allclose(
                    got.float(), want.float(), atol=atol, rtol=rtol)
                err = (got.float() - want.float()).abs().max().item()
                bad += not ok
                print(f"check {name:8s} {str(dtype):14s} x{tuple(x.shape)} N={n} K={k}: max|err|={err:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"check: {bad} failures")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms)")
    ap.add_argument("--check", action="store_true", help="only check correctness on awkward shapes, then exit")
    ap.add_argument("--graph", action="store_true",
                    help="time inside a CUDA graph (do_bench_cudagraph): GPU time without Python launch overhead")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="override the list of M")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_gemm.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              "(run the CPU benchmarks with: pytest bench/test_bench_cpu_paths.py)", file=sys.stderr)
        return 2
    import triton.testing

    if args.check:
        return 1 if check(torch.Generator(device="cuda").manual_seed(0)) else 0

    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = args.ms or ([1, 16, 256, 4096] if args.quick else MS)
    if args.graph:
        def timer(fn):
            return triton.testing.do_bench_cudagraph(fn, rep=args.rep)
    else:
        def timer(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=args.rep)
    gen = torch.Generator(device="cuda").manual_seed(0)
    records, t0 = [], time.time()
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for n, k in shapes:
            meths = _methods(n, k, dtype, gen)
            errs = {}
            for name, (fn, wd) in meths.items():  # correctness first
                if isinstance(fn, Exception):
                    errs[name] = f"unavailable: {type(fn).__name__}: {str(fn)[:120]}"
                    continue
                try:
                    e = 0.0
                    for m in (1, 256):
                        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
                        e = max(e, (fn(x).float() - F.linear(x.float(), wd.float())).abs().max().item())
                    errs[name] = e
                except Exception as ex:
                    errs[name] = f"error: {type(ex).__name__}: {str(ex)[:160]}"
            for m in ms:
                x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
                row = {}
                for name, (fn, _) in meths.items():
                    if not isinstance(errs.get(name), float):
                        row[name] = None
                        continue
                    try:
                        row[name] = timer(lambda: fn(x)) * 1e3
                    except Exception as ex:  # e.g. the 2:4 path rejecting a shape
                        errs[name] = f"error at M={m}: {type(ex).__name__}: {str(ex)[:160]}"
                        row[name] = None
                for name, us in row.items():
                    records.append(dict(method=name, M=m, N=n, K=k, dtype=dname, us=us,
                                        speedup_vs_cublas=(row["cublas"] / us) if us and row.get("cublas") else None,
                                        max_abs_err=errs.get(name)))
                cells = " ".join(f"{name}={us:8.1f}" if us else f"{name}=     n/a" for name, us in row.items())
                print(f"{dname:8s} N={n:5d} K={k:5d} M={m:5d} us: {cells}", flush=True)
            print("max |err| vs F.linear:", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in errs.items()})
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, seconds=round(time.time() - t0, 1),
                timer="do_bench_cudagraph" if args.graph else "do_bench")
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(records)} records, {meta['seconds']} s on {meta['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
