"""Tile configs of the training GEMMs (``masked_gemm`` forward / dX / dW, ``sparse24_grad`` dV):
the fp32 FMA tile tables chosen by grid fill and the 16-bit tiles per shape regime.

Pure Python (no Triton kernels); ``masked_gemm`` imports the config rules its launchers use
(``masked_gemm._config`` and the rest keep working); the tile tables are read from here. ``sms``
defaults to an H100's 132 SMs (the grid-fill rule off a GPU).
"""
from __future__ import annotations

import torch
import triton

_SMS = 132  # H100 SXM: the grid-fill rule's default when the device is not a GPU

# fp32 ("ieee": FMA units, tiles in registers) prefill / training tiles, largest first:
# (output rows per program, output columns per program, config, needs N % 16 == 0 and K % 32 == 0).
# A launcher takes the first whose grid fills the GPU (at least one program per SM), else the last:
# a larger tile issues fewer shared-memory loads per multiply-add, but on a grid smaller than the
# GPU it only lengthens the one wave. sm_90 audit, thread-instructions per multiply-add over the
# dense fp32 prefill GEMM's, plain loop (guard passed) / masked loop: forward 64 x 64 1.02x / 1.11x
# (32 x 64: 1.12x / 1.25x), dX 64 x 64 1.02x / 1.13x (64 x 32: 1.17x / 1.29x), dW 128 x 64 0.97x
# (3 stages: with 2 the bias-free dV spilled 80 bytes on sm_80), 64 x 64 with a 16-row step and
# 4 warps 0.99x (the 32-row step, 0.985x, spills 120-152 bytes bias-free on sm_80 and 48 on sm_90
# at 1 stage, found once the audit compiled the bias-free launches; 8 warps: 1.02x). The 64 x 64
# forward / dX tiles spill 32-40 bytes
# in their masked loop when N and K are not 16-divisible, hence the condition; 128-row forward / dX
# tiles (0.97-0.98x plain) spill 800-1300 bytes in the masked loop the guarded kernel also holds.
_FP32_FWD = ((64, 64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2), True),
             (32, 64, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2), False))
# dX: output [BLOCK_M, BLOCK_K], reduction over N in BLOCK_N
_FP32_DX = ((64, 64, dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2), True),
            (64, 32, dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2), False))
# dW / dV: output [BLOCK_N, BLOCK_K], reduction over M in BLOCK_M (the mask is applied after the loop)
_FP32_DW = ((128, 64, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), False),
            (64, 64, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2), False))


# 16-bit dW / dV on grids that leave SMs idle (``_dw_config``)
_DW16_FILL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)

# 16-bit prefill forward / dX with 256 rows of x / dY per program on sm_80-sm_90, where that grid keeps 3/4
# of the SMs busy (``_wide``; ``_config`` / ``_dx_config`` with ``arch``): the mask applied in the loop (the guard's fallback) is
# work per weight element, the MMA per weight element x BLOCK_M, so twice the rows halve its share.
# Audit (thread-instructions per multiply-add over the dense 128-row prefill GEMM; masked loop /
# plain loop after the guard): sm_90 forward 256 x 128 x 64 1.22x / 0.68x (128 rows: 2.25x / 1.00x),
# dX 256 x 64 x 128 1.13x / 0.66x (2.13x / 0.96x); sm_80 (mma.sync: both operands in registers, a
# 32-deep step to stay clear of spills) forward 256 x 128 x 32 1.23x / 0.79x (1.80x / 1.01x), dX
# 256 x 32 x 128 1.20x / 1.02x (1.70x / 1.14x); 0 spills. 2 stages: the third adds 50 KB of shared
# memory and instructions (sm_90 forward 1.26x, dX 1.31x at 3).
_FWD16_256 = {90: dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2),
              80: dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)}
_DX16_256 = {90: dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2),
             80: dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2)}


def _tile_family(arch: int | None) -> int | None:
    """90 for sm_90, 80 for sm_80-sm_89 (mma.sync, at least 99 KB of shared memory a block), else None
    (the 128-row tiles: the CPU, the interpreter, other GPUs)."""
    if arch == 90:
        return 90
    if arch is not None and 80 <= arch < 90:
        return 80
    return None


def _wide(table: dict, rows: int, cols: int | None, arch: int | None, sms: int) -> dict | None:
    """``table[family]`` where its grid over ``rows x cols`` keeps at least 3/4 of the ``sms`` busy,
    else None. The sm_90 step model (bench/sass_model.py, bf16 MLP-block steps of SmolLM2 and
    Llama-7B at 512-8,192 tokens, masked path x torch) put the threshold there: with "every SM"
    the 7B down projection at 1,024 tokens (128 programs on 132 SMs) kept 128 rows, 1.205x against
    1.282x; at 1/2 SmolLM2 at 4,096 tokens fell from 1.283x to 1.249x; always 256 rows: SmolLM2 at
    1,024 tokens 0.960x against 1.152x."""
    fam = _tile_family(arch)
    if fam is None or cols is None:
        return None
    cfg = table[fam]
    col_block = cfg["BLOCK_N"] if table is _FWD16_256 else cfg["BLOCK_K"]
    return dict(cfg) if 4 * triton.cdiv(rows, 256) * triton.cdiv(cols, col_block) >= 3 * sms else None


