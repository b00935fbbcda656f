"""Masked linear layer for training with a fixed sparsity pattern: forward and both gradients.

    forward      y  [M, N] = x [M, K] @ (W ⊙ mask)^T [K, N] + b
    grad input   dX [M, K] = dY [M, N] @ (W ⊙ mask) [N, K]
    grad weight  dW [N, K] = (dY^T [N, M] @ X [M, K]) ⊙ mask      (+ db [N] = sum_m dY, fused)

The mask is a :class:`~laco_kernels.formats.PackedMask` (int32 ``[N, ceil(K/32)]``, bit
``k % 32`` of word ``k // 32``). Every program loads the ``BLOCK_N x BLOCK_K/32`` words of its
weight tile once and expands them to bits in registers, so the mask costs 1/16 of the fp16
weight's bytes and no tensor of W's size exists besides dW itself. dW is written already
masked: a pruned weight gets an exact zero gradient, so no optimizer without weight decay can
make it nonzero.

Guard (``flag=`` of :func:`masked_linear_fwd` / :func:`masked_linear_dx`, used by the ops layer
from ``GUARD_MIN_ROWS`` tokens): :func:`pruned_nonzero` tells on the device whether W is zero at
every pruned slot; the kernels then branch once per program to the plain GEMM loop (W ⊙ M == W,
the dense GEMM's instruction count) or to the masked loop. The mask in the loop costs a shared-
memory round trip plus ~3 instructions per weight element: 2.13-2.25x the dense GEMM per multiply-add
on sm_90 with 128 rows of x per program, 1.13-1.22x with the 256-row tiles that sm_80 / sm_90 launches
take where that grid keeps 3/4 of the SMs busy (``_train_tiles._wide``; docs/gpu_training_kernels.md);
recovery keeps pruned weights at exactly 0, so in practice the plain loop runs and only dW applies the
mask, to its output tile.
The dX / dW loops step over whole tiles without a bound test along the loop's dimension; when
that dimension is not a multiple of the step, the partial last step is peeled after the loop
(16-bit; the fp32 FMA tiles keep the bound test in the loop, where peeling spilled registers).
``EVEN`` (dX: N % BLOCK_N == 0; dW: M % BLOCK_M == 0, set by the launchers) leaves that step out.

Inputs fp16 / bf16 / fp32 (x and W the same dtype), fp32 accumulation, outputs in x's dtype.
fp32 inputs use ``input_precision="ieee"`` by default: on a GPU fp32 ``tl.dot`` would be TF32
(10-bit mantissa, ~1e-3 relative error), as large as the small corrections recovery learns and
far outside the 1e-4 tolerance the fp32 reference comparison holds; "tf32" is a launcher option
for speed when that is acceptable. ``HAS_MASK=False`` gives the plain (unmasked) linear with the
same tiling: the baseline of the traffic audit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import unpack_bits
from ._train_tiles import _SMS, _config, _dw_config, _dx_config


# ----------------------------------------------------------------------------------------
# configs per shape regime (decode: few rows; prefill / training: many rows)
# ----------------------------------------------------------------------------------------
# The tile tables and config rules (_config, _dx_config, _dw_config, the fp32 grid-fill tables) are in
# _train_tiles and imported above; _SMS here is what _device_sms falls back to off a GPU.


def _device_sms(t: torch.Tensor, default: int | None = None) -> int:
    """SMs of ``t``'s GPU; off a GPU (the interpreter) ``default``, else this module's ``_SMS``."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _SMS if default is None else default


