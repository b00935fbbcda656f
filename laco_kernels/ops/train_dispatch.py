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
  zeros; db fused). Transient memory: one dense W per call; optimizer state as ``triton``. The
  fused kernels decompress each weight tile once per row tile of x, the expansion once in all;
  measured fastest (H200) for the Llama-7B MLP linears at 4096 / 8192 tokens (both ops in bf16,
  and all but one fp32 point, where torch is within 1.5%).
- ``auto``: on CUDA tensors with ``LACO_BACKEND=auto``, the path MEASURED fastest at the nearest
  measured point (below); for a dtype without measurements, the path the SASS audit PREDICTS
  fastest. Elsewhere (``LACO_BACKEND=triton`` forced, the CPU interpreter) ``triton``: a forced
  backend runs the kernels.

Measurements first, predictions where there are none. ``_train_dispatch_table.MEASURED`` holds, per
(op, dtype, tokens M, N, K), the time of each path for one forward + backward through the public op
with that path forced (``bench/gpu_training.py``, ``do_bench``; ``MEASURED_DEVICE``: an NVIDIA H200,
torch 2.11, Triton 3.6), copied by ``bench/train_dispatch_table.py`` from
``bench/results/gpu_training.json`` (SmolLM2 MLP linears 1536x576 / 576x1536, 512 and 4096 tokens)
and ``bench/results/gpu_training_7b.json`` (Llama-7B MLP linears 11008x4096 / 4096x11008, 4096 and
8192 tokens), fp32 and bf16. ``auto`` takes the path of smallest measured time at the measured point
of the same op and dtype nearest in log space over (M, N, K) (Euclidean in log M, log N, log K;
ties between points go to the first in sorted key order, ties between paths to triton, expand,
torch in that order), however far that point is (no distance limit: away from the measurements the
nearest one still decides; the predictions do not take over). The choice is computed once per
(op, M, N, K, dtype) and cached. fp16 has no measurements: it follows the bf16 points as a proxy (the
same tensor-core kernels and cuBLAS GEMMs with the same operand width; not measured in fp16). For
example, bf16 7B up projection (11008 x 4096) at 4096 tokens, masked: triton 3.88 ms, expand 1.82,
torch 3.02 (predicted: triton); 2:4: triton 8.88, expand 1.91, torch 8.97; SmolLM2 linears (0.6-1.6
ms in bf16 whatever the path: launch-bound): masked -> torch, 2:4 -> triton. ``measured_times``
shows the point and times behind a choice.

Predictions (``predicted_ratio``; tables ``RATIO`` / ``RATIO_EXPAND``, nearest grid point in log M,
N, K, generated from ``bench/results/sass_audit.json``): the audit model's predicted torch / path
time ratios (fitted to H100 timings), scaled down per dtype where an H100 measurement of the old
kernels (``CALIBRATION``; the audit's ``training_check`` rows, ``gpu_training_h100.json``) found the
model too kind to the Triton path; ``triton`` or ``expand`` where one is predicted at least as fast
as ``torch``, else ``torch``. ``auto`` uses them only for a dtype with no measured point (none today:
fp32 and bf16 are measured, fp16 borrows bf16). At 19 of the 24 measured points the predicted path
was not the measured fastest (1.01-5.0x slower; 2.1-5.0x for the bf16 7B linears, where the
predictions picked the fused kernels).
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
_PATHS = ("triton", "expand", "torch")  # measured paths; the order breaks exact ties
MEASURED_PROXY = {"fp16": "bf16"}  # a dtype without measurements -> the measured dtype standing in for it


def requested_train_path(path: str | None = None) -> str:
    """``path`` if given, else ``LACO_TRAIN_PATH`` (default ``auto``); a clear error if unknown."""
    src = "path" if path is not None else "LACO_TRAIN_PATH"
    name = path if path is not None else os.environ.get("LACO_TRAIN_PATH", "auto")
    name = (name or "auto").strip().lower()
    if name not in TRAIN_PATHS:
        raise ValueError(f"{src}={name!r} is not a training path; expected one of {TRAIN_PATHS}")
    return name


def _check(op: str, m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """The dtype's table name, after checking the arguments."""
    if op not in TRAIN_OPS:
        raise ValueError(f"train path: unknown op {op!r}; expected one of {TRAIN_OPS}")
    if dtype not in _DTYPES:
        raise TypeError(f"{op}: no training-path prediction for dtype {dtype}")
    if min(m, n, k) < 1:
        raise ValueError(f"{op}: shape m={m}, n={n}, k={k} has an empty dimension")
    return _DTYPES[dtype]


def _grid_key(op: str, m: int, n: int, k: int, dtype: torch.dtype) -> tuple:
    """The table key of the grid point nearest to (m, n, k) in log space (checked arguments)."""
    _check(op, m, n, k, dtype)
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


def _measured_points(measured: dict) -> dict:
    """``{(op, dtype): ((log M, log N, log K, key, fastest path), ...)}`` in sorted key order."""
    out: dict = {}
    for key in sorted(measured):
        op, dt, m, n, k = key
        times = measured[key]
        fastest = min(_PATHS, key=times.__getitem__)
        out.setdefault((op, dt), []).append((math.log(m), math.log(n), math.log(k), key, fastest))
    return {g: tuple(v) for g, v in out.items()}


_MEASURED_POINTS = _measured_points(_table.MEASURED)
_AUTO_CACHE: dict = {}  # (op, m, n, k, dtype) -> auto's path; a plain dict (torch.compile traces it without warning)
_AUTO_CACHE_MAX = 4096


def _nearest_measured(op: str, m: int, n: int, k: int, dtype: torch.dtype) -> tuple | None:
    """(key, fastest path) of the measured point nearest to (m, n, k) in log space for op and dtype
    (fp16: the bf16 points), or None where that dtype has none."""
    dt = _check(op, m, n, k, dtype)
    pts = _MEASURED_POINTS.get((op, dt))
    if pts is None and dt in MEASURED_PROXY:
        pts = _MEASURED_POINTS.get((op, MEASURED_PROXY[dt]))
    if pts is None:
        return None
    lm, ln, lk = math.log(m), math.log(n), math.log(k)
    best = min(pts, key=lambda p: (p[0] - lm) ** 2 + (p[1] - ln) ** 2 + (p[2] - lk) ** 2)  # first of ties
    return best[3], best[4]


def measured_times(op: str, m: int, n: int, k: int, dtype: torch.dtype) -> tuple | None:
    """``(point, times)``: the measured point ``(op, dtype, M, N, K)`` nearest to this linear in log
    space (dtype: the measured one, bf16 for fp16) and its ms per path ``{"triton", "expand",
    "torch"}`` (one forward + backward on ``_train_dispatch_table.MEASURED_DEVICE``); None where the
    dtype has no measurements. ``auto`` on CUDA runs the fastest of these paths."""
    near = _nearest_measured(op, int(m), int(n), int(k), dtype)
    if near is None:
        return None
    return near[0], dict(_table.MEASURED[near[0]])


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
    key = (op, int(m), int(n), int(k), dtype)
    got = _AUTO_CACHE.get(key)  # it runs on every training step, for a handful of distinct shapes
    if got is None:
        got = _auto_path(*key)
        if len(_AUTO_CACHE) < _AUTO_CACHE_MAX:
            _AUTO_CACHE[key] = got
    return got


def _auto_path(op: str, m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """The ``auto`` choice on CUDA: measured fastest at the nearest measured point, else predicted."""
    near = _nearest_measured(op, m, n, k, dtype)
    if near is not None:
        return near[1]
    key = _grid_key(op, m, n, k, dtype)
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
