"""Unstructured sparse linear ``y = x @ dense(bw)^T + b`` for a bitmap-compressed weight, in Triton.

Weight: :class:`~laco_kernels.formats.BitmapWeight`: values ``[nnz]`` (row-major nonzeros),
bitmap int32 ``[N, ceil(K/32)]``, offsets int32 ``[N, ceil(K/tile_k)]`` (index in values of each
tile's first nonzero; a tile is ``tile_k`` columns of one row).

``BLOCK_K == tile_k``, so one K step of a program covers exactly one tile per row. Per step it
loads the ``[BLOCK_N, tile_k/32]`` bitmap words and the ``[BLOCK_N]`` offsets once, expands
the bits in registers (``_bits.unpack_bits``), ranks every set bit within its row tile with an
exclusive ``tl.cumsum`` and gathers ``values[offset + rank]`` with a load masked by the bit:
only nonzeros are read, so the weight costs ``nnz * itemsize + N*K/8 + 4*N*K/tile_k`` bytes
(0.57 of dense fp16 at 50% sparsity, 0.39 at 70%, with tile_k = 128).

Tiling, split-K, grouped order, dtypes and fp32 precision are those of ``dense_gemm.py``;
supported tile_k: ``dense_gemm.BITMAP_TILE_KS`` (the reference handles any other).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import unpack_bits
from .bitmap_gemv import bitmap_gemv, gemv_max_m
from .dense_gemm import compile_specs, grouped_pid, launch, store_tile


@triton.jit
def _bitmap_w_tile(v_ptr, bitmap_ptr, offsets_ptr, offs_n, k0, N, K, stride_bmn, stride_on, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """dense(bitmap weight)[offs_n, k0 : k0 + BLOCK_K] as a ``[BLOCK_N, BLOCK_K]`` tile in the values' dtype.

    ``BLOCK_K == tile_k`` and ``k0`` a multiple of it: the tile is one tile of each row, so one offset
    per row plus the rank of every set bit inside the tile locate its value. Zero at unset bits, past
    N and past K (the format keeps padding bits past K zero, so nothing is gathered there).
    Shared by the tiled GEMM and the expansion kernel (``weight_expand.py``).
    """
    n_ok = offs_n < N
    wk = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(bitmap_ptr + offs_n[:, None] * stride_bmn + wk[None, :],
                    mask=n_ok[:, None] & (wk[None, :] < tl.cdiv(K, 32)), other=0)
    base = tl.load(offsets_ptr + offs_n * stride_on + k0 // BLOCK_K, mask=n_ok, other=0)
    bits = unpack_bits(words, BLOCK_N, BLOCK_K)  # 0 past K and past N: padding bits are zero
    rank = tl.cumsum(bits, axis=1) - bits  # nonzeros before this column in the row's tile
    return tl.load(v_ptr + (base[:, None] + rank), mask=bits != 0, other=0.0)


@triton.jit
def _bitmap_gemm_kernel(x_ptr, v_ptr, bitmap_ptr, offsets_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                        stride_xm, stride_xk, stride_bmn, stride_on, stride_ys, stride_ym, stride_yn,
                        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] (+ slice * stride_ys) = x[M, K-slice] @ dense(bitmap weight)[N, K-slice]^T (+ b)."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = _bitmap_w_tile(v_ptr, bitmap_ptr, offsets_ptr, offs_n, k0, N, K, stride_bmn, stride_on, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ys, stride_ym, stride_yn, HAS_BIAS)


def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor, shape,
                  tile_k: int, bias: torch.Tensor | None = None, input_precision: str | None = None) -> torch.Tensor:
    """x [M, K] @ dense(values, bitmap, offsets)^T + bias [N] -> y [M, N] in x's dtype; ``shape`` = (N, K).

    M <= ``bitmap_gemv.gemv_max_m()`` runs a decode GEMV (any tile_k) instead of the tl.dot kernel.
    """
    n, k = shape
    if 0 < x.shape[0] <= gemv_max_m() and k > 0:
        return bitmap_gemv(x, values, bitmap, offsets, shape, tile_k, bias)
    values = values.contiguous()
    if bitmap.stride(1) != 1:
        bitmap = bitmap.contiguous()
    if offsets.stride(1) != 1:
        offsets = offsets.contiguous()
    return launch(_bitmap_gemm_kernel, "bitmap", x, (values, bitmap, offsets),
                  (bitmap.stride(0), offsets.stride(0)), bias, n, k, input_precision, tile_k=tile_k)


def tile_bytes_bitmap(block_n: int, block_k: int, itemsize: int, density: float) -> float:
    """Expected bytes of a [block_n, block_k = tile_k] bitmap tile at ``density`` (kept fraction):
    the kept values, block_k / 32 bitmap words and one int32 offset per row."""
    return block_n * block_k * density * itemsize + block_n * (block_k // 32) * 4 + block_n * 4


def _specs():
    return compile_specs(_bitmap_gemm_kernel, "bitmap", {"v_ptr": "*{dt}", "bitmap_ptr": "*i32", "offsets_ptr": "*i32"},
                         {"stride_bmn": None, "stride_on": None}, tile_bytes_bitmap)


COMPILE_SPECS = _specs()
