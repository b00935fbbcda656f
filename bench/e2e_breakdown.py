"""Where a SmolLM2 decode token goes, and the speed-up the weight bytes allow (issue 16, item 3).

Times greedy decode (32 new tokens after an 8-token prompt, KV cache, as ``bench/cpu_kernels.py``'s
end-to-end part) of three models with SmolLM2-135M's shapes (random init), round-robin in one process:

- ``dense``: the model as built;
- ``sparse``: every decoder linear 2:4-pruned and swapped for ``SparseLinear24`` (``sparsify``);
- ``free``: every decoder linear replaced by a module that returns a preallocated zero output, so a
  token costs only what is not a decoder linear (attention, norms, rotary, the tied LM head, HF's
  Python); the LM head (``F.linear``, 49152 x 576, not pruned) is timed on its own as well.

From them: the decoder linears' time per token, dense (``dense - free``) and sparse (``sparse - free``),
the bytes each reads per token (dense weights; 2:4 values + metadata), the bandwidth each reaches, what
a plain streaming read reaches at the same thread count (``torch.sum`` over 256 MB), and a
**prediction**: the decode speed-up if the sparse linears streamed their bytes at the dense linears'
bandwidth (``dense / (free + (dense - free) * sparse_bytes / dense_bytes)``). That ceiling is dense's
yardstick, not the machine's: where both linears stay below the plain read, a faster kernel can pass it.

``--old <path of another build's _C*.so>`` also times the sparse model with that build's kernels
(``sparse_old``; the modules' fast path is pointed at it for those rounds; the two builds take turns
right after the dense model), in the same process. Run it both ways (each build once as the package):
in stop 35 the same code measured up to 1.1-1.2x apart depending on which side it was on.

    OMP_NUM_THREADS=2 python bench/e2e_breakdown.py --out bench/results/e2e_breakdown_epyc_zen3.json
    OMP_NUM_THREADS=2 python bench/e2e_breakdown.py --old "/tmp/oldtree/laco_kernels/_C*.so" --out /tmp/ab.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from cpu_kernels import SMOLLM2, _decode_seconds, _prune_decoder_linears_24, cpu_isa_flags, cpu_model  # noqa: E402

GOALS = {"fp32": 1.5, "bf16": 1.3}  # issue 16 item 3: decode tokens/s over the dense model


class _FreeLinear(torch.nn.Module):
    """Stands in for an ``nn.Linear``: returns a zero output of the right shape at no cost."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.out_features = lin.out_features
        self.register_buffer("zero", torch.zeros(1, 1, lin.out_features, dtype=lin.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zero.expand(*x.shape[:-1], self.out_features)


def _decoder_linears(model):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                yield parent, name, child


def _models(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from laco_kernels.nn import SparseLinear24, sparsify

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(dtype).eval()
    sparse = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(dtype).eval()
    sparse.load_state_dict(dense.state_dict())
    _prune_decoder_linears_24(sparse)
    sparsify(sparse, "2:4", mode="inference")
    free = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(dtype).eval()
    free.load_state_dict(dense.state_dict())
    dense_bytes = sparse_bytes = 0
    for parent, name, child in _decoder_linears(free):
        if isinstance(child, torch.nn.Linear):
            dense_bytes += child.weight.numel() * child.weight.element_size()
            setattr(parent, name, _FreeLinear(child))
    swapped = 0
    for _, _, child in _decoder_linears(sparse):
        if isinstance(child, SparseLinear24):
            swapped += 1
            sparse_bytes += sum(t.numel() * t.element_size() for t in (child.values, child.meta))
    if swapped != 210:
        raise RuntimeError(f"expected 210 decoder linears swapped for SparseLinear24, got {swapped}")
    return dense, sparse, free, dense_bytes, sparse_bytes


def read_gb_per_s(threads: int, mb: int = 256, rounds: int = 5) -> float:
    """What this machine streams at ``threads``: the best of ``rounds`` ``torch.sum`` over ``mb`` MB of fp32."""
    torch.set_num_threads(threads)
    t = torch.ones(mb << 18)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return round(t.numel() * 4 / best / 1e9, 2)


def _timed_with(c_module, fn):
    """``fn()`` with the modules' native fast path calling ``c_module`` (None: the package's own build)."""
    from laco_kernels import nn as lnn

    if c_module is None:
        return fn()
    lnn._fast_c()
    saved = lnn._FAST_C[0]
    lnn._FAST_C[0] = c_module
    try:
        return fn()
    finally:
        lnn._FAST_C[0] = saved


def breakdown(dname: str, threads: int, rounds: int, new_tokens: int, old=None) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
    dense, sparse, free, dense_bytes, sparse_bytes = _models(dtype)
    torch.set_num_threads(threads)
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 1, SMOLLM2["hidden_size"], dtype=dtype)
    head = dense.lm_head.weight
    for m in (dense, sparse, free):  # warm-up
        _decode_seconds(m, prompt, 4)
    ms = {"dense": [], "sparse": [], "free": [], "lm_head": []}
    if old is not None:
        _timed_with(old, lambda: _decode_seconds(sparse, prompt, 4))
        ms["sparse_old"] = []
    def sparse_with(c_module):
        return lambda: _timed_with(c_module, lambda: _decode_seconds(sparse, prompt, new_tokens))

    for r in range(rounds):
        runs = [("dense", lambda: _decode_seconds(dense, prompt, new_tokens)), ("sparse", sparse_with(None))]
        if old is not None:  # the two builds in turn first after the dense model: neither always follows the other
            runs.insert(1 + r % 2, ("sparse_old", sparse_with(old)))
        runs.append(("free", lambda: _decode_seconds(free, prompt, new_tokens)))
        for name, fn in runs:
            ms[name].append(fn() / new_tokens * 1e3)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                F.linear(x, head)
            ms["lm_head"].append((time.perf_counter() - t0) / new_tokens * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    lin_dense, lin_sparse = med["dense"] - med["free"], med["sparse"] - med["free"]
    ceiling_ms = med["free"] + lin_dense * sparse_bytes / dense_bytes
    row = dict(dtype=dname, threads=threads, rounds=rounds, new_tokens=new_tokens,
               token_ms={k: round(v, 3) for k, v in med.items()},
               decoder_linears_ms={"dense": round(lin_dense, 3), "sparse": round(lin_sparse, 3)},
               rest_ms_without_lm_head=round(med["free"] - med["lm_head"], 3),
               bytes_per_token={"dense": dense_bytes, "sparse": sparse_bytes},
               byte_ratio=round(dense_bytes / sparse_bytes, 4),
               gb_per_s={"dense_linears": round(dense_bytes / lin_dense / 1e6, 2),
                         "sparse_linears": round(sparse_bytes / lin_sparse / 1e6, 2)},
               linears_speedup=round(lin_dense / lin_sparse, 3),
               decode_speedup=round(med["dense"] / med["sparse"], 3),
               predicted_ceiling_speedup=round(med["dense"] / ceiling_ms, 3),
               read_gb_per_s=read_gb_per_s(threads),
               goal=GOALS[dname])
    print(f"{dname} t={threads}: token dense {med['dense']:.1f} ms, 2:4 {med['sparse']:.1f} ms "
          f"({row['decode_speedup']:.2f}x, goal {GOALS[dname]}x); without decoder linears {med['free']:.1f} ms "
          f"(LM head {med['lm_head']:.1f}); a plain read streams {row['read_gb_per_s']} GB/s; linears dense {lin_dense:.1f} ms at {row['gb_per_s']['dense_linears']} GB/s, "
          f"2:4 {lin_sparse:.1f} ms at {row['gb_per_s']['sparse_linears']} GB/s ({row['linears_speedup']:.2f}x, "
          f"bytes {row['byte_ratio']:.2f}x fewer); ceiling at dense's bandwidth {row['predicted_ceiling_speedup']:.2f}x "
          "(prediction)", flush=True)
    if old is not None:
        lin_old = med["sparse_old"] - med["free"]
        row.update(decode_speedup_old_build=round(med["dense"] / med["sparse_old"], 3),
                   sparse_old_linears_ms=round(lin_old, 3), linears_new_over_old=round(lin_old / lin_sparse, 3))
        print(f"  old build: token {med['sparse_old']:.1f} ms ({row['decode_speedup_old_build']:.2f}x dense), "
              f"linears {lin_old:.1f} ms; new build's linears {row['linears_new_over_old']:.2f}x faster", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--old", default=None, help="path (glob) of another build's _C*.so to time beside this one")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e_breakdown.json"))
    args = ap.parse_args(argv)
    dtypes, threads = args.dtypes.split(","), args.threads.split(",")
    if not dtypes or any(d not in GOALS for d in dtypes):
        ap.error(f"--dtypes: comma-separated subset of {','.join(GOALS)}, got {args.dtypes!r}")
    if not threads or any(not t.isdigit() or int(t) < 1 for t in threads):
        ap.error(f"--threads: comma-separated thread counts >= 1, got {args.threads!r}")
    if args.rounds < 1 or args.new_tokens < 1:
        ap.error(f"--rounds and --new-tokens must be >= 1, got {args.rounds} and {args.new_tokens}")
    old = None
    if args.old:
        from native_ab import load_build

        old = load_build(args.old)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    rows = [breakdown(d, int(t), args.rounds, args.new_tokens, old) for d in dtypes for t in threads]
    result = dict(started_utc=started, cpu=cpu_model(), cpu_isa_flags=cpu_isa_flags(), torch=torch.__version__,
                  old_build=args.old, load_average_before=load_before, load_average_after=os.getloadavg(), command=" ".join(sys.argv),
                  notes=("token times are medians over round-robin rounds of 32-token greedy decodes; 'free': "
                         "decoder linears replaced by a zero-output stand-in; decoder_linears_ms = model - free; "
                         "predicted_ceiling_speedup is a prediction (the 2:4 linears at the dense linears' "
                         "bandwidth), not a measurement"),
                  rows=rows)
    from laco_kernels._atomic import atomic_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_file(args.out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
