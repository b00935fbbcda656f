"""Expand a trained sparse weight to a dense one in a single memory-bound pass (the "expand" path).

- 2:4: values ``[N, K/2]`` + meta int32 ``[N, ceil(K/32)]`` -> dense ``[N, K]`` in the values'
  dtype (16-bit: the values read as int32 group words and expanded by two ``prmt`` per group,
  ``_bits.expand_24_prmt``, as the 2:4 GEMMs do; fp32: ``_bits.expand_24``).
- masked: weight ``[N, K]`` + packed mask bits int32 ``[N, ceil(K/32)]`` -> ``W ⊙ M`` ``[N, K]``
  (pruned slots exactly 0, also where W holds NaN / inf there).
- bitmap (unstructured, inference): values ``[nnz]`` + bitmap int32 ``[N, ceil(K/32)]`` + offsets
  int32 ``[N, ceil(K/tile_k)]`` -> dense ``[N, K]`` in the values' dtype (a copy, bit for bit
  ``BitmapWeight.to_dense()``); each tile decoded by ``bitmap_gemm._bitmap_w_tile``, the tiled
  GEMM's own decode. The GPU prefill path of ``ops.sparse_gemm.bitmap_linear`` runs it, then cuBLAS.

Why: the fused training kernels (``masked_gemm.py``, the 2:4 forward + ``sparse24_grad.py``)
decompress every weight tile once per row tile of x. At a few thousand tokens there are only a
few row tiles, the grid leaves SMs idle and the per-tile decompression is not amortised (SASS
audit: the 16-bit 2:4 step on SmolLM2 at 1,024 tokens predicted 0.91x the torch path fused, 1.09x expanded). Expanding
once costs one read of the compressed weight and one write of the dense one; the forward and
input-gradient GEMMs then run on cuBLAS (``F.linear`` / ``mm``) and the weight gradient stays in
our kernels (dV ``[N, K/2]`` gathered, masked dW with exact zeros, db fused), so the optimizer
still holds state for the kept values only. ``ops/train_dispatch.py`` picks this path per shape.

Why bitmap: ``BitmapWeight.to_dense()`` (torch ``masked_scatter`` over an unpacked bool mask) took
375 us for a 4096 x 4096 fp16 weight at 50% density on an H200; this kernel took 62.5 us there
(bench/results/gpu_decode_sweep.json), 0.85 TB/s against the ~11 us a full-bandwidth pass would take.

Launchers take 2-D tensors with any strides (16-bit 2:4 values need unit stride along K: they
are reinterpreted as int32 words, else copied; 1-D bitmap values are made contiguous). The
references are ``Sparse24Weight.to_dense``, ``weight * PackedMask.to_bool()`` (with exact zeros
at pruned slots) and ``BitmapWeight.to_dense``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._bits import expand_24_prmt
from ._compile import ARCHS, CompileSpec, _is_interpreted
from .bitmap_gemm import _bitmap_w_tile
from .dense_gemm import BITMAP_TILE_KS
from .masked_gemm import _masked_w_tile
from .sparse24_grad import _dense_w_tile

# one [BLOCK_N, BLOCK_K] tile per program: 16 KB of dense 16-bit output, 4 warps (memory-bound)
_CFG = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4)
_BLOCKS = {b: _CFG[b] for b in ("BLOCK_N", "BLOCK_K")}
# bitmap: BLOCK_K is the weight's tile_k (one offset per row and program, as in the tiled GEMM), the
# tiled GEMM's tile_k values only (BITMAP_TILE_KS; tl.arange needs a power of two). BLOCK_N * tile_k =
# 4,096 elements: a gathered element keeps its bit, rank and 64-bit address in registers, so 16 of them
# per thread at 8 warps (32-40 registers and no spills on sm_80 / sm_90; the row scan stays inside a
# warp, no shared memory, except fp32 at tile_k 256; 4 warps or 8,192 elements stage it through shared
# memory). About 16-22 thread-instructions per element (256-360 SASS instructions per thread, 16 elements):
# ~8.5 us of issue for 4096 x 4096 on an H200 by that count, ~11 us of memory traffic, yet 57.8-62.5 us
# measured there (bench/results/gpu_decode_sweep.json); why is not measured (a guess: the gathers wait on
# the row scan, so few bytes are in flight)
_BITMAP_ELEMS, _BITMAP_WARPS = 4096, 8


@triton.jit
def _sparse24_expand_kernel(w_ptr, v_ptr, meta_ptr, lut_ptr, N, K, stride_vn, stride_vk, stride_mn,
                            stride_wn, stride_wk, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """w[N, K] = dense(V, meta); one [BLOCK_N, BLOCK_K] tile per program (grid: N tiles x K tiles).
    (The output pointer comes first: the audit reads a spec's dtype from its first pointer.)

    16-bit values come as int32 group words (``v_ptr`` int32 ``[N, K/4]``); padding groups past K
    load zero words, which decode to zeros (and are not stored).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    if v_ptr.dtype.element_ty == tl.int32:
        g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        ok = (offs_n[:, None] < N) & (g[None, :] < K // 4)
        pair = tl.load(v_ptr + offs_n[:, None] * stride_vn + g[None, :], mask=ok, other=0)
        word = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 8)[None, :], mask=ok, other=0)
        sel = tl.load(lut_ptr + ((word >> ((g % 8) * 4)[None, :]) & 0xF))
        w = expand_24_prmt(pair, sel, w_ptr.dtype.element_ty, EMULATE, BLOCK_N, BLOCK_K)
    else:
        w = _dense_w_tile(v_ptr, meta_ptr, offs_n, k0, N, K, stride_vn, stride_vk, stride_mn, BLOCK_N, BLOCK_K)
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk, w,
             mask=(offs_n[:, None] < N) & (kk[None, :] < K))


