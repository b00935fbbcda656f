"""Training path choice: our Triton training kernels or ``F.linear(x, W * M)`` + autograd.

Applies to ``masked_linear`` (every call) and to ``sparse24_linear`` when its values are trained
(``w24.values.requires_grad`` under grad mode), once ``ops.dispatch.select_backend`` has chosen
``triton``. The path is ``LACO_TRAIN_PATH`` (``auto`` unless set) or the ``path=`` argument of
the op, which wins over the variable:

- ``triton``: the Triton kernels (``kernels/masked_gemm.py``; the 2:4 forward + ``kernels/
  sparse24_grad.py``). No tensor of the weight's size is created besides dW (masked) or dV
  (``[N, K/2]``): the smallest memory.
- ``torch``: ``F.linear(x, W * M, b)`` with autograd in the input dtype (masked: ``W * M`` from
  the unpacked mask; 2:4: ``Sparse24Weight.to_dense(values)``). Same semantics: dW = (dY^T X) ⊙ M
  (exact zeros at pruned positions), dV = dY^T X gathered at the kept positions, db = sum dY. It
  MATERIALISES, per call, the unpacked bool mask (N*K bytes) and W ⊙ M (N*K elements, kept for the
  backward), and in the backward a dense [N, K] gradient (2:4: transient, before the gather to dV).
  The optimizer state is unchanged (2:4 still trains the [N, K/2] values: about half the state).
- ``expand``: one memory-bound Triton kernel writes the dense weight (``kernels/weight_expand.py``:
  2:4 values -> dense, or W ⊙ M with exact zeros), ``F.linear`` / ``mm`` (cuBLAS) run the forward
  and dX on it (re-expanded in the backward, so nothing of W's size is kept between the two), and
  the weight gradient stays in our kernels (2:4: dV ``[N, K/2]`` gathered; masked: dW with exact
  zeros; db fused). Transient memory: one dense W per call; optimizer state as ``triton``. It
  wins where the grid is small (few thousand tokens): the fused kernels decompress each weight
  tile once per row tile of x, the expansion once in all.
- ``auto``: on CUDA tensors with ``LACO_BACKEND=auto``, the path the SASS audit PREDICTS fastest:
  ``triton`` or ``expand`` where one of them is predicted at least as fast as ``torch`` (tables
  ``_train_dispatch_table.RATIO`` and ``RATIO_EXPAND``, nearest grid point in log M, N, K;
  generated from ``bench/results/sass_audit.json`` by ``bench/train_dispatch_table.py``), else
  ``torch``. Elsewhere (``LACO_BACKEND=triton`` forced, the CPU interpreter) ``triton``: a forced
  backend runs the kernels.

Predictions, not measurements: the table holds the audit model's predicted time ratios (fitted
to H100 timings), scaled down per dtype where an H100 measurement of the training step
(``bench/results/gpu_training.json``) found the model too kind to the Triton path. That is fp32:
cuBLAS's fp32 GEMM measured up to 3.6x faster than the model's yardstick (our FMA GEMM), so fp32
trains on the torch path at every grid point. No GPU has confirmed the current kernels' choice yet.
"""
from __future__ import annotations

import math
import os

import torch

from . import _train_dispatch_table as _table
from .dispatch import requested_backend

TRAIN_PATHS = ("auto", "triton", "expand", "torch")
EXPAND = "triton_expand"  # the backend string the custom ops receive for the expand path
TRAIN_OPS = ("masked_linear", "sparse24_linear")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def requested_train_path(path: str | None = None) -> str:
    """``path`` if given, else ``LACO_TRAIN_PATH`` (default ``auto``); a clear error if unknown."""
    src = "path" if path is not None else "LACO_TRAIN_PATH"
    name = path if path is not None else os.environ.get("LACO_TRAIN_PATH", "auto")
    name = (name or "auto").strip().lower()
    if name not in TRAIN_PATHS:
        raise ValueError(f"{src}={name!r} is not a training path; expected one of {TRAIN_PATHS}")
    return name


def _grid_key(op: str, m: int, n: int, k: int, dtype: torch.dtype) -> tuple:
    """The table key of the grid point nearest to (m, n, k) in log space (checked arguments)."""
    if op not in TRAIN_OPS:
        raise ValueError(f"train path: unknown op {op!r}; expected one of {TRAIN_OPS}")
    if dtype not in _DTYPES:
        raise TypeError(f"{op}: no training-path prediction for dtype {dtype}")
    if min(m, n, k) < 1:
        raise ValueError(f"{op}: shape m={m}, n={n}, k={k} has an empty dimension")
    lm, ln, lk = math.log(m), math.log(n), math.log(k)
    tok = min(_table.TOKENS, key=lambda t: abs(math.log(t) - lm))
    nk = min(_table.SHAPES, key=lambda s: (math.log(s[0]) - ln) ** 2 + (math.log(s[1]) - lk) ** 2)
    return op, _DTYPES[dtype], tok, nk[0], nk[1]


def predicted_ratio(op: str, m: int, n: int, k: int, dtype: torch.dtype, path: str = "triton") -> float:
    """PREDICTED time of the torch path over ``path``'s (``"triton"`` or ``"expand"``) for one
    training step of a linear ``[m, k] x [n, k]^T`` (> 1: ``path`` predicted faster), from the
    grid point nearest in log space. m: tokens (rows of x), n: out_features, k: in_features."""
    if path not in ("triton", "expand"):
        raise ValueError(f"predicted_ratio: path must be 'triton' or 'expand', got {path!r}")
    return (_table.RATIO if path == "triton" else _table.RATIO_EXPAND)[_grid_key(op, m, n, k, dtype)]


def best_path(fused: float, expand: float) -> str:
    """The path of larger predicted torch / path ratio when one is >= 1 (fused wins ties), else torch."""
    if max(fused, expand) < 1.0:
        return "torch"
    return "triton" if fused >= expand else "expand"


def choose_train_path(op: str, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device | str,
                      path: str | None = None) -> str:
    """``"triton"``, ``"expand"`` or ``"torch"`` for ``op`` on a linear of this shape, dtype and device, given that
    the backend dispatcher chose Triton (see the module docstring for the rules)."""
    want = requested_train_path(path)
    if want != "auto":
        return want
    dev = torch.device(device).type
    if dev != "cuda" or requested_backend() != "auto":
        return "triton"
    key = _grid_key(op, m, n, k, dtype)  # one nearest-point search per call (it runs on every training step)
    return best_path(_table.RATIO[key], _table.RATIO_EXPAND[key])


def masked_linear_torch(x: torch.Tensor, weight: torch.Tensor, bits_mask, bias: torch.Tensor | None) -> torch.Tensor:
    """The torch path of ``masked_linear``: F.linear(x, weight * mask, bias) with autograd.

    bits_mask: a validated :class:`~laco_kernels.formats.PackedMask`. A bias of another float dtype
    is cast to x's (F.linear needs one dtype; its gradient is cast back by autograd)."""
    m = bits_mask.to_bool().to(weight.dtype)
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight * m, b)


def sparse24_linear_torch(x: torch.Tensor, w24, bias: torch.Tensor | None) -> torch.Tensor:
    """The torch path of ``sparse24_linear``: F.linear(x, w24.to_dense(), bias) with autograd
    (``to_dense`` is a masked scatter: its backward gathers dV at the kept positions)."""
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w24.to_dense(), b)
