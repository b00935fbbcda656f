"""Host time of one training call (forward + backward) through the public ops, by dispatch route.

Providers, side by side in one process (round-robin, medians):

- ``eager``: what an eager training call runs since stop 33: a plain ``torch.autograd.Function``
  around the op's implementation (``ops.dispatch.eager_function``);
- ``custom_op``: the same call forced through the ``torch.ops.laco.*`` custom op and its
  Python-level autograd (``call_route`` patched to ``"op"``), the route every training call took before;
- ``torch``: ``F.linear(x, W * M, b)`` (2:4: ``F.linear(x, dense(V), b)``) with autograd, the mask
  or dense weight prepared outside the timed call: the floor a wrapper can approach.

Where: ``--device cpu`` (default) runs the native backend on a small shape, so the time is mostly
dispatch; ``--stub`` instead runs the Triton backend (interpreter flag set) with every Triton
launcher replaced by an empty-tensor stub, which isolates the host work of the GPU route without a
GPU; ``--device cuda`` runs the real kernels (a GPU loan: small shapes there are host-bound).
Writes ``bench/results/op_overhead[_stub|_cuda].json``.

    python bench/op_overhead.py [--stub] [--device cuda] [--path triton|expand|auto] [--m 8 --n 64 --k 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stub_triton_launchers():
    """Replace the Triton launchers the two ops call by stubs returning tensors of the right shape."""
    import torch

    from laco_kernels.kernels import masked_gemm as km
    from laco_kernels.kernels import sparse24_gemm as s24
    from laco_kernels.kernels import sparse24_grad as sg

    km.pruned_nonzero = lambda w, b: torch.zeros(1, dtype=torch.int32)
    km.masked_linear_fwd = lambda x, w, b, bias, flag=None: x.new_empty(x.shape[0], w.shape[0])
    km.masked_linear_dx = lambda dy, w, b, flag=None: dy.new_empty(dy.shape[0], w.shape[1])
    km.masked_linear_dw = lambda dy, x, b, want_bias=False, bias_dtype=None: (
        x.new_empty(dy.shape[1], x.shape[1]), None if not want_bias else dy.new_empty(dy.shape[1]))
    s24.sparse24_linear = lambda x, v, meta, shape, bias=None, **kw: x.new_empty(x.shape[0], shape[0])
    sg.sparse24_grad_input = lambda dy, v, meta, shape, **kw: dy.new_empty(dy.shape[0], shape[1])
    sg.sparse24_values_grad = lambda dy, x, meta, shape, want_bias=False, bias_dtype=None, **kw: (
        x.new_empty(shape[0], shape[1] // 2), None if not want_bias else dy.new_empty(shape[0]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--stub", action="store_true", help="CPU: the Triton route with stubbed launchers")
    ap.add_argument("--path", default="triton", choices=["triton", "expand", "auto"],
                    help="LACO_TRAIN_PATH on the Triton backend (--stub, cuda): the route whose host time is measured")
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.stub:
        if a.device != "cpu":
            ap.error("--stub runs on the CPU (it stands in for the GPU kernels)")
        os.environ["LACO_BACKEND"], os.environ["TRITON_INTERPRET"] = "triton", "1"
    os.environ["LACO_TRAIN_PATH"] = a.path
    import torch
    import torch.nn.functional as F

    from laco_kernels.formats import PackedMask, Sparse24Weight
    from laco_kernels.ops import masked_gemm, sparse_gemm

    if a.stub:
        _stub_triton_launchers()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dev = torch.device(a.device)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    x = torch.randn(a.m, a.k, device=dev, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(a.n, a.k, device=dev, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(a.n, device=dev, dtype=dtype))
    pm = PackedMask.from_bool(torch.rand(a.n, a.k, device=dev) > 0.5)
    mask = pm.to_bool().to(dtype)
    w24 = Sparse24Weight.from_dense(w.detach(), prune=True)
    v = torch.nn.Parameter(w24.values.clone())
    t24 = Sparse24Weight(v, w24.meta, w24.shape)
    dense24 = w24.to_dense()
    dy = torch.ones(a.m, a.n, device=dev, dtype=dtype)

    def on(mod, eager):
        return lambda fn: (lambda: _route(mod, eager, fn))

    def _route(mod, eager, fn):
        if eager:
            return fn()
        saved = mod.call_route
        mod.call_route = lambda *t: "op"
        try:
            return fn()
        finally:
            mod.call_route = saved

    calls = {
        "masked_linear/eager": on(masked_gemm, True)(lambda: masked_gemm.masked_linear(x, w, pm, b).backward(dy)),
        "masked_linear/custom_op": on(masked_gemm, False)(lambda: masked_gemm.masked_linear(x, w, pm, b).backward(dy)),
        "masked_linear/torch": lambda: F.linear(x, w * mask, b).backward(dy),
        "sparse24_linear/eager": on(sparse_gemm, True)(lambda: sparse_gemm.sparse24_linear(x, t24, b).backward(dy)),
        "sparse24_linear/custom_op": on(sparse_gemm, False)(
            lambda: sparse_gemm.sparse24_linear(x, t24, b).backward(dy)),
        "sparse24_linear/torch": lambda: F.linear(x, dense24.requires_grad_(), b).backward(dy),
    }
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    for fn in calls.values():  # warm-up (Triton / autotune caches, first-call imports)
        for _ in range(20):
            fn()
    sync()
    times = {name: [] for name in calls}
    for _ in range(a.rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / a.calls * 1e6)
    rows = {name: round(statistics.median(ts), 1) for name, ts in times.items()}
    print(f"{'call (forward + backward)':<28} {'us / call':>10}")
    for name, us in rows.items():
        print(f"{name:<28} {us:>10.1f}")
    res = dict(device=a.device, stub=a.stub, path=a.path, dtype=str(dtype).replace("torch.", ""), m=a.m, n=a.n, k=a.k,
               calls=a.calls, rounds=a.rounds, us_per_call_median=rows,
               cpu=torch.cuda.get_device_name() if a.device == "cuda" else _cpu_name(),
               command="python bench/op_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    suffix = "_stub" if a.stub else ("_cuda" if a.device == "cuda" else "")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"op_overhead{suffix}.json")
    from laco_kernels._atomic import atomic_file

    with atomic_file(out) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(res, indent=1) + "\n")
    print("wrote", out)
    return res


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
