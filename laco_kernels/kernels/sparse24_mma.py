"""2:4 sparse decode on the sparse tensor cores: ``y = x @ dense(values, meta)^T + b`` for 1 <= M <= 16.

Weight: the canonical :class:`~laco_kernels.formats.Sparse24Weight` (values ``[N, K/2]``, meta int32
``[N, ceil(K/32)]``, nibble ``g % 8`` of word ``g // 8`` = ``i0 | i1 << 2`` with ``i0 < i1``), read as
is: no derived layout, no extra memory.

Why: the GEMV (``sparse24_gemv.py``, now the fallback) repeats its per-value work for every token, and
the ``tl.dot`` decode tile (``sparse24_gemm.py``) rebuilds a dense tile (4.1 thread-instructions per compressed byte,
predicted 1.13x the dense kernel at M = 16). ``mma.sp.m16n8k32`` takes the kept pairs and a metadata
word in exactly our format: 16 weight rows x 32 columns against 8 tokens per instruction, nothing
decompressed. One warp owns 16 rows; per 32-column tile each thread issues 4 value loads, 1 meta
load, 1 shuffle, 1 byte permute, 4 x loads and one ``mma.sp`` per 8 tokens (about 17-23 instructions for 18
weight bytes).

Fragment mapping (PTX ISA, sparse ``mma.m16n8k32``, 16-bit; lane = 4 gid + tig):

- A (the weight, rows = output features): ``a0`` / ``a1`` = the kept pair (one int32 word, as stored)
  of group ``tig`` of row ``gid`` / ``gid + 8``; ``a2`` / ``a3`` = group ``tig + 4`` of the same rows;
- metadata, sparsity selector 0: lanes with ``tig`` 0 and 1 hold the nibbles of groups 0-3 and 4-7,
  row ``gid`` in bits 0-15 and row ``gid + 8`` in bits 16-31. Lane 0 loads row ``gid``'s meta word,
  lane 1 row ``gid + 8``'s; a ``shfl.bfly 1`` swaps them and one ``prmt`` (selector 0x5410 on lane 0,
  0x3276 on lane 1) packs the halves. Lanes 2 and 3 are not read;
- B (x^T, 32 x 8): register ``j`` = columns ``2 tig + 8 j``, ``+ 1`` of token ``gid``: one int32 word;
- D: ``d0, d1`` = row ``gid``, tokens ``2 tig``, ``2 tig + 1``; ``d2, d3`` = row ``gid + 8``.

Nothing here depends on the register layout Triton picks: every tensor is 1-D with one element per
thread, and each element's lane and warp come from ``%tid.x`` (an asm read), so the addresses are
those of the thread that holds the element whatever the layout. The padding nibbles of a last,
partial meta word are 0 (an invalid pattern for ``mma.sp``); the tail tile patches them to
``0b0100`` with zero values.

Interpreter (``EMULATE``): the same loads as the GPU path (masked where a lane's data is unused, so
the traffic audit counts distinct loads), then the shuffle, the metadata packing and the instruction
itself, emulated from the PTX fragment rules with reshapes and masked sums (``_emulate_mma``), so the
interpreter tests check the fragment construction, not only the arithmetic. A numpy lane model in
``tests/test_sparse24_mma.py`` checks the same rules independently; on a GPU the kernel self-checks
once per device and dtype (``mma_verified``) before it serves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compile import CompileSpec, _is_interpreted
from ._mma_emulate import _emulate_mma, _lane_pick
from ._selfcheck import self_check_once
from ._splitk import _TL, AuditDevice, reduce_launch, reduce_partials, slice_k, splitk_plan

MMA_MAX_M = 16  # two mma.sp per tile cover 16 tokens; above, the tl.dot tile (prefill config)
# 32 rows per program (16 per warp), 4 tiles of 32 columns per loop iteration, no software pipelining of the
# loop, K sliced until there are PER_SM programs per SM. Measured on an H200 (bench/gpu_decode_sweep.py ->
# bench/results/gpu_decode_sweep.json, fp16, 7B shapes, M = 1 / 4 / 16): the number of K slices decides the
# time (one program per SM, the old rule, left the memory pipe empty: 4096 x 11008 at M = 1 took 50 us);
# warps 2 / 4 / 8, unroll 2 / 4 / 8 and 1 or 3 stages change it by a few percent once the slices are right.
# 8 two-warp programs per SM (16 warps) came within 7% of the fastest configuration at every measured point.
# PREFETCH (register double buffering of whole unrolled steps) measured 3-6% faster on two shapes and 2% slower
# on the third (bench/results/gpu_decode_prefetch.json): kept as an option, off (docs/gpu_decode_kernels.md).
_CFG = dict(WARPS=2, UNROLL=4, STAGES=1, PER_SM=8, PREFETCH=False)


def _mma_asm(dt: str, halves: int) -> str:
    """shfl + prmt of the meta words, then ``halves`` mma.sp (8 tokens each). Operands: outputs $0..,
    then a0-a3, this lane's meta word, the prmt selector, x words (4 per half), accumulators."""
    n_out = 4 * halves
    a = n_out
    w, sel = a + 4, a + 5
    xb = a + 6
    acc = xb + 4 * halves
    op = "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{t}.{t}.f32".format(t=dt)
    s = (f"{{ .reg .b32 e, o; shfl.sync.bfly.b32 o, ${w}, 1, 0x1f, 0xffffffff; "
         f"prmt.b32 e, ${w}, o, ${sel}; ")
    for h in range(halves):
        d = ", ".join(f"${4 * h + i}" for i in range(4))
        av = ", ".join(f"${a + i}" for i in range(4))
        bv = ", ".join(f"${xb + 4 * h + i}" for i in range(4))
        cv = ", ".join(f"${acc + 4 * h + i}" for i in range(4))
        s += f"{op} {{{d}}}, {{{av}}}, {{{bv}}}, {{{cv}}}, e, 0x0; "
    return s + "}"


