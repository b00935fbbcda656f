"""Backward of the 2:4 linear layer, trained on its compressed values.

With y = x @ dense(V, meta)^T + b (``V`` the kept values ``[N, K/2]``, ``meta`` the nibble
words of :class:`~laco_kernels.formats.Sparse24Weight`):

    grad input   dX [M, K]   = dY [M, N] @ dense(V, meta) [N, K]
    grad values  dV [N, K/2] = (dY^T X) [N, K] gathered at the kept positions

Both kernels touch only the compressed weight: dX decompresses each [BLOCK_N, BLOCK_K] tile of
W in registers from BLOCK_K/2 values and BLOCK_K/32 meta words per row; dV accumulates a dense
[BLOCK_N, BLOCK_K] tile of dY^T X in fp32, selects the two kept entries of every group of 4 in
registers and stores only the [BLOCK_N, BLOCK_K/2] values. An optimizer therefore holds state
for the kept half only, and the pruned half can never be revived.

Inputs fp16 / bf16 / fp32, fp32 accumulation, outputs in the input dtype; fp32 uses
``input_precision="ieee"`` by default (see masked_gemm.py for why).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import decode_24_nibbles, expand_24
from .masked_gemm import _bias_grad_rows, _dw_config, _dx_config, _grouped_pid, _load_tile_words, _precision


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
def _sparse24_dx_kernel(dy_ptr, v_ptr, meta_ptr, dx_ptr, M, N, K,
                        stride_dym, stride_dyn, stride_vn, stride_vk, stride_mn, stride_dxm, stride_dxk,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dX[M, K] = dY[M, N] @ dense(V, meta)[N, K]; one [BLOCK_M, BLOCK_K] tile per program."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _dense_w_tile(v_ptr, meta_ptr, offs_n, k0, N, K, stride_vn, stride_vk, stride_mn, BLOCK_N, BLOCK_K)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + kk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (kk[None, :] < K))


@triton.jit
def _sparse24_dv_kernel(dy_ptr, x_ptr, meta_ptr, dv_ptr, db_ptr, M, N, K,
                        stride_dym, stride_dyn, stride_xm, stride_xk, stride_mn, stride_dvn, stride_dvk,
                        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=(offs_m[None, :] < M) & (offs_n[:, None] < N), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=DOT_PRECISION)
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


def sparse24_grad_input(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape,
                        input_precision: str | None = None) -> torch.Tensor:
    """dY [M, N] @ dense(values [N, K/2], meta) -> dX [M, K] in dY's dtype; ``shape`` = (N, K)."""
    m = dy.shape[0]
    n, k = shape
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    meta = _meta_arg(meta)
    cfg = _dx_config(m, dy.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _sparse24_dx_kernel[grid](
        dy, values, meta, dx, m, n, k, dy.stride(0), dy.stride(1), values.stride(0), values.stride(1),
        meta.stride(0), dx.stride(0), dx.stride(1), DOT_PRECISION=_precision(dy.dtype, input_precision), **cfg)
    return dx


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
    cfg = _dw_config(n, x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _sparse24_dv_kernel[grid](
        dy, x, meta, dv, db if db is not None else dv, m, n, k, dy.stride(0), dy.stride(1), x.stride(0),
        x.stride(1), meta.stride(0), dv.stride(0), dv.stride(1), HAS_BIAS=want_bias,
        DOT_PRECISION=_precision(x.dtype, input_precision), **cfg)
    return dv, db


# ----------------------------------------------------------------------------------------
# compile checks (bench/compile_report.py)
# ----------------------------------------------------------------------------------------
def _compile_specs():
    from .masked_gemm import _TYPES, REGIMES, _spec
    from .sparse24_gemm import tile_bytes_24

    specs = []
    for dtype, p in _TYPES.items():
        dt = str(dtype).replace("torch.", "")
        for regime, rows in REGIMES.items():
            rep = dtype == torch.bfloat16 and regime == "prefill"
            specs.append(_spec(_sparse24_dx_kernel, dict(dy_ptr=p, v_ptr=p, meta_ptr="*i32", dx_ptr=p),
                               _dx_config(rows, dtype), dict(DOT_PRECISION="ieee"), f"{dt} {regime}", rep,
                               "sparse24", "train-dx", tile_bytes_24))
            # the dV loop reads dY and X only (meta is read once after it): no weight bytes
            specs.append(_spec(_sparse24_dv_kernel, dict(dy_ptr=p, x_ptr=p, meta_ptr="*i32", dv_ptr=p, db_ptr=p),
                               _dw_config(rows, dtype), dict(HAS_BIAS=True, DOT_PRECISION="ieee"),
                               f"{dt} {regime} +bias", rep, "sparse24", "train-dw"))
    return specs


COMPILE_SPECS = _compile_specs()
