"""2:4 sparse linear ``y = x @ dense(values, meta)^T + b`` in Triton, decompressing in registers.

Weight: :class:`~laco_kernels.formats.Sparse24Weight`, values ``[N, K/2]`` (x's dtype) and
meta int32 ``[N, ceil(K/32)]`` (nibble ``g % 8`` of word ``g // 8`` = ``i0 | i1 << 2``).
Per K step a program loads its values tile ``[BLOCK_N, BLOCK_K/2]`` and meta words
``[BLOCK_N, BLOCK_K/32]`` once, rebuilds the dense ``[BLOCK_N, BLOCK_K]`` tile in registers
(``_bits.expand_24``: split the kept pairs, place each at its nibble's position with
``tl.where``) and feeds it to ``tl.dot``. The weight therefore costs 9/16 of the dense bytes in
fp16/bf16 (1/2 values + 1/16 meta), the bound of a bandwidth-limited decode step.

Tiling, split-K, grouped order, dtypes and fp32 precision are those of ``dense_gemm.py``
(shared config table ``dense_gemm.gemm_config("sparse24", ...)``).

Measured on an H100 (bench/results/gpu_gemm_graph.json, fp16, CUDA graphs, 4096 x 4096): M = 1
25 us against 11 us for the dense Triton kernel and cuBLAS: the byte saving is real (traffic
audit: 0.57 of dense) but the in-register scatter (split / where / reshape, with its layout
conversions) makes the kernel compute-bound. Removing that cost (e.g. a gather load of the values
masked to the kept columns, which compiles spill-free with 8 warps but was not timed) is open work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import expand_24
from .dense_gemm import compile_specs, grouped_pid, launch, store_tile


@triton.jit
def _sparse24_gemm_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                          stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_ys, stride_ym, stride_yn,
                          HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] (+ slice * stride_ys) = x[M, K-slice] @ dense(V, meta)[N, K-slice]^T (+ b)."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_w = tl.arange(0, BLOCK_K // 32)
    n_ok = offs_n[:, None] < N
    n_words = tl.cdiv(K, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        vk = k0 // 2 + offs_h
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + vk[None, :] * stride_vk,
                    mask=n_ok & (vk[None, :] < K // 2), other=0.0)
        wk = k0 // 32 + offs_w
        words = tl.load(meta_ptr + offs_n[:, None] * stride_mn + wk[None, :], mask=n_ok & (wk[None, :] < n_words),
                        other=0)
        w = expand_24(v, words, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ys, stride_ym, stride_yn, HAS_BIAS)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape, bias: torch.Tensor | None = None,
                    input_precision: str | None = None) -> torch.Tensor:
    """x [M, K] @ dense(values [N, K/2], meta [N, ceil(K/32)])^T + bias [N] -> y [M, N] in x's dtype.

    ``shape`` = (N, K). x and values may have any strides; meta needs unit stride along K.
    """
    n, k = shape
    if meta.stride(1) != 1:
        meta = meta.contiguous()
    return launch(_sparse24_gemm_kernel, "sparse24", x, (values, meta),
                  (values.stride(0), values.stride(1), meta.stride(0)), bias, n, k, input_precision)


def tile_bytes_24(block_n: int, block_k: int, itemsize: int, density: float = 0.5) -> float:
    """Bytes of a [block_n, block_k] 2:4 tile: block_k / 2 values and block_k / 32 int32 meta words
    per row (density is fixed at 1/2 by the format; the argument is ignored)."""
    return block_n * (block_k // 2) * itemsize + block_n * (block_k // 32) * 4


COMPILE_SPECS = compile_specs(_sparse24_gemm_kernel, "sparse24", {"v_ptr": "*{dt}", "meta_ptr": "*i32"},
                              {"stride_vn": None, "stride_vk": 1, "stride_mn": None}, tile_bytes_24)
