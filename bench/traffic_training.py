"""Traffic records of the training kernels (issue 3), for ``bench/traffic.py``'s registry.

Bytes every ``tl.load`` / ``tl.store`` moves in the Triton interpreter
(``laco_kernels.kernels._traffic.count_traffic``), in two families:

- ``masked_linear``: one training step of a linear layer, forward + grad input + grad weight
  (``kernels/masked_gemm.py``), with the bit-packed mask and without it (the same kernels with
  ``HAS_MASK=False``: the unmasked Triton linear of the same shape and tiling). Bound:
  ``total_ratio`` = (read + written) / unmasked (read + written) <= 1.15 (the mask adds 1/16 of
  the fp16 weight's bytes to each of the three weight-sized passes).
- ``recon_loss``: the fused loss (``kernels/recon_loss.py``), forward and backward separately.
  ``dense_bytes_read`` is pred + target read once; bounds: the forward reads exactly that, the
  backward reads that plus the saved per-row statistics (cosine: 12 bytes a row) and the scalar
  scale (4 bytes per program), and writes exactly grad_pred.

Run through ``python bench/traffic.py`` (every registered family) or on its own:
``python bench/traffic_training.py --m 64 --n 512 --k 512``.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from laco_kernels.formats import PackedMask  # noqa: E402
from laco_kernels.kernels._traffic import count_traffic  # noqa: E402

MASKED_BOUND = 1.15
KINDS = ("mse", "nmse", "cosine")


def _measure(fn) -> Dict[str, int]:
    with count_traffic() as t:
        fn()
    return dict(bytes_read=t.bytes_read, bytes_written=t.bytes_written)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def masked_linear_step(m, n, k, dtype, density=0.5, seed=0) -> dict:
    """Bytes of forward + dX + dW (no bias) with and without the mask, and their ratio."""
    from laco_kernels.kernels import masked_gemm as mg

    g = torch.Generator().manual_seed(seed)
    x, w, dy = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (n, k), (m, n)))
    bits = PackedMask.from_bool(torch.rand(n, k, generator=g) < density).bits

    def step(b):
        mg.masked_linear_fwd(x, w, b)
        mg.masked_linear_dx(dy, w, b)
        mg.masked_linear_dw(dy, x, b)

    masked, plain = _measure(lambda: step(bits)), _measure(lambda: step(None))
    total = masked["bytes_read"] + masked["bytes_written"]
    base = plain["bytes_read"] + plain["bytes_written"]
    return dict(kernel="masked_linear_fwd_bwd", M=m, N=n, K=k, dtype=_dt(dtype), sparsity=round(1 - density, 4),
                bytes_read=masked["bytes_read"], bytes_written=masked["bytes_written"],
                dense_bytes_read=plain["bytes_read"], dense_bytes_written=plain["bytes_written"],
                read_ratio=round(masked["bytes_read"] / plain["bytes_read"], 4),
                total_ratio=round(total / base, 4), bound=MASKED_BOUND, mask_nbytes=bits.numel() * 4,
                weight_nbytes=w.numel() * w.element_size())


def recon_loss_traffic(r, d, dtype, kind, seed=0) -> List[dict]:
    """Forward and backward records of the fused loss on ``[r, d]`` pred / target."""
    from laco_kernels.kernels import recon_loss as rl

    g = torch.Generator().manual_seed(seed)
    pred, target = (torch.randn(r, d, generator=g).to(dtype) for _ in range(2))
    once = 2 * pred.numel() * pred.element_size()
    box = {}

    def fwd():
        box["loss"], box["stats"] = rl.recon_loss_fwd(pred, target, kind)

    f = _measure(fwd)
    b = _measure(lambda: rl.recon_loss_bwd(torch.tensor(1.0), pred, target, kind, box["stats"]))
    stats_bytes = r * 12 if kind == "cosine" else 0
    programs = -(-r // rl._config(r, d)["BLOCK_R"])  # each backward program loads the fp32 scale once
    common = dict(M=r, N=d, K=0, dtype=_dt(dtype), sparsity=0.0, dense_bytes_read=once, loss_kind=kind)
    return [dict(kernel=f"recon_loss_fwd[{kind}]", bytes_read=f["bytes_read"], bytes_written=f["bytes_written"],
                 read_ratio=round(f["bytes_read"] / once, 4), allowed_extra_read=0, **common),
            dict(kernel=f"recon_loss_bwd[{kind}]", bytes_read=b["bytes_read"], bytes_written=b["bytes_written"],
                 read_ratio=round(b["bytes_read"] / once, 4), allowed_extra_read=stats_bytes + 4 * programs,
                 grad_nbytes=pred.numel() * pred.element_size(), **common)]


# families with bench/traffic.py's registry signature fn(M, N, K, dtype) -> [record, ...]
def masked_linear_records(m, n, k, dtype) -> List[dict]:
    return [masked_linear_step(m, n, k, dtype, density) for density in (0.5,)]


def recon_loss_records(m, n, k, dtype) -> List[dict]:
    """The loss on the layer's output ``[M, N]``."""
    return [rec for kind in KINDS for rec in recon_loss_traffic(m, n, dtype, kind)]


FAMILIES = {"masked_linear": masked_linear_records, "recon_loss": recon_loss_records}


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=512)
    a = ap.parse_args(argv)
    for fam in FAMILIES.values():
        for r in fam(a.m, a.n, a.k, torch.float16):
            extra = f" total_ratio={r['total_ratio']:.3f}" if "total_ratio" in r else ""
            print(f"{r['kernel']:24s} M={r['M']} N={r['N']} K={r['K']} read={r['bytes_read']:,d} "
                  f"written={r['bytes_written']:,d} baseline_read={r['dense_bytes_read']:,d} "
                  f"read_ratio={r['read_ratio']:.3f}{extra}")


if __name__ == "__main__":
    main()