@triton.jit
def _masked_expand_kernel(w_ptr, bits_ptr, out_ptr, N, K, stride_wn, stride_wk, stride_bn, stride_on, stride_ok,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = W ⊙ mask (tl.where: a pruned slot is 0 whatever W holds there)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    w = _masked_w_tile(w_ptr, bits_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_wk, stride_bn, True,
                       BLOCK_N, BLOCK_K)
    kk = k0 + offs_k
    tl.store(out_ptr + offs_n[:, None] * stride_on + kk[None, :] * stride_ok, w,
             mask=(offs_n[:, None] < N) & (kk[None, :] < K))


@triton.jit
def _bitmap_expand_kernel(w_ptr, v_ptr, bitmap_ptr, offsets_ptr, N, K, stride_bmn, stride_on, stride_wn, stride_wk,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[N, K] = dense(values [nnz], bitmap, offsets); one [BLOCK_N, BLOCK_K = tile_k] tile per program
    (grid: N tiles x K tiles). Only set bits gather a value; the rest of the tile stores +0."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _bitmap_w_tile(v_ptr, bitmap_ptr, offsets_ptr, offs_n, k0, N, K, stride_bmn, stride_on, BLOCK_N, BLOCK_K)
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk, w,
             mask=(offs_n[:, None] < N) & (kk[None, :] < K))


def _grid(n: int, k: int):
    return triton.cdiv(n, _CFG["BLOCK_N"]), triton.cdiv(k, _CFG["BLOCK_K"])


def _check_words(words: torch.Tensor, name: str, n: int, k: int, op: str) -> None:
    check_tensor(words, f"{op}: {name}", dtypes=(torch.int32,), ndim=2)
    if tuple(words.shape) != (n, -(-k // 32)):
        raise ValueError(f"{op}: {name} has shape {tuple(words.shape)}; a [{n}, {k}] weight needs ({n}, {-(-k // 32)})")


def sparse24_to_dense(values: torch.Tensor, meta: torch.Tensor, shape) -> torch.Tensor:
    """dense(values [N, K/2], meta int32 [N, ceil(K/32)]) -> [N, K] in values' dtype; ``shape`` = (N, K).

    Bad arguments (types, shapes, K not a multiple of 4, devices) raise before any launch."""
    from .sparse24_gemm import _lut

    op = "sparse24_to_dense"
    n, k = shape
    if k % 4:
        raise ValueError(f"{op}: shape {tuple(shape)} has K not divisible by 4 (2:4 groups)")
    check_tensor(values, f"{op}: values", dtypes=FLOAT_DTYPES, ndim=2)
    if tuple(values.shape) != (n, k // 2):
        raise ValueError(f"{op}: values has shape {tuple(values.shape)}; shape {tuple(shape)} needs ({n}, {k // 2})")
    _check_words(meta, "meta", n, k, op)
    check_same_device(values=values, meta=meta)
    w = torch.empty(n, k, dtype=values.dtype, device=values.device)
    if n == 0 or k == 0:
        return w
    if meta.stride(1) != 1:
        meta = meta.contiguous()
    if values.dtype in (torch.float16, torch.bfloat16):
        # int32 group words: unit stride along K and 4-byte aligned rows (every packed weight has them)
        if values.stride(1) != 1 or values.stride(0) % 2 or values.storage_offset() % 2:
            values = values.contiguous()
        values = values.view(torch.int32)
    _sparse24_expand_kernel[_grid(n, k)](
        w, values, meta, _lut(values.device), n, k, values.stride(0), values.stride(1), meta.stride(0),
        w.stride(0), w.stride(1), EMULATE=_is_interpreted(_sparse24_expand_kernel), num_warps=_CFG["num_warps"],
        **_BLOCKS)
    return w


def masked_to_dense(weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """weight [N, K] ⊙ mask (bits int32 [N, ceil(K/32)]) -> [N, K] in weight's dtype, exact zeros where pruned.

    Bad arguments (types, shapes, devices) raise before any launch."""
    check_tensor(weight, "masked_to_dense: weight", dtypes=FLOAT_DTYPES, ndim=2)
    n, k = weight.shape
    _check_words(bits, "bits", n, k, "masked_to_dense")
    check_same_device(weight=weight, bits=bits)
    out = torch.empty(n, k, dtype=weight.dtype, device=weight.device)
    if n == 0 or k == 0:
        return out
    if bits.stride(1) != 1:
        bits = bits.contiguous()
    _masked_expand_kernel[_grid(n, k)](weight, bits, out, n, k, weight.stride(0), weight.stride(1), bits.stride(0),
                                       out.stride(0), out.stride(1), num_warps=_CFG["num_warps"], **_BLOCKS)
    return out


def _bitmap_blocks(tile_k: int) -> dict:
    return dict(BLOCK_N=_BITMAP_ELEMS // tile_k, BLOCK_K=tile_k)


def bitmap_to_dense(values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor, shape, tile_k: int
                    ) -> torch.Tensor:
    """dense(values [nnz], bitmap int32 [N, ceil(K/32)], offsets int32 [N, ceil(K/tile_k)]) -> [N, K]
    in values' dtype; ``shape`` = (N, K), ``tile_k`` in ``dense_gemm.BITMAP_TILE_KS``.

    Bad arguments (types, shapes, tile_k, devices, N * K past int32 indexing) raise before any
    launch; the content (set bits == nnz, offsets matching the bitmap) is ``BitmapWeight.validate()``'s
    to check, once, as for ``bitmap_linear``."""
    op = "bitmap_to_dense"
    n, k = shape
    if not isinstance(tile_k, int) or isinstance(tile_k, bool) or tile_k not in BITMAP_TILE_KS:
        raise ValueError(f"{op}: tile_k={tile_k!r} is not one the kernel supports {BITMAP_TILE_KS} (use "
                         "BitmapWeight.to_dense(), or repack with BitmapWeight.from_dense(W, tile_k=128))")
    if n * k > 2 ** 31 - 1:
        raise ValueError(f"{op}: shape {tuple(shape)} has {n * k} elements, past the kernel's int32 indexing")
    check_tensor(values, f"{op}: values", dtypes=FLOAT_DTYPES, ndim=1)
    _check_words(bitmap, "bitmap", n, k, op)
    check_tensor(offsets, f"{op}: offsets", dtypes=(torch.int32,), ndim=2)
    if tuple(offsets.shape) != (n, -(-k // tile_k)):
        raise ValueError(f"{op}: offsets has shape {tuple(offsets.shape)}; a [{n}, {k}] weight with tile_k={tile_k} "
                         f"needs ({n}, {-(-k // tile_k)})")
    check_same_device(values=values, bitmap=bitmap, offsets=offsets)
    w = torch.empty(n, k, dtype=values.dtype, device=values.device)
    if n == 0 or k == 0:
        return w
    values = values.contiguous()  # the kernel gathers values[offset + rank]: unit stride
    if bitmap.stride(1) != 1:
        bitmap = bitmap.contiguous()
    if offsets.stride(1) != 1:
        offsets = offsets.contiguous()
    blocks = _bitmap_blocks(tile_k)
    _bitmap_expand_kernel[(triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(k, tile_k))](
        w, values, bitmap, offsets, n, k, bitmap.stride(0), offsets.stride(0), w.stride(0), w.stride(1),
        num_warps=_BITMAP_WARPS, **blocks)
    return w


def expand_bytes(kind: str, n: int, k: int, itemsize: int, density: float = 1.0, tile_k: int = 128) -> float:
    """Bytes one expansion moves: the compressed weight read once, the dense one written
    (2:4: K/2 values + K/32 meta words per row; masked: the dense W + its bits; bitmap: the
    ``density * N * K`` kept values, the bits and one int32 offset per row and tile_k columns)."""
    words = n * triton.cdiv(k, 32) * 4
    if kind == "bitmap":
        read = density * n * k * itemsize + words + n * triton.cdiv(k, tile_k) * 4
    else:
        read = n * (k // 2) * itemsize + words if kind == "sparse24" else n * k * itemsize + words
    return float(read + n * k * itemsize)


# ----------------------------------------------------------------------------------------
# compile checks (bench/compile_report.py) and SASS-audit records (regime "train-expand": no loop)
# ----------------------------------------------------------------------------------------
def _compile_specs():
    specs = []
    blocks = _BLOCKS
    for dtype, p in {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}.items():
        dt = str(dtype).replace("torch.", "")
        vp = "*i32" if dtype != torch.float32 else p
        sig = dict(w_ptr=p, v_ptr=vp, meta_ptr="*i32", lut_ptr="*i32", N="i32", K="i32", stride_vn="i32",
                   stride_vk="constexpr", stride_mn="i32", stride_wn="i32", stride_wk="constexpr",
                   EMULATE="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr")
        specs.append(CompileSpec(_sparse24_expand_kernel, sig, dict(stride_vk=1, stride_wk=1, EMULATE=False, **blocks),
                                 _CFG["num_warps"], 1, f"{dt} expand", is_gemm=False,
                                 representative=dtype == torch.bfloat16,
                                 divisible=("w_ptr", "v_ptr", "meta_ptr", "lut_ptr", "N", "K", "stride_vn",
                                            "stride_mn", "stride_wn"),
                                 family="sparse24", regime="train-expand", archs=ARCHS))
        sig = dict(w_ptr=p, bits_ptr="*i32", out_ptr=p, N="i32", K="i32", stride_wn="i32", stride_wk="constexpr",
                   stride_bn="i32", stride_on="i32", stride_ok="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr")
        specs.append(CompileSpec(_masked_expand_kernel, sig, dict(stride_wk=1, stride_ok=1, **blocks),
                                 _CFG["num_warps"], 1, f"{dt} expand", is_gemm=False,
                                 representative=dtype == torch.bfloat16,
                                 divisible=("w_ptr", "bits_ptr", "out_ptr", "N", "K", "stride_wn", "stride_bn",
                                            "stride_on"),
                                 family="masked", regime="train-expand", archs=ARCHS))
        # bitmap (inference prefill): regime "prefill-expand", not a training-plan step of the SASS audit
        for tile_k in BITMAP_TILE_KS:
            sig = dict(w_ptr=p, v_ptr=p, bitmap_ptr="*i32", offsets_ptr="*i32", N="i32", K="i32", stride_bmn="i32",
                       stride_on="i32", stride_wn="i32", stride_wk="constexpr", BLOCK_N="constexpr",
                       BLOCK_K="constexpr")
            specs.append(CompileSpec(_bitmap_expand_kernel, sig, dict(stride_wk=1, **_bitmap_blocks(tile_k)),
                                     _BITMAP_WARPS, 1, f"{dt} expand tk{tile_k}", is_gemm=False,
                                     representative=dtype == torch.bfloat16 and tile_k == 128,
                                     divisible=("w_ptr", "v_ptr", "bitmap_ptr", "offsets_ptr", "N", "K",
                                                "stride_bmn", "stride_wn"),
                                     family="bitmap", regime="prefill-expand", archs=ARCHS))
    return specs


COMPILE_SPECS = _compile_specs()
