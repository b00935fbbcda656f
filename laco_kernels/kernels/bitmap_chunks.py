"""Bitmap decode GEMV on a derived GPU layout (lane chunks with 4-bit column gaps): work per KEPT value.

The canonical :class:`~laco_kernels.formats.BitmapWeight` (values row-major, bitmap, per-tile
offsets) makes a GEMV pay per DENSE column (bit test, popcount, address, predicated gather: about
9.6 instructions, ``bitmap_gemv._bitmap_gemv_kernel``). This module builds, once per weight, a
derived copy in which each kept value carries its own column, so the loop only touches kept values:

- rows are sorted by length (number of entries, descending; ``perm`` gives each block row's output
  row) and grouped in blocks of ``ROWS`` (32) weight rows; each weight row is split in ``LANES`` (4)
  contiguous quarters of its entries, the **layout rows**: 128 per block, one per thread of 4 warps,
  the 4 of weight row G of a warp on lanes 4G..4G+3 (an ``mma.sync`` group, see ``_CHUNK_MMA``);
- a layout row's entries (kept values in column order, plus rare zero "fillers", see below) are cut
  in **chunks of 8**; a block stores ``L_b`` chunks per layout row (its longest row / 32, rounded
  up; shorter rows padded with zero values), chunk-major: ``vals [sum L_b, BLOCK_N, 8]`` (the
  weight's dtype; a warp's chunk is 512 contiguous bytes, one 128-bit load per thread) and ``offs
  [sum L_b, BLOCK_N]`` (int32): the 8 column gaps of the chunk row, 4 bits each (byte b = gap 2b |
  gap 2b + 1 << 4; one 32-bit load);
- the column of entry ``i`` of a chunk is ``base + gap[0] + ... + gap[i]``, where ``base`` is the
  column of the layout row's previous entry (the previous chunk's last, or for a lane's first chunk
  the previous lane's last; 0 at a row's start); the kernel forms the 8 prefix sums in registers
  (SWAR, ``_columns``), and the next chunk's base is entry 7's column;
- a gap of more than ``MAX_GAP`` (15) columns gets zero fillers every 15 columns (at 30% density a
  gap > 15 has probability 0.7^15 ~ 0.5%; very sparse rows pay up to one filler per 15 columns);
- padding entries repeat the last column before them (value 0), so every gathered column is in [0, K);
- split-K cuts each block's chunk range in ``splits`` equal parts; ``bases [n_blocks, splits,
  BLOCK_N]`` (int32) holds every layout row's base at each part's first chunk, ``starts
  [n_blocks + 1]`` each block's first chunk.

Per chunk and thread the GPU loop (fp16 / bf16) issues the gap word's SWAR, 8 byte extracts, 8
64-bit addresses and x gathers (one-instruction asm loads, from L1: the x row is a few KB), 4 packs
of x pairs and two ``mma.sync`` whose diagonal accumulates the products (exact, fp32): 5.92
instructions per entry on sm_90 (first version, fp32 FMAs and byte offsets: 7.39).

Memory (derived copy, kept next to the canonical weight): ``(itemsize + 0.5)`` bytes per entry;
entries = kept values + padding to the longest row of each 32-row block + fillers (0.3-1.8% for
random masks at 50-70% sparsity once rows are sorted); measured for fp16 on random 4096 /
11008-sized masks: 0.77 byte per weight at 70% sparsity (canonical 0.76, dense 2), 1.26-1.27 at 50%
(canonical 1.16). Built on first use, cached per ``values`` tensor (:func:`cached_layout`);
``state_dict`` and checkpoints keep the canonical format. Numerics are the reference's: exact
products, fp32 accumulation (the sum order differs). The interpreter runs an ``EMULATE`` path
(fp32 products of the same tensors); the GPU path is checked by a lane-level model of its mma
fragments on the compiled layout (tests) and by :func:`gemv_verified` on first use.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..formats import unpack_bits
from ._compile import CompileSpec, _is_interpreted
from ._selfcheck import self_check_once
from ._splitk import choose_splits, reduce_partials, splitk_plan, store_gemv_row

BLOCK_N = 128  # layout rows per program and per layout block: one per thread of 4 warps
LANES = 4  # layout rows (consecutive lanes) per weight row: each takes a quarter of the row's entries
ROWS = BLOCK_N // LANES  # weight rows per program and per layout block
NUM_WARPS = 4
UNROLL = 8  # chunks per steady-state iteration (8 values each per thread)
MAX_GAP = 15  # gaps are stored in 4 bits
# K slices until PER_SM programs per SM: on an H200 (bench/results/gpu_decode_sweep.json, fp16, M = 1) one program
# per SM left 50% sparsity at 12.9 / 36.1 / 49.6 us on 4096 x 4096 / 11008 x 4096 / 4096 x 11008 where 4 / 2 / 8
# slices took 11.7 / 26.7 / 27.7 (70%: 10.2 / 15.0 / 18.8 against 9.2 at 4 slices / 16.4 at 2 / 17.4 at 4)
PER_SM = 4


@dataclass
class ChunkLayout:
    """The derived GPU layout of one bitmap weight (module docstring). ``splits`` is baked into ``bases``."""

    vals: torch.Tensor  # [chunks, BLOCK_N, 8], the weight's dtype
    offs: torch.Tensor  # [chunks, BLOCK_N] int32: the 8 column gaps of a chunk row, 4 bits each
    starts: torch.Tensor  # [n_blocks + 1] int32: first chunk of each block
    bases: torch.Tensor  # [n_blocks, splits, BLOCK_N] int32: column base of each layout row at each split's first chunk
    perm: torch.Tensor  # [n_blocks * ROWS] int32: the weight row of each block row (N for padding rows)
    shape: tuple
    splits: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.vals, self.offs, self.starts, self.bases, self.perm))


def build_layout(values: torch.Tensor, bitmap: torch.Tensor, shape, splits: int | None = None) -> ChunkLayout:
    """Derived layout of the canonical (values ``[nnz]`` row-major, bitmap ``[N, ceil(K/32)]``) weight,
    built with torch ops on the weight's device. ``splits``: K split count (None: fill the SMs at M = 1).

    Transient memory while building: a bool ``[N, K]`` mask, about 40 bytes per kept value (int64
    row / column indices and their derived positions) and two ``[N_pad, 32 * longest lane]`` work
    arrays (int32 columns, values): peak RSS grew 0.82 GB building an 11008 x 4096 fp16 weight at 50%
    sparsity on the CPU (the layout itself: 57 MB)."""
    n, k = shape
    dev = values.device
    nb = triton.cdiv(n, ROWS)
    rows_p = nb * ROWS
    rows, cols = unpack_bits(bitmap, k).nonzero(as_tuple=True)  # row-major: the order of `values`
    rows, cols = rows.long(), cols.long()
    nnz = cols.numel()
    if nnz != values.numel():
        raise ValueError(f"bitmap has {nnz} set bits but values holds {values.numel()}")
    first = torch.ones(nnz, dtype=torch.bool, device=dev)
    first[1:] = rows[1:] != rows[:-1]
    prev = torch.zeros_like(cols)
    prev[1:] = cols[:-1]
    prev[first] = 0  # a row's first gap is measured from column 0 (the first chunk's base)
    nfill = torch.clamp((cols - prev + MAX_GAP - 1) // MAX_GAP - 1, min=0)
    per_row = torch.zeros(rows_p, dtype=torch.long, device=dev).index_add_(0, rows, nfill + 1)
    row_start = torch.cumsum(per_row, 0) - per_row
    pos = torch.cumsum(nfill + 1, 0) - 1 - row_start[rows]  # entry index of each kept value in its row
    del first, row_start  # nnz-sized temporaries are most of the build's memory: drop them early
    # block row i holds weight row order[i]: rows sorted by length, so a block's rows need little padding
    order = torch.argsort(per_row[:n], descending=True, stable=True)
    perm = torch.full((rows_p,), n, dtype=torch.int32, device=dev)  # padding rows: n (not stored)
    perm[:n] = order.to(torch.int32)
    inv = torch.empty(n, dtype=torch.long, device=dev)
    inv[order] = torch.arange(n, device=dev)
    per_row = torch.cat([per_row[:n][order], per_row[n:]])
    lb = ((per_row + 8 * LANES - 1) // (8 * LANES)).view(nb, ROWS).amax(1)  # chunks per lane of each block
    lmax = max(int(lb.max()) if nb else 0, 1)
    span32 = (8 * lb.repeat_interleave(ROWS)).to(torch.int32)  # [rows_p] entries per lane of each row's block

    def slot(r, p, row_stride=0):  # entry p of block row r -> its place in a [LANES, lmax, 8] row (+ r * row_stride):
        q = span32[r]  # lane p // span, then in order; int32 temporaries, in place (nnz-sized: the build's memory)
        p32 = p.to(torch.int32)
        lane = torch.div(p32, q, rounding_mode="floor")
        p32.sub_(lane * q)
        del q
        p32.add_(lane.mul_(8 * lmax))
        del lane
        out = p32.long()
        del p32
        return out.add_(r, alpha=row_stride) if row_stride else out

    colarr = torch.zeros(rows_p, LANES * lmax * 8, dtype=torch.int32, device=dev)
    valarr = torch.zeros(rows_p, LANES * lmax * 8, dtype=values.dtype, device=dev)
    r_of = inv[rows]
    del rows
    flat = slot(r_of, pos, LANES * lmax * 8)  # one int64 index per kept value, used twice
    colarr.view(-1)[flat] = cols.to(torch.int32)
    valarr.view(-1)[flat] = values
    del flat, cols
    if int(nfill.sum()):  # zero fillers every MAX_GAP columns before a value that follows a long gap
        owner = torch.repeat_interleave(torch.arange(nnz, device=dev), nfill)
        f = torch.arange(owner.numel(), device=dev) - (torch.cumsum(nfill, 0) - nfill)[owner] + 1
        ro = r_of[owner]
        colarr[ro, slot(ro, pos[owner] - nfill[owner] + f - 1)] = (prev[owner] + MAX_GAP * f).to(torch.int32)
    del prev, nfill, pos, r_of
    # padding (the end of a lane, the chunks past its block's length) repeats the last column before it:
    # entries are sorted, so a running max fills it, and a lane's first base is its predecessor's last column
    colarr = torch.cummax(colarr, dim=1).values
    base = torch.zeros_like(colarr)
    base[:, 1:] = colarr[:, :-1]
    base = base.view(rows_p, LANES, lmax, 8)[..., 0]  # column before each chunk's first entry (0 at a row's start)
    colv = colarr.view(rows_p, LANES, lmax, 8)
    gaps = torch.diff(colv, dim=3, prepend=base[..., None])  # column gap of every entry to the one before it
    keep = torch.arange(lmax, device=dev)[None, :] < lb[:, None]  # [nb, lmax]: the chunks each block stores

    def blockwise(t):  # [rows_p, LANES, lmax, ...] -> [sum lb, BLOCK_N, ...]: chunk-major, layout row = 4 row + lane
        t = t.view(nb, ROWS, LANES, lmax, *t.shape[3:]).transpose(2, 3).transpose(1, 2)
        return t.reshape(nb, lmax, BLOCK_N, *t.shape[4:])[keep].contiguous()

    gaps = blockwise(gaps)
    if nnz and (int(gaps.min()) < 0 or int(gaps.max()) > MAX_GAP):
        raise AssertionError("bitmap_chunks: column gap out of [0, 15] (layout invariant broken)")
    gaps = gaps.to(torch.uint8).view(*gaps.shape[:-1], 4, 2)
    words = (gaps[..., 0] | (gaps[..., 1] << 4)).contiguous().view(torch.int32)[..., 0]  # byte b: gaps 2b, 2b + 1
    s = splits or choose_splits(nb, lmax, dev, per_sm=PER_SM)
    per = (lb + s - 1) // s
    t_s = torch.clamp(torch.minimum(torch.arange(s, device=dev)[None, :] * per[:, None], lb[:, None]), max=lmax - 1)
    bases = base.view(nb, ROWS, LANES, lmax).reshape(nb, BLOCK_N, lmax)
    bases = bases.gather(2, t_s[:, None, :].expand(nb, BLOCK_N, s)).permute(0, 2, 1)
    starts = torch.zeros(nb + 1, dtype=torch.int32, device=dev)
    starts[1:] = torch.cumsum(lb, 0).to(torch.int32)
    return ChunkLayout(blockwise(valarr.view(rows_p, LANES, lmax, 8)), words, starts,
                       bases.contiguous().to(torch.int32), perm, (n, k), s)


# one derived layout per canonical values tensor, keyed by id() and dropped when the tensor is collected
# (weakref.finalize; tensors cannot be WeakKeyDictionary keys: their == is elementwise); rebuilt when a
# canonical tensor is replaced or modified in place (data pointers, version counters)
_CACHE: dict = {}


def cached_layout(values: torch.Tensor, bitmap: torch.Tensor, shape, splits: int | None = None) -> ChunkLayout:
    """The derived layout of this weight, built on first use and kept while ``values`` lives."""
    key = (bitmap.data_ptr(), values.data_ptr(), values._version, bitmap._version, tuple(shape), splits)
    entry = _CACHE.get(id(values))
    if entry is None or entry[0]() is not values:
        entry = (weakref.ref(values), {})
        _CACHE[id(values)] = entry
        weakref.finalize(values, _CACHE.pop, id(values), None)
    lay = entry[1].get(splits)
    if lay is None or lay[0] != key:
        lay = (key, build_layout(values, bitmap, shape, splits))
        entry[1][splits] = lay
    return lay[1]


@triton.jit
def _columns(op, je):
    """Column offsets [BLOCK_N, 8] of a chunk's entries from its base, and the next base's offset [BLOCK_N]:
    prefix sums of the 8 4-bit gaps of the chunk row's word (byte b = gap 2b | gap 2b + 1 << 4), in
    registers (SWAR: no gap exceeds 15, so every partial sum stays below 121 and no byte carries into
    the next). op: [BLOCK_N, 1] pointers to the words; the word and its sums live once per row."""
    w = tl.load(op)
    lo = w & 0x0F0F0F0F  # gaps 0, 2, 4, 6
    hi = (w >> 4) & 0x0F0F0F0F  # gaps 1, 3, 5, 7
    odd = (lo + hi) * 0x01010101  # byte b: offset of entry 2b + 1 (sum of gaps 0 .. 2b + 1)
    cum = tl.where(je % 2 == 1, odd, odd - hi)  # even entries: minus their successor's gap
    o = (cum >> (8 * (je // 2))) & 0xFF  # constant per element: a byte extract
    return o, tl.sum((odd >> 24) & 0xFF, axis=1)  # entry 7: the next chunk's base


@triton.jit
def _chunk(acc, xb, vp, op, j, je, MMA: tl.constexpr, HALVES: tl.constexpr, DT: tl.constexpr, EMULATE: tl.constexpr):
    """One chunk (8 entries of each of BLOCK_N layout rows): acc += vals * x[base + offs]; returns the next bases.

    MMA (GPU, fp16 / bf16): acc [BLOCK_N, 8] holds the two mma accumulators of _CHUNK_MMA (see there);
    HALVES (fp32): two 128-bit halves per chunk row, acc is a pair of [BLOCK_N, 4]; otherwise (the
    interpreter's 16-bit path) fp32 products of the same tensors.
    """
    o, step = _columns(op, je)
    if HALVES:
        acc_lo, acc_hi = acc
        o_lo, o_hi = tl.split(tl.permute(tl.reshape(o, (o.shape[0], 2, 4)), (0, 2, 1)))
        acc_lo += tl.load(vp).to(tl.float32) * tl.load(xb[:, None] + o_lo).to(tl.float32)
        acc_hi += tl.load(vp + 4).to(tl.float32) * tl.load(xb[:, None] + o_hi).to(tl.float32)
        return (acc_lo, acc_hi), xb + step
    else:
        v = tl.load(vp)
        xv = tl.load(xb[:, None] + o)  # gather from the x row (L1-resident)
        if MMA:
            if DT == "bf16":
                acc = tl.inline_asm_elementwise(_CHUNK_MMA_BF16, _CHUNK_CONSTRAINTS, [v, xv, acc], dtype=tl.float32,
                                                is_pure=True, pack=8)
            else:
                acc = tl.inline_asm_elementwise(_CHUNK_MMA_FP16, _CHUNK_CONSTRAINTS, [v, xv, acc], dtype=tl.float32,
                                                is_pure=True, pack=8)
        else:
            acc += v.to(tl.float32) * xv.to(tl.float32)
        return acc, xb + step  # next base = this chunk's last entry


# GPU 16-bit path: the products on the tensor cores, two mma.sync.m16n8k16 per chunk. The [BLOCK_N, 8]
# tensors have 8 entries per thread (one 128-bit load of values) and one layout row per lane in order
# (tests/test_bitmap_gemv.py reads that from the TTGIR), and a weight row's 4 layout rows are lanes
# 4G..4G+3: the mma fragment split (groupID = lane / 4, threadID_in_group = lane % 4). The 8 values
# of a lane, packed in pairs as loaded (v0 | v1 << 16, ...), are A's a0..a3 (a0 / a2: row groupID,
# k = 2 tig + {0, 1} / + 8; a1 / a3: row groupID + 8), and the gathered x, packed the same way, are
# B's (b0, b1) = (x01, x45) in column groupID for the first mma and (x23, x67) for the second. So the
# diagonal D[G][G] of the first mma and D[G + 8][G] of the second accumulate (fp32, exact products) the
# entries the 4 lanes of weight row G hold; every other entry of D is never read (_mma_diagonal).
# Operands (pack = 8; 16-bit inputs come two per register): $0-$3 / $4-$7 = the two accumulators out,
# $8-$11 = value pairs, $12-$15 = x pairs, $16-$19 / $20-$23 = the accumulators in.
_CHUNK_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 8 + ["f"] * 8))
_CHUNK_MMA_FP16 = tl.constexpr(
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$8, $9, $10, $11}, {$12, $14}, "
    "{$16, $17, $18, $19}; mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$4, $5, $6, $7}, "
    "{$8, $9, $10, $11}, {$13, $15}, {$20, $21, $22, $23};")
_CHUNK_MMA_BF16 = tl.constexpr(
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$8, $9, $10, $11}, {$12, $14}, "
    "{$16, $17, $18, $19}; mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$4, $5, $6, $7}, "
    "{$8, $9, $10, $11}, {$13, $15}, {$20, $21, $22, $23};")

_DIAG_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["f"] * 8))


@triton.jit
def _mma_diagonal(acc):
    """The weight row's sum a lane holds after the loop: D1[G][G] + D2[G + 8][G] in the lane with
    threadID_in_group == G / 2 (c0 + c2' for even G, c1 + c3' for odd), in element 0; zero elsewhere."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 l, g, t, h; .reg .pred p, q; .reg .f32 a, b; mov.u32 l, %laneid; shr.u32 g, l, 2; "
        "and.b32 t, l, 3; shr.u32 h, g, 1; setp.eq.u32 p, t, h; and.b32 h, g, 1; setp.eq.u32 q, h, 1; "
        "selp.f32 a, $9, $8, q; selp.f32 b, $15, $14, q; add.f32 a, a, b; selp.f32 $0, a, 0f00000000, p; "
        "mov.f32 $1, 0f00000000; mov.f32 $2, 0f00000000; mov.f32 $3, 0f00000000; mov.f32 $4, 0f00000000; "
        "mov.f32 $5, 0f00000000; mov.f32 $6, 0f00000000; mov.f32 $7, 0f00000000; }",
        _DIAG_CONSTRAINTS, [acc], dtype=tl.float32, is_pure=True, pack=8)