@triton.jit
def _grouped_pid(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Tutorial grouped ordering: GROUP row tiles share the column tiles they sweep (L2 reuse)."""
    grid_r = tl.cdiv(n_rows, BLOCK_R)
    grid_c = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP * grid_c
    group_id = pid // per_group
    first_r = group_id * GROUP
    size = tl.minimum(grid_r - first_r, GROUP)
    pid_r = first_r + ((pid % per_group) % size)
    pid_c = (pid % per_group) // size
    return pid_r, pid_c


@triton.jit
def _load_tile_words(bits_ptr, offs_n, k0, N, K, stride_bn, BLOCK_K: tl.constexpr, ROW_BOUND: tl.constexpr = True):
    """The BLOCK_K // 32 packed words per row covering columns k0 .. k0 + BLOCK_K (one load each).

    Serves the mask bits and the 2:4 metadata alike (both hold 32 columns per int32 word);
    words past a row's end load as 0. ROW_BOUND=False: every row of offs_n is known to be < N.
    """
    words_k = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    ok = words_k[None, :] < tl.cdiv(K, 32)
    if ROW_BOUND:
        ok = ok & (offs_n[:, None] < N)
    return tl.load(bits_ptr + offs_n[:, None] * stride_bn + words_k[None, :], mask=ok, other=0)


@triton.jit
def _masked_w_tile(w_ptr, bits_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_wk, stride_bn,
                   HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ROW_BOUND: tl.constexpr = True):
    """(W ⊙ mask)[offs_n, k0 + offs_k] as a [BLOCK_N, BLOCK_K] tile in W's dtype (ROW_BOUND=False:
    every row of offs_n is known to be < N, no test)."""
    kk = k0 + offs_k
    inside = kk[None, :] < K
    if ROW_BOUND:
        inside = inside & (offs_n[:, None] < N)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk, mask=inside, other=0.0)
    if HAS_MASK:
        words = _load_tile_words(bits_ptr, offs_n, k0, N, K, stride_bn, BLOCK_K, ROW_BOUND)
        w = tl.where(unpack_bits(words, BLOCK_N, BLOCK_K) != 0, w, tl.zeros_like(w))
    return w


@triton.jit
def _fwd_loop(acc, x_ptr, w_ptr, bits_ptr, offs_m, offs_n, M, N, K,
              stride_xm, stride_xk, stride_wn, stride_wk, stride_bn,
              HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[offs_m, :] @ (W ⊙ mask)[offs_n, :]^T over all of K (HAS_MASK=False: plain W)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = _masked_w_tile(w_ptr, bits_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_wk, stride_bn,
                           HAS_MASK, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _masked_linear_fwd_kernel(x_ptr, w_ptr, bits_ptr, flag_ptr, b_ptr, y_ptr, M, N, K,
                              stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_ym, stride_yn,
                              HAS_MASK: tl.constexpr, GUARDED: tl.constexpr, HAS_BIAS: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] = x[M, K] @ (W ⊙ mask)[N, K]^T + b; one [BLOCK_M, BLOCK_N] tile per program.

    GUARDED (with HAS_MASK): ``flag_ptr`` holds :func:`pruned_nonzero`'s verdict. 0 (W is zero at
    every pruned slot, so W ⊙ mask == W): the plain GEMM loop, no mask work; else the masked
    loop. The branch is uniform per program, taken once before the loop.
    """
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GUARDED:
        if tl.load(flag_ptr) != 0:
            acc = _fwd_loop(acc, x_ptr, w_ptr, bits_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk,
                            stride_wn, stride_wk, stride_bn, True, DOT_PRECISION, BLOCK_N, BLOCK_K)
        else:
            acc = _fwd_loop(acc, x_ptr, w_ptr, bits_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk,
                            stride_wn, stride_wk, stride_bn, False, DOT_PRECISION, BLOCK_N, BLOCK_K)
    else:
        acc = _fwd_loop(acc, x_ptr, w_ptr, bits_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk,
                        stride_wn, stride_wk, stride_bn, HAS_MASK, DOT_PRECISION, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _dx_tiles(dy_ptr, w_ptr, n0, left, dy_off, w_off, rows, m_ok, k_ok, stride_dyn, stride_wn, BOUND: tl.constexpr):
    """One step of the plain dX loop: dY [BLOCK_M, BLOCK_N] and W [BLOCK_N, BLOCK_K] at rows n0.. of
    the reduction; BOUND: only ``left`` rows remain."""
    if BOUND:
        dy = tl.load(dy_ptr + n0 * stride_dyn + dy_off, mask=m_ok & (rows[None, :] < left), other=0.0)
        w = tl.load(w_ptr + n0 * stride_wn + w_off, mask=(rows[:, None] < left) & k_ok, other=0.0)
    else:
        dy = tl.load(dy_ptr + n0 * stride_dyn + dy_off, mask=m_ok, other=0.0)
        w = tl.load(w_ptr + n0 * stride_wn + w_off, mask=k_ok, other=0.0)
    return dy, w


@triton.jit
def _dx_loop(acc, dy_ptr, w_ptr, bits_ptr, offs_m, k0, M, N, K,
             stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, HAS_MASK: tl.constexpr,
             EVEN: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += dY[offs_m, :] @ (W ⊙ mask)[:, k0:k0+BLOCK_K] over all of N (HAS_MASK=False: plain W).

    Plain loop: loop-invariant offset tensors plus scalar base pointers moved each step, no bound
    test along N (sm_90, 16-bit prefill: 98 loop instructions, 0.96x the dense GEMM per multiply-add;
    99 when N % BLOCK_N != 0 and the last step is peeled, 122 with the bound test in the loop)."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, BLOCK_N)
    kk = k0 + offs_k
    dy_off = offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn
    w_off = rows[:, None] * stride_wn + kk[None, :] * stride_wk
    m_ok = offs_m[:, None] < M
    k_ok = kk[None, :] < K
    if HAS_MASK:  # (per-element offsets: fewer instructions here than the moving base pointers)
        # 16-bit: whole steps without a bound test along N, a partial last step peeled (fp32 keeps the test)
        n_full = N if (EVEN or dy_ptr.dtype.element_ty == tl.float32) else N - N % BLOCK_N
        for n0 in range(0, n_full, BLOCK_N):
            offs_n = n0 + rows
            if dy_ptr.dtype.element_ty == tl.float32 and not EVEN:
                dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                             mask=m_ok & (offs_n[None, :] < N), other=0.0)
                w = _masked_w_tile(w_ptr, bits_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_wk, stride_bn,
                                   True, BLOCK_N, BLOCK_K)
            else:
                dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=m_ok,
                             other=0.0)
                w = _masked_w_tile(w_ptr, bits_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_wk, stride_bn,
                                   True, BLOCK_N, BLOCK_K, False)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        if n_full < N:  # 16-bit, not EVEN: the partial last step
            offs_n = n_full + rows
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=m_ok & (offs_n[None, :] < N), other=0.0)
            w = _masked_w_tile(w_ptr, bits_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_wk, stride_bn,
                               True, BLOCK_N, BLOCK_K)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    elif (not EVEN) and (dy_ptr.dtype.element_ty == tl.float32):
        # fp32 (FMA tiles): the bound test stays in the loop (peeling the last step spilled 8 bytes
        # in the 64 x 64 tile on sm_90, for 1.04x -> 1.03x of the dense GEMM)
        for n0 in range(0, N, BLOCK_N):
            dy, w = _dx_tiles(dy_ptr, w_ptr, n0, N - n0, dy_off, w_off, rows, m_ok, k_ok, stride_dyn, stride_wn, True)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    else:
        # whole BLOCK_N steps without a bound test along N; a partial last step (not EVEN) peeled
        # after the loop, so the steady loop is the EVEN one for every N
        n_full = N if EVEN else N - N % BLOCK_N
        for n0 in range(0, n_full, BLOCK_N):
            dy, w = _dx_tiles(dy_ptr, w_ptr, n0, N - n0, dy_off, w_off, rows, m_ok, k_ok, stride_dyn, stride_wn, False)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        if not EVEN:
            if n_full < N:
                dy, w = _dx_tiles(dy_ptr, w_ptr, n_full, N - n_full, dy_off, w_off, rows, m_ok, k_ok, stride_dyn,
                                  stride_wn, True)
                acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _masked_linear_dx_kernel(dy_ptr, w_ptr, bits_ptr, flag_ptr, dx_ptr, M, N, K,
                             stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_dxm, stride_dxk,
                             HAS_MASK: tl.constexpr, GUARDED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, EVEN: tl.constexpr):
    """dX[M, K] = dY[M, N] @ (W ⊙ mask)[N, K]; one [BLOCK_M, BLOCK_K] tile per program, loop over N.

    GUARDED: as in :func:`_masked_linear_fwd_kernel` (flag 0: the plain GEMM loop)."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if GUARDED:
        if tl.load(flag_ptr) != 0:
            acc = _dx_loop(acc, dy_ptr, w_ptr, bits_ptr, offs_m, k0, M, N, K, stride_dym, stride_dyn,
                           stride_wn, stride_wk, stride_bn, True, EVEN, DOT_PRECISION, BLOCK_N, BLOCK_K)
        else:
            acc = _dx_loop(acc, dy_ptr, w_ptr, bits_ptr, offs_m, k0, M, N, K, stride_dym, stride_dyn,
                           stride_wn, stride_wk, stride_bn, False, EVEN, DOT_PRECISION, BLOCK_N, BLOCK_K)
    else:
        acc = _dx_loop(acc, dy_ptr, w_ptr, bits_ptr, offs_m, k0, M, N, K, stride_dym, stride_dyn,
                       stride_wn, stride_wk, stride_bn, HAS_MASK, EVEN, DOT_PRECISION, BLOCK_N, BLOCK_K)
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + kk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (kk[None, :] < K))


@triton.jit
def _dw_tiles(dy_ptr, x_ptr, m0, left, dy_off, x_off, rows, n_ok, k_ok, stride_dym, stride_xm,
              BOUND: tl.constexpr):
    """One step of the dW loop: dY^T [BLOCK_N, BLOCK_M] and X [BLOCK_M, BLOCK_K] at rows m0..;
    BOUND: only ``left`` rows remain."""
    if BOUND:
        dyt = tl.load(dy_ptr + m0 * stride_dym + dy_off, mask=(rows[None, :] < left) & n_ok, other=0.0)
        x = tl.load(x_ptr + m0 * stride_xm + x_off, mask=(rows[:, None] < left) & k_ok, other=0.0)
    else:
        dyt = tl.load(dy_ptr + m0 * stride_dym + dy_off, mask=n_ok, other=0.0)
        x = tl.load(x_ptr + m0 * stride_xm + x_off, mask=k_ok, other=0.0)
    return dyt, x


@triton.jit
def _dw_loop(dy_ptr, x_ptr, offs_n, offs_k, M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk,
             EVEN: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """(dY^T X)[offs_n, offs_k] in fp32 over all of M (the dW / dV GEMM loop).

    No bound test along M in the loop (16-bit: a partial last step is peeled; EVEN, M % BLOCK_M
    == 0, leaves it out); the other bounds are loop-invariant (sm_90, 16-bit: see the audit's "even" specs)."""
    rows = tl.arange(0, BLOCK_M)
    # dY^T tile [BLOCK_N, BLOCK_M] read straight from dY [M, N] through its strides
    dy_off = rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn
    x_off = rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    n_ok = offs_n[:, None] < N
    k_ok = offs_k[None, :] < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if (not EVEN) and (x_ptr.dtype.element_ty == tl.float32):
        # fp32 (FMA tiles): the bound test stays in the loop (peeling the last step spilled 36
        # bytes in the 128 x 64 tile on sm_90, for 1.01x -> 0.98x of the dense GEMM)
        for m0 in range(0, M, BLOCK_M):
            dyt, x = _dw_tiles(dy_ptr, x_ptr, m0, M - m0, dy_off, x_off, rows, n_ok, k_ok,
                               stride_dym, stride_xm, True)
            acc = tl.dot(dyt, x, acc, input_precision=DOT_PRECISION)
    else:
        # whole BLOCK_M steps without a bound test along M; a partial last step (not EVEN) peeled
        # after the loop, so the steady loop is the EVEN one for every M
        m_full = M if EVEN else M - M % BLOCK_M
        for m0 in range(0, m_full, BLOCK_M):
            dyt, x = _dw_tiles(dy_ptr, x_ptr, m0, M - m0, dy_off, x_off, rows, n_ok, k_ok,
                               stride_dym, stride_xm, False)
            acc = tl.dot(dyt, x, acc, input_precision=DOT_PRECISION)
        if not EVEN:
            if m_full < M:
                dyt, x = _dw_tiles(dy_ptr, x_ptr, m_full, M - m_full, dy_off, x_off, rows, n_ok, k_ok,
                                   stride_dym, stride_xm, True)
                acc = tl.dot(dyt, x, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _masked_linear_dw_kernel(dy_ptr, x_ptr, bits_ptr, dw_ptr, db_ptr, M, N, K,
                             stride_dym, stride_dyn, stride_xm, stride_xk, stride_bn, stride_dwn, stride_dwk,
                             HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, EVEN: tl.constexpr):
    """dW[N, K] = (dY^T @ X) ⊙ mask, one [BLOCK_N, BLOCK_K] tile per program, loop over M.

    With HAS_BIAS the programs of the first K tile also write db[N] = sum_m dY, in a loop of
    their own before the GEMM loop (:func:`_bias_grad_rows`): summing each dY tile inside the GEMM
    loop cost every program a cross-thread reduction per step (the audit's loop went from 128 to
    284 instructions), while the separate loop reads dY once in all, like a reduction kernel.
    (Placed after the GEMM loop it kept predicates live across it: 145 instructions instead of 127.)
    """
    pid_n, pid_k = _grouped_pid(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if HAS_BIAS:
        if pid_k == 0:
            _bias_grad_rows(dy_ptr, db_ptr, offs_n, M, N, stride_dym, stride_dyn, BLOCK_M, BLOCK_N)
    acc = _dw_loop(dy_ptr, x_ptr, offs_n, offs_k, M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk,
                   EVEN, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_MASK:
        words = _load_tile_words(bits_ptr, offs_n, pid_k * BLOCK_K, N, K, stride_bn, BLOCK_K)
        acc = tl.where(unpack_bits(words, BLOCK_N, BLOCK_K) != 0, acc, 0.0)
    tl.store(dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk, acc.to(dw_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


@triton.jit
def _bias_grad_rows(dy_ptr, db_ptr, offs_n, M, N, stride_dym, stride_dyn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """db[offs_n] = sum over the M rows of dY[:, offs_n], fp32 accumulation (a 2-D partial sum, one
    reduction across threads at the end)."""
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        part += tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    tl.store(db_ptr + offs_n, tl.sum(part, axis=0).to(db_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _pruned_nonzero_kernel(w_ptr, bits_ptr, flag_ptr, N, K, stride_wn, stride_wk, stride_bn,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """flag[0] = 1 if rows [pid * BLOCK_N, +BLOCK_N) of W hold an entry that is not 0 (NaN
    included) where the mask bit is 0. A read of W and its bits: the loop walks K, ORs the
    violations into a register tile and reduces once at the end."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    bad = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int1)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
        keep = unpack_bits(_load_tile_words(bits_ptr, offs_n, k0, N, K, stride_bn, BLOCK_K), BLOCK_N, BLOCK_K)
        bad = bad | ((w != 0) & (keep == 0))
    if tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0:  # any program may write; all write 1
        tl.store(flag_ptr, 1)


# ----------------------------------------------------------------------------------------
# host launchers (2-D tensors, any strides; the ops layer validates and reshapes)
# ----------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype, input_precision: str | None) -> str:
    if input_precision is None:
        return "ieee"
    if input_precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"input_precision must be 'ieee', 'tf32' or 'tf32x3', got {input_precision!r}")
    return input_precision


def _bits_args(bits: torch.Tensor | None, like: torch.Tensor):
    if bits is None:  # HAS_MASK=False: any int32 pointer, never read
        return like.new_empty(1, dtype=torch.int32), 0
    if bits.stride(1) != 1:
        bits = bits.contiguous()
    return bits, bits.stride(0)


# Guarded launches (``flag=`` of the fwd / dX launchers) pay one read of W and its bits for the
# check; at <= 64 rows the GEMM itself is about one read of W, so the check would cost as much as
# it saves: the ops layer guards only above this many rows (tokens).
GUARD_MIN_ROWS = 65
_CHECK_CFG = dict(BLOCK_N=8, BLOCK_K=256, num_warps=4)


def pruned_nonzero(weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """int32 ``[1]`` on weight's device: 1 if some ``weight[n, k]`` is not 0 (or is NaN) where the
    mask ``bits`` (int32 ``[N, ceil(K/32)]``) has a 0, else 0. Asynchronous (no host sync): the
    guarded fwd / dX kernels read it on the device.

    Why: an optimizer step with dW = (dY^T X) ⊙ M never makes a pruned weight nonzero when it
    starts at zero (SGD, momentum, Adam, AdamW, weight decay of a zero are all zero), so in
    recovery W ⊙ M == W; with flag 0 the fwd / dX kernels run the plain GEMM loop, with flag 1
    (W changed outside the optimizer, or was never zeroed) the masked loop: exact either way."""
    n, k = weight.shape
    flag = torch.zeros(1, dtype=torch.int32, device=weight.device)
    if n == 0 or k == 0:
        return flag
    bits, sbn = _bits_args(bits, weight)
    c = _CHECK_CFG
    grid = (triton.cdiv(n, c["BLOCK_N"]),)
    _pruned_nonzero_kernel[grid](weight, bits, flag, n, k, weight.stride(0), weight.stride(1), sbn,
                                 BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"])
    return flag


def _flag_args(flag: torch.Tensor | None, has_mask: bool, like: torch.Tensor):
    if flag is None or not has_mask:
        return like.new_empty(1, dtype=torch.int32), False
    if flag.dtype != torch.int32 or flag.numel() != 1 or flag.device != like.device:
        raise ValueError("flag must be the int32 [1] tensor of pruned_nonzero on the inputs' device")
    return flag, True


def masked_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor | None,
                      bias: torch.Tensor | None = None, input_precision: str | None = None,
                      flag: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] ⊙ bits)^T + bias [N] -> y [M, N] in x's dtype (bits=None: no mask).

    flag: :func:`pruned_nonzero` of (weight, bits): the kernel skips the mask when it is 0."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    has_mask = bits is not None
    bits, sbn = _bits_args(bits, x)
    flag, guarded = _flag_args(flag, has_mask, x)
    from .dense_gemm import device_arch

    cfg = _config(m, x.dtype, n, _device_sms(x), k, device_arch(x.device))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _masked_linear_fwd_kernel[grid](
        x, weight, bits, flag, bias if bias is not None else y, y, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sbn, y.stride(0), y.stride(1),
        HAS_MASK=has_mask, GUARDED=guarded, HAS_BIAS=bias is not None,
        DOT_PRECISION=_precision(x.dtype, input_precision), **cfg)
    return y


def masked_linear_dx(dy: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor | None,
                     input_precision: str | None = None, flag: torch.Tensor | None = None) -> torch.Tensor:
    """dY [M, N] @ (weight [N, K] ⊙ bits) -> dX [M, K] in dY's dtype (bits=None: no mask).

    flag: as in :func:`masked_linear_fwd`."""
    m, n = dy.shape
    k = weight.shape[1]
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    has_mask = bits is not None
    bits, sbn = _bits_args(bits, dy)
    flag, guarded = _flag_args(flag, has_mask, dy)
    from .dense_gemm import device_arch

    cfg = _dx_config(m, dy.dtype, k, _device_sms(dy), n, device_arch(dy.device))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _masked_linear_dx_kernel[grid](
        dy, weight, bits, flag, dx, m, n, k,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), sbn, dx.stride(0), dx.stride(1),
        HAS_MASK=has_mask, GUARDED=guarded, DOT_PRECISION=_precision(dy.dtype, input_precision),
        EVEN=n % cfg["BLOCK_N"] == 0, **cfg)
    return dx


def masked_linear_dw(dy: torch.Tensor, x: torch.Tensor, bits: torch.Tensor | None, want_bias: bool = False,
                     bias_dtype: torch.dtype | None = None, input_precision: str | None = None):
    """(dY [M, N]^T @ x [M, K]) ⊙ bits -> (dW [N, K] in x's dtype, db [N] or None).

    db (in ``bias_dtype``, default x's dtype) = sum over M of dY, computed in the same pass.
    """
    m, n = dy.shape
    k = x.shape[1]
    dw = torch.empty(n, k, dtype=x.dtype, device=x.device)
    db = torch.empty(n, dtype=bias_dtype or x.dtype, device=x.device) if want_bias else None
    if m == 0:
        dw.zero_()
        if db is not None:
            db.zero_()
        return dw, db
    has_mask = bits is not None
    bits, sbn = _bits_args(bits, x)
    cfg = _dw_config(n, x.dtype, k, _device_sms(x))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _masked_linear_dw_kernel[grid](
        dy, x, bits, dw, db if db is not None else dw, m, n, k,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), sbn, dw.stride(0), dw.stride(1),
        HAS_MASK=has_mask, HAS_BIAS=want_bias, DOT_PRECISION=_precision(x.dtype, input_precision),
        EVEN=m % cfg["BLOCK_M"] == 0, **cfg)
    return dw, db


# compile checks: every kernel at every config it can launch (kernels/_masked_specs.py)
from ._masked_specs import (REGIMES, _TYPES, _UNIT_STRIDES, _arch_variants, _check_spec, _compile_specs,  # noqa: E402,F401
                            _spec, _tile_variants, tile_bytes_dense, tile_bytes_masked)

COMPILE_SPECS = _compile_specs()