def _constraints(halves: int) -> str:
    return ",".join(["=f"] * (4 * halves) + ["r"] * (6 + 4 * halves) + ["f"] * (4 * halves))


_ASM = {(dt, h): tl.constexpr(_mma_asm(dt, h)) for dt in ("f16", "bf16") for h in (1, 2)}
_CONS = {h: tl.constexpr(_constraints(h)) for h in (1, 2)}
_ASM_F16_1, _ASM_F16_2 = _ASM[("f16", 1)], _ASM[("f16", 2)]
_ASM_BF16_1, _ASM_BF16_2 = _ASM[("bf16", 1)], _ASM[("bf16", 2)]
_CONS_1, _CONS_2 = _CONS[1], _CONS[2]


@triton.jit
def _thread_index(n: tl.constexpr, EMULATE: tl.constexpr):
    """int32 [n]: the CTA thread index (``%tid.x``) of the thread holding each element (the element
    index itself in the interpreter)."""
    idx = tl.arange(0, n)
    if EMULATE:
        return idx
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [idx], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _ld(ptr, used, EMULATE: tl.constexpr):
    """Load where ``used`` in the interpreter (so the traffic audit counts distinct loads); on the GPU
    unmasked: the unused lanes' clamped pointers repeat a used lane's address (one request a warp)."""
    if EMULATE:
        return tl.load(ptr, mask=used, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _tile_loads(v0, v1, mp, xa, xb, gt, n_groups, tig, ok_a, ok_b, MASKED: tl.constexpr, HALVES: tl.constexpr,
                EMULATE: tl.constexpr):
    """The operands of one 32-column tile (groups gt .. gt + 7): (w, a0, a1, a2, a3, b0, ..., b7), the same
    loads on both paths.

    v0 / v1 -> int32 pair words of rows gid / gid + 8 at group gt + tig; mp -> the meta word of row
    gid (lane tig 0) or gid + 8 (lane tig 1), exchanged by a shuffle; xa / xb -> int32 x words (column
    pairs) of tokens gid / gid + 8 at pair 2 gt + tig, loaded where ok_a / ok_b (the token exists).
    MASKED (the last, partial tile): groups >= n_groups read as zero with a valid nibble."""
    # On the GPU, lanes whose data is not used (meta of lanes tig 2 / 3, x of tokens past M) load the same
    # address as a used lane (clamped pointers): one request per warp, no masks, no zeroing. The
    # interpreter masks them off instead, so the traffic audit counts each distinct load once.
    mine = tig < 2
    if MASKED:
        valid = n_groups - gt  # 1..7 groups of this meta word exist
        keep = (1 << (4 * valid)) - 1
        pad = 0x44444444 & ~keep  # i0 = 0, i1 = 1 for absent groups (their values and x are 0)
        w = (_ld(mp, mine, EMULATE) & keep) | pad
        ok_lo = gt + tig < n_groups
        ok_hi = gt + tig + 4 < n_groups
        a0 = tl.load(v0, mask=ok_lo, other=0)
        a1 = tl.load(v1, mask=ok_lo, other=0)
        a2 = tl.load(v0 + 4, mask=ok_hi, other=0)
        a3 = tl.load(v1 + 4, mask=ok_hi, other=0)
        xo = 2 * gt + tig  # x word (column pair) of register j: xo + 4 j
        b0 = tl.load(xa, mask=(xo < 2 * n_groups) & ok_a, other=0)
        b1 = tl.load(xa + 4, mask=(xo + 4 < 2 * n_groups) & ok_a, other=0)
        b2 = tl.load(xa + 8, mask=(xo + 8 < 2 * n_groups) & ok_a, other=0)
        b3 = tl.load(xa + 12, mask=(xo + 12 < 2 * n_groups) & ok_a, other=0)
        if HALVES == 2:
            b4 = tl.load(xb, mask=(xo < 2 * n_groups) & ok_b, other=0)
            b5 = tl.load(xb + 4, mask=(xo + 4 < 2 * n_groups) & ok_b, other=0)
            b6 = tl.load(xb + 8, mask=(xo + 8 < 2 * n_groups) & ok_b, other=0)
            b7 = tl.load(xb + 12, mask=(xo + 12 < 2 * n_groups) & ok_b, other=0)
        else:
            b4, b5, b6, b7 = b0, b1, b2, b3
    else:
        w = _ld(mp, mine, EMULATE)
        a0 = tl.load(v0)
        a1 = tl.load(v1)
        a2 = tl.load(v0 + 4)
        a3 = tl.load(v1 + 4)
        b0 = _ld(xa, ok_a, EMULATE)
        b1 = _ld(xa + 4, ok_a, EMULATE)
        b2 = _ld(xa + 8, ok_a, EMULATE)
        b3 = _ld(xa + 12, ok_a, EMULATE)
        if HALVES == 2:
            b4 = _ld(xb, ok_b, EMULATE)
            b5 = _ld(xb + 4, ok_b, EMULATE)
            b6 = _ld(xb + 8, ok_b, EMULATE)
            b7 = _ld(xb + 12, ok_b, EMULATE)
        else:
            b4, b5, b6, b7 = b0, b1, b2, b3
    return w, a0, a1, a2, a3, b0, b1, b2, b3, b4, b5, b6, b7


@triton.jit
def _prefetch_loads(v0, v1, mp, xa, xb, tig, ok_a, ok_b, live, HALVES: tl.constexpr, EMULATE: tl.constexpr):
    """:func:`_tile_loads` of a whole tile, predicated on the scalar ``live`` (False: the step after a
    slice's last one, nothing is read and the zeros are never used)."""
    live = tl.where(live, tig >= 0, tig < 0)  # the scalar predicate as a per-thread mask (a where: bool data)
    mine = (tig < 2) & live
    w = tl.load(mp, mask=mine if EMULATE else live, other=0)
    a0 = tl.load(v0, mask=live, other=0)
    a1 = tl.load(v1, mask=live, other=0)
    a2 = tl.load(v0 + 4, mask=live, other=0)
    a3 = tl.load(v1 + 4, mask=live, other=0)
    la = (ok_a & live) if EMULATE else live
    b0 = tl.load(xa, mask=la, other=0)
    b1 = tl.load(xa + 4, mask=la, other=0)
    b2 = tl.load(xa + 8, mask=la, other=0)
    b3 = tl.load(xa + 12, mask=la, other=0)
    if HALVES == 2:
        lb = (ok_b & live) if EMULATE else live
        b4 = tl.load(xb, mask=lb, other=0)
        b5 = tl.load(xb + 4, mask=lb, other=0)
        b6 = tl.load(xb + 8, mask=lb, other=0)
        b7 = tl.load(xb + 12, mask=lb, other=0)
    else:
        b4, b5, b6, b7 = b0, b1, b2, b3
    return w, a0, a1, a2, a3, b0, b1, b2, b3, b4, b5, b6, b7


@triton.jit
def _tile_mma(c0, c1, c2, c3, c4, c5, c6, c7, ops, sel, tig, HALVES: tl.constexpr, DT: tl.constexpr,
              WARPS: tl.constexpr, EMULATE: tl.constexpr):
    """c0..c7 += the tile whose operands :func:`_tile_loads` returned (``ops``)."""
    w, a0, a1, a2, a3, b0, b1, b2, b3, b4, b5, b6, b7 = ops
    if EMULATE:
        # the shuffle: lane tig 0 / 1 gets (its word, the partner's word) -> prmt with its selector
        w3 = tl.reshape(w, (WARPS, 8, 4))
        tig3 = tl.reshape(tig, (WARPS, 8, 4))
        other = tl.reshape(_lane_pick(w3, tl.arange(0, 4), tig3 ^ 1), (32 * WARPS,))
        lo_row = tl.where(tig == 0, w, other)  # row gid's word
        hi_row = tl.where(tig == 0, other, w)  # row gid + 8's word
        sh = 16 * (tig & 1)
        e = ((lo_row >> sh) & 0xFFFF) | (((hi_row >> sh) & 0xFFFF) << 16)
        c0, c1, c2, c3 = _emulate_mma((c0, c1, c2, c3), a0, a1, a2, a3, e, b0, b1, b2, b3, WARPS, DT)
        if HALVES == 2:
            c4, c5, c6, c7 = _emulate_mma((c4, c5, c6, c7), a0, a1, a2, a3, e, b4, b5, b6, b7, WARPS, DT)
        return c0, c1, c2, c3, c4, c5, c6, c7
    if HALVES == 1:
        if DT == "bf16":
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM_BF16_1, _CONS_1, [a0, a1, a2, a3, w, sel, b0, b1, b2, b3, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM_F16_1, _CONS_1, [a0, a1, a2, a3, w, sel, b0, b1, b2, b3, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        if DT == "bf16":
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                _ASM_BF16_2, _CONS_2, [a0, a1, a2, a3, w, sel, b0, b1, b2, b3, b4, b5, b6, b7,
                                       c0, c1, c2, c3, c4, c5, c6, c7],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                       tl.float32), is_pure=True, pack=1)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                _ASM_F16_2, _CONS_2, [a0, a1, a2, a3, w, sel, b0, b1, b2, b3, b4, b5, b6, b7,
                                      c0, c1, c2, c3, c4, c5, c6, c7],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                       tl.float32), is_pure=True, pack=1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _tile(c0, c1, c2, c3, c4, c5, c6, c7, v0, v1, mp, xa, xb, sel, gt, n_groups, tig, ok_a, ok_b,
          MASKED: tl.constexpr, HALVES: tl.constexpr, DT: tl.constexpr, WARPS: tl.constexpr,
          EMULATE: tl.constexpr):
    """One 32-column tile (groups gt .. gt + 7) loaded and accumulated into c0..c7."""
    ops = _tile_loads(v0, v1, mp, xa, xb, gt, n_groups, tig, ok_a, ok_b, MASKED, HALVES, EMULATE)
    return _tile_mma(c0, c1, c2, c3, c4, c5, c6, c7, ops, sel, tig, HALVES, DT, WARPS, EMULATE)


