"""Backward of the 2:4 linear layer, trained on its compressed values.

With y = x @ dense(V, meta)^T + b (``V`` the kept values ``[N, K/2]``, ``meta`` the nibble
words of :class:`~laco_kernels.formats.Sparse24Weight`):

    grad input   dX [M, K]   = dY [M, N] @ dense(V, meta) [N, K]
    grad values  dV [N, K/2] = (dY^T X) [N, K] gathered at the kept positions

Both kernels touch only the compressed weight: dX decompresses each [BLOCK_N, BLOCK_K] tile of
W in registers from BLOCK_K/2 values and BLOCK_K/32 meta words per row (16-bit: elementwise
byte permutes on [BLOCK_N, BLOCK_K/4] group words, as the 2:4 prefill forward; fp32: split and
select); dV accumulates a dense
[BLOCK_N, BLOCK_K] tile of dY^T X in fp32, selects the two kept entries of every group of 4 in
registers and stores only the [BLOCK_N, BLOCK_K/2] values. An optimizer therefore holds state
for the kept half only, and the pruned half can never be revived.

Inputs fp16 / bf16 / fp32, fp32 accumulation, outputs in the input dtype; fp32 uses
``input_precision="ieee"`` by default (see masked_gemm.py for why).
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._bits import decode_24_nibbles, expand_24, expand_24_prmt
from ._compile import _is_interpreted
from ._train_tiles import _SMS, _tile_family  # _SMS: the grid-fill rule's SM count off a GPU (tests patch it here)
from .masked_gemm import (_bias_grad_rows, _device_sms, _dw_config, _dw_loop, _dx_config, _grouped_pid,
                          _load_tile_words, _precision)


@triton.jit
def _dense_w_tile(v_ptr, meta_ptr, offs_n, k0, N, K, stride_vn, stride_vk, stride_mn,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dense(V, meta)[offs_n, k0:k0+BLOCK_K] as a [BLOCK_N, BLOCK_K] tile in V's dtype.

    Reads BLOCK_K / 2 values and BLOCK_K / 32 meta words per row; padding groups past K decode
    from zero words to position 0 and take a zero value, so they contribute nothing.
    """
    offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk,
                mask=(offs_n[:, None] < N) & (offs_v[None, :] < K // 2), other=0.0)
    return expand_24(v, _load_tile_words(meta_ptr, offs_n, k0, N, K, stride_mn, BLOCK_K), BLOCK_N, BLOCK_K)


@triton.jit
def _dx24_tiles(dy_ptr, v_ptr, meta_ptr, lut_ptr, n0, left, k0, N, K, g, g_shift, rows, m_ok, gk_ok, dy_off,
                stride_dyn, stride_vn, stride_vk, stride_mn, BOUND: tl.constexpr, EMULATE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of the 2:4 dX loop: the dY tile [BLOCK_M, BLOCK_N] at rows n0.. of the reduction and the
    expanded weight tile [BLOCK_N, BLOCK_K]; BOUND: only ``left`` rows remain (the peeled last step)."""
    if BOUND:
        dy = tl.load(dy_ptr + n0 * stride_dyn + dy_off, mask=m_ok & (rows[None, :] < left), other=0.0)
    else:
        dy = tl.load(dy_ptr + n0 * stride_dyn + dy_off, mask=m_ok, other=0.0)
    if v_ptr.dtype.element_ty == tl.int32:
        if BOUND:
            g_ok = (rows[:, None] < left) & gk_ok
        else:
            g_ok = gk_ok
        pair = tl.load(v_ptr + n0 * stride_vn + (rows[:, None] * stride_vn + g[None, :]), mask=g_ok, other=0)
        word = tl.load(meta_ptr + n0 * stride_mn + (rows[:, None] * stride_mn + (g // 8)[None, :]), mask=g_ok, other=0)
        sel = tl.load(lut_ptr + ((word >> g_shift[None, :]) & 0xF))
        w = expand_24_prmt(pair, sel, dy_ptr.dtype.element_ty, EMULATE, BLOCK_N, BLOCK_K, OPAQUE=True)
    else:
        w = _dense_w_tile(v_ptr, meta_ptr, n0 + rows, k0, N, K, stride_vn, stride_vk, stride_mn, BLOCK_N, BLOCK_K)
    return dy, w


@triton.jit
def _sparse24_dx_kernel(dy_ptr, v_ptr, meta_ptr, lut_ptr, dx_ptr, M, N, K,
                        stride_dym, stride_dyn, stride_vn, stride_vk, stride_mn, stride_dxm, stride_dxk,
                        n_per, stride_dxs,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EMULATE: tl.constexpr, EVEN: tl.constexpr,
                        SPLIT: tl.constexpr = False):
    """dX[M, K] = dY[M, N] @ dense(V, meta)[N, K]; one [BLOCK_M, BLOCK_K] tile per program.

    16-bit values come as int32 group words (``v_ptr`` int32 ``[N, K/4]``, one kept pair per
    group) and are expanded as the 2:4 prefill forward does (``_bits.expand_24_prmt``: per group
    one meta-word gather, one selector from ``lut_ptr`` and two ``prmt``, all elementwise on
    ``[BLOCK_N, BLOCK_K/4]``, no split and no layout conversion); fp32 values by ``expand_24``.

    SPLIT: the reduction over N is split in slices of ``n_per`` rows (a multiple of BLOCK_N), one
    per ``program_id(1)``; each writes its fp32 partial at ``dx_ptr + slice * stride_dxs``
    (``_splitk.reduce_partials`` sums them). Without SPLIT ``n_per`` and ``stride_dxs`` are unused.
    """
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    # the program's K columns are fixed: its groups, their meta-word columns and nibble shifts too
    g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    g_shift = (g % 8) * 4
    rows = tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    gk_ok = g[None, :] < K // 4
    dy_off = offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # whole BLOCK_N steps without a bound test along N; a partial last step (not EVEN) peeled after
    # the loop, so the steady loop is the EVEN one for every N
    if SPLIT:  # this program's slice of the reduction; only the last slice can end in a partial step
        n_lo = tl.program_id(1) * n_per
        n_full = tl.minimum(N if EVEN else N - N % BLOCK_N, n_lo + n_per)
        dx_ptr += tl.program_id(1).to(tl.int64) * stride_dxs
    else:
        n_lo = 0
        n_full = N if EVEN else N - N % BLOCK_N
    for n0 in range(n_lo, n_full, BLOCK_N):
        dy, w = _dx24_tiles(dy_ptr, v_ptr, meta_ptr, lut_ptr, n0, N - n0, k0, N, K, g, g_shift, rows, m_ok, gk_ok,
                            dy_off, stride_dyn, stride_vn, stride_vk, stride_mn, False, EMULATE, BLOCK_N, BLOCK_K)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    if not EVEN:
        peel = n_full < N
        if SPLIT:  # the partial step belongs to the last slice only
            peel = peel & (n_full < n_lo + n_per)
        if peel:
            dy, w = _dx24_tiles(dy_ptr, v_ptr, meta_ptr, lut_ptr, n_full, N - n_full, k0, N, K, g, g_shift, rows, m_ok,
                                gk_ok, dy_off, stride_dyn, stride_vn, stride_vk, stride_mn, True, EMULATE, BLOCK_N,
                                BLOCK_K)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + kk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (kk[None, :] < K))


@triton.jit
def _sparse24_dv_kernel(dy_ptr, x_ptr, meta_ptr, dv_ptr, db_ptr, M, N, K,
                        stride_dym, stride_dyn, stride_xm, stride_xk, stride_mn, stride_dvn, stride_dvk,
                        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN: tl.constexpr):
    """dV[N, K/2] = (dY^T X) at the kept positions; one [BLOCK_N, BLOCK_K/2] output tile per program.

    With HAS_BIAS the programs of the first K tile also write db[N] = sum_m dY, before the GEMM
    loop (masked_gemm._bias_grad_rows: no reduction inside the loop).
    """
    pid_n, pid_k = _grouped_pid(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if HAS_BIAS:
        if pid_k == 0:
            _bias_grad_rows(dy_ptr, db_ptr, offs_n, M, N, stride_dym, stride_dyn, BLOCK_M, BLOCK_N)
    acc = _dw_loop(dy_ptr, x_ptr, offs_n, offs_k, M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk,
                   EVEN, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    i0, i1 = decode_24_nibbles(_load_tile_words(meta_ptr, offs_n, k0, N, K, stride_mn, BLOCK_K), BLOCK_N, BLOCK_K)
    groups = tl.reshape(acc, (BLOCK_N, BLOCK_K // 4, 4))
    pos = tl.arange(0, 4)[None, None, :]
    g0 = tl.sum(tl.where(pos == i0[:, :, None], groups, 0.0), axis=2)
    g1 = tl.sum(tl.where(pos == i1[:, :, None], groups, 0.0), axis=2)
    dv = tl.reshape(tl.join(g0, g1), (BLOCK_N, BLOCK_K // 2))  # values[n, 2g + j] = kept j of group g
    offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    tl.store(dv_ptr + offs_n[:, None] * stride_dvn + offs_v[None, :] * stride_dvk, dv.to(dv_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_v[None, :] < K // 2))


# ----------------------------------------------------------------------------------------
# host launchers (2-D tensors, any strides; the ops layer validates and reshapes)
# ----------------------------------------------------------------------------------------
def _meta_arg(meta: torch.Tensor) -> torch.Tensor:
    return meta if meta.stride(1) == 1 else meta.contiguous()




def _dx24_config(m: int, dtype: torch.dtype, arch: int | None = None, k: int | None = None,
                 n: int | None = None) -> dict:
    """Tiles of the 2:4 input gradient ``dX [m, k] = dY [m, n] @ W [n, k]``.

    16-bit, m > 64: a 128 x 128 output tile with a 64-row reduction step (the expansion is
    elementwise, ``expand_24_prmt``). On sm_90 256 rows of dY per program (the 2:4 prefill
    forward's reasoning: the expansion is work per weight element, the MMA per weight element x
    BLOCK_M; sm_90 audit: 220 loop instructions, 1.08x the dense GEMM per multiply-add, where the
    128-row tile's 193 are 1.89x); where that grid leaves SMs idle the reduction is split instead
    (:func:`_dx24_splits`). sm_80-sm_89 (mma.sync holds both operands in registers; other archs keep
    the 128 x 128 tile, not audited) 256 rows with a 32-row reduction step and 2 stages: 166 loop instructions on sm_80,
    1.04x its dense GEMM per multiply-add, 0 spills (the 64-row step spills 280 bytes at 256 rows; the
    128 x 128 tile's 455 instructions were 2.86x). That needs the expansion compiled ``OPAQUE``
    (``_bits.expand_24_prmt``): otherwise Triton gives both dot operands kWidth 4 and ptxas pairs
    the weight's registers for mma.sync with about 130 moves per loop step.
    fp32 (FMA), m > 16: a 64 x 64 output tile, 8 warps, a 32-row reduction step (1.18x the dense
    GEMM per multiply-add on sm_90, against 1.38x for the 64 x 32 output tile used before) when n
    and k are multiples of 16 and 32; otherwise the same output tile with a 16-row step (1.22x; the
    32-row step spills 12-24 bytes on sm_90 without that divisibility, the 16-row one spills
    nothing on sm_80 or sm_90 whatever the divisibility of N, K and the strides).
    """
    if dtype != torch.float32 and m > 64:
        family = _tile_family(arch)  # the masked tiles' arch classes (sm_90, sm_80-sm_89, other)
        if family == 90:
            return dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
        if family == 80 or arch is None:  # (None: the interpreter runs sm_80's tile)
            return dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2)
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)  # not audited
    if dtype != torch.float32 and m <= 16:  # 128 output columns: 16 x 64 x 64 spills 8 bytes on sm_90
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    if dtype == torch.float32 and m > 16:
        wide = (n is None or n % 16 == 0) and (k is None or k % 32 == 0)
        return dict(BLOCK_M=64, BLOCK_N=32 if wide else 16, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2)
    return _dx_config(m, dtype)


_SPLIT_MAX = 4  # at most 4 slices: each adds an fp32 [M, K] partial written and read back once
_SPLIT_MIN_STEPS = 2  # and each slice keeps at least 2 loop steps (the prologue is paid per program)


def _dx24_splits(m: int, n: int, k: int, cfg: dict, sms: int = _SMS) -> int:
    """Slices of the reduction over N for a 256-row 2:4 dX launch (1: no split).

    The 256-row tile keeps the loop at the dense GEMM's cost per multiply-add but gives few
    programs at recovery's token counts (a SmolLM2 up projection at 1,024 tokens: 4 x 5 = 20 on
    132 SMs). Where the grid fills at most half the SMs and the reduction is long against dX's
    width (n >= 2k), N is split into up to ``_SPLIT_MAX`` slices of at least ``_SPLIT_MIN_STEPS``
    steps; each slice writes an fp32 [m, k] partial, so a wide dX (n < 2k) pays more in partial
    traffic than it gains. The rule follows the sm_90 step model (``bench/sass_model.py``, bf16,
    predicted us for 1, 2, 3, 4 slices): 1536 x 576 at 512 tokens 16.6 / 12.0 / 10.3 / 9.9, at
    1,024 17.2 / 13.9 / 13.0 / 13.2, at 4,096 (80 programs) 20.9 / 27.7; 11008 x 4096 at 512 tokens
    119.8 / 80.7 / 85.8, at 1,024 (128 programs) 124.1 / 143.8; 576 x 1536 at 1,024 8.6 / 14.3. sm_80's
    256-row tile (32-row step) splits by the same rule (not modelled there)."""
    if cfg["BLOCK_M"] != 256:
        return 1
    programs = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"])
    steps = triton.cdiv(n, cfg["BLOCK_N"])
    if 2 * programs > sms or n < 2 * k:
        return 1
    want = min(_SPLIT_MAX, triton.cdiv(sms, programs), max(1, steps // _SPLIT_MIN_STEPS))
    return _dx24_slices(n, cfg["BLOCK_N"], want)[0] if want > 1 else 1


def _dx24_slices(n: int, block_n: int, splits: int) -> tuple:
    """(slices, rows per slice) when the reduction over ``n`` rows is cut into about ``splits``
    slices of whole ``block_n`` steps (what the launcher launches and the step model plans)."""
    steps = triton.cdiv(n, block_n)
    per = triton.cdiv(steps, max(1, min(splits, steps)))
    return triton.cdiv(steps, per), per * block_n


def sparse24_grad_input(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape,
                        input_precision: str | None = None, splits: int | None = None) -> torch.Tensor:
    """dY [M, N] @ dense(values [N, K/2], meta) -> dX [M, K] in dY's dtype; ``shape`` = (N, K).

    ``splits`` (tests): slices of the reduction over N (:func:`_dx24_splits` by default)."""
    from ._splitk import reduce_partials
    from .sparse24_gemm import _lut

    m = dy.shape[0]
    n, k = shape
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    meta = _meta_arg(meta)
    if values.dtype in (torch.float16, torch.bfloat16):
        # int32 group words (as the 2:4 forward): unit stride along K and 4-byte aligned rows
        if values.stride(1) != 1 or values.stride(0) % 2 or values.storage_offset() % 2:
            values = values.contiguous()
        values = values.view(torch.int32)
    from .dense_gemm import device_arch

    sms = _device_sms(dy, _SMS)
    cfg = _dx24_config(m, dy.dtype, device_arch(dy.device), k, n)
    s, n_per = _dx24_slices(n, cfg["BLOCK_N"], _dx24_splits(m, n, k, cfg, sms) if splits is None else splits)
    out = torch.empty(s, m, k, dtype=torch.float32, device=dy.device) if s > 1 else dx
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]), s)
    _sparse24_dx_kernel[grid](
        dy, values, meta, _lut(dy.device), out, m, n, k, dy.stride(0), dy.stride(1), values.stride(0),
        values.stride(1), meta.stride(0), out.stride(-2), out.stride(-1), n_per, m * k,
        DOT_PRECISION=_precision(dy.dtype, input_precision), EMULATE=_is_interpreted(_sparse24_dx_kernel),
        EVEN=n % cfg["BLOCK_N"] == 0, SPLIT=s > 1, **cfg)
    return reduce_partials(out, None, dx) if s > 1 else dx


def sparse24_values_grad(dy: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, shape, want_bias: bool = False,
                         bias_dtype: torch.dtype | None = None, input_precision: str | None = None):
    """(dY [M, N]^T @ x [M, K]) at the kept positions -> (dV [N, K/2] in x's dtype, db [N] or None)."""
    m = dy.shape[0]
    n, k = shape
    dv = torch.empty(n, k // 2, dtype=x.dtype, device=x.device)
    db = torch.empty(n, dtype=bias_dtype or x.dtype, device=x.device) if want_bias else None
    if m == 0:
        dv.zero_()
        if db is not None:
            db.zero_()
        return dv, db
    meta = _meta_arg(meta)
    sms = _device_sms(dy, _SMS)
    cfg = _dw_config(n, x.dtype, k, sms)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _sparse24_dv_kernel[grid](
        dy, x, meta, dv, db if db is not None else dv, m, n, k, dy.stride(0), dy.stride(1), x.stride(0),
        x.stride(1), meta.stride(0), dv.stride(0), dv.stride(1), HAS_BIAS=want_bias,
        DOT_PRECISION=_precision(x.dtype, input_precision), EVEN=m % cfg["BLOCK_M"] == 0, **cfg)
    return dv, db


# ----------------------------------------------------------------------------------------
# compile checks (bench/compile_report.py)
# ----------------------------------------------------------------------------------------
def _compile_specs():
    from ._compile import ARCHS
    from .masked_gemm import _TYPES, REGIMES, _spec, _tile_variants
    from .sparse24_gemm import tile_bytes_24

    specs = []
    for dtype, p in _TYPES.items():
        dt = str(dtype).replace("torch.", "")
        for regime, rows in REGIMES.items():
            rep = dtype == torch.bfloat16 and regime == "prefill"
            vp = "*i32" if dtype != torch.float32 else p  # 16-bit values as int32 group words
            if dtype != torch.float32 and regime == "prefill":  # 256 rows, 32-row step (sm_80) / 64 (sm_90), split or not
                c80, c90 = _dx24_config(rows, dtype, 80), _dx24_config(rows, dtype, 90)
                cfgs = [(c80, (80,), " 256x32", False), (c80, (80,), " 256x32 split", True), (c90, (90,), "", False),
                        (c90, (90,), " split", True)]
            elif dtype == torch.float32 and regime != "decode":  # 64 x 64 output; a 16-row step without 16-divisibility
                cfgs = [(_dx24_config(rows, dtype), ARCHS, "", False),
                        (_dx24_config(rows, dtype, n=1), ARCHS, " narrow", False)]
            else:
                cfgs = [(_dx24_config(rows, dtype), ARCHS, "", False)]
            for (cfg, archs, suffix, split), even in itertools.product(cfgs, (False, True) if regime == "prefill"
                                                                        else (False,)):
                # split partials are fp32 whatever the input dtype
                spec = _spec(_sparse24_dx_kernel, dict(dy_ptr=p, v_ptr=vp, meta_ptr="*i32", lut_ptr="*i32",
                                                       dx_ptr="*fp32" if split else p),
                             cfg, dict(DOT_PRECISION="ieee", EMULATE=False, EVEN=even, SPLIT=split),
                             f"{dt} {regime}{suffix}" + (" even" if even else ""),
                             rep and suffix in ("", " split", " 256x32", " 256x32 split") and (even or regime != "prefill"), "sparse24", "train-dx",
                             tile_bytes_24)
                spec.archs = archs
                specs.append(spec)
            # the dV loop reads dY and X only (meta is read once after it): no weight bytes
            # prefill: + bias (db fused) and without (the audit's recovery-step plans: bias-free linears)
            for (t, cfg), even, bias in itertools.product(_tile_variants("dw", rows, dtype),
                                                          (False, True) if regime == "prefill" else (False,),
                                                          (True, False) if regime == "prefill" else (True,)):
                specs.append(_spec(_sparse24_dv_kernel, dict(dy_ptr=p, x_ptr=p, meta_ptr="*i32", dv_ptr=p, db_ptr=p),
                                   cfg, dict(HAS_BIAS=bias, DOT_PRECISION="ieee", EVEN=even),
                                   f"{dt} {regime}" + (" +bias" if bias else "") + (" even" if even else "") + t,
                                   bias and not t and rep and (even or regime != "prefill"), "sparse24", "train-dw"))
    return specs


COMPILE_SPECS = _compile_specs()
