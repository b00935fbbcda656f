"""Memory and time of one recovery training step of a Llama MLP block (SmolLM2-135M shapes).

    y = down(silu(gate(x)) * up(x)),  hidden 576, intermediate 1536, x [4, 128, 576]

Variants (same masks, 50% unstructured per weight, AdamW with weight_decay=0, target = the
dense block's output):
  a. ``materialized``: ``F.linear(x, W * M)`` for each projection + ``F.mse_loss`` (what people do today)
  b. ``ops``: ``masked_linear(x, W, PackedMask)`` + ``reconstruction_loss(y, t, "mse")``
  c. ``ops_24``: 2:4 masks instead, ``sparse24_linear`` on trainable compressed values ``[N, K/2]``
     + ``reconstruction_loss`` (optimizer state for the kept half only)
The backends are whatever ``ops.dispatch`` picks for the tensors (CPU: reference / native;
CUDA: Triton) and are recorded per variant.

Memory, per device:
  * CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the allocation before it
    (``step_peak_bytes``), plus what lives across steps (``persistent_bytes``: allocated before).
  * CPU: the CPU allocator's own accounting as the PyTorch profiler reports it
    (``profile_memory=True``: every allocation and free event carries the running total of
    bytes allocated through c10's CPU allocator since profiling began); ``step_peak_bytes`` is
    the maximum of that total during one step. ``persistent_bytes`` is the sum of the nbytes of
    the parameters, optimizer state, masks and inputs. (tracemalloc does not see torch's
    allocator, and RSS includes allocator caching and the Python heap.)
Time: median wall time of ``--reps`` steps after 2 warm-up steps (shared machine: a rough figure).

    python bench/train_step.py                 # CPU (and CUDA when present)
    python bench/train_step.py --devices cuda --dtypes float32 bfloat16
Writes ``bench/results/train_step.json`` (entries keyed by device and dtype; others kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from laco_kernels.formats import PackedMask, Sparse24Weight  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json")
HIDDEN, INTER = 576, 1536
NAMES = ("gate", "up", "down")


def _shapes():
    return {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}


def _problem(device, dtype, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = {n: (torch.randn(*s, generator=g) / s[1] ** 0.5) for n, s in _shapes().items()}
    x = torch.randn(batch, seq, HIDDEN, generator=g)
    with torch.no_grad():
        target = F.linear(F.silu(F.linear(x, dense["gate"])) * F.linear(x, dense["up"]), dense["down"])
    masks = {n: torch.rand(w.shape, generator=g) >= 0.5 for n, w in dense.items()}
    to = dict(device=device, dtype=dtype)
    return ({n: w.to(**to) for n, w in dense.items()}, {n: m.to(device) for n, m in masks.items()},
            x.to(**to), target.to(**to))


def _mlp(lin, x):
    return lin("down", F.silu(lin("gate", x)) * lin("up", x))


def build(variant, device, dtype, batch, seq):
    """-> (step function, tensors that persist across steps, backends used)."""
    from laco_kernels.ops.dispatch import select_backend

    dense, masks, x, target = _problem(device, dtype, batch, seq)
    keep = [x, target]
    if variant == "materialized":
        params = {n: torch.nn.Parameter(dense[n] * masks[n]) for n in NAMES}
        keep += list(masks.values())  # bool masks, 1 byte a weight
        fwd = lambda: F.mse_loss(_mlp(lambda n, h: F.linear(h, params[n] * masks[n]), x).float(), target.float())
        backends = {"linear": "torch", "loss": "torch"}
    elif variant == "ops":
        from laco_kernels.ops.loss import reconstruction_loss
        from laco_kernels.ops.masked_gemm import masked_linear

        params = {n: torch.nn.Parameter(dense[n] * masks[n]) for n in NAMES}
        pm = {n: PackedMask.from_bool(masks[n]) for n in NAMES}
        keep += [p.bits for p in pm.values()]
        fwd = lambda: reconstruction_loss(_mlp(lambda n, h: masked_linear(h, params[n], pm[n]), x), target, "mse")
        backends = {"linear": select_backend("masked_linear", [x]), "loss": select_backend("reconstruction_loss", [x])}
    elif variant == "ops_24":
        from laco_kernels.ops.loss import reconstruction_loss
        from laco_kernels.ops.sparse_gemm import sparse24_linear

        w24 = {n: Sparse24Weight.from_dense(dense[n], prune=True) for n in NAMES}
        params = {n: torch.nn.Parameter(w24[n].values.clone()) for n in NAMES}
        keep += [w.meta for w in w24.values()]
        fwd = lambda: reconstruction_loss(
            _mlp(lambda n, h: sparse24_linear(h, Sparse24Weight(params[n], w24[n].meta, w24[n].shape)), x),
            target, "mse")
        backends = {"linear": select_backend("sparse24_linear", [x]),
                    "loss": select_backend("reconstruction_loss", [x])}
    else:
        raise ValueError(f"unknown variant {variant!r}")
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd()
        loss.backward()
        opt.step()
        return loss

    def persistent():
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in list(params.values()) + keep + state)

    return step, persistent, backends, params, masks


def _cpu_step_peak(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    path = f"/tmp/train_step_trace_{os.getpid()}.json"
    prof.export_chrome_trace(path)  # the [memory] events with the allocator's running total
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    running = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
               and e["args"].get("Device Type", 0) == 0]
    if not running:
        raise RuntimeError("the profiler reported no CPU memory events; cannot measure the peak")
    return max(running)


def measure(variant, device, dtype, batch=4, seq=128, reps=5) -> dict:
    step, persistent, backends, params, masks = build(variant, device, dtype, batch, seq)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = float(step().detach())  # warm-up (creates grads and optimizer state, compiles kernels)
    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _cpu_step_peak(step)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    pruned_nonzero = 0
    if variant != "ops_24":
        pruned_nonzero = sum(int((params[n].detach()[~masks[n]] != 0).sum()) for n in NAMES)
    return dict(variant=variant, device=device, dtype=str(dtype).replace("torch.", ""), tokens=batch * seq,
                backends=backends, first_loss=first, step_ms=round(1e3 * statistics.median(times), 2),
                step_ms_all=[round(1e3 * t, 2) for t in times], step_peak_bytes=int(peak),
                persistent_bytes=int(persistent()), total_peak_bytes=int(peak + persistent()),
                pruned_weights_nonzero_after_steps=pruned_nonzero)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--variants", nargs="+", default=["materialized", "ops", "ops_24"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    results = {}
    if a.out and os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)
    print(f"{'device':6s} {'dtype':9s} {'variant':13s} {'linear':>9s} {'loss':>9s} {'ms/step':>9s} "
          f"{'step peak MiB':>14s} {'persist MiB':>12s} {'total MiB':>10s}")
    for device in a.devices:
        for dt in a.dtypes:
            key = f"{device}/{dt}"
            results[key] = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if device == "cuda"
                            else "cpu", "threads": torch.get_num_threads(), "records": []}
            for v in a.variants:
                r = measure(v, device, getattr(torch, dt), reps=a.reps)
                results[key]["records"].append(r)
                mib = 2 ** 20
                print(f"{device:6s} {dt:9s} {v:13s} {r['backends']['linear']:>9s} {r['backends']['loss']:>9s} "
                      f"{r['step_ms']:9.2f} {r['step_peak_bytes'] / mib:14.2f} {r['persistent_bytes'] / mib:12.2f} "
                      f"{r['total_peak_bytes'] / mib:10.2f}", flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        tmp = f"{a.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, a.out)
    return results


if __name__ == "__main__":
    main()
