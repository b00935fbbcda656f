"""Traffic audit: bytes every tl.load / tl.store moves, kernels run in the Triton interpreter.

Writes ``bench/results/traffic.json``: records ``{kernel, M, N, K, dtype, sparsity, bytes_read,
bytes_written, dense_bytes_read, read_ratio, ...}`` where ``dense_bytes_read`` is the dense
Triton GEMM (``kernels/dense_gemm.py``, same tiling and split-K) of the same shape under the same
accounting. Targets (issue 2, M = 1, fp16): 2:4 read ratio <= 0.60; bitmap <= 0.60 at 50%
sparsity and <= 0.42 at 70%.

Other kernel families register a function ``fn(M, N, K, dtype) -> list of records`` with
:func:`register` (the audit runs every registered family), and can reuse :func:`measure` and
``laco_kernels.kernels._traffic.count_traffic``.

    python bench/traffic.py                      # M in {1, 16}, N = K = 4096, fp16
    python bench/traffic.py --n 1024 --k 1024    # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from laco_kernels.formats import BitmapWeight, Sparse24Weight  # noqa: E402
from laco_kernels.kernels._traffic import count_traffic  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "traffic.json")
REGISTRY: Dict[str, Callable] = {}


def register(name: str):
    """Decorator: ``@register("family")`` on ``fn(M, N, K, dtype) -> [record, ...]``."""
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


def measure(fn) -> Dict[str, int]:
    """Run ``fn()`` (interpreted kernels on CPU tensors) and return the bytes it moved."""
    with count_traffic() as t:
        fn()
    return dict(bytes_read=t.bytes_read, bytes_written=t.bytes_written)


def _weight(n, k, dtype, sparsity, gen):
    w = torch.randn(n, k, generator=gen).to(dtype)
    if sparsity:
        keep = torch.rand(n, k, generator=gen) >= sparsity
        w = w * keep.to(dtype)
    return w


def _record(kernel, m, n, k, dtype, sparsity, moved, dense, **extra):
    return dict(kernel=kernel, M=m, N=n, K=k, dtype=str(dtype).replace("torch.", ""), sparsity=sparsity,
                bytes_read=moved["bytes_read"], bytes_written=moved["bytes_written"],
                dense_bytes_read=dense["bytes_read"], read_ratio=round(moved["bytes_read"] / dense["bytes_read"], 4),
                **extra)


_DENSE_CACHE: Dict[tuple, Dict[str, int]] = {}


def dense_traffic(m, n, k, dtype) -> Dict[str, int]:
    """Bytes of the dense Triton GEMM for this shape (the baseline every record divides by)."""
    key = (m, n, k, dtype)
    if key not in _DENSE_CACHE:
        from laco_kernels.kernels import dense_gemm

        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(m, k, generator=g).to(dtype), _weight(n, k, dtype, 0.0, g)
        _DENSE_CACHE[key] = measure(lambda: dense_gemm.dense_linear(x, w))
    return _DENSE_CACHE[key]


@register("sparse24")
def sparse24_records(m, n, k, dtype) -> List[dict]:
    from laco_kernels.kernels import sparse24_gemm

    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    w24 = Sparse24Weight.from_dense(_weight(n, k, dtype, 0.0, g), prune=True)
    moved = measure(lambda: sparse24_gemm.sparse24_linear(x, w24.values, w24.meta, w24.shape))
    return [_record("sparse24_gemm", m, n, k, dtype, 0.5, moved, dense_traffic(m, n, k, dtype),
                    weight_nbytes=w24.nbytes)]


@register("bitmap")
def bitmap_records(m, n, k, dtype, sparsities=(0.5, 0.7)) -> List[dict]:
    """``bitmap_gemm`` (the launcher on the canonical layout: tl.dot kernel or popcount GEMV) and, where
    M routes to a GEMV, ``bitmap_chunks`` (the default GEMV on the derived chunk layout: it reads
    ``itemsize + 0.5`` bytes per entry plus one gathered x element per entry, L1 traffic on a GPU)."""
    import os

    from laco_kernels.kernels import bitmap_chunks, bitmap_gemm, bitmap_gemv

    out = []
    for s in sparsities:
        g = torch.Generator().manual_seed(2)
        x = torch.randn(m, k, generator=g).to(dtype)
        bw = BitmapWeight.from_dense(_weight(n, k, dtype, s, g), tile_k=128)
        old = os.environ.get(bitmap_gemv.LAYOUT_ENV)
        os.environ[bitmap_gemv.LAYOUT_ENV] = "canonical"
        try:
            moved = measure(lambda: bitmap_gemm.bitmap_linear(x, bw.values, bw.bitmap, bw.offsets, bw.shape, bw.tile_k))
        finally:
            if old is None:
                os.environ.pop(bitmap_gemv.LAYOUT_ENV)
            else:
                os.environ[bitmap_gemv.LAYOUT_ENV] = old
        out.append(_record("bitmap_gemm", m, n, k, dtype, s, moved, dense_traffic(m, n, k, dtype),
                           weight_nbytes=bw.nbytes, measured_sparsity=round(1 - bw.density(), 4)))
        if m <= bitmap_gemv.GEMV_MAX_M:
            lay = bitmap_chunks.build_layout(bw.values, bw.bitmap, bw.shape)
            moved = measure(lambda: bitmap_chunks.chunks_gemv(x, lay))
            out.append(_record("bitmap_chunks", m, n, k, dtype, s, moved, dense_traffic(m, n, k, dtype),
                               weight_nbytes=lay.nbytes(), entries=lay.vals.numel(), splits=lay.splits,
                               measured_sparsity=round(1 - bw.density(), 4)))
    return out


# training kernels (issue 3): masked_linear forward + backward, fused reconstruction loss
from traffic_training import FAMILIES as _TRAINING_FAMILIES  # noqa: E402

REGISTRY.update(_TRAINING_FAMILIES)


def run(ms=(1, 16), n=4096, k=4096, dtype=torch.float16, families=None, out=DEFAULT_OUT, note=""):
    records = []
    for m in ms:
        for name, fn in REGISTRY.items():
            if families and name not in families:
                continue
            t0 = time.time()
            recs = fn(m, n, k, dtype)
            for r in recs:
                r["seconds"] = round(time.time() - t0, 1)
                if note:
                    r["note"] = note
            records.extend(recs)
            for r in recs:
                print(f"{r['kernel']:16s} M={m:<3d} N={n} K={k} {r['dtype']} sparsity={r['sparsity']:.2f} "
                      f"read={r['bytes_read']:>11,d} dense={r['dense_bytes_read']:>11,d} ratio={r['read_ratio']:.3f} "
                      f"written={r['bytes_written']:,d}", flush=True)
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, out)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    run(tuple(a.m), a.n, a.k, torch.float16, a.families, a.out, a.note)


if __name__ == "__main__":
    main()
