"""2:4 sparse linear ``y = x @ dense(values, meta)^T + b`` in Triton, decompressing in registers.

Weight: :class:`~laco_kernels.formats.Sparse24Weight`, values ``[N, K/2]`` (x's dtype) and
meta int32 ``[N, ceil(K/32)]`` (nibble ``g % 8`` of word ``g // 8`` = ``i0 | i1 << 2``).
Per K step a program rebuilds the dense ``[BLOCK_N, BLOCK_K]`` weight tile in registers and
feeds it to ``tl.dot``; the weight costs 9/16 of the dense bytes in fp16/bf16 (1/2 values + 1/16
meta). Two decodes:

- 16-bit weights, prefill (M > 16) and decode past the GEMV (4 <= M <= 16): values read as int32 words (one kept pair per group), each
  group's meta nibble picks two byte-permute selectors from ``_bits.PRMT_LUT_24``, and
  ``_bits.expand_24_prmt`` writes the group's 4 positions with two ``prmt`` (an
  ``inline_asm_elementwise(pack=4)``; plain integer ops in the interpreter, ``EMULATE``): no
  split, no layout conversion. sm_90: 228 loop instructions per warp-iteration on 256 x 128 x 64
  tiles, 1.12x the dense kernel's per multiply-add (docs/gpu_prefill_kernels.md); sm_80 (256 x 128
  x 32): 199, 1.25x (294, 1.85x, before the asm was compiled ``OPAQUE``: mma.sync operands of
  kWidth 4 made every thread expand four threads' groups). Decode tile 16 x 64 x 256, 4 warps:
  505 loop instructions on sm_90 (587 before ``OPAQUE``), 0 STS; at 587 it was 4.1
  thread-instructions per compressed byte, predicted 1.13-1.14x the dense Triton kernel at M =
  3..16 on the Llama-7B shapes (the old decode: 862 instructions, 64 STS, 12.0 per byte, 0.62x;
  ``bench/sass_audit.py --specs 'sparse24-decode-16bit*'``). M <= 2 runs ``sparse24_gemv.py``.
- fp32: values tile ``[BLOCK_N, BLOCK_K/2]`` + meta words, expanded by
  ``_bits.expand_24`` (split the kept pairs, ``tl.where`` by nibble, reshape).

Tiling, split-K, grouped order, dtypes and fp32 precision are those of ``dense_gemm.py``
(shared config table ``dense_gemm.gemm_config("sparse24", ...)``).

Measured on an H100 before the prefill decode above (bench/results/gpu_gemm_graph.json, fp16,
CUDA graphs, 4096 x 4096): M = 1 25 us against 11 us for the dense Triton kernel, M = 4096 1187 us
against 268: the split / where / reshape scatter and its layout conversions made the kernel
compute-bound. The word decode is not timed yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import PRMT_LUT_24, expand_24, expand_24_prmt
from ._compile import _is_interpreted
from .dense_gemm import compile_specs, grouped_pid, launch, store_tile
from .sparse24_gemv import GEMV_MAX_M, gemv_verified, sparse24_gemv
from .sparse24_mma import MMA_MAX_M, mma_verified, sparse24_mma


@triton.jit
def _sparse24_gemm_kernel(x_ptr, v_ptr, meta_ptr, lut_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                          stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_ys, stride_ym, stride_yn,
                          HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          EMULATE: tl.constexpr):
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
    offs_g = tl.arange(0, BLOCK_K // 4)
    g_shift = (offs_g % 8) * 4  # BLOCK_K and every k0 are multiples of 32: group g's nibble sits at 4 * (g % 8)
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        if v_ptr.dtype.element_ty == tl.int32:
            # 16-bit weights, values viewed as int32 [N, K/4]: one word = the kept pair of one group.
            # Everything below is elementwise on [BLOCK_N, BLOCK_K/4] tensors, and the four positions
            # are joined in registers (no layout conversion through shared memory).
            g = k0 // 4 + offs_g
            g_ok = n_ok & (g[None, :] < K // 4)
            pair = tl.load(v_ptr + offs_n[:, None] * stride_vn + g[None, :], mask=g_ok, other=0)
            # each group gathers its own meta word (8 groups share one; the repeats hit L1), then the
            # byte-permute selectors of its nibble from the 16-entry table (64 bytes, L1-resident)
            word = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 8)[None, :], mask=g_ok, other=0)
            sel = tl.load(lut_ptr + ((word >> g_shift[None, :]) & 0xF))
            w = expand_24_prmt(pair, sel, x_ptr.dtype.element_ty, EMULATE, BLOCK_N, BLOCK_K, OPAQUE=True)
        else:
            vk = k0 // 2 + offs_h
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + vk[None, :] * stride_vk,
                        mask=n_ok & (vk[None, :] < K // 2), other=0.0)
            wk = k0 // 32 + offs_w
            words = tl.load(meta_ptr + offs_n[:, None] * stride_mn + wk[None, :],
                            mask=n_ok & (wk[None, :] < n_words), other=0)
            w = expand_24(v, words, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ys, stride_ym, stride_yn, HAS_BIAS)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape, bias: torch.Tensor | None = None,
                    input_precision: str | None = None) -> torch.Tensor:
    """x [M, K] @ dense(values [N, K/2], meta [N, ceil(K/32)])^T + bias [N] -> y [M, N] in x's dtype.

    ``shape`` = (N, K). x and values may have any strides; meta needs unit stride along K.
    fp16 / bf16 with M <= ``sparse24_mma.MMA_MAX_M`` runs the sparse tensor-core decode kernel; fp32
    (or a failed self-check of that kernel) with M <= ``sparse24_gemv.GEMV_MAX_M`` the decode GEMV.
    """
    n, k = shape
    m = x.shape[0]
    # 16-bit decode on the sparse tensor cores (sparse24_mma.py), once it passed its per-device self-check
    if (0 < m <= MMA_MAX_M and k > 0 and x.dtype in (torch.float16, torch.bfloat16)
            and mma_verified(x.device, x.dtype)):
        return sparse24_mma(x, values, meta, shape, bias)
    # else the GEMV on the compressed pairs (sparse24_gemv.py; fp32, or the fallback), same self-check
    if 0 < m <= GEMV_MAX_M and k > 0 and gemv_verified(x.device, x.dtype):
        return sparse24_gemv(x, values, meta, shape, bias)
    if meta.stride(1) != 1:
        meta = meta.contiguous()
    consts = dict(EMULATE=_is_interpreted(_sparse24_gemm_kernel))
    lut = _lut(x.device)
    if values.dtype in (torch.float16, torch.bfloat16):
        # the 16-bit path (decode past the GEMV, and prefill) reads values as int32 words (one per group): needs unit stride
        # along K and 4-byte aligned rows, which every packed weight has (K % 4 == 0); others are copied
        if values.stride(1) != 1 or values.stride(0) % 2 or values.storage_offset() % 2:
            values = values.contiguous()
        words = values.view(torch.int32)
        return launch(_sparse24_gemm_kernel, "sparse24", x, (words, meta, lut),
                      (words.stride(0), 1, meta.stride(0)), bias, n, k, input_precision, consts=consts)
    return launch(_sparse24_gemm_kernel, "sparse24", x, (values, meta, lut),
                  (values.stride(0), values.stride(1), meta.stride(0)), bias, n, k, input_precision, consts=consts)


_LUTS: dict = {}


def _lut(device: torch.device) -> torch.Tensor:
    """``_bits.PRMT_LUT_24`` as an int32 tensor on ``device`` (built once per device)."""
    key = str(device)
    if key not in _LUTS:
        _LUTS[key] = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in PRMT_LUT_24],
                                  dtype=torch.int32, device=device)
    return _LUTS[key]


def tile_bytes_24(block_n: int, block_k: int, itemsize: int, density: float = 0.5) -> float:
    """Bytes of a [block_n, block_k] 2:4 tile: block_k / 2 values and block_k / 32 int32 meta words
    per row (density is fixed at 1/2 by the format; the argument is ignored)."""
    return block_n * (block_k // 2) * itemsize + block_n * (block_k // 32) * 4


def _specs():
    specs = compile_specs(_sparse24_gemm_kernel, "sparse24", {"v_ptr": "*{dt}", "meta_ptr": "*i32", "lut_ptr": "*i32"},
                          {"stride_vn": None, "stride_vk": 1, "stride_mn": None}, tile_bytes_24,
                          extra_consts=dict(EMULATE=False))
    for spec in specs:  # what the launcher passes for 16-bit weights: values as int32 group words
        if spec.signature["v_ptr"] in ("*fp16", "*bf16"):
            spec.signature["v_ptr"] = "*i32"
    return specs


COMPILE_SPECS = _specs()