def _fill(tiles, rows: int, cols: int | None, sms: int, divisible: bool) -> dict:
    """The first of ``tiles`` allowed for ``divisible`` whose grid over a ``rows x cols`` output has
    at least ``sms`` programs, else the last (``cols`` None: the last)."""
    if cols is not None:
        for r, c, cfg, needs_div in tiles:
            if (divisible or not needs_div) and triton.cdiv(rows, r) * triton.cdiv(cols, c) >= sms:
                return dict(cfg)
    return dict(tiles[-1][2])


def _divisible(n: int | None, k: int | None) -> bool:
    return n is not None and k is not None and n % 16 == 0 and k % 32 == 0


def _config(rows: int, dtype: torch.dtype, cols: int | None = None, sms: int = _SMS, k: int | None = None,
            arch: int | None = None) -> dict:
    """Tile sizes for a GEMM whose "rows" dimension (M for y and dX, N for dW) is ``rows``
    (fp32 grid-fill choice: ``cols`` = N, the output's other dimension, ``k`` = K, ``sms`` = SMs;
    ``arch``: the GPU's, for the 16-bit forward's 256-row tile, ``_FWD16_256``).

    BLOCK_K is a multiple of 32 (one mask word per 32 columns). fp32 with ``ieee`` precision
    runs on FMA units with the tiles in registers, so its tiles are smaller. Every config is
    chosen to compile without spills for sm_80 and sm_90 even without the JIT's alignment
    specialization (odd shapes), which is what the COMPILE_SPECS check.
    """
    if dtype == torch.float32:
        if rows <= 16:
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
        return _fill(_FP32_FWD, rows, cols, sms, _divisible(cols, k))
    if rows <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    if rows <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    # BLOCK_K 64 (the dense prefill GEMM's): the loop's fixed cost (barriers, addresses) spread over
    # twice the K; sm_90 audit 160 instructions per 32 K -> 230 per 64 K
    return _wide(_FWD16_256, rows, cols, arch, sms) or dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                                                             num_warps=8, num_stages=3)


def _dx_config(m: int, dtype: torch.dtype, k: int | None = None, sms: int = _SMS, n: int | None = None,
               arch: int | None = None) -> dict:
    """Tiles of an input-gradient GEMM: output [BLOCK_M, BLOCK_K], reduction over N in BLOCK_N
    (``k``: dX's columns, ``n``: the reduction, for the fp32 grid-fill choice; ``arch``: the GPU's,
    for the 16-bit 256-row tile, ``_DX16_256``)."""
    if dtype == torch.float32:  # FMA tiles (_FP32_DX)
        if m > 16:
            return _fill(_FP32_DX, m, k, sms, _divisible(n, k))
        return _config(1, dtype)
    if m > 64:  # a 128 x 128 output tile (128 x 32 before: 2.4x the instructions per multiply-add
        # in the sm_90 audit); a 128-wide reduction tile spills here
        return _wide(_DX16_256, m, k, arch, sms) or dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8,
                                                          num_warps=8, num_stages=3)
    return _config(m, dtype)


def _dw_config(n: int, dtype: torch.dtype, k: int | None = None, sms: int = _SMS) -> dict:
    """Tiles of a weight-gradient GEMM: output [BLOCK_N, BLOCK_K] over N rows, reduction over M
    (``k``: the weight's columns, for the fp32 grid-fill choice).

    16-bit with n > 64 (every real layer): a square 128 x 128 output tile and a 64-row reduction
    step, the dense prefill GEMM's multiply-adds per loaded element (a 128 x 32 output tile with a
    128-row step, the transposed forward tiling used before, issued 3.4x the instructions per
    multiply-add in the SASS audit). When that grid has fewer programs than ``sms`` (SmolLM2's
    576 x 1536 weights: 60 programs on 132 SMs) a 64 x 128 output tile with 4 warps: each program
    then issues 0.56x the thread-instructions (sm_90: 106 loop instructions x 4 warps + a 1,078-
    instruction epilogue against 91 x 8 + 1,021; the gather / mask epilogue is paid per program).
    """
    if dtype != torch.float32 and n > 64:
        if k is not None and triton.cdiv(n, 128) * triton.cdiv(k, 128) < sms:
            return dict(_DW16_FILL)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if dtype == torch.float32 and n > 16:  # FMA tiles (_FP32_DW)
        return _fill(_FP32_DW, n, k, sms, True)
    cfg = _config(n, dtype)
    return dict(cfg, BLOCK_N=cfg["BLOCK_M"], BLOCK_M=cfg["BLOCK_N"])
