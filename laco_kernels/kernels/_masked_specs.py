"""Compile checks of ``masked_gemm``'s kernels: every kernel at every config it can launch
(``bench/compile_report.py``, the SASS audit ``bench/sass_audit.py``). ``masked_gemm`` builds its
``COMPILE_SPECS`` from :func:`_compile_specs` and re-exports the helpers that ``sparse24_grad`` and
the tests use (``_spec``, ``_TYPES``, ``REGIMES``, ``_tile_variants``, ``tile_bytes_*``).

Kept apart from the kernels so that ``masked_gemm.py`` stays a kernel file; the kernels are imported
when the specs are built (after ``masked_gemm`` has defined them).
"""
from __future__ import annotations

from functools import partial

import torch

from ._train_tiles import _DW16_FILL, _DX16_256, _FP32_DW, _FP32_DX, _FP32_FWD, _FWD16_256, _config, _dw_config, _dx_config

_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
REGIMES = {"decode": 8, "mid": 48, "prefill": 512}  # a representative row count per config branch
# strides of the innermost dimension are 1 for contiguous tensors, which the JIT specializes
# as a constant; the specs do the same so they compile what a contiguous launch runs
_UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_yn", "stride_dyn", "stride_dxk", "stride_dwk",
                 "stride_vk", "stride_dvk")


def _spec(kernel, ptrs: dict, cfg: dict, flags: dict, label: str, representative: bool = False,
          family: str | None = None, regime: str | None = None, tile_weight_bytes=None):
    """CompileSpec of a launch on row-major tensors: inner strides 1 (constexpr, as the JIT
    specializes them), pointers, outer strides, N and K multiples of 16 (as for Llama shapes).
    The configs were also checked to compile without spills when nothing is 16-divisible.

    family / regime: SASS-audit metadata; tile_weight_bytes(BLOCK_N, BLOCK_K, itemsize, density):
    weight bytes of the [BLOCK_N, BLOCK_K] tile one loop iteration loads (None: the loop loads
    no weight, as in the weight-gradient kernels)."""
    import inspect

    from ._compile import CompileSpec

    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    consts = {**flags, **cfg}
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in _UNIT_STRIDES:
            consts[name] = 1
        sig[name] = "constexpr" if name in consts else ptrs.get(name, "i32")
    divisible = tuple(a for a, t in sig.items() if t.startswith("*") or (t == "i32" and a not in ("M",)))
    fp32 = ptrs.get("dy_ptr", ptrs.get("x_ptr")) == "*fp32"
    itemsize = {"*fp16": 2, "*bf16": 2, "*fp32": 4}[ptrs.get("dy_ptr", ptrs.get("x_ptr"))]
    wbytes = None if tile_weight_bytes is None else partial(tile_weight_bytes, cfg["BLOCK_N"], cfg["BLOCK_K"], itemsize)
    return CompileSpec(kernel, sig, consts, warps, stages, label, is_gemm=True, expect_tensor_core=not fp32,
                       note="fp32 uses input_precision='ieee' (FMA, no tensor cores) on purpose" if fp32 else "",
                       representative=representative, divisible=divisible, family=family, regime=regime,
                       loop_weight_bytes=wbytes)


