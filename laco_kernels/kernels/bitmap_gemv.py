"""Bitmap (unstructured) sparse GEMV for decode, ``y = x @ dense(bw)^T + b`` at small M, in Triton.

:func:`bitmap_gemv` is the entry point of both bitmap GEMVs: by default it runs ``bitmap_chunks``
on a derived layout built once per weight (work per kept value, products on the tensor cores;
predicted 2.1x a dense GEMM at 70% sparsity, M = 1); ``LACO_BITMAP_GPU_LAYOUT=canonical`` (or ``layout="canonical"``) runs this module's
kernel on the canonical tensors, described below (no extra memory, work per dense column).

Weight: the canonical :class:`~laco_kernels.formats.BitmapWeight` (values ``[nnz]`` row-major,
bitmap int32 ``[N, ceil(K/32)]``, offsets int32 ``[N, ceil(K/tile_k)]``), read as is.

Rank by popcount, not by a cumulative sum: the nonzeros of a row are contiguous in ``values``
(row-major), so a program walking a row's K slice word by word keeps a running base (the index
of the word's first nonzero): ``offsets`` gives it once at the start of the slice, and every
word adds ``popc(word)``. Inside a word, the element at column ``c`` has rank
``popc(word & (2^c - 1))``; the kernel loads ``values[base + rank]`` masked by the bit, and x at
column ``c`` contiguously (no gather, shared by the rows of the tile). No ``tl.cumsum``, no
reshape, no layout conversion; fp32 multiply-add, fp32 accumulation. Split-K at whole
``tile_k`` tiles (where ``offsets`` gives the base), partials summed by ``_splitk``.

Cost is per dense element (bit test, popcount, address, predicated load, convert, FMA), so
thread-instructions per compressed byte grow as the density falls: 8.6 at 50% sparsity, 13.3 at
70% (fp16, sm_90; old kernel 40 / 61), no STS / LDS; docs/gpu_decode_kernels.md has the counts.
``popc`` is libdevice's ``__nv_popc`` on the GPU; the Triton interpreter has no extern functions,
so interpreted launches (``HW_POPC=False``) count bits with shifts and masks.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._compile import CompileSpec
from ._splitk import AuditDevice, choose_splits, reduce_partials, splitk_plan, store_gemv_row

# a GEMV repeats its per-value work for every token; the audit predicts it faster than the tl.dot
# kernel (tile_k 128) up to M = 13 on the chunk layout (fp16 and bf16, 50% and 70% sparsity, the three
# audited shapes; M = 14 loses at 50% on 4096 x 4096) and up to 4 on the canonical layout
# (docs/gpu_decode_kernels.md)
GEMV_MAX_M = 13
CANONICAL_GEMV_MAX_M = 4
LAYOUT_ENV = "LACO_BITMAP_GPU_LAYOUT"  # "chunks" (default): derived layout, built once per weight; "canonical"
_CFG = dict(BLOCK_N=256, UNROLL=2, num_warps=4)  # 256 rows x 2 words (64 columns) per loop iteration


@triton.jit
def _popc(v, HW_POPC: tl.constexpr):
    """Number of set bits of every int32 element."""
    if HW_POPC:
        return libdevice.popc(v)
    else:
        u = v.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _bitmap_gemv_word(acc, vrow, x_ptrs, w_ptrs, row_ok, lowmask, c, col0, K, MASKED: tl.constexpr,
                      HW_POPC: tl.constexpr):
    """One 32-column word of BLOCK_N rows: acc [32, BLOCK_N] += values * x.

    vrow [1, BLOCK_N]: pointer to the word's first nonzero; returns (acc, pointer for the next word).
    """
    if MASKED:
        col = col0 + 0 * w_ptrs.to(tl.int64, bitcast=True)  # col0 in the words' shape
        word = tl.load(w_ptrs, mask=row_ok & (col < K), other=0)  # bits past K are 0 in the format
        xv = tl.load(x_ptrs, mask=col0 + c < K, other=0.0)
    else:
        word = tl.load(w_ptrs, mask=row_ok, other=0)
        xv = tl.load(x_ptrs)
    # rank(c) = set bits below column c; the bit itself is rank(c + 1) != rank(c): each thread owns
    # the 32 columns of its row's word, so rank(c + 1) is the next column's rank (one popcount each)
    rank = _popc(word & lowmask, HW_POPC)
    kept = _popc(word & ((lowmask << 1) | 1), HW_POPC) != rank
    v = tl.load(vrow + rank, mask=kept, other=0.0)
    acc += v.to(tl.float32) * xv.to(tl.float32)
    return acc, vrow + _popc(word, HW_POPC)


@triton.jit
def _bitmap_gemv_kernel(x_ptr, v_ptr, bitmap_ptr, offsets_ptr, b_ptr, y_ptr, N, K, K_PER_SPLIT, stride_xm, stride_bmn,
                        stride_on, stride_ys, stride_ym, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                        TILE_K: tl.constexpr, HW_POPC: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """y[m, n-tile] (or the fp32 partial of K slice pid 2) = x[m, slice] @ dense(W)[n-tile, slice]^T (+ b).

    K_PER_SPLIT is a multiple of TILE_K (the slice's first base comes from ``offsets``).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # tiles are [32 columns, BLOCK_N rows]: the gather loads (no contiguity) put threads along the
    # last axis, so each thread owns one row and several columns of it (per-word work amortised)
    # and x [32, 1] is loaded once per program and word
    rows = offs_n[None, :]
    row_ok = rows < N  # rows past N read all-zero words: no bit set, nothing gathered
    c = tl.arange(0, 32)[:, None]
    lowmask = ~(-1 << c)  # bits below column c
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    vrow = v_ptr + tl.load(offsets_ptr + rows * stride_on + k_lo // TILE_K, mask=row_ok, other=0)  # first nonzero
    w_ptrs = bitmap_ptr + rows * stride_bmn + k_lo // 32
    x_ptrs = x_ptr + pid_m * stride_xm + k_lo + c
    acc = tl.zeros((32, BLOCK_N), dtype=tl.float32)
    n_words = (k_hi - k_lo) // 32
    for _ in range(n_words // UNROLL):
        for u in tl.static_range(UNROLL):
            acc, vrow = _bitmap_gemv_word(acc, vrow, x_ptrs + 32 * u, w_ptrs + u, row_ok, lowmask, c, 0, K, False,
                                          HW_POPC)
        x_ptrs += 32 * UNROLL
        w_ptrs += UNROLL
    col0 = k_lo + n_words // UNROLL * UNROLL * 32
    for _ in range(n_words // UNROLL * UNROLL, tl.cdiv(k_hi - k_lo, 32)):  # remainder words, masked past K
        acc, vrow = _bitmap_gemv_word(acc, vrow, x_ptrs, w_ptrs, row_ok, lowmask, c, col0, K, True, HW_POPC)
        x_ptrs += 32
        w_ptrs += 1
        col0 += 32
    out = tl.sum(acc, axis=0)
    store_gemv_row(out, y_ptr, b_ptr, offs_n, N, pid_k, pid_m, stride_ys, stride_ym, PARTIAL, HAS_BIAS)


def gpu_layout() -> str:
    """Which layout the bitmap GEMV reads: ``"chunks"`` (default; ``bitmap_chunks``, a derived copy
    built once per weight) or ``"canonical"`` (this module's kernel, no extra memory), from ``$LACO_BITMAP_GPU_LAYOUT``."""
    v = os.environ.get(LAYOUT_ENV, "chunks").strip().lower() or "chunks"
    if v not in ("chunks", "canonical"):
        raise ValueError(f"{LAYOUT_ENV} must be 'chunks' or 'canonical', got {v!r}")
    return v


def gemv_max_m() -> int:
    """Largest M the launcher sends to a GEMV (the layout in use decides, see GEMV_MAX_M)."""
    return GEMV_MAX_M if gpu_layout() == "chunks" else CANONICAL_GEMV_MAX_M


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bitmap_gemv(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor, shape, tile_k: int,
                bias: torch.Tensor | None = None, splits: int | None = None, layout: str | None = None) -> torch.Tensor:
    """x [M, K] @ dense(values, bitmap, offsets)^T + bias [N] -> y [M, N] in x's dtype; ``shape`` = (N, K).

    ``layout``: ``"chunks"`` runs ``bitmap_chunks`` on the derived layout (built on first use and
    cached per ``values`` tensor, see that module for its memory), ``"canonical"`` this module's
    popcount kernel on the canonical tensors; None: :func:`gpu_layout`. Any tile_k (multiple of 32)
    works. ``splits`` overrides the split-K choice (tests).
    """
    n, k = shape
    m = x.shape[0]
    if tile_k <= 0 or tile_k % 32:
        raise ValueError(f"bitmap_gemv: tile_k must be a positive multiple of 32, got {tile_k}")
    layout = layout or gpu_layout()
    if layout not in ("chunks", "canonical"):
        raise ValueError(f"bitmap_gemv: layout must be 'chunks' or 'canonical', got {layout!r}")
    if layout == "chunks" and m > 0 and k > 0:
        from . import bitmap_chunks

        if bitmap_chunks.gemv_verified(x.device, x.dtype):  # False: the GPU self-check failed (warned once)
            return bitmap_chunks.chunks_gemv(x, bitmap_chunks.cached_layout(values, bitmap, shape, splits), bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    values = values.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if bitmap.stride(1) != 1:
        bitmap = bitmap.contiguous()
    if offsets.stride(1) != 1:
        offsets = offsets.contiguous()
    cfg = _CFG
    n_tiles, s, k_per = launch_geometry(m, n, k, tile_k, x.device, splits)
    out = y if s == 1 else torch.empty(s, m, n, dtype=torch.float32, device=x.device)
    _bitmap_gemv_kernel[(m, n_tiles, s)](
        x, values, bitmap, offsets, bias if bias is not None else out, out, n, k, k_per, x.stride(0), bitmap.stride(0),
        offsets.stride(0), 0 if s == 1 else out.stride(0), out.stride(-2),
        HAS_BIAS=bias is not None and s == 1, PARTIAL=s > 1,  # partials: the reduce adds the bias
        TILE_K=tile_k, HW_POPC=not _interpreted(), BLOCK_N=cfg["BLOCK_N"], UNROLL=cfg["UNROLL"],
        num_warps=cfg["num_warps"], num_stages=1)
    if s > 1:
        reduce_partials(out, bias, y)
    return y


def launch_geometry(m: int, n: int, k: int, tile_k: int, device, splits: int | None = None):
    """(row tiles, K slices, columns per slice): slices are whole tile_k tiles (offsets give their base)."""
    n_tiles = triton.cdiv(n, _CFG["BLOCK_N"])
    k_tiles = triton.cdiv(k, tile_k)
    s = splits or choose_splits(m * n_tiles, k_tiles, device)
    k_per = triton.cdiv(k_tiles, min(s, k_tiles)) * tile_k
    return n_tiles, triton.cdiv(k, k_per), k_per


def loop_weight_bytes(dt: str):
    """Weight bytes one program loads per steady-state loop iteration, as a function of density."""
    cols = _CFG["BLOCK_N"] * 32 * _CFG["UNROLL"]
    size = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    return lambda density=0.5: cols * (density * size + 1 / 8)


def _specs():
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for tile_k in (128, 64, 256):  # 128 (the format default) first: the audit predicts the first per dtype
            for partial in (False, True):
                for has_bias in ((False,) if partial else (False, True)):
                    sig = dict(x_ptr=f"*{dt}", v_ptr=f"*{dt}", bitmap_ptr="*i32", offsets_ptr="*i32", b_ptr=f"*{dt}",
                               y_ptr="*fp32" if partial else f"*{dt}", N="i32", K="i32", K_PER_SPLIT="i32",
                               stride_xm="i32", stride_bmn="i32", stride_on="i32", stride_ys="i32", stride_ym="i32",
                               HAS_BIAS="constexpr", PARTIAL="constexpr", TILE_K="constexpr", HW_POPC="constexpr",
                               BLOCK_N="constexpr", UNROLL="constexpr")
                    consts = dict(HAS_BIAS=has_bias, PARTIAL=partial, TILE_K=tile_k, HW_POPC=True,
                                  BLOCK_N=_CFG["BLOCK_N"], UNROLL=_CFG["UNROLL"])
                    name = f"bitmap-gemv-{dt}-tk{tile_k}" + ("-partial" if partial else "-out") + (
                        "-bias" if has_bias else "")
                    specs.append(CompileSpec(
                        _bitmap_gemv_kernel, sig, consts, _CFG["num_warps"], 1, name, is_gemm=True, expect_tensor_core=False,
                        representative=tile_k == 128 and ((dt == "bf16" and partial) or (dt == "fp32" and has_bias)),
                        divisible=("x_ptr", "v_ptr", "bitmap_ptr", "offsets_ptr", "b_ptr", "y_ptr", "N", "K",
                                   "K_PER_SPLIT", "stride_xm", "stride_bmn", "stride_on", "stride_ys", "stride_ym"),
                        family="bitmap", regime="decode", loop_weight_bytes=loop_weight_bytes(dt)))
    return specs


COMPILE_SPECS = _specs()


def SASS_LAUNCH_PLAN(spec, m: int, n: int, k: int, density: float = 0.5):  # noqa: N802 (name the audit looks up)
    """Launches of one ``bitmap_gemv`` call on an H100 (132 SMs) for ``bench/sass_audit.py``: the
    GEMV (programs, average steady-state iterations, HBM bytes at ``density``) and the split-K reduce."""
    dt = spec.signature["x_ptr"][1:]
    tile_k = spec.constexprs["TILE_K"]
    n_tiles, s, k_per = launch_geometry(m, n, k, tile_k, AuditDevice())
    main = next(sp for sp in COMPILE_SPECS if sp.signature["x_ptr"] == spec.signature["x_ptr"]
                and sp.constexprs["TILE_K"] == tile_k and sp.constexprs["PARTIAL"] == (s > 1)
                and not sp.constexprs["HAS_BIAS"])
    isz = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    w_bytes = n * k * density * isz + n * triton.cdiv(k, 32) * 4 + n * triton.cdiv(k, tile_k) * 4
    return splitk_plan(main, m * n_tiles * s, k / s / (32 * _CFG["UNROLL"]), w_bytes, m, n, k, isz, s, dt)
