"""2:4 sparse GEMV for decode, ``y = x @ dense(values, meta)^T + b`` at small M, in Triton.

Weight: the canonical :class:`~laco_kernels.formats.Sparse24Weight` (values ``[N, K/2]``, meta
int32 ``[N, ceil(K/32)]``, nibble ``g % 8`` of word ``g // 8`` = ``i0 | i1 << 2``), read as is:
no derived layout, no extra memory.

Why a GEMV and not ``tl.dot``: at M <= 16 the GPU time is the weight's bytes, and rebuilding a
dense tile for ``tl.dot`` (``sparse24_gemm.py``) cost 12 thread-instructions per compressed byte
(split / where / reshape and their shared-memory layout conversions), making the kernel
compute-bound and 2.2x slower than the dense GEMM it replaces. Here nothing is rebuilt; the loop
works on the compressed pairs:

- the values are read as int32 words, one per group of 4 columns (``v0 | v1 << 16``), 128-bit
  loads (4 groups, a "quad"); the meta word of each 8 groups once; x as int64 words, one per group
  (its 4 columns), loaded contiguously (no gather) and kept in L1 for the rows that share it;
- per quad (GPU, 16-bit): the quad's nibbles become byte-permute selectors, two groups per
  register; one ``prmt`` per group picks ``x[i0] | x[i1] << 16`` out of the group's 8 x bytes;
  the products then run on the tensor cores: two ``mma.sync.m16n8k16`` per quad, the kept pairs
  as A exactly as loaded, the picked x as B, of which only the diagonal is kept (see
  ``_QUAD_MMA_FP16``): fp32 accumulation of exact products, as in ``reference.py``; ~6 instructions
  per group instead of ~15 with fp32 FMAs (conversions + FMA were most of them);
- all tensors of the loop have one shape ``[BLOCK_N, BLOCK_W, 8]`` (rows, meta words, groups of
  a word) and one register layout: no ``convert_layout``, no STS / LDS (the meta word is read by
  a one-instruction asm load so it needs no layout of its own);
- tile 32 rows x 1024 columns per iteration, 4 warps; the K loop is unrolled ``UNROLL`` times
  (pointer increments once per unrolled step), tiles never masked in the loop (rows past N are
  clamped to row N - 1 and dropped at the store; the K remainder runs after the loop with masks);
- grid ``(M, N / BLOCK_N, S)``: tokens are the fastest axis, so the programs of the M tokens
  read the same weight tile at the same time (from L2 after the first); split-K ``S`` gives about
  one program per SM; partials are summed by ``_splitk.reduce_partials`` (one small kernel).

The interpreter cannot run PTX: ``EMULATE`` (set for interpreted launches) computes the same
selectors and byte permutes with integer ops and fp32 products per group, which the tests hold
against ``reference.py``; the warp-level mma mapping is checked separately against the compiled
layout with a lane-by-lane model of the PTX fragment rules (tests/test_sparse24_gemv.py).

Cost: the steady-state loop on sm_90 issues 1.37 thread-instructions per compressed weight byte
(fp16 and bf16), no STS / LDS (first GEMV: 3.4; old tl.dot kernel: 12.0 with 64 STS);
docs/gpu_decode_kernels.md has the counts and the audit's predictions. Each further token repeats
the per-value work, so the launcher uses this kernel up to ``GEMV_MAX_M`` tokens.
fp32 weights take a plain gather path (correct, not tuned).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compile import CompileSpec, _is_interpreted
from ._selfcheck import self_check_once
from ._splitk import (_TL, REDUCE_SPECS, AuditDevice, reduce_launch, reduce_partials, slice_k, splitk_plan,
                      store_gemv_row)

GEMV_MAX_M = 2  # predicted faster than the tl.dot decode tile up to M = 2 (4096 x 4096: 8.8 vs 12.9 us at M = 1, 10.4 vs 13.0 at 2, 12.9 vs 13.0 at 3 but 34.7 vs 32.6 on 11008 x 4096; docs)
_CFG = dict(BLOCK_N=32, BLOCK_W=4, UNROLL=8, num_warps=4)  # 32 rows x 1024 columns per loop iteration


@triton.jit
def _as_f32(bits, DT: tl.constexpr):
    """Low 16 bits of an integer tensor, read as DT (fp16 / bf16), widened to fp32."""
    if DT == "bf16":  # bf16 -> fp32 is a 16-bit left shift of the bits
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _prmt(lo, hi, sel, EMULATE: tl.constexpr):
    """``prmt.b32 d, lo, hi, sel`` (default mode) on int32 tensors: byte j of d is byte
    ``sel[4j:4j+3]`` of the 8 bytes ``hi:lo`` (selector bit 3 of each nibble is never set here).
    EMULATE (the interpreter, which cannot run PTX): the same permute in plain integer ops."""
    if EMULATE:
        out = tl.zeros_like(lo)
        for j in tl.static_range(4):
            c = (sel >> (4 * j)) & 7
            byte = tl.where(c < 4, lo >> ((c & 3) * 8), hi >> ((c & 3) * 8)) & 0xFF
            out = out | (byte << (8 * j))
        return out
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sel], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _gemv24_step(acc, acc2, x_ptrs, v_ptrs, w_ptrs, shifts, g, K, MASKED: tl.constexpr, DT: tl.constexpr,
                 EMULATE: tl.constexpr):
    """One step over [BLOCK_N, BLOCK_W, 8] groups (rows, meta words, groups of a word).

    fp32: x_ptrs -> x row, v_ptrs -> values row (indexed here from g). 16-bit: x_ptrs -> int64 x
    words, v_ptrs -> int32 pairs, both at the element's group. Returns the accumulators (acc2 is
    only used by the GPU 16-bit path: the second mma of a quad, see _QUAD_MMA)."""
    ok = g < K // 4
    if MASKED:
        words = tl.load(w_ptrs, mask=ok, other=0)
    elif DT != "fp32" and not EMULATE:
        # GPU 16-bit steady state: the meta word read by a one-instruction asm load on an address
        # tensor of the quad layout. A tl.load of the [BLOCK_N, BLOCK_W, 1] words gets its own
        # layout and a shared-memory conversion to the quad layout in every step (8 STS + 16 LDS +
        # 16 BAR per iteration on sm_90); addresses are plain arithmetic, rebuilt in any layout.
        # The 4 elements of a quad share the address, so LLVM keeps one load of them.
        words = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [(w_ptrs + 0 * g).to(tl.int64)],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        words = tl.load(w_ptrs)
    if DT == "fp32":
        t = words >> shifts  # nibble of this group in bits 0..3
        i0 = t & 3
        i1 = (t >> 2) & 3
        v0 = tl.load(v_ptrs + 2 * g, mask=ok, other=0.0)
        v1 = tl.load(v_ptrs + 2 * g + 1, mask=ok, other=0.0)
        x0 = tl.load(x_ptrs + 4 * g + i0, mask=ok, other=0.0)
        x1 = tl.load(x_ptrs + 4 * g + i1, mask=ok, other=0.0)
        return acc + v0 * x0 + v1 * x1, acc2
    else:
        if MASKED:
            pairs = tl.load(v_ptrs, mask=ok, other=0)
            xq = tl.load(x_ptrs, mask=ok, other=0)
        else:
            pairs = tl.load(v_ptrs)
            xq = tl.load(x_ptrs)
        if EMULATE:
            # x[i] is bytes 2i, 2i+1 of the group's 8 x bytes: one byte permute with the selector
            # nibbles (2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1) = 0x1010 + 0x22 i0 + 0x2200 i1 packs
            # x[i0] | x[i1] << 16 (i1 sits at bits 2-3 of the nibble: (t & 12) * 0x880 = 0x2200 i1)
            t = words >> shifts
            sel = (t & 3) * 0x22 + (t & 12) * 0x880 + 0x1010
            xs = _prmt(xq.to(tl.int32), (xq >> 32).to(tl.int32), sel, EMULATE)
            return acc + _as_f32(pairs, DT) * _as_f32(xs, DT) + _as_f32(pairs >> 16, DT) * _as_f32(xs >> 16, DT), acc2
        else:
            # the quad's nibbles (groups 4 (q // 4) .. + 3) in bits 0..15
            tq = words >> ((shifts >> 4) << 4)
            args = [tq, xq.to(tl.int32), (xq >> 32).to(tl.int32), pairs, acc, acc2]
            if DT == "bf16":
                return tl.inline_asm_elementwise(_QUAD_MMA_BF16, _QUAD_CONSTRAINTS, args,
                                                 dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(_QUAD_MMA_FP16, _QUAD_CONSTRAINTS, args,
                                                 dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


# GPU 16-bit path: the products on the tensor cores, two mma.sync.m16n8k16 per quad of groups.
# Triton lays out the [BLOCK_N, BLOCK_W, 8] tensors with 4 consecutive groups per thread (one
# 128-bit load of pairs) and the lanes of a warp in row-major order, so lanes 4G..4G+3 hold the same
# row (tests/test_sparse24_gemv.py checks the TTGIR layout for that). That matches the mma fragment
# split (groupID = lane / 4, threadID_in_group = lane % 4): a quad's kept pairs p0..p3, as loaded,
# are A's a0..a3 (a0 / a2: row groupID, k = 2 tig + {0, 1} / + 8; a1 / a3: row groupID + 8), and the
# x picked for p0, p2 (first mma) or p1, p3 (second mma) are B's b0, b1 in column groupID. So the
# diagonal D[G][G] of the first mma and D[G + 8][G] of the second accumulate (fp32) the products
# of the groups the 4 lanes of the row hold; every other entry is a product of one row's values
# with another row's x, never read (_mma_diagonal keeps the diagonal). Per quad: 1 prmt for the
# quad's nibbles, 2 x 4 for the selectors (two groups per register, as 0x1010 + 0x22 i0 + 0x2200 i1
# per 16-bit half), 2 shifts, 4 prmt picking x[i0] | x[i1] << 16, 2 mma.
# Operands (pack = 4): $0-$3 / $4-$7 = the two accumulators out, $8-$11 = quad nibbles (4 copies),
# $12-$15 / $16-$19 = x bytes 0-3 / 4-7 of groups 0..3, $20-$23 = pairs, $24-$27 / $28-$31 accumulators in.
_QUAD_CONSTRAINTS = tl.constexpr("=f,=f,=f,=f,=f,=f,=f,=f," + ",".join(["r"] * 16) + "," + ",".join(["f"] * 8))
_QUAD_SEL = ("prmt.b32 u, $8, 0, 0x4140; "  # nibbles of groups 0, 1 -> bits 0-7, of groups 2, 3 -> bits 16-23
             "and.b32 s, u, 0x00030003; and.b32 v, u, 0x000C000C; mad.lo.u32 s, v, 64, s; mad.lo.u32 s, s, 34, 0x10101010; "
             "shr.b32 u, u, 4; and.b32 t, u, 0x00030003; and.b32 v, u, 0x000C000C; mad.lo.u32 t, v, 64, t; "
             "mad.lo.u32 t, t, 34, 0x10101010; "
             "prmt.b32 x0, $12, $16, s; shr.b32 s, s, 16; prmt.b32 x2, $14, $18, s; "
             "prmt.b32 x1, $13, $17, t; shr.b32 t, t, 16; prmt.b32 x3, $15, $19, t; ")
_QUAD_DECL = "{ .reg .b32 u, s, t, v, x0, x1, x2, x3; "
_QUAD_MMA_FP16 = tl.constexpr(
    _QUAD_DECL + _QUAD_SEL
    + "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$20, $21, $22, $23}, {x0, x2}, "
    "{$24, $25, $26, $27}; mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$4, $5, $6, $7}, "
    "{$20, $21, $22, $23}, {x1, x3}, {$28, $29, $30, $31}; }")
_QUAD_MMA_BF16 = tl.constexpr(
    _QUAD_DECL + _QUAD_SEL
    + "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$20, $21, $22, $23}, {x0, x2}, "
    "{$24, $25, $26, $27}; mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$4, $5, $6, $7}, "
    "{$20, $21, $22, $23}, {x1, x3}, {$28, $29, $30, $31}; }")


@triton.jit
def _mma_diagonal(acc, acc2):
    """Per quad, the row's sum a lane holds: D1[G][G] + D2[G + 8][G] in the lane with
    threadID_in_group == G / 2 (c0 + c2' for even G, c1 + c3' for odd), zero elsewhere."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 l, g, t, h; .reg .pred p, q; .reg .f32 a, b; mov.u32 l, %laneid; shr.u32 g, l, 2; "
        "and.b32 t, l, 3; shr.u32 h, g, 1; setp.eq.u32 p, t, h; and.b32 h, g, 1; setp.eq.u32 q, h, 1; "
        "selp.f32 a, $5, $4, q; selp.f32 b, $11, $10, q; add.f32 a, a, b; selp.f32 $0, a, 0f00000000, p; "
        "mov.f32 $1, 0f00000000; mov.f32 $2, 0f00000000; mov.f32 $3, 0f00000000; }",
        "=f,=f,=f,=f,f,f,f,f,f,f,f,f", [acc, acc2], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, N, K, K_PER_SPLIT, stride_xm, stride_vn, stride_mn,
                          stride_ys, stride_ym, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DT: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, UNROLL: tl.constexpr, EMULATE: tl.constexpr):
    """y[m, n-tile] (or fp32 partial of K slice pid 2) = sum over the slice of x[m, k] * W[n, k] (+ b).

    x_ptr / v_ptr / b_ptr in the weight's dtype (16-bit: x rows 8-byte and value rows 4-byte
    aligned, the launcher checks), meta_ptr int32 [N, ceil(K/32)]; strides in elements.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)[:, None, None]  # clamped: no row mask in the loop
    BLOCK_G: tl.constexpr = 8 * BLOCK_W  # groups of 4 columns per step
    w = tl.arange(0, BLOCK_W)[None, :, None]
    q = tl.arange(0, 8)[None, None, :]
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    g = k_lo // 4 + 8 * w + q  # group index of every element
    shifts = 4 * q
    if DT == "fp32":
        x_ptrs = x_ptr + pid_m * stride_xm + 0 * g
        v_ptrs = v_ptr + rows * stride_vn + 0 * g
    else:  # same bytes read as one int64 per group of x and one int32 (v0 | v1 << 16) per value pair
        x_ptrs = (x_ptr + pid_m * stride_xm).to(tl.pointer_type(tl.int64), bitcast=True) + g
        v_ptrs = (v_ptr + rows * stride_vn).to(tl.pointer_type(tl.int32), bitcast=True) + g
    w_ptrs = meta_ptr + rows * stride_mn + k_lo // 32 + w
    acc = tl.zeros((BLOCK_N, BLOCK_W, 8), dtype=tl.float32)
    acc2 = tl.zeros_like(acc)  # GPU 16-bit: the second mma's accumulator (unused otherwise)
    n_steps = (k_hi - k_lo) // (4 * BLOCK_G)
    for _ in range(n_steps // UNROLL):
        for u in tl.static_range(UNROLL):
            if DT == "fp32":
                acc, acc2 = _gemv24_step(acc, acc2, x_ptrs, v_ptrs, w_ptrs + u * BLOCK_W, shifts, g + u * BLOCK_G, K, False, DT, EMULATE)
            else:
                acc, acc2 = _gemv24_step(acc, acc2, x_ptrs + u * BLOCK_G, v_ptrs + u * BLOCK_G, w_ptrs + u * BLOCK_W, shifts,
                                   g, K, False, DT, EMULATE)
        if DT != "fp32":
            x_ptrs += UNROLL * BLOCK_G
            v_ptrs += UNROLL * BLOCK_G
        w_ptrs += UNROLL * BLOCK_W
        g += UNROLL * BLOCK_G
    # remainder: fewer than UNROLL whole steps, then a partial step (masked by g < K / 4)
    for _ in range(n_steps // UNROLL * UNROLL, tl.cdiv(k_hi - k_lo, 4 * BLOCK_G)):
        acc, acc2 = _gemv24_step(acc, acc2, x_ptrs, v_ptrs, w_ptrs, shifts, g, K, True, DT, EMULATE)
        if DT != "fp32":
            x_ptrs += BLOCK_G
            v_ptrs += BLOCK_G
        w_ptrs += BLOCK_W
        g += BLOCK_G
    if DT != "fp32" and not EMULATE:
        acc = _mma_diagonal(acc, acc2)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    store_gemv_row(out, y_ptr, b_ptr, offs_n, N, pid_k, pid_m, stride_ys, stride_ym, PARTIAL, HAS_BIAS)


def launch_geometry(m: int, n: int, k: int, device, splits: int | None = None):
    """(row tiles, K slices, columns per slice) of a launch; slices are whole unrolled steps
    (``splits`` given: whole 128-column steps, so tests reach the remainder loop)."""
    n_tiles = triton.cdiv(n, _CFG["BLOCK_N"])
    return (n_tiles,) + slice_k(m * n_tiles, k, _CFG["UNROLL"] * 32 * _CFG["BLOCK_W"], device, splits, granule=128)


def sparse24_gemv(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape, bias: torch.Tensor | None = None,
                  splits: int | None = None) -> torch.Tensor:
    """x [M, K] @ dense(values [N, K/2], meta [N, ceil(K/32)])^T + bias [N] -> y [M, N] in x's dtype.

    M should be small (the launcher routes M <= GEMV_MAX_M here). ``splits`` overrides the split-K
    choice (tests). x rows, values rows and meta rows need unit stride along K; others are copied.
    """
    n, k = shape
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    dt = _TL[x.dtype]
    if meta.stride(1) != 1:
        meta = meta.contiguous()
    # 16-bit x is read as one int64 per group (rows 8-byte aligned), 16-bit values as int32 pairs
    # (rows 4-byte aligned); anything else is copied (Triton itself specialises on 16-byte alignment)
    if x.stride(1) != 1 or (dt != "fp32" and (x.stride(0) % 4 or x.data_ptr() % 8)):
        x = x.contiguous()
    if values.stride(1) != 1 or (dt != "fp32" and (values.stride(0) % 2 or values.data_ptr() % 4)):
        values = values.contiguous()
    n_tiles, s, k_per = launch_geometry(m, n, k, x.device, splits)
    out = y if s == 1 else torch.empty(s, m, n, dtype=torch.float32, device=x.device)
    cfg = _CFG
    _sparse24_gemv_kernel[(m, n_tiles, s)](
        x, values, meta, bias if bias is not None else out, out, n, k, k_per, x.stride(0), values.stride(0),
        meta.stride(0), 0 if s == 1 else out.stride(0), out.stride(-2),
        HAS_BIAS=bias is not None and s == 1, PARTIAL=s > 1,  # partials: the reduce adds the bias
        DT=dt, BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], UNROLL=cfg["UNROLL"], EMULATE=_is_interpreted(_sparse24_gemv_kernel),
        num_warps=cfg["num_warps"], num_stages=1)
    if s > 1:
        reduce_partials(out, bias, y)
    return y


def loop_weight_bytes(dt: str):
    """Weight bytes one program loads per steady-state (unrolled) loop iteration."""
    groups = _CFG["BLOCK_N"] * _CFG["UNROLL"] * 8 * _CFG["BLOCK_W"]
    per_group = 2 * (4 if dt == "fp32" else 2) + 0.5  # two values + one nibble
    return lambda density=0.5: groups * per_group


def _specs():
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for partial in (False, True):
            for has_bias in ((False,) if partial else (False, True)):
                sig = dict(x_ptr=f"*{dt}", v_ptr=f"*{dt}", meta_ptr="*i32", b_ptr=f"*{dt}", y_ptr="*fp32" if partial else f"*{dt}",
                           N="i32", K="i32", K_PER_SPLIT="i32", stride_xm="i32", stride_vn="i32", stride_mn="i32",
                           stride_ys="i32", stride_ym="i32", HAS_BIAS="constexpr", PARTIAL="constexpr", DT="constexpr",
                           BLOCK_N="constexpr", BLOCK_W="constexpr", UNROLL="constexpr", EMULATE="constexpr")
                consts = dict(HAS_BIAS=has_bias, PARTIAL=partial, DT=dt, BLOCK_N=_CFG["BLOCK_N"],
                              BLOCK_W=_CFG["BLOCK_W"], UNROLL=_CFG["UNROLL"], EMULATE=False)
                name = f"sparse24-gemv-{dt}" + ("-partial" if partial else "-out") + ("-bias" if has_bias else "")
                specs.append(CompileSpec(
                    _sparse24_gemv_kernel, sig, consts, _CFG["num_warps"], 1, name, is_gemm=True, expect_tensor_core=dt != "fp32",
                    representative=(dt == "bf16" and partial) or (dt == "fp32" and has_bias),
                    divisible=("x_ptr", "v_ptr", "meta_ptr", "b_ptr", "y_ptr", "N", "K", "K_PER_SPLIT", "stride_xm",
                               "stride_vn", "stride_mn", "stride_ys", "stride_ym"),
                    family="sparse24", regime="decode", loop_weight_bytes=loop_weight_bytes(dt)))
    return specs + REDUCE_SPECS


COMPILE_SPECS = _specs()


def SASS_LAUNCH_PLAN(spec, m: int, n: int, k: int, density: float = 0.5):  # noqa: N802 (name the audit looks up)
    """Launches of one ``sparse24_gemv`` call on an H100 (132 SMs) for ``bench/sass_audit.py``:
    the GEMV (programs, average steady-state iterations, HBM bytes) and the split-K reduce."""
    if spec.name != "_sparse24_gemv_kernel":
        return [reduce_launch(m, n, 1, spec.signature["y_ptr"][1:])]
    dt = spec.constexprs["DT"]
    n_tiles, s, k_per = launch_geometry(m, n, k, AuditDevice())
    main = next(sp for sp in COMPILE_SPECS if sp.name == spec.name and sp.constexprs["DT"] == dt
                and sp.constexprs["PARTIAL"] == (s > 1) and not sp.constexprs["HAS_BIAS"])
    isz = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    chunk = _CFG["UNROLL"] * 32 * _CFG["BLOCK_W"]
    w_bytes = n * (k // 2) * isz + n * triton.cdiv(k, 32) * 4
    return splitk_plan(main, m * n_tiles * s, k / s / chunk, w_bytes, m, n, k, isz, s, dt)


_VERIFIED: dict = {}


def _self_check_problem(dtype: torch.dtype, device) -> tuple:
    """A small random 2:4 problem (x [2, 160], values [40, 80], meta [40, 5], dense [40, 160]) built
    by hand (no import of formats: kernels stay below it), every valid (i0, i1) pattern present."""
    gen = torch.Generator().manual_seed(1234)
    n, k = 40, 160
    combos = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    pick = combos[torch.randint(0, 6, (n, k // 4), generator=gen)]  # [n, groups, 2]
    values = torch.randn(n, k // 2, generator=gen).to(dtype)
    dense = torch.zeros(n, k // 4, 4, dtype=dtype)
    dense.scatter_(2, pick, values.view(n, k // 4, 2))
    nib = (pick[..., 0] | (pick[..., 1] << 2)).view(n, k // 32, 8).to(torch.int64)
    words = (nib << (4 * torch.arange(8))).sum(-1)
    meta = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    x = torch.randn(2, k, generator=gen).to(dtype)
    return x.to(device), values.to(device), meta.to(device), dense.view(n, k).to(device), (n, k)


def gemv_verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this GEMV may serve (device, dtype): True off CUDA (the interpreter runs the tested
    EMULATE path); on CUDA, once per device and dtype, the tensor-core path is run on a small random
    problem against a dense matmul. A mismatch (the lane mapping of its mma.sync depends on the
    layout Triton picks, checked at build time for the Triton we test with, not on every hardware and
    version) warns and returns False, and the launcher then uses the tl.dot decode kernel instead."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return True
    def run():
        x, values, meta, dense, shape = _self_check_problem(dtype, device)
        return sparse24_gemv(x, values, meta, shape), x.float() @ dense.float().t()

    return self_check_once(_VERIFIED, device, dtype, run, "the 2:4 tensor-core GEMV",
                           "the tl.dot decode kernel for M <= 2")
