"""Shared ``@triton.jit`` helpers that decode the packed layouts of ``formats.py`` in registers.

Every helper takes words that the caller loaded ONCE (one ``tl.load`` per word) and expands
them with shifts and ``tl.reshape``; nothing here touches memory, so the traffic audit sees
exactly the packed bytes.

- :func:`unpack_bits`: bitmap / packed-mask words int32 ``[BN, BK // 32]`` -> int32 0/1
  ``[BN, BK]`` (bit ``k % 32`` of word ``k // 32``).
- :func:`decode_24_nibbles`: 2:4 metadata words int32 ``[BN, BK // 32]`` -> kept positions
  ``(i0, i1)`` int32 ``[BN, BK // 4]`` each (nibble ``g % 8`` of word ``g // 8`` = ``i0 | i1 << 2``).
- :func:`expand_24`: kept values ``[BN, BK // 2]`` + metadata words -> dense tile ``[BN, BK]``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_bits(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 ``[BLOCK_N, BLOCK_K // 32]`` -> int32 0/1 ``[BLOCK_N, BLOCK_K]``."""
    shifts = tl.arange(0, 32)
    # arithmetic shift of a negative word still leaves bit 31 in bit 0 before the "& 1"
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_N, BLOCK_K))


@triton.jit
def decode_24_nibbles(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """2:4 metadata words ``[BLOCK_N, BLOCK_K // 32]`` -> ``(i0, i1)`` int32 ``[BLOCK_N, BLOCK_K // 4]``."""
    shifts = 4 * tl.arange(0, 8)
    nib = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K // 4))
    return nib & 3, (nib >> 2) & 3


@triton.jit
def expand_24(values, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kept values ``[BLOCK_N, BLOCK_K // 2]`` + metadata words -> dense ``[BLOCK_N, BLOCK_K]`` (values' dtype).

    ``values[n, 2g + j]`` lands at column ``4g + i_j`` of group ``g``; the other two columns are 0.
    """
    v0, v1 = tl.split(tl.reshape(values, (BLOCK_N, BLOCK_K // 4, 2)))
    i0, i1 = decode_24_nibbles(words, BLOCK_N, BLOCK_K)
    pos = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros_like(v0)[:, :, None]
    dense = tl.where(pos == i0[:, :, None], v0[:, :, None], tl.where(pos == i1[:, :, None], v1[:, :, None], zero))
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def expand_24_pairs(pair, nib, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """16-bit 2:4 groups -> dense ``[BLOCK_N, BLOCK_K]`` tile of ``dtype`` (fp16 / bf16).

    pair: int32 ``[BLOCK_N, BLOCK_K // 4]``, the group's kept values as one word ``v0 | v1 << 16``;
    nib: int32 ``[BLOCK_N, BLOCK_K // 4]``, its metadata nibble ``i0 | i1 << 2`` (``i0 < i1``).
    Only elementwise integer ops on the group tile (the two output words ``q0`` = positions 0, 1
    and ``q1`` = positions 2, 3, each a pair of 16-bit halves), then two ``tl.join`` levels and
    one reshape that only rename registers: no ``tl.split`` and no per-element work.
    """
    i0 = nib & 3
    i1 = nib >> 2
    # positions 0, 1: (0,1) -> both halves; (0,2|3) -> v0 low; (1,x) -> v0 high; (2,3) -> nothing
    q0 = tl.where(i0 == 0, tl.where(i1 == 1, pair, pair & 0xFFFF), tl.where(i0 == 1, pair << 16, 0))
    # positions 2, 3: (2,3) -> both; (x,3) -> v1 high; (x,2) -> v1 low; (0,1) -> nothing
    q1 = tl.where(i1 == 3, tl.where(i0 == 2, pair, pair & -65536), tl.where(i1 == 2, (pair >> 16) & 0xFFFF, 0))
    p0 = q0.to(tl.int16).to(dtype, bitcast=True)
    p1 = (q0 >> 16).to(tl.int16).to(dtype, bitcast=True)
    p2 = q1.to(tl.int16).to(dtype, bitcast=True)
    p3 = (q1 >> 16).to(tl.int16).to(dtype, bitcast=True)
    # join stacks along a new LAST axis: [.., j, i] = (p0, p2)[j] if i == 0 else (p1, p3)[j] -> p0 p1 p2 p3
    return tl.join(tl.join(p0, p2), tl.join(p1, p3)).reshape(BLOCK_N, BLOCK_K)
