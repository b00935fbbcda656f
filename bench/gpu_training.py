"""Training kernels on a real GPU: correctness against the references, then kernel timings.

Needs CUDA (run it where a GPU is lent). Checks, for fp16 / bf16 / fp32 and awkward shapes
(M = 1, odd N and K, a large K): masked_linear forward and all gradients, the 2:4 backward
through ``sparse24_linear`` (dX, dV, db), and the fused reconstruction loss (value and grad),
each against ``reference.py`` computed on the same GPU in fp32 (bf16 included, which the
interpreter cannot check), on both the fused-kernel path and the expand path. Then times, with
``triton.testing.do_bench``, one forward + backward of masked_linear against the same kernels
without the mask and against ``F.linear(x, W * M)`` with autograd, and every training path
(``triton`` / ``expand`` / ``torch``) of masked_linear and the 2:4 op, at SmolLM2 MLP shapes (``--shapes 7b``: Llama-7B MLP linears at 4096 and 8192 tokens; ``--skip-check`` times only). Writes ``bench/results/gpu_training.json``.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from laco_kernels import reference  # noqa: E402
from laco_kernels.formats import PackedMask, Sparse24Weight  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_training.json")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _err(a, b):
    """max |a - b| / max(1, max |b|) in fp32."""
    a, b = a.float(), b.float()
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).detach())


def _grads(fn, args, dy):
    leaves = [t.detach().clone().requires_grad_() for t in args]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


def check_correctness(dev="cuda"):
    from laco_kernels.ops.loss import reconstruction_loss
    from laco_kernels.ops.masked_gemm import masked_linear
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, n, k in ((1, 37, 72), (33, 45, 100), (512, 1536, 576), (7, 96, 4100)):
            x, w, b, dy = (torch.randn(*s, device=dev, dtype=dtype) for s in ((m, k), (n, k), (n,), (m, n)))
            mask = torch.rand(n, k, device=dev) < 0.5
            pm = PackedMask.from_bool(mask)
            w24 = Sparse24Weight.from_dense(w, prune=True)
            want = _grads(lambda x, w, b: reference.masked_linear(x.float(), w.float(), mask, b.float()),
                          (x, w, b), dy.float())
            want24 = _grads(lambda x, v, b: reference.sparse24_linear(x.float(), w24, b.float(), values=v.float()),
                            (x, w24.values, b), dy.float())
            for path in ("triton", "expand"):  # the fused kernels, and the expand path (weight_expand + cuBLAS)
                got = _grads(lambda x, w, b: masked_linear(x, w, pm, b, path=path), (x, w, b), dy)
                errs = [_err(g, r) for g, r in zip(got, want)]
                zero = bool((got[2][~mask] == 0).all())
                rows.append(dict(op=f"masked_linear[{path}]", dtype=str(dtype), shape=(m, n, k), errs=errs,
                                 pruned_grad_zero=zero, ok=max(errs) <= TOL[dtype] and zero))
                got = _grads(lambda x, v, b: sparse24_linear(x, Sparse24Weight(v, w24.meta, w24.shape), b, path=path),
                             (x, w24.values, b), dy)
                errs = [_err(g, r) for g, r in zip(got, want24)]
                rows.append(dict(op=f"sparse24_linear(values)[{path}]", dtype=str(dtype), shape=(m, n, k), errs=errs,
                                 ok=max(errs) <= TOL[dtype]))
        for kind in ("mse", "nmse", "cosine"):
            p, t = torch.randn(8, 128, 576, device=dev, dtype=dtype), torch.randn(8, 128, 576, device=dev, dtype=dtype)
            got = _grads(lambda p: reconstruction_loss(p, t, kind), (p,), torch.tensor(1.0, device=dev))
            want = _grads(lambda p: reference.reconstruction_loss(p.float(), t, kind), (p,),
                          torch.tensor(1.0, device=dev))
            errs = [abs(float(got[0] - want[0])) / max(1e-12, abs(float(want[0])))] + [_err(got[1] / want[1].abs().max(),
                                                                                              want[1] / want[1].abs().max())]
            rows.append(dict(op=f"reconstruction_loss[{kind}]", dtype=str(dtype), shape=(8 * 128, 576), errs=errs,
                             ok=errs[0] <= 1e-4 and errs[1] <= TOL[dtype]))
    return rows


SHAPES = {"smollm2": ((512, 1536, 576), (512, 576, 1536), (4096, 1536, 576)),  # (tokens M, N, K) of MLP linears
          "7b": ((4096, 11008, 4096), (4096, 4096, 11008), (8192, 11008, 4096))}


def time_kernels(dev="cuda", shapes=SHAPES["smollm2"]):
    from triton.testing import do_bench

    from laco_kernels.kernels import masked_gemm as mg
    from laco_kernels.ops.masked_gemm import masked_linear
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for m, n, k in shapes:
            x, w, dy = (torch.randn(*s, device=dev, dtype=dtype) for s in ((m, k), (n, k), (m, n)))
            mask = torch.rand(n, k, device=dev) < 0.5
            bits = PackedMask.from_bool(mask).bits

            def kernels(b):
                mg.masked_linear_fwd(x, w, b)
                mg.masked_linear_dx(dy, w, b)
                mg.masked_linear_dw(dy, x, b)

            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            pm = PackedMask(bits, (n, k))

            def ours_autograd():
                masked_linear(xs, ws, pm).backward(dy)

            def torch_materialized():
                F.linear(xs, ws * mask).backward(dy)

            w24 = Sparse24Weight.from_dense(w, prune=True)
            v24 = w24.values.clone().requires_grad_()

            def ops(op, path):
                if op == "masked":
                    return lambda: masked_linear(xs, ws, pm, path=path).backward(dy)
                return lambda: sparse24_linear(xs, Sparse24Weight(v24, w24.meta, w24.shape), path=path).backward(dy)

            r = dict(dtype=str(dtype), shape=(m, n, k), ms_masked_kernels=do_bench(lambda: kernels(bits)),
                     ms_unmasked_kernels=do_bench(lambda: kernels(None)), ms_masked_linear_autograd=do_bench(ours_autograd),
                     ms_torch_W_times_M_autograd=do_bench(torch_materialized))
            # every training path of both ops through the public op + autograd (the auto dispatch's choices)
            for op in ("masked", "sparse24"):
                for path in ("triton", "expand", "torch"):
                    r[f"ms_{op}_{path}_path"] = do_bench(ops(op, path))
            rows.append(r)
    return rows


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2", help="timed (tokens, N, K) set")
    ap.add_argument("--skip-check", action="store_true", help="timings only (the correctness part ran before)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_training.py needs a CUDA GPU")
    import triton

    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               shapes=args.shapes)
    res["correctness"] = [] if args.skip_check else check_correctness()
    for r in res["correctness"]:
        print(f"{r['op']:28s} {r['dtype']:15s} {str(r['shape']):18s} {'ok ' if r['ok'] else 'BAD'} "
              + " ".join(f"{e:.1e}" for e in r["errs"]), flush=True)
    res["timing"] = time_kernels(shapes=SHAPES[args.shapes])
    for r in res["timing"]:
        print(f"{r['dtype']:15s} {str(r['shape']):18s} masked {r['ms_masked_kernels']:.3f} ms  unmasked "
              f"{r['ms_unmasked_kernels']:.3f} ms  masked_linear+autograd {r['ms_masked_linear_autograd']:.3f} ms  "
              f"F.linear(x, W*M)+autograd {r['ms_torch_W_times_M_autograd']:.3f} ms", flush=True)
        print("    paths (ms): " + "  ".join(f"{op} {p} {r[f'ms_{op}_{p}_path']:.3f}" for op in ("masked", "sparse24")
                                         for p in ("triton", "expand", "torch")), flush=True)
    out = os.environ.get("GPU_TRAINING_OUT", OUT)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(out + ".tmp", out)
    bad = [r for r in res["correctness"] if not r["ok"]]
    if bad:
        raise SystemExit(f"{len(bad)} correctness checks failed")


if __name__ == "__main__":
    main()