@triton.jit
def _bitmap_chunks_gemv_kernel(x_ptr, v_ptr, o_ptr, starts_ptr, bases_ptr, perm_ptr, b_ptr, y_ptr, N, S, stride_xm, stride_ys,
                          stride_ym, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr,
                          LANES: tl.constexpr, UNROLL: tl.constexpr, EMULATE: tl.constexpr):
    """y[m, block] (or the fp32 partial of split pid 2) = sum over the split's chunks of vals * x[cols] (+ b).

    EMULATE (interpreted launches; the interpreter cannot run PTX): fp32 products instead of the mma."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = tl.arange(0, BLOCK_N)
    DT: tl.constexpr = "fp32" if v_ptr.dtype.element_ty == tl.float32 else (
        "bf16" if v_ptr.dtype.element_ty == tl.bfloat16 else "fp16")
    HALVES: tl.constexpr = DT == "fp32"  # fp32: two 128-bit halves per chunk row
    MMA: tl.constexpr = not HALVES and not EMULATE
    W: tl.constexpr = 4 if HALVES else 8  # elements per accumulator row
    j = tl.arange(0, W)
    c0 = tl.load(starts_ptr + pid_n)
    n_ch = tl.load(starts_ptr + pid_n + 1) - c0
    per = tl.cdiv(n_ch, S)
    t0 = tl.minimum(pid_k * per, n_ch)
    n_my = tl.minimum(t0 + per, n_ch) - t0
    xb = x_ptr + pid_m * stride_xm + tl.load(bases_ptr + (pid_n * S + pid_k) * BLOCK_N + rows)
    vp = v_ptr + (c0 + t0).to(tl.int64) * (BLOCK_N * 8) + rows[:, None] * 8 + j[None, :]
    je = tl.arange(0, 8)[None, :]
    op = o_ptr + (c0 + t0).to(tl.int64) * BLOCK_N + rows[:, None]  # [BLOCK_N, 1]: each row's gap word
    if HALVES:
        acc = (tl.zeros((BLOCK_N, W), dtype=tl.float32), tl.zeros((BLOCK_N, W), dtype=tl.float32))
    else:
        acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    for _ in range(n_my // UNROLL):
        for u in tl.static_range(UNROLL):
            acc, xb = _chunk(acc, xb, vp + u * BLOCK_N * 8, op + u * BLOCK_N, j, je, MMA, HALVES, DT, EMULATE)
        vp += UNROLL * BLOCK_N * 8
        op += UNROLL * BLOCK_N
    for _ in range(n_my % UNROLL):  # remainder chunks
        acc, xb = _chunk(acc, xb, vp, op, j, je, MMA, HALVES, DT, EMULATE)
        vp += BLOCK_N * 8
        op += BLOCK_N
    if HALVES:
        out = tl.sum(acc[0] + acc[1], axis=1)
    elif MMA:
        out = tl.sum(_mma_diagonal(acc), axis=1)
    else:
        out = tl.sum(acc, axis=1)
    out = tl.sum(tl.reshape(out, (BLOCK_N // LANES, LANES)), axis=1)  # a weight row's LANES layout rows
    r = tl.arange(0, BLOCK_N // LANES)
    store_gemv_row(out, y_ptr, b_ptr, tl.load(perm_ptr + pid_n * (BLOCK_N // LANES) + r), N, pid_k, pid_m, stride_ys,
                   stride_ym, PARTIAL, HAS_BIAS)


def chunks_gemv(x: torch.Tensor, lay: ChunkLayout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (unit stride along K) @ dense(weight)^T + bias [N] -> y [M, N] in x's dtype."""
    n, k = lay.shape
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    nb, s = lay.starts.numel() - 1, lay.splits
    out = y if s == 1 else torch.empty(s, m, n, dtype=torch.float32, device=x.device)
    _bitmap_chunks_gemv_kernel[(m, nb, s)](
        x, lay.vals, lay.offs, lay.starts, lay.bases, lay.perm, bias if bias is not None else out, out, n, s, x.stride(0),
        0 if s == 1 else out.stride(0), out.stride(-2), HAS_BIAS=bias is not None and s == 1, PARTIAL=s > 1,
        BLOCK_N=BLOCK_N, LANES=LANES, UNROLL=UNROLL, EMULATE=_is_interpreted(_bitmap_chunks_gemv_kernel),
        num_warps=NUM_WARPS, num_stages=1)
    if s > 1:
        reduce_partials(out, bias, y)
    return y


