"""Thin Python layer over the optional C++ extension ``laco_kernels._C`` (native CPU kernels).

Importing this module raises ImportError when the extension is not built, so
``ops.dispatch.native_supports`` answers False and the reference runs instead.

The ops layer calls, for CPU tensors whose dtypes pass :func:`supports_dtype`:

- ``sparse24_linear(x, w24, bias=None, values=None)`` -> ``[..., N]`` in x's dtype
- ``bitmap_linear(x, bw, bias=None)`` -> ``[..., N]`` in x's dtype
- ``masked_linear_forward(x, weight, bits, bias=None)`` -> ``[..., N]``; ``masked_linear_grad_input`` /
  ``masked_linear_grad_weight`` for its backward (dX; dW exactly 0 where the mask is)
- ``reconstruction_loss_forward(pred, target, kind)`` -> ``(loss, stats)``
- ``reconstruction_loss_backward(grad_out, pred, target, kind, stats)`` -> grad of pred

Native kernels take float32 and bfloat16 (accumulation in fp32; bf16 outputs rounded to
nearest even). Above an M threshold (:func:`panel_min_m`, measured per op, dtype and ISA)
the sparse linears decompress blocks of weight rows into a dense panel and run the BLAS that
``F.linear`` uses on it (csrc/panel.cpp); below it, the direct kernels. bf16 on a CPU with AMX tiles
runs a middle range of M (:func:`amx_range`) on the tiles, the rows decompressed straight into
the tile layout (csrc/amx_linear.cpp). float16 is not implemented natively: ``supports_dtype`` says False and the
caller must run the reference. None of these functions is differentiable; the autograd
Functions in ``ops/`` call the backward explicitly.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _C  # noqa: F401  (ImportError propagates: the extension is optional)
from .formats import BitmapWeight, Sparse24Weight

_OPS = ("sparse24_linear", "bitmap_linear", "masked_linear", "reconstruction_loss")
_DTYPES = (torch.float32, torch.bfloat16)


def supports(op: str) -> bool:
    """True when the extension implements ``op`` (for CPU tensors of a dtype in :func:`supports_dtype`)."""
    return op in _OPS


def supports_dtype(op: str, *dtypes: torch.dtype) -> bool:
    """True when ``op`` runs natively for all these dtypes (float32 / bfloat16; not float16)."""
    return supports(op) and all(d in _DTYPES for d in dtypes)


def isa() -> str:
    """Vector ISA the kernels use now (chosen at run time): ``"avx512bf16"``, ``"avx512"``, ``"avx2"``, ``"scalar"``."""
    return _C.active_isa()


def has_bf16_gemm() -> bool:
    """True when this CPU has AVX512-BF16 (the hardware, not the ``set_isa`` cap): torch's bf16
    GEMMs are then fast (AMX / VDPBF16PS); without it they are several times slower than fp32
    (6.9x on an AVX2 EPYC, docs/cpu_kernels.md), so bf16 work is widened to fp32 instead."""
    return _C.detected_isa() == "avx512bf16"


def set_isa(name: str) -> None:
    """Cap the ISA (``"auto"``, ``"scalar"``, ``"avx2"``, ``"avx512"``, ``"avx512bf16"``); for tests and benchmarks."""
    _C.set_isa(name)


def _query_args(fn: str, dtype: torch.dtype, shape) -> Tuple[str, int, int]:
    """The dtype name and (N, K) of a threshold query, checked: TypeError / ValueError naming ``fn``."""
    if dtype not in _DTYPES:
        raise TypeError(f"{fn}: dtype must be float32 or bfloat16, got {dtype}")
    try:
        n, k = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: shape must be (N, K), two ints, got {shape!r}") from None
    if n < 0 or k < 0:
        raise ValueError(f"{fn}: shape must be (N, K) with N, K >= 0, got {shape!r}")
    return ("float32" if dtype == torch.float32 else "bfloat16"), n, k


def panel_min_m(op: str, dtype: torch.dtype, shape) -> int:
    """Smallest M (rows of x) at which ``op`` (``"sparse24_linear"`` / ``"bitmap_linear"``) runs through
    decompressed panels and the BLAS instead of the direct kernel, for x of ``dtype``, a weight of
    ``shape`` ``(N, K)``, under the active ISA."""
    name, n, k = _query_args("panel_min_m", dtype, shape)
    return _C.panel_min_m(op, name, n, k)


def _threshold_arg(fn: str, m) -> int:
    """None -> -1 (the measured defaults); else a non-negative int M."""
    if m is None:
        return -1
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"{fn}: m must be None (measured defaults) or an int >= 0, got {m!r}")
    return m


def outer_min_m(op: str, dtype: torch.dtype, shape) -> int:
    """Smallest M at which ``op`` runs through an outer-product kernel instead of the direct kernel: for fp32
    (csrc/outer_linear.cpp: each kept weight times a vector of 8 or 16 rows of x transposed; below
    :func:`panel_min_m`), for bf16 on CPUs with AVX512_BF16 and no AMX the pair kernel (see
    :func:`pair_max_m`). Huge where the active ISA has no such kernel."""
    name, n, k = _query_args("outer_min_m", dtype, shape)
    return _C.outer_min_m(op, name, n, k)


def pair_max_m(op: str, dtype: torch.dtype, shape) -> int:
    """First M past the bf16 pair kernel's range (csrc/pair_outer_bf16.cpp: one vdpbf16ps per kept weight
    pair and 16 rows of x, on CPUs with AVX512_BF16 and no AMX): ``op`` runs it for
    ``outer_min_m <= M < pair_max_m`` (the bitmap only at a density of 0.4 or less). 0 where it does not run."""
    name, n, k = _query_args("pair_max_m", dtype, shape)
    return _C.pair_max_m(op, name, n, k)


def linear_path(op: str, dtype: torch.dtype, shape, m: int, density: float = 0.5) -> str:
    """The path ``op`` takes for ``m`` rows of x of ``dtype`` and a weight of ``shape`` ``(N, K)`` (bitmap:
    nonzero fraction ``density``), from the dispatch itself: ``"direct"``, ``"outer"``, ``"pair"``,
    ``"panel"``, ``"amx"``, ``"shuffle"`` (2:4 bf16 on AVX512_BF16 CPUs without AMX, from M = 8) or ``"lanes"``
    (the bf16 bitmap there, weights under 16 MB, from M = 32)."""
    name, n, k = _query_args("linear_path", dtype, shape)
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"linear_path: m must be an int >= 0, got {m!r}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"linear_path: density must be in [0, 1], got {density!r}")
    return _C.linear_path(op, name, n, k, m, float(density))


def set_outer_min_m(m: int | None) -> None:
    """Force the outer-product threshold for every op (0: from M = 1; a huge M: never); None restores
    the measured defaults. For tests and benchmarks."""
    _C.set_outer_min_m(_threshold_arg("set_outer_min_m", m))


def set_shuffle_min_m(m: int | None) -> None:
    """Force the 2:4 bf16 shuffle kernel's threshold (csrc/lanes_bf16.cpp; AVX512_BF16 only): from
    M = m on it serves every bf16 ``sparse24_linear`` (0: from M = 1; a huge M: never); None restores the
    measured defaults. For tests and benchmarks."""
    _C.set_shuffle_min_m(_threshold_arg("set_shuffle_min_m", m))


def set_lanes_min_m(m: int | None) -> None:
    """Force the bf16 bitmap lanes kernel's threshold (csrc/lanes_bf16.cpp; AVX512_BF16, even K): from M = m
    on it serves every bf16 ``bitmap_linear`` (0: from M = 1; a huge M: never); None restores the measured
    defaults. For tests and benchmarks."""
    _C.set_lanes_min_m(_threshold_arg("set_lanes_min_m", m))


def amx_available() -> bool:
    """True when this CPU has AMX-BF16 tiles (and AVX512_BF16) and the OS granted the tile state."""
    return bool(_C.amx_available())


def amx_range(op: str, dtype: torch.dtype, shape) -> Tuple[int, int]:
    """``(lo, hi)``: ``op`` runs on AMX tiles (csrc/amx_linear.cpp: rows decompressed straight into the tile
    layout) for ``lo <= M < hi``. bf16 only; ``lo`` is huge without AMX, for fp32, when disabled by
    :func:`set_amx_enabled` or when the ISA is capped below ``avx512bf16``. Above it the panel path runs."""
    name, n, k = _query_args("amx_range", dtype, shape)
    return int(_C.amx_min_m(op, name, n, k)), int(_C.amx_max_m(op, name, n, k))


def set_amx_min_m(m: int | None) -> None:
    """Force the AMX path from M = ``m`` on, for every larger M too (0: always, where available; a huge M:
    never); None restores the measured range. For tests and benchmarks."""
    _C.set_amx_min_m(_threshold_arg("set_amx_min_m", m))


def set_amx_enabled(on: bool) -> None:
    """Turn the AMX path on or off (it is on by default where :func:`amx_available`)."""
    if not isinstance(on, bool):
        raise TypeError(f"set_amx_enabled: on must be True or False, got {on!r}")
    _C.set_amx_enabled(on)


def prefetch_bytes(op: str) -> int:
    """Software prefetch distance (bytes) of ``op``'s direct kernel in its values stream at M = 1."""
    return _C.prefetch_bytes(op)