@triton.jit
def _advance(v0, v1, mp, xa, xb, gt, TILES: tl.constexpr):
    """The tile pointers (value words, meta word, x words) and group index moved TILES tiles of 32 columns on."""
    return v0 + 8 * TILES, v1 + 8 * TILES, mp + TILES, xa + 16 * TILES, xb + 16 * TILES, gt + 8 * TILES


@triton.jit
def _store(c, y_ptr, b_ptr, row, tok, M, N, pid_k, stride_ys, stride_ym, PARTIAL: tl.constexpr,
           HAS_BIAS: tl.constexpr):
    """y[tok, row] = c (+ b[row]) in y's dtype, or the raw fp32 partial of K slice pid_k."""
    ok = (row < N) & (tok < M)
    dst = y_ptr + pid_k * stride_ys + tok * stride_ym + row
    if PARTIAL:
        tl.store(dst, c, mask=ok)
    else:
        if HAS_BIAS:
            c += tl.load(b_ptr + row, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst, c.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sparse24_mma_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_vn, stride_mn,
                         stride_ys, stride_ym, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DT: tl.constexpr,
                         HALVES: tl.constexpr, WARPS: tl.constexpr, UNROLL: tl.constexpr, EMULATE: tl.constexpr,
                         PREFETCH: tl.constexpr = False):
    """y[m, rows] (or the fp32 partial of K slice pid 1) for the program's 16 * WARPS rows.

    x_ptr: x [M, K] (DT, rows 4-byte aligned, unit stride); v_ptr: values viewed as int32 [N, K/4]
    (one kept pair per word); meta_ptr: int32 [N, ceil(K/32)]; strides in elements of those views
    (stride_xm in DT elements). HALVES: 1 (M <= 8) or 2 (M <= 16) mma.sp per tile.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tid = _thread_index(32 * WARPS, EMULATE)
    lane = tid % 32
    gid = lane // 4
    tig = lane % 4
    row0 = pid_n * (16 * WARPS) + (tid // 32) * 16 + gid
    row1 = row0 + 8
    r0 = tl.minimum(row0, N - 1).to(tl.int64)  # clamped: rows past N compute garbage, never stored
    r1 = tl.minimum(row1, N - 1).to(tl.int64)
    tok_a = tl.minimum(gid, M - 1).to(tl.int64)  # clamped addresses; tokens past M are masked off below
    tok_b = tl.minimum(gid + 8, M - 1).to(tl.int64)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    n_groups = K // 4
    # lane tig 0 loads row gid's meta word, lane 1 row gid + 8's; after the shuffle each packs its 16-bit
    # halves: tig 0 the low halves (groups 0-3), tig 1 the high halves (groups 4-7) of (row gid, row gid + 8)
    sel = tl.where(tig == 0, 0x5410, 0x3276)
    xw = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # x column pairs as int32 words
    v0 = v_ptr + r0 * stride_vn + k_lo // 4 + tig
    v1 = v_ptr + r1 * stride_vn + k_lo // 4 + tig
    mp = meta_ptr + tl.where(tig == 0, r0, r1) * stride_mn + k_lo // 32
    ok_a = gid < M  # tokens past M load nothing (their D columns are dropped)
    ok_b = gid + 8 < M
    xa = xw + tok_a * (stride_xm // 2) + k_lo // 2 + tig
    xb = xw + tok_b * (stride_xm // 2) + k_lo // 2 + tig
    c0 = tl.zeros((32 * WARPS,), dtype=tl.float32)
    c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    c4 = tl.zeros_like(c0)
    c5 = tl.zeros_like(c0)
    c6 = tl.zeros_like(c0)
    c7 = tl.zeros_like(c0)
    n_full = (k_hi - k_lo) // 32
    gt = k_lo // 4
    if PREFETCH:
        # register double buffering: the loads of step i + 1 are issued before the mma.sp of step i, so a
        # warp keeps a whole unrolled step (UNROLL x 576 weight bytes) in flight; without it ptxas
        # interleaves each tile's loads with the previous tile's mma.sp (about one tile in flight)
        n_steps = n_full // UNROLL
        cur = ()
        for u in tl.static_range(UNROLL):
            cur = cur + (_prefetch_loads(v0 + 8 * u, v1 + 8 * u, mp + u, xa + 16 * u, xb + 16 * u, tig, ok_a, ok_b,
                                         n_steps > 0, HALVES, EMULATE),)
        for it in range(n_steps):
            live = it + 1 < n_steps
            nxt = ()
            for u in tl.static_range(UNROLL):
                o = UNROLL + u
                nxt = nxt + (_prefetch_loads(v0 + 8 * o, v1 + 8 * o, mp + o, xa + 16 * o, xb + 16 * o, tig, ok_a,
                                             ok_b, live, HALVES, EMULATE),)
            for u in tl.static_range(UNROLL):
                c0, c1, c2, c3, c4, c5, c6, c7 = _tile_mma(c0, c1, c2, c3, c4, c5, c6, c7, cur[u], sel, tig,
                                                           HALVES, DT, WARPS, EMULATE)
            cur = nxt
            v0, v1, mp, xa, xb, gt = _advance(v0, v1, mp, xa, xb, gt, UNROLL)
    else:
        for _ in range(n_full // UNROLL):
            for u in tl.static_range(UNROLL):
                c0, c1, c2, c3, c4, c5, c6, c7 = _tile(
                    c0, c1, c2, c3, c4, c5, c6, c7, v0 + 8 * u, v1 + 8 * u, mp + u, xa + 16 * u, xb + 16 * u, sel,
                    gt + 8 * u, n_groups, tig, ok_a, ok_b, False, HALVES, DT, WARPS, EMULATE)
            v0, v1, mp, xa, xb, gt = _advance(v0, v1, mp, xa, xb, gt, UNROLL)
    for _ in range(n_full // UNROLL * UNROLL, n_full):  # whole tiles short of an unrolled step
        c0, c1, c2, c3, c4, c5, c6, c7 = _tile(
            c0, c1, c2, c3, c4, c5, c6, c7, v0, v1, mp, xa, xb, sel, gt, n_groups, tig, ok_a, ok_b,
            False, HALVES, DT, WARPS, EMULATE)
        v0, v1, mp, xa, xb, gt = _advance(v0, v1, mp, xa, xb, gt, 1)
    if (k_hi - k_lo) % 32 != 0:  # the last K slice ends in a partial tile (K % 32 != 0)
        c0, c1, c2, c3, c4, c5, c6, c7 = _tile(
            c0, c1, c2, c3, c4, c5, c6, c7, v0, v1, mp, xa, xb, sel, gt, n_groups, tig, ok_a, ok_b,
            True, HALVES, DT, WARPS, EMULATE)
    # D: c0 / c1 = row gid, tokens 2 tig / 2 tig + 1; c2 / c3 = row gid + 8; c4..c7 the same for tokens + 8
    _store(c0, y_ptr, b_ptr, row0, 2 * tig, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
    _store(c1, y_ptr, b_ptr, row0, 2 * tig + 1, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
    _store(c2, y_ptr, b_ptr, row1, 2 * tig, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
    _store(c3, y_ptr, b_ptr, row1, 2 * tig + 1, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
    if HALVES == 2:
        _store(c4, y_ptr, b_ptr, row0, 2 * tig + 8, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
        _store(c5, y_ptr, b_ptr, row0, 2 * tig + 9, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
        _store(c6, y_ptr, b_ptr, row1, 2 * tig + 8, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)
        _store(c7, y_ptr, b_ptr, row1, 2 * tig + 9, M, N, pid_k, stride_ys, stride_ym, PARTIAL, HAS_BIAS)


def launch_geometry(m: int, n: int, k: int, device, splits: int | None = None):
    """(row tiles, K slices, columns per slice) of a launch: slices are whole unrolled steps
    (``splits`` given: whole 32-column tiles, so tests reach the single-tile and tail paths)."""
    n_tiles = triton.cdiv(n, 16 * _CFG["WARPS"])
    return (n_tiles,) + slice_k(n_tiles, k, 32 * _CFG["UNROLL"], device, splits, granule=32, per_sm=_CFG["PER_SM"])


def sparse24_mma(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape, bias: torch.Tensor | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """x [M, K] @ dense(values [N, K/2], meta [N, ceil(K/32)])^T + bias [N] -> y [M, N] in x's dtype.

    fp16 / bf16 only, 1 <= M <= ``MMA_MAX_M`` (the launcher sends every 16-bit M <= 16 here). ``splits`` overrides
    the split-K choice (tests). x and values rows need unit stride along K and 4-byte alignment,
    meta rows unit stride; others are copied.
    """
    n, k = shape
    m = x.shape[0]
    if x.dtype not in (torch.float16, torch.bfloat16) or not 0 < m <= MMA_MAX_M:
        raise ValueError(f"sparse24_mma: needs fp16 / bf16 x with 1 <= M <= {MMA_MAX_M}, got {x.dtype}, M = {m}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if meta.stride(1) != 1:
        meta = meta.contiguous()
    if x.stride(1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:
        x = x.contiguous()
    if values.stride(1) != 1 or values.stride(0) % 2 or values.data_ptr() % 4:
        values = values.contiguous()
    words = values.view(torch.int32) if values.shape[1] else values.new_empty(n, 0).view(torch.int32)
    n_tiles, s, k_per = launch_geometry(m, n, k, x.device, splits)
    out = y if s == 1 else torch.empty(s, m, n, dtype=torch.float32, device=x.device)
    _sparse24_mma_kernel[(n_tiles, s)](
        x, words, meta, bias if bias is not None else out, out, m, n, k, k_per, x.stride(0), words.stride(0),
        meta.stride(0), 0 if s == 1 else out.stride(0), out.stride(-2),
        HAS_BIAS=bias is not None and s == 1, PARTIAL=s > 1, DT=_TL[x.dtype], HALVES=1 if m <= 8 else 2,
        WARPS=_CFG["WARPS"], UNROLL=_CFG["UNROLL"], EMULATE=_is_interpreted(_sparse24_mma_kernel),
        PREFETCH=_CFG["PREFETCH"],
        num_warps=_CFG["WARPS"], num_stages=_CFG["STAGES"])
    if s > 1:
        reduce_partials(out, bias, y)
    return y


def loop_weight_bytes(density: float = 0.5) -> float:
    """Weight bytes one program loads per steady-state (unrolled) iteration: 16 rows per
    warp, UNROLL tiles of 32 columns, 16 value bytes + 1 meta word per row and tile (16-bit)."""
    return 16 * _CFG["WARPS"] * _CFG["UNROLL"] * (32 + 4)


def _specs():
    specs = []
    for dt in ("fp16", "bf16"):
        for halves in (1, 2):
            for partial in (False, True):
                for has_bias in ((False,) if partial else (False, True)):
                    sig = dict(x_ptr=f"*{dt}", v_ptr="*i32", meta_ptr="*i32", b_ptr=f"*{dt}",
                               y_ptr="*fp32" if partial else f"*{dt}", M="i32", N="i32", K="i32", K_PER_SPLIT="i32",
                               stride_xm="i32", stride_vn="i32", stride_mn="i32", stride_ys="i32", stride_ym="i32",
                               HAS_BIAS="constexpr", PARTIAL="constexpr", DT="constexpr", HALVES="constexpr",
                               WARPS="constexpr", UNROLL="constexpr", EMULATE="constexpr", PREFETCH="constexpr")
                    consts = dict(HAS_BIAS=has_bias, PARTIAL=partial, DT=dt, HALVES=halves, WARPS=_CFG["WARPS"],
                                  UNROLL=_CFG["UNROLL"], EMULATE=False, PREFETCH=_CFG["PREFETCH"])
                    name = (f"sparse24-mma-{dt}-m{8 * halves}" + ("-partial" if partial else "-out")
                            + ("-bias" if has_bias else ""))
                    specs.append(CompileSpec(
                        _sparse24_mma_kernel, sig, consts, _CFG["WARPS"], _CFG["STAGES"], name, is_gemm=True,
                        expect_tensor_core=True, representative=dt == "bf16" and halves == 2 and partial,
                        divisible=("x_ptr", "v_ptr", "meta_ptr", "b_ptr", "y_ptr", "N", "K", "K_PER_SPLIT",
                                   "stride_xm", "stride_vn", "stride_mn", "stride_ys", "stride_ym"),
                        family="sparse24", regime="decode", loop_weight_bytes=loop_weight_bytes))
    return specs  # the split-K reduce specs are registered once, in sparse24_gemv.COMPILE_SPECS


COMPILE_SPECS = _specs()


def SASS_LAUNCH_PLAN(spec, m: int, n: int, k: int, density: float = 0.5):  # noqa: N802 (name the audit looks up)
    """Launches of one ``sparse24_mma`` call on an H100 (132 SMs) for ``bench/sass_audit.py``: the
    kernel (programs, average steady-state iterations, HBM bytes) and the split-K reduce."""
    if spec.name != "_sparse24_mma_kernel":
        return [reduce_launch(m, n, 1, spec.signature["y_ptr"][1:])]
    dt = spec.constexprs["DT"]
    n_tiles, s, k_per = launch_geometry(m, n, k, AuditDevice())
    halves = 1 if m <= 8 else 2
    main = next(sp for sp in COMPILE_SPECS if sp.name == spec.name and sp.constexprs["DT"] == dt
                and sp.constexprs["HALVES"] == halves and sp.constexprs["PARTIAL"] == (s > 1)
                and not sp.constexprs["HAS_BIAS"])
    w_bytes = n * (k // 2) * 2 + n * triton.cdiv(k, 32) * 4
    return splitk_plan(main, n_tiles * s, k / s / (32 * _CFG["UNROLL"]), w_bytes, m, n, k, 2, s, dt)


_VERIFIED: dict = {}


def mma_verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this kernel may serve (device, dtype): True off CUDA (the interpreter runs the tested
    EMULATE path); on CUDA, once per device and dtype, it runs a small random problem (M = 11: both
    token halves; K = 148: the tail tile) against a dense matmul; a mismatch warns and returns False, and the
    launcher uses the GEMV (M <= 2) or the tl.dot decode tile instead. (The fragment mapping follows the PTX ISA and is
    checked lane by lane in tests/test_sparse24_mma.py, but no GPU has run it in our CI.)"""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return True
    from .sparse24_gemv import _self_check_problem

    def run():
        x, values, meta, dense, shape = _self_check_problem(dtype, device)
        k = shape[1] - 12  # 148: the last tile partial
        x = (torch.cat([x] * 6)[:11, :k] * torch.arange(1, 12, device=x.device, dtype=dtype)[:, None] / 11).contiguous()
        return sparse24_mma(x, values[:, :k // 2], meta, (shape[0], k)), x.float() @ dense[:, :k].float().t()

    return self_check_once(_VERIFIED, device, dtype, run, "the 2:4 sparse tensor-core decode kernel",
                           "the tl.dot decode kernel for M <= 16")