def tile_bytes_masked(block_n: int, block_k: int, itemsize: int, density: float = 1.0) -> float:
    """Bytes of a [block_n, block_k] masked-weight tile: the dense weight and its packed mask bits
    (the weight is stored dense, so density does not change them)."""
    return block_n * block_k * itemsize + block_n * (block_k // 32) * 4


def _check_spec(dtype: torch.dtype):
    """The guard's check kernel (no dot, no loop: one tile of W and its bits per program)."""
    from ._compile import CompileSpec
    from .masked_gemm import _CHECK_CFG, _pruned_nonzero_kernel

    c = dict(_CHECK_CFG)
    warps = c.pop("num_warps")
    sig = dict(w_ptr=_TYPES[dtype], bits_ptr="*i32", flag_ptr="*i32", N="i32", K="i32", stride_wn="i32",
               stride_wk="constexpr", stride_bn="i32", BLOCK_N="constexpr", BLOCK_K="constexpr")
    return CompileSpec(_pruned_nonzero_kernel, sig, dict(stride_wk=1, **c), warps, 1,
                       f"{str(dtype).replace('torch.', '')} check", is_gemm=False, representative=False,
                       divisible=("w_ptr", "bits_ptr", "N", "K", "stride_wn", "stride_bn"),
                       family="masked", regime="train-check")


def tile_bytes_dense(block_n: int, block_k: int, itemsize: int, density: float = 1.0) -> float:
    """Bytes of a [block_n, block_k] weight tile read without its mask (guard passed)."""
    return block_n * block_k * itemsize


def _tile_variants(kind: str, rows: int, dtype: torch.dtype):
    """``[(label suffix, config)]`` a launcher can pick for ``rows`` (fp32 prefill: every tile of the
    grid-fill rule, the one used on small grids unlabelled; 16-bit dW / dV: the main tile and the
    small-grid one; otherwise the single config)."""
    fn = {"fwd": _config, "dx": _dx_config, "dw": _dw_config}[kind]
    out = [("", fn(rows, dtype))]
    if dtype == torch.float32 and rows > 64:
        tiles = {"fwd": _FP32_FWD, "dx": _FP32_DX, "dw": _FP32_DW}[kind]
        out += [(f" t{r}x{c}", dict(cfg)) for r, c, cfg, _ in tiles[:-1]]
    elif kind == "dw" and rows > 64:  # 16-bit small-grid dW / dV tile
        out.append((" t64x128", dict(_DW16_FILL)))
    return out


def _arch_variants(kind: str, rows: int, dtype: torch.dtype):
    """``[(label suffix, config, archs)]``: the variants of :func:`_tile_variants` (every arch) and the
    16-bit prefill forward / dX 256-row tiles, each on its own arch (``_train_tiles._FWD16_256``)."""
    out = [(t, cfg, None) for t, cfg in _tile_variants(kind, rows, dtype)]
    if dtype != torch.float32 and rows > 64 and kind in ("fwd", "dx"):
        table = _FWD16_256 if kind == "fwd" else _DX16_256
        out += [(f" t256 sm{a}", dict(table[a]), (a,)) for a in (80, 90)]
    return out


def _set_archs(specs, archs):
    if archs is not None:  # a tile launched on one arch only (its table row, audit and compile check)
        for sp in specs:
            sp.archs = archs


def _compile_specs():
    from .masked_gemm import GUARD_MIN_ROWS, _masked_linear_dw_kernel, _masked_linear_dx_kernel, _masked_linear_fwd_kernel

    specs = []
    for dtype, p in _TYPES.items():
        dt = str(dtype).replace("torch.", "")
        fwd_ptrs = dict(x_ptr=p, w_ptr=p, bits_ptr="*i32", flag_ptr="*i32", b_ptr=p, y_ptr=p)
        dx_ptrs = dict(dy_ptr=p, w_ptr=p, bits_ptr="*i32", flag_ptr="*i32", dx_ptr=p)
        for regime, rows in REGIMES.items():
            tag, rep = f"{dt} {regime}", dtype == torch.bfloat16 and regime == "prefill"
            for t, cfg, archs in _arch_variants("fwd", rows, dtype):
                n0 = len(specs)
                # "masked": the mask applied in the loop (unguarded launches, and the guard's fallback)
                specs.append(_spec(_masked_linear_fwd_kernel, fwd_ptrs, cfg,
                                   dict(HAS_MASK=True, GUARDED=False, HAS_BIAS=True, DOT_PRECISION="ieee"),
                                   f"{tag} masked+bias{t}", rep, "masked", "train-fwd", tile_bytes_masked))
                if rows >= GUARD_MIN_ROWS:
                    # what a guarded launch (ops layer, >= GUARD_MIN_ROWS tokens) compiles: both loops ...
                    specs.append(_spec(_masked_linear_fwd_kernel, fwd_ptrs, cfg,
                                       dict(HAS_MASK=True, GUARDED=True, HAS_BIAS=True, DOT_PRECISION="ieee"),
                                       f"{tag} guarded+bias{t}", False, "masked-guarded", "train-fwd",
                                       tile_bytes_masked))
                    # ... and the loop it runs when the check passes (W zero at every pruned slot)
                    specs.append(_spec(_masked_linear_fwd_kernel, fwd_ptrs, cfg,
                                       dict(HAS_MASK=False, GUARDED=False, HAS_BIAS=True, DOT_PRECISION="ieee"),
                                       f"{tag} zero-pruned+bias{t}", rep and not t, "masked-zero", "train-fwd",
                                       tile_bytes_dense))
                _set_archs(specs[n0:], archs)
            for t, cfg, archs in _arch_variants("dx", rows, dtype):
                n0 = len(specs)
                specs.append(_spec(_masked_linear_dx_kernel, dx_ptrs, cfg,
                                   dict(HAS_MASK=True, GUARDED=False, DOT_PRECISION="ieee", EVEN=False),
                                   f"{tag} masked{t}", rep, "masked", "train-dx", tile_bytes_masked))
                if rows >= GUARD_MIN_ROWS:
                    specs.append(_spec(_masked_linear_dx_kernel, dx_ptrs, cfg,
                                       dict(HAS_MASK=True, GUARDED=True, DOT_PRECISION="ieee", EVEN=True),
                                       f"{tag} guarded even{t}", False, "masked-guarded", "train-dx",
                                       tile_bytes_masked))
                    for even in (True, False):  # N % BLOCK_N == 0 (every model shape) or not
                        specs.append(_spec(_masked_linear_dx_kernel, dx_ptrs, cfg,
                                           dict(HAS_MASK=False, GUARDED=False, DOT_PRECISION="ieee", EVEN=even),
                                           f"{tag} zero-pruned" + (" even" if even else "") + t,
                                           rep and even and not t, "masked-zero", "train-dx", tile_bytes_dense))
                _set_archs(specs[n0:], archs)
            for t, cfg in _tile_variants("dw", rows, dtype):
                for even in (False, True) if rows >= GUARD_MIN_ROWS else (False,):  # M % BLOCK_M == 0 or not
                    # + bias (db fused), and without (the linears of Llama-style blocks: what the
                    # audit's recovery-step plans launch) from GUARD_MIN_ROWS rows on
                    for bias in (True, False) if rows >= GUARD_MIN_ROWS else (True,):
                        specs.append(_spec(_masked_linear_dw_kernel,
                                           dict(dy_ptr=p, x_ptr=p, bits_ptr="*i32", dw_ptr=p, db_ptr=p), cfg,
                                           dict(HAS_MASK=True, HAS_BIAS=bias, DOT_PRECISION="ieee", EVEN=even),
                                           f"{tag} masked" + ("+bias" if bias else "") + (" even" if even else "") + t,
                                           bias and not t and (rep and even or rep and rows < GUARD_MIN_ROWS),
                                           "masked", "train-dw"))
    specs += [_check_spec(dtype) for dtype in _TYPES]
    return specs
