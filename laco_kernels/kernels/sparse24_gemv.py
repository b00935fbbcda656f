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
  loads; the meta word of each 8 groups once; x as int64 words, one per group (its 4 columns),
  loaded contiguously (no gather) and kept in L1 for the rows that share it;
- per group: ``x[i0]`` and ``x[i1]`` are picked out of the 64-bit x word with one funnel shift
  each (shift ``16 * i`` from the nibble), converted to fp32 and multiplied with the two values
  (fp32 FMA, fp32 accumulation);
- all tensors of the loop have one shape ``[BLOCK_N, BLOCK_W, 8]`` (rows, meta words, groups of
  a word), so Triton gives them one register layout: no ``convert_layout``, no STS / LDS;
- tile 32 rows x 1024 columns per iteration; the K loop is unrolled ``UNROLL`` times (pointer
  increments once per unrolled step), tiles never masked in the loop (rows past N are clamped to row N - 1 and dropped at the store; the
  K remainder runs after the loop with masks);
- grid ``(M, N / BLOCK_N, S)``: tokens are the fastest axis, so the programs of the M tokens
  read the same weight tile at the same time (from L2 after the first); split-K ``S`` gives about
  one program per SM; partials are summed by ``_splitk.reduce_partials`` (one small kernel).

Cost: the steady-state loop on sm_90 issues 3.4 (fp16) / 3.2 (bf16) thread-instructions per
compressed weight byte, no STS / LDS (old kernel: 12.0, 64 STS); docs/gpu_decode_kernels.md has
the counts and the audit's predictions. Each further token repeats the per-value work, so the
launcher uses this kernel up to ``GEMV_MAX_M`` tokens.
fp32 weights take a plain gather path (correct, not tuned).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compile import CompileSpec, _is_interpreted
from ._splitk import _TL, REDUCE_SPECS, choose_splits, reduce_launch, reduce_partials, store_gemv_row