def loop_weight_bytes(dt: str):
    """Derived-layout bytes one program loads per steady-state iteration (values + byte offsets of
    BLOCK_N x 8 x UNROLL entries; padding entries included, whatever the density)."""
    isz = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    return lambda density=0.5: BLOCK_N * 8 * UNROLL * (isz + 0.5)


def expected_chunks(k: int, density: float) -> float:
    """Expected chunks per lane of a layout block for a random mask of ``density`` on K columns: the
    mean row (kept values + fillers) in chunks of 8 x LANES, plus a half for the rounding up and the
    spread inside a block of length-sorted rows (measured mean block lengths on random 4096 / 11008-column
    masks at 50% / 70% sparsity: within 0.06 chunk of this; padding + fillers 0.3-1.8% of the entries)."""
    mean = k * density
    gaps = mean * (1 - density) ** MAX_GAP  # P(gap > 15): one filler each (more are rare)
    return (mean + gaps) / (8 * LANES) + 0.5


def _specs():
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for partial in (False, True):
            for has_bias in ((False,) if partial else (False, True)):
                sig = dict(x_ptr=f"*{dt}", v_ptr=f"*{dt}",
                           o_ptr="*i32", starts_ptr="*i32", bases_ptr="*i32", perm_ptr="*i32",
                           b_ptr=f"*{dt}", y_ptr="*fp32" if partial else f"*{dt}", N="i32", S="i32", stride_xm="i32",
                           stride_ys="i32", stride_ym="i32", HAS_BIAS="constexpr", PARTIAL="constexpr",
                           BLOCK_N="constexpr", LANES="constexpr", UNROLL="constexpr", EMULATE="constexpr")
                consts = dict(HAS_BIAS=has_bias, PARTIAL=partial, BLOCK_N=BLOCK_N, LANES=LANES, UNROLL=UNROLL,
                              EMULATE=False)
                name = f"bitmap-chunks-{dt}" + ("-partial" if partial else "-out") + ("-bias" if has_bias else "")
                specs.append(CompileSpec(
                    _bitmap_chunks_gemv_kernel, sig, consts, NUM_WARPS, 1, name, is_gemm=True, expect_tensor_core=dt != "fp32",
                    representative=(dt == "bf16" and partial) or (dt == "fp16" and has_bias),
                    divisible=("x_ptr", "v_ptr", "o_ptr", "starts_ptr", "bases_ptr", "perm_ptr", "b_ptr", "y_ptr", "N",
                               "stride_xm", "stride_ys", "stride_ym"),
                    family="bitmap", regime="decode", loop_weight_bytes=loop_weight_bytes(dt)))
    return specs