def set_prefetch_bytes(op: str, nbytes: int | None) -> None:
    """Set that distance (0 .. 1 MiB; None restores the default). Results do not depend on it; the best
    value depends on the machine's memory system (bench/cpu_kernels.py records the one used)."""
    _C.set_prefetch_bytes(op, -1 if nbytes is None else int(nbytes))


def set_panel_min_m(m: int | None) -> None:
    """Force the panel threshold for every op (0: always panels; a huge M: never); None restores the
    measured defaults. For tests and benchmarks."""
    _C.set_panel_min_m(_threshold_arg("set_panel_min_m", m))


def bitmap_block_range(k: int, density: float = 0.5) -> Tuple[int, int]:
    """``(lo, hi)``: ``bitmap_linear`` with bf16 x and weights on its direct path (AVX512_BF16) runs the
    register-blocked kernel (csrc/bitmap_avx512.inc ``bm_bf16_block``: 3 weight rows x 8 rows of x) instead of
    the one-row kernel for ``lo <= M < hi``, on a weight of ``k`` input features holding ``density`` nonzeros
    (measured: M = 1 keeps the one-row kernel, and so does M >= 4 where k >= 8192 at density above 0.4)."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"bitmap_block_range: k must be a positive int, got {k!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"bitmap_block_range: density must be a number in [0, 1], got {density!r}")
    lo, hi = _C.bitmap_block_range(k, float(density))
    return int(lo), int(hi)


def set_bitmap_block_min_m(m: int | None) -> None:
    """Force the blocked kernel from this M on, at every k (0 or 1: from M = 1; a huge M: never); None
    restores the measured range. For tests and benchmarks."""
    _C.set_bitmap_block_min_m(_threshold_arg("set_bitmap_block_min_m", m))


def set_panel_split(on: bool | None) -> None:
    """Force how the panel path uses several threads: True splits the weight rows between threads, each
    running its own panels through a sequential BLAS call; False decompresses each panel on all threads
    and calls the threaded BLAS once per panel; None restores the measured default. For tests and
    benchmarks."""
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"set_panel_split: on must be True, False or None, got {on!r}")
    _C.set_panel_split(-1 if on is None else int(on))


def panel_split(shape, m: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a panel-path call with x [m, K] (``dtype``: float32 or bfloat16) on a [N, K] weight would
    split rows between threads now (the dtype matters through the measured rule)."""
    if len(tuple(shape)) != 2 or int(m) < 0 or any(int(v) < 0 for v in shape):
        raise ValueError(f"panel_split: need shape (N, K) and m >= 0, got shape {tuple(shape)} and m {m}")
    if dtype not in _DTYPES:
        raise TypeError(f"panel_split: dtype must be float32 or bfloat16, got {dtype}")
    n, k = (int(v) for v in shape)
    return bool(_C.panel_split(int(m), n, k, torch.empty((), dtype=dtype).element_size()))


