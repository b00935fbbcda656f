"""Interpreter emulation of one sparse ``mma.sp.m16n8k32`` (16-bit, selector 0) on per-thread registers.

Used by ``sparse24_mma.py`` when the Triton interpreter runs it (``EMULATE``): the kernel's loads, the
metadata shuffle and packing are the GPU path's; only the instruction itself is replaced by this
emulation, written from the PTX fragment rules in that module's docstring (element i of every 1-D
tensor = thread i: warp i // 32, gid, tig), so the interpreter tests check the fragment construction,
not only the arithmetic.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _f32(bits, DT: tl.constexpr):
    """Low 16 bits of int32 ``bits`` read as DT (fp16 / bf16), widened to fp32."""
    if DT == "bf16":
        return ((bits & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _halves_f32(w, DT: tl.constexpr):
    """int32 words [...] -> fp32 [..., 2] (low half, high half), read as DT."""
    return tl.join(_f32(w, DT), _f32(w >> 16, DT))


@triton.jit
def _lane_pick(t3, lane_idx, want):
    """t3 [W, 8, 4] -> [W, 8, 4]: each (w, gid, *) takes t3[w, gid, want] (want [W, 8, 4] or scalar)."""
    # interpreter only: a shuffle within the 4 lanes of a group, as sums of masked values
    src = tl.reshape(t3, (t3.shape[0], 8, 1, 4))
    pick = lane_idx[None, None, None, :] == tl.reshape(want, (t3.shape[0], 8, 4, 1))
    return tl.sum(tl.where(pick, src, 0), axis=3)


@triton.jit
def _emulate_mma(c, a0, a1, a2, a3, e, b0, b1, b2, b3, W: tl.constexpr, DT: tl.constexpr):
    """Interpreter: one sparse mma.m16n8k32 (selector 0) on per-thread registers, element i = thread i
    (warp i // 32, gid, tig), following the PTX fragment rules of the module docstring. c: tuple of
    the 4 fp32 accumulators. Returns them updated."""
    tig4 = tl.arange(0, 4)
    p4 = tl.arange(0, 4)
    tig3 = tl.reshape(tl.arange(0, 32 * W) % 4, (W, 8, 4))
    e3 = tl.reshape(e, (W, 8, 4))
    out = []
    for h in tl.static_range(2):  # rows gid (h = 0: a0 / a2) and gid + 8 (h = 1: a1 / a3)
        acc = tl.zeros((W, 8, 8), dtype=tl.float32)  # [w, row gid, token]
        for sh in tl.static_range(2):  # groups 0-3 (a0 / a1, meta of lane tig 0) and 4-7 (a2 / a3, lane 1)
            if h == 0:
                a = a0 if sh == 0 else a2
            else:
                a = a1 if sh == 0 else a3
            a3d = tl.reshape(a, (W, 8, 4))
            meta = _lane_pick(e3, tig4, sh + 0 * tig3)  # the contributing lane's word, for every lane
            nib = (meta >> (16 * h + 4 * tig3)) & 0xF
            hv = _halves_f32(a3d, DT)  # [W, 8, 4, 2]
            lo = tl.sum(tl.where(tl.arange(0, 2) == 0, hv, 0.0), axis=3)
            hi = tl.sum(tl.where(tl.arange(0, 2) == 1, hv, 0.0), axis=3)
            pos = p4[None, None, None, :]
            dense = tl.where(pos == (nib & 3)[:, :, :, None], lo[:, :, :, None],
                             tl.where(pos == (nib >> 2)[:, :, :, None], hi[:, :, :, None], 0.0))
            a16 = tl.reshape(dense, (W, 8, 16))  # [w, gid, k - 16 sh] (k = 4 slot + p)
            # B rows 16 sh .. 16 sh + 15: registers j = 2 sh, 2 sh + 1 of the token's lanes, k = 2 tig + 8 j + half
            bj0 = b0 if sh == 0 else b2
            bj1 = b1 if sh == 0 else b3
            x0 = tl.reshape(_halves_f32(tl.reshape(bj0, (W, 8, 4)), DT), (W, 8, 8))  # [w, token, 2 tig + half]
            x1 = tl.reshape(_halves_f32(tl.reshape(bj1, (W, 8, 4)), DT), (W, 8, 8))
            b16 = tl.reshape(tl.permute(tl.join(x0, x1), (0, 1, 3, 2)), (W, 8, 16))  # [w, token, 8 j' + ...]
            acc += tl.sum(a16[:, :, None, :] * b16[:, None, :, :], axis=3)
        out.append(acc)
    tok = tl.arange(0, 8)[None, None, None, :]
    res = []
    for i in tl.static_range(4):  # d0 / d1: row gid, tokens 2 tig / + 1; d2 / d3: row gid + 8
        d = out[i // 2]
        picked = tl.sum(tl.where(tok == (2 * tig3 + i % 2)[:, :, :, None], d[:, :, None, :], 0.0), axis=3)
        res.append(c[i] + tl.reshape(picked, (32 * W,)))
    return res[0], res[1], res[2], res[3]