COMPILE_SPECS = _specs()


def launch_plan(spec, m: int, n: int, k: int, density: float):
    """Launches of one :func:`chunks_gemv` call on an H100 (132 SMs), for ``bench/sass_audit.py``:
    the GEMV (programs, average steady-state iterations, HBM bytes of the derived layout as stored:
    padding included, expected for a random mask) and the split-K reduce."""
    dt = spec.signature["x_ptr"][1:]
    isz = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    nb = triton.cdiv(n, ROWS)
    lb = expected_chunks(k, density)
    s = choose_splits(nb, math.ceil(lb), torch.device("cpu"), per_sm=PER_SM)  # cpu: 132 SMs, the audit's H100
    main = next(sp for sp in COMPILE_SPECS if sp.signature["x_ptr"] == spec.signature["x_ptr"]
                and sp.constexprs["PARTIAL"] == (s > 1) and not sp.constexprs["HAS_BIAS"])
    layout_bytes = nb * lb * BLOCK_N * 8 * (isz + 0.5) + nb * s * BLOCK_N * 4 + (nb + 1) * 4 + nb * ROWS * 4
    return splitk_plan(main, m * nb * s, math.ceil(lb / s) / UNROLL, layout_bytes, m, n, k, isz, s, dt)


SASS_LAUNCH_PLAN = launch_plan  # the name bench/sass_model.py looks up


