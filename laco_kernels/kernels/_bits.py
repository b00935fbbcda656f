"""Shared ``@triton.jit`` helpers that decode the packed layouts of ``formats.py`` in registers.

Every helper takes words that the caller loaded ONCE (one ``tl.load`` per word) and expands
them with shifts and ``tl.reshape``; nothing here touches memory, so the traffic audit sees
exactly the packed bytes.

- :func:`unpack_bits`: bitmap / packed-mask words int32 ``[BN, BK // 32]`` -> int32 0/1
  ``[BN, BK]`` (bit ``k % 32`` of word ``k // 32``).
- :func:`decode_24_nibbles`: 2:4 metadata words int32 ``[BN, BK // 32]`` -> kept positions
  ``(i0, i1)`` int32 ``[BN, BK // 4]`` each (nibble ``g % 8`` of word ``g // 8`` = ``i0 | i1 << 2``).
- :func:`expand_24`: kept values ``[BN, BK // 2]`` + metadata words -> dense tile ``[BN, BK]``
  (decode and fp32; ``tl.split`` / ``tl.reshape`` cost shared-memory layout conversions).
- :func:`expand_24_prmt` + :data:`PRMT_LUT_24`: 16-bit prefill: int32 value pairs + byte-permute
  selectors ``[BN, BK // 4]`` -> dense tile ``[BN, BK]`` with two ``prmt`` per group and no
  layout conversion (docs/gpu_prefill_kernels.md). Its caller gathers one meta word and one table
  entry per group (L1 hits), so in the traffic audit's accounting it reads those repeatedly.
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


def _prmt_selector(i0: int, i1: int) -> int:
    """``prmt.b32 d, pair, 0, sel`` selectors of one 2:4 group: bits 0-15 build positions 0, 1
    (``q0``), bits 16-31 positions 2, 3 (``q1``); per 16-bit position: bytes 1 0 of ``pair`` (v0,
    selector 0x10), bytes 3 2 (v1, 0x32) or bytes of the zero operand (0x44)."""
    code = [0x44] * 4
    if i0 < i1:
        code[i0], code[i1] = 0x10, 0x32
    return code[0] | code[1] << 8 | code[2] << 16 | code[3] << 24


# nibble ``i0 | i1 << 2`` -> selectors; the patterns packing never writes (i0 >= i1, e.g. the
# nibble 0 of padding groups past K) decode to zeros
PRMT_LUT_24 = tuple(_prmt_selector(nib & 3, nib >> 2) for nib in range(16))


@triton.jit
def _byte_perm_zero(a, sel):
    """Plain-op ``prmt.b32 d, a, 0, sel`` (default mode, selector bit 3 never set by PRMT_LUT_24)."""
    out = tl.zeros_like(a)
    for j in tl.static_range(4):
        c = (sel >> (4 * j)) & 7
        byte = tl.where(c < 4, (a >> ((c & 3) * 8)) & 0xFF, 0)
        out = out | (byte << (8 * j))
    return out


@triton.jit
def expand_24_prmt(pair, sel, dtype: tl.constexpr, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, OPAQUE: tl.constexpr = False):
    """16-bit 2:4 groups -> dense ``[BLOCK_N, BLOCK_K]`` tile of ``dtype`` (fp16 / bf16).

    pair: int32 ``[BLOCK_N, BLOCK_K // 4]``, a group's kept values as one word ``v0 | v1 << 16``;
    sel: int32 ``[BLOCK_N, BLOCK_K // 4]``, ``PRMT_LUT_24[nibble]`` of the group.
    GPU: ``pair`` and ``sel`` are repeated 4x along K by ``tl.join`` (register renames) and one
    ``inline_asm_elementwise`` with ``pack=4`` handles the 4 positions of a group at once: two
    ``prmt`` write the packed fp16 pairs (positions 0, 1 and 2, 3) straight into the tile's
    registers: 3 instructions per group, no per-element work, no split and no layout conversion.
    (``pack=4`` needs the 4 elements of one asm call to be the 4 positions of one group: the
    joined layout keeps them consecutive in one thread; tests/test_sparse24_gemm.py checks the
    compiled LLVM IR for it.) EMULATE (the interpreter, which cannot run PTX): the same byte
    permutes in plain integer ops.

    OPAQUE: mark the asm as having side effects. Triton picks a dot operand's kWidth (mma.sync,
    sm_80) from the narrowest load its operand is computed from, halved once a ``tl.join`` is on the
    way (AccelerateMatmul's ``computeOrigBitWidth``); through the pure asm it sees the joins and
    gives 16-bit operands kWidth 4: on sm_80 the 2:4 dX loop then spent about 130 register moves per
    step pairing the weight's registers for mma.sync, and the 2:4 forward expanded every group in
    four threads. An opaque asm stops that search (kWidth 2, as a dense GEMM); both 2:4 GEMMs pass
    True. No effect on sm_90's wgmma loops (the weight is read from shared memory there).
    """
    if EMULATE:
        q0 = _byte_perm_zero(pair, sel)
        q1 = _byte_perm_zero(pair, sel >> 16)
        p0 = q0.to(tl.int16).to(dtype, bitcast=True)
        p1 = (q0 >> 16).to(tl.int16).to(dtype, bitcast=True)
        p2 = q1.to(tl.int16).to(dtype, bitcast=True)
        p3 = (q1 >> 16).to(tl.int16).to(dtype, bitcast=True)
        # join stacks along a new LAST axis: [.., j, i] = (p0, p2)[j] if i == 0 else (p1, p3)[j]
        return tl.join(tl.join(p0, p2), tl.join(p1, p3)).reshape(BLOCK_N, BLOCK_K)
    else:
        pair4 = tl.join(tl.join(pair, pair), tl.join(pair, pair)).reshape(BLOCK_N, BLOCK_K)
        sel4 = tl.join(tl.join(sel, sel), tl.join(sel, sel)).reshape(BLOCK_N, BLOCK_K)
        # $0, $1: packed outputs (positions 0 1, 2 3); $2-$5: the group's pair (4 copies); $6-$9: its sel
        return tl.inline_asm_elementwise("{ .reg .b32 t; prmt.b32 $0, $2, 0, $6; shr.b32 t, $6, 16; "
                                         "prmt.b32 $1, $2, 0, t; }", "=r,=r,r,r,r,r,r,r,r,r", [pair4, sel4],
                                         dtype=dtype.value, is_pure=not OPAQUE, pack=4)