GEMV_MAX_M = 1  # predicted faster than the tl.dot decode tile only at M = 1 (10.3 vs 12.9 us at 4096 x 4096; M = 2: 13.5 vs 13.0; docs)
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
def _gemv24_step(acc, x_ptrs, v_ptrs, w_ptrs, shifts, g, K, MASKED: tl.constexpr, DT: tl.constexpr,
                 EMULATE: tl.constexpr):
    """One step over BLOCK_N rows x 8 * BLOCK_W groups.

    fp32: tensors [BLOCK_N, BLOCK_W, 8], one group each; x_ptrs -> x row, v_ptrs -> values row
    (indexed here from g). 16-bit: tensors [BLOCK_N, BLOCK_W, 4], element q holds groups q and
    q + 4 of a meta word (g is group q); x_ptrs -> int64 x words, v_ptrs -> int32 pairs, both at group q.
    """
    ok = g < K // 4
    if MASKED:
        words = tl.load(w_ptrs, mask=ok, other=0)
    else:
        words = tl.load(w_ptrs)
    t = words >> shifts  # nibble of group q in bits 0..3 (16-bit: of group q + 4 in bits 16..19)
    if DT == "fp32":
        i0 = t & 3
        i1 = (t >> 2) & 3
        v0 = tl.load(v_ptrs + 2 * g, mask=ok, other=0.0)
        v1 = tl.load(v_ptrs + 2 * g + 1, mask=ok, other=0.0)
        x0 = tl.load(x_ptrs + 4 * g + i0, mask=ok, other=0.0)
        x1 = tl.load(x_ptrs + 4 * g + i1, mask=ok, other=0.0)
        return acc + v0 * x0 + v1 * x1
    else:
        ok4 = (g + 4) < K // 4
        if MASKED:
            pa = tl.load(v_ptrs, mask=ok, other=0)
            pb = tl.load(v_ptrs + 4, mask=ok4, other=0)
            xa = tl.load(x_ptrs, mask=ok, other=0)
            xb = tl.load(x_ptrs + 4, mask=ok4, other=0)
        else:
            pa = tl.load(v_ptrs)
            pb = tl.load(v_ptrs + 4)
            xa = tl.load(x_ptrs)
            xb = tl.load(x_ptrs + 4)
        if EMULATE:
            # x[i] is bytes 2i, 2i+1 of the group's 8 x bytes. Both groups' byte-permute selectors at
            # once, one per 16-bit half: nibbles (2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1) = 0x1010 + 0x22 i0 +
            # 0x2200 i1; i0 | i1 << 8 per half is (t & 0x00030003) + (t & 0x000C000C) * 64.
            sel = ((t & 0x00030003) + (t & 0x000C000C) * 64) * 0x22 + 0x10101010
            sa = _prmt(xa.to(tl.int32), (xa >> 32).to(tl.int32), sel, EMULATE)
            sb = _prmt(xb.to(tl.int32), (xb >> 32).to(tl.int32), sel >> 16, EMULATE)
            acc = acc + _as_f32(pa, DT) * _as_f32(sa, DT) + _as_f32(pa >> 16, DT) * _as_f32(sa >> 16, DT)
            return acc + _as_f32(pb, DT) * _as_f32(sb, DT) + _as_f32(pb >> 16, DT) * _as_f32(sb >> 16, DT)
        else:
            # the same steps in one asm block, so LLVM cannot pack the halves of different groups
            # into one register before converting them (its SLP pass did: 2 extra PRMT per group)
            args = [t, xa.to(tl.int32), (xa >> 32).to(tl.int32), xb.to(tl.int32), (xb >> 32).to(tl.int32), pa, pb, acc]
            if DT == "bf16":
                return tl.inline_asm_elementwise(_GROUPS_ASM_BF16, "=f,r,r,r,r,r,r,r,f", args, dtype=tl.float32,
                                                 is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise(_GROUPS_ASM_FP16, "=f,r,r,r,r,r,r,r,f", args, dtype=tl.float32,
                                                 is_pure=True, pack=1)


# two 2:4 groups on the GPU: $1 = meta bits with group a's nibble at 0-3 and group b's at 16-19
# (other bits ignored), $2 $3 / $4 $5 = x bytes 0-3, 4-7 of group a / b, $6 / $7 = kept pairs
# v0 | v1 << 16 of a / b, $8 = accumulator; $0 = $8 + the four products, in fp32 (exact products,
# fp32 sums: the contract of reference.py). 8 instructions pick the four x (selectors of both
# groups in one register), then 8 conversions and 4 FMA.
_SEL2 = ("and.b32 s, $1, 0x00030003; and.b32 u, $1, 0x000C000C; mad.lo.u32 s, u, 64, s; "
         "mad.lo.u32 s, s, 34, 0x10101010; prmt.b32 xa, $2, $3, s; shr.b32 s, s, 16; prmt.b32 xb, $4, $5, s; ")
_GROUPS_ASM_FP16 = tl.constexpr(
    "{ .reg .b32 s, u, xa, xb; .reg .b16 h0, h1, h2, h3, w0, w1, w2, w3; .reg .f32 f0, f1, f2, f3, g0, g1, g2, g3, r; "
    + _SEL2 + "mov.b32 {h0, h1}, xa; mov.b32 {h2, h3}, xb; mov.b32 {w0, w1}, $6; mov.b32 {w2, w3}, $7; "
    "cvt.f32.f16 f0, h0; cvt.f32.f16 f1, h1; cvt.f32.f16 f2, h2; cvt.f32.f16 f3, h3; "
    "cvt.f32.f16 g0, w0; cvt.f32.f16 g1, w1; cvt.f32.f16 g2, w2; cvt.f32.f16 g3, w3; "
    "fma.rn.f32 r, g0, f0, $8; fma.rn.f32 r, g1, f1, r; fma.rn.f32 r, g2, f2, r; fma.rn.f32 $0, g3, f3, r; }")
_GROUPS_ASM_BF16 = tl.constexpr(  # bf16 -> fp32: the bits shifted to the high half (low half: shl, high half: and)
    "{ .reg .b32 s, u, xa, xb, c0, c1, c2, c3, d0, d1, d2, d3; .reg .f32 r; " + _SEL2
    + "shl.b32 c0, xa, 16; and.b32 c1, xa, 0xffff0000; shl.b32 c2, xb, 16; and.b32 c3, xb, 0xffff0000; "
    "shl.b32 d0, $6, 16; and.b32 d1, $6, 0xffff0000; shl.b32 d2, $7, 16; and.b32 d3, $7, 0xffff0000; "
    "fma.rn.f32 r, d0, c0, $8; fma.rn.f32 r, d1, c1, r; fma.rn.f32 r, d2, c2, r; fma.rn.f32 $0, d3, c3, r; }")


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
    if DT == "fp32":
        q = tl.arange(0, 8)[None, None, :]  # one group per element
    else:
        q = tl.arange(0, 4)[None, None, :]  # groups q and q + 4 per element (one register of selectors)
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
    if DT == "fp32":
        acc = tl.zeros((BLOCK_N, BLOCK_W, 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_W, 4), dtype=tl.float32)
    n_steps = (k_hi - k_lo) // (4 * BLOCK_G)
    for _ in range(n_steps // UNROLL):
        for u in tl.static_range(UNROLL):
            if DT == "fp32":
                acc = _gemv24_step(acc, x_ptrs, v_ptrs, w_ptrs + u * BLOCK_W, shifts, g + u * BLOCK_G, K, False, DT, EMULATE)
            else:
                acc = _gemv24_step(acc, x_ptrs + u * BLOCK_G, v_ptrs + u * BLOCK_G, w_ptrs + u * BLOCK_W, shifts,
                                   g, K, False, DT, EMULATE)
        if DT != "fp32":
            x_ptrs += UNROLL * BLOCK_G
            v_ptrs += UNROLL * BLOCK_G
        w_ptrs += UNROLL * BLOCK_W
        g += UNROLL * BLOCK_G
    # remainder: fewer than UNROLL whole steps, then a partial step (masked by g < K / 4)
    for _ in range(n_steps // UNROLL * UNROLL, tl.cdiv(k_hi - k_lo, 4 * BLOCK_G)):
        acc = _gemv24_step(acc, x_ptrs, v_ptrs, w_ptrs, shifts, g, K, True, DT, EMULATE)
        if DT != "fp32":
            x_ptrs += BLOCK_G
            v_ptrs += BLOCK_G
        w_ptrs += BLOCK_W
        g += BLOCK_G
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    store_gemv_row(out, y_ptr, b_ptr, offs_n, N, pid_k, pid_m, stride_ys, stride_ym, PARTIAL, HAS_BIAS)


def launch_geometry(m: int, n: int, k: int, device, splits: int | None = None):
    """(row tiles, K slices, columns per slice) of a launch; slices are whole unrolled steps
    (``splits`` given: whole 128-column steps, so tests reach the remainder loop)."""
    chunk = _CFG["UNROLL"] * 32 * _CFG["BLOCK_W"]
    n_tiles = triton.cdiv(n, _CFG["BLOCK_N"])
    if splits is None:
        s = choose_splits(m * n_tiles, triton.cdiv(k, chunk), device)
        k_per = triton.cdiv(triton.cdiv(k, s), chunk) * chunk
    else:
        k_per = triton.cdiv(triton.cdiv(k, splits), 128) * 128
    return n_tiles, triton.cdiv(k, k_per), k_per


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
                    _sparse24_gemv_kernel, sig, consts, _CFG["num_warps"], 1, name, is_gemm=True, expect_tensor_core=False,
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
    n_tiles, s, k_per = launch_geometry(m, n, k, _AuditDevice())
    main = next(sp for sp in COMPILE_SPECS if sp.name == spec.name and sp.constexprs["DT"] == dt
                and sp.constexprs["PARTIAL"] == (s > 1) and not sp.constexprs["HAS_BIAS"])
    isz = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    chunk = _CFG["UNROLL"] * 32 * _CFG["BLOCK_W"]
    w_bytes = n * (k // 2) * isz + n * triton.cdiv(k, 32) * 4
    launches = [dict(name=main.name, spec=main, programs=m * n_tiles * s, iterations=k / s / chunk,
                     bytes=float(w_bytes) + m * k * isz  # weight from HBM once: the M tokens' programs run together
                     + (s * m * n * 4 if s > 1 else m * n * isz))]
    if s > 1:
        launches.append(reduce_launch(m, n, s, dt))
    return launches


class _AuditDevice:
    type = "cpu"  # choose_splits: no CUDA device -> 132 SMs (an H100)