_VERIFIED: dict = {}


def _self_check_problem(dtype: torch.dtype, device) -> tuple:
    """x [2, 300], the layout of a random [45, 300] weight (two blocks, fillers, an empty row) and x @ W^T (fp32)."""
    from ..formats import BitmapWeight

    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(45, 300, generator=gen) * (torch.rand(45, 300, generator=gen) > 0.6)
    w[5] = 0
    w[5, 0], w[5, 299] = 1.0, 2.0  # a long gap: fillers
    w[9] = 0  # an empty row
    w = w.to(dtype)
    bw = BitmapWeight.from_dense(w)
    x = torch.randn(2, 300, generator=gen).to(dtype)
    lay = build_layout(bw.values.to(device), bw.bitmap.to(device), bw.shape)
    return x.to(device), lay, (x.float() @ w.float().t()).to(device)


def gemv_verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the chunk GEMV may serve (device, dtype): True off CUDA (the interpreter runs the tested
    EMULATE path) and for fp32 (no tensor cores); on CUDA, once per device and 16-bit dtype, the
    tensor-core path is run on a small random weight (two blocks, fillers, an empty row) against a dense
    matmul. Its lane mapping depends on the register layout Triton picks (checked at build time against
    the Triton we test with, not on every hardware and version): a mismatch warns and returns False, and
    ``bitmap_gemv`` then uses the canonical-layout GEMV instead."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return True
    def run():
        x, lay, want = _self_check_problem(dtype, device)
        return chunks_gemv(x, lay), want

    return self_check_once(_VERIFIED, device, dtype, run, "the bitmap chunk GEMV", "the canonical-layout GEMV")
