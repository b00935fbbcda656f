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

from ._compile import CompileSpec
from ._splitk import _TL, REDUCE_SPECS, choose_splits, reduce_launch, reduce_partials

GEMV_MAX_M = 3  # the GEMV repeats its work per token: predicted faster than the tl.dot kernel up to M = 3 (docs)
_CFG = dict(BLOCK_N=32, BLOCK_W=4, UNROLL=8, num_warps=8)  # 32 rows x 1024 columns per loop iteration


@triton.jit
def _as_f32(bits, DT: tl.constexpr):
    """Low 16 bits of an integer tensor, read as DT (fp16 / bf16), widened to fp32."""
    if DT == "bf16":  # bf16 -> fp32 is a 16-bit left shift of the bits
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _gemv24_step(acc, x_ptrs, v_ptrs, w_ptrs, shifts, g, K, MASKED: tl.constexpr, DT: tl.constexpr):
    """One [BLOCK_N, BLOCK_W, 8]-group step. 16-bit: x_ptrs -> int64 x words, v_ptrs -> int32 pairs.
    fp32: x_ptrs -> x row, v_ptrs -> values row (both indexed here from g)."""
    ok = g < K // 4
    if MASKED:
        words = tl.load(w_ptrs, mask=ok, other=0)
    else:
        words = tl.load(w_ptrs)
    t = words >> shifts  # nibble of this group in bits 0..3
    if DT == "fp32":
        i0 = t & 3
        i1 = (t >> 2) & 3
        v0 = tl.load(v_ptrs + 2 * g, mask=ok, other=0.0)
        v1 = tl.load(v_ptrs + 2 * g + 1, mask=ok, other=0.0)
        x0 = tl.load(x_ptrs + 4 * g + i0, mask=ok, other=0.0)
        x1 = tl.load(x_ptrs + 4 * g + i1, mask=ok, other=0.0)
        return acc + v0 * x0 + v1 * x1
    else:
        if MASKED:
            pairs = tl.load(v_ptrs, mask=ok, other=0)
            xq = tl.load(x_ptrs, mask=ok, other=0)
        else:
            pairs = tl.load(v_ptrs)
            xq = tl.load(x_ptrs)
        # x[i] sits at bits 16 i of the group's 64-bit x word
        x0 = _as_f32(xq >> ((t & 3) * 16).to(tl.int64), DT)
        x1 = _as_f32(xq >> ((t & 12) * 4).to(tl.int64), DT)
        return acc + _as_f32(pairs, DT) * x0 + _as_f32(pairs >> 16, DT) * x1


@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, N, K, K_PER_SPLIT, stride_xm, stride_vn, stride_mn,
                          stride_ys, stride_ym, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DT: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, UNROLL: tl.constexpr):
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
    n_steps = (k_hi - k_lo) // (4 * BLOCK_G)
    for _ in range(n_steps // UNROLL):
        for u in tl.static_range(UNROLL):
            if DT == "fp32":
                acc = _gemv24_step(acc, x_ptrs, v_ptrs, w_ptrs + u * BLOCK_W, shifts, g + u * BLOCK_G, K, False, DT)
            else:
                acc = _gemv24_step(acc, x_ptrs + u * BLOCK_G, v_ptrs + u * BLOCK_G, w_ptrs + u * BLOCK_W, shifts,
                                   g, K, False, DT)
        if DT != "fp32":
            x_ptrs += UNROLL * BLOCK_G
            v_ptrs += UNROLL * BLOCK_G
        w_ptrs += UNROLL * BLOCK_W
        g += UNROLL * BLOCK_G
    # remainder: fewer than UNROLL whole steps, then a partial step (masked by g < K / 4)
    for _ in range(n_steps // UNROLL * UNROLL, tl.cdiv(k_hi - k_lo, 4 * BLOCK_G)):
        acc = _gemv24_step(acc, x_ptrs, v_ptrs, w_ptrs, shifts, g, K, True, DT)
        if DT != "fp32":
            x_ptrs += BLOCK_G
            v_ptrs += BLOCK_G
        w_ptrs += BLOCK_W
        g += BLOCK_G
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    dst = y_ptr + pid_k * stride_ys + pid_m * stride_ym + offs_n
    if PARTIAL:
        tl.store(dst, out, mask=offs_n < N)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(dst, out.to(y_ptr.dtype.element_ty), mask=offs_n < N)


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
        DT=dt, BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], UNROLL=cfg["UNROLL"], num_warps=cfg["num_warps"],
        num_stages=1)
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
                           BLOCK_N="constexpr", BLOCK_W="constexpr", UNROLL="constexpr")
                consts = dict(HAS_BIAS=has_bias, PARTIAL=partial, DT=dt, BLOCK_N=_CFG["BLOCK_N"],
                              BLOCK_W=_CFG["BLOCK_W"], UNROLL=_CFG["UNROLL"])
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