def _check_cpu(op: str, bias: torch.Tensor | None = None, **tensors) -> None:
    """CPU tensors of a native dtype (bias: CPU, any float dtype; it is used in fp32)."""
    for name, t in {**tensors, "bias": bias}.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op} (native): {name} is on {t.device}; the native kernels take CPU tensors")
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op} (native): {name} has dtype {t.dtype}; native kernels take float32 or "
                            "bfloat16 (check supports_dtype and use the reference otherwise)")


def sparse24_to_dense(values: torch.Tensor, meta: torch.Tensor, shape) -> torch.Tensor:
    """Dense ``[N, K]`` (values' dtype) of a 2:4 weight: values ``[N, K/2]`` fp32 / bf16, int32 meta
    ``[N, ceil(K/32)]`` (CPU; the vectorised decompressor of the panel path). Not differentiable."""
    n, k = shape
    _check_cpu("sparse24_to_dense", values=values)
    return _C.sparse24_to_dense(values.contiguous(), meta.contiguous(), int(n), int(k))


def sparse24_gather(dense: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The kept half ``[N, K/2]`` (dense's dtype) of ``dense`` ``[N, K]`` fp32 / bf16 at the positions of a
    2:4 weight's int32 ``meta`` ``[N, ceil(K/32)]`` (CPU): bit-identical to
    ``dense.gather(1, ops.sparse_gemm.kept_columns(meta, K))`` without building that int64 index."""
    _check_cpu("sparse24_gather", dense=dense)
    return _C.sparse24_gather(dense.contiguous(), meta.contiguous())


def sparse24_linear(x: torch.Tensor, w24: Sparse24Weight, bias: torch.Tensor | None = None,
                    values: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(w24)^T + bias -> ``[..., N]`` in x's dtype (CPU, fp32 / bf16).

    ``values`` (``[N, K/2]``, x's dtype) overrides ``w24.values`` (e.g. a trainable copy).
    x, values and bias may be non-contiguous (copied); bias may be any float dtype (used in fp32).
    """
    n, k = w24.shape
    v = w24.values if values is None else values
    _check_cpu("sparse24_linear", x=x, values=v, bias=bias)
    if x.shape[-1] != k:
        raise ValueError(f"sparse24_linear: x has {x.shape[-1]} features (shape {tuple(x.shape)}), weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()
    y = _C.sparse24_linear(x2, v.contiguous(), w24.meta.contiguous(), bias, n, k)
    return y.reshape(*x.shape[:-1], n)


def sparse24_linear_checked(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """The ops layer's call: x2 ``[M, K]`` and the weight's tensors already checked there (devices,
    dtypes, shapes), so only the C++ checks run. The Python checks of :func:`sparse24_linear` cost
    ~12 us a call, three times the kernel of a small decode linear (measured: 16.8 vs 4.3 us)."""
    return _C.sparse24_linear(x2.contiguous(), values.contiguous(), meta.contiguous(), bias,
                              values.shape[0], x2.shape[1])


def bitmap_linear_checked(x2: torch.Tensor, bw: BitmapWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """As :func:`sparse24_linear_checked`, for a bitmap weight (x2 ``[M, K]``, checked by the ops layer)."""
    n, k = bw.shape
    return _C.bitmap_linear(x2.contiguous(), bw.values.contiguous(), bw.bitmap.contiguous(),
                            bw.offsets.contiguous(), bw.tile_k, bias, n, k)


def bitmap_linear(x: torch.Tensor, bw: BitmapWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ dense(bw)^T + bias -> ``[..., N]`` in x's dtype (CPU, fp32 / bf16).

    ``bw`` must be consistent (as built by ``BitmapWeight.from_dense`` or checked by ``validate()``).
    """
    n, k = bw.shape
    _check_cpu("bitmap_linear", x=x, values=bw.values, bias=bias)
    if x.shape[-1] != k:
        raise ValueError(f"bitmap_linear: x has {x.shape[-1]} features (shape {tuple(x.shape)}), weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()
    y = _C.bitmap_linear(x2, bw.values.contiguous(), bw.bitmap.contiguous(), bw.offsets.contiguous(),
                         bw.tile_k, bias, n, k)
    return y.reshape(*x.shape[:-1], n)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[..., K]`` @ (weight ``[N, K]`` ⊙ mask)^T + bias -> ``[..., N]`` in x's dtype (CPU, fp32 / bf16).

    bits: ``PackedMask.bits`` (int32 ``[N, ceil(K/32)]``). bias is added in x's dtype (as F.linear does).
    """
    _check_cpu("masked_linear", x=x, weight=weight, bias=bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    y = _C.masked_linear_forward(x2, weight.detach().contiguous(), bits.contiguous(),
                                 None if bias is None else bias.detach())
    return y.reshape(*x.shape[:-1], n)


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """dX ``[M, K]`` = grad_out ``[M, N]`` @ (weight ⊙ mask), in grad_out's dtype (cast to weight's first)."""
    _check_cpu("masked_linear", grad_out=grad_out, weight=weight)
    return _C.masked_linear_grad_input(grad_out.detach().to(weight.dtype), weight.detach().contiguous(),
                                       bits.contiguous()).to(grad_out.dtype)


def masked_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """dW ``[N, K]`` = (grad_out ``[M, N]``^T @ x ``[M, K]``) ⊙ mask in x's dtype; exactly 0 where the mask is."""
    _check_cpu("masked_linear", grad_out=grad_out, x=x)
    return _C.masked_linear_grad_weight(grad_out.detach().to(x.dtype), x.detach(), bits.contiguous())


def reconstruction_loss_forward(pred: torch.Tensor, target: torch.Tensor, kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused loss of ``reference.reconstruction_loss`` for ``pred``, ``target`` ``[..., D]`` (same shape).

    Returns ``(loss, stats)``: loss a 0-dim float32 tensor; stats a float32 tensor to pass back to
    :func:`reconstruction_loss_backward` unchanged (mse: empty; nmse: ``[1]`` clamped sum of
    target^2; cosine: ``[R, 3]`` per-row dot, |pred|, |target| with R = numel / D).
    pred and target may be float32 or bfloat16 independently.
    """
    _check_cpu("reconstruction_loss", pred=pred, target=target)
    if pred.shape != target.shape:
        raise ValueError(f"reconstruction_loss: pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
    if pred.dim() == 0 or pred.numel() == 0:
        raise ValueError(f"reconstruction_loss: need a non-empty tensor with a feature dimension, got {tuple(pred.shape)}")
    d = pred.shape[-1]
    return _C.reconstruction_loss_forward(pred.detach().reshape(-1, d).contiguous(),
                                          target.detach().reshape(-1, d).contiguous(), kind)


def reconstruction_loss_backward(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, kind: str,
                                 stats: torch.Tensor) -> torch.Tensor:
    """d loss / d pred, shaped like ``pred`` and in its dtype (target gets no gradient).

    grad_out: the scalar upstream gradient of the loss; stats: the second output of the forward.
    """
    _check_cpu("reconstruction_loss", pred=pred, target=target)
    d = pred.shape[-1]
    g = _C.reconstruction_loss_backward(grad_out.detach(), pred.detach().reshape(-1, d).contiguous(),
                                        target.detach().reshape(-1, d).contiguous(), kind, stats)
    return g.reshape(pred.shape)
