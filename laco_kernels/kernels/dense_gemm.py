"""Dense linear ``y = x @ W^T + b`` in Triton, and the plumbing shared by the inference GEMMs.

The dense kernel is the baseline of the traffic audit and of the GPU benchmarks: it has exactly
the tiling, split-K and program ordering of the 2:4 and bitmap kernels (``sparse24_gemm.py``,
``bitmap_gemm.py``), minus the decompression, so byte counts and timings compare like for like.

Shared here:
- :class:`GemmConfig` and :func:`gemm_config`: ONE table of tile configurations per kernel
  family and shape regime. Launchers read it, and :func:`compile_specs` enumerates the same
  table (every regime, dtype, precision, output dtype, bias flag) into ``COMPILE_SPECS``, so the
  compile report checks exactly what can be launched.
- Architecture rows (``_ARCH_TABLE``): a (family, regime, width) may have a row for one GPU
  architecture (sm_90) that replaces the base row there; :func:`launch` asks
  :func:`device_arch`, and the row's compile specs carry ``archs=(arch,)``.
- Regimes. decode (M <= 16): BLOCK_M = 16 and one program per (N tile, K slice): no weight byte is
  read twice, and split-K (each K slice writes an fp32 partial, summed on the host) fills the
  GPU when N / BLOCK_N programs alone would leave SMs idle. prefill (M > 16): 128 x 128 (or
  128 x 64) tiles in the tutorial's grouped order (GROUP_M row tiles sweep the same column tiles,
  so weight tiles are re-read from L2, not HBM).
- fp32 inputs: ``input_precision="ieee"`` by default. On a GPU fp32 ``tl.dot`` would otherwise
  be TF32 (10-bit mantissa, ~1e-3 relative error), breaking the contract "same result as
  reference.py within fp32 tolerance"; fp32 weights are a correctness path, not the fast path.
  ``"tf32"`` is an opt-in launcher argument (``"tf32x3"`` is not offered: it spilled at these
  tiles). "ieee" lowers to FMA, not mma: those
  specs carry ``expect_tensor_core=False``.

All launchers take 2-D ``x [M, K]`` (any strides) and return ``y [M, N]`` in x's dtype with fp32
accumulation. Program ids: axis 0 = output tile (grouped order), axis 1 = K slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
import triton
import triton.language as tl

from ._compile import ARCHS, CompileSpec

DECODE_MAX_M = 16
PRECISIONS = ("ieee", "tf32")
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DEFAULT_SMS = 132  # H100 SXM; used for the split-K choice when no CUDA device tells us (interpreter)


@dataclass(frozen=True)
class GemmConfig:
    name: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int

    def meta(self) -> Dict[str, int]:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K, GROUP_M=self.GROUP_M)


# (family, regime, "16bit" | "fp32", tile_k or None) -> config. Chosen so that no config spills
# on sm_80 / sm_90 (bench/compile_report.py checks it). Bitmap BLOCK_K equals the weight's tile_k.
_TABLE: Dict[Tuple[str, str, str, int | None], GemmConfig] = {}


# (family, regime, width, tile_k, arch) -> config used on that GPU architecture only (e.g. 90 = sm_90,
# H100 / H200) instead of the base row; the base row then serves every other architecture.
_ARCH_TABLE: Dict[Tuple[str, str, str, int | None, int], GemmConfig] = {}


# same keys as _ARCH_TABLE: the grid-filling alternative of an architecture row, used while that
# row's tiles would give fewer programs than the GPU has SMs (small M: one wave, idle SMs)
_FILL_TABLE: Dict[Tuple[str, str, str, int | None, int], GemmConfig] = {}


def _add(family, regime, width, tile_k, bm, bn, bk, warps, stages, group=8, arch=None, fill=False):
    name = f"{family}-{regime}-{width}" + (f"-tk{tile_k}" if tile_k else "") + (f"-sm{arch}" if arch else "") + (
        "-fill" if fill else "")
    table, key = (_TABLE, (family, regime, width, tile_k)) if arch is None else (
        _FILL_TABLE if fill else _ARCH_TABLE, (family, regime, width, tile_k, arch))
    table[key] = GemmConfig(name, bm, bn, bk, group, warps, stages)


# decode: fp32 tiles carry twice the bytes per element, hence half the BLOCK_K (or BLOCK_N)
_add("dense", "decode", "16bit", None, 16, 64, 128, 8, 3)
_add("sparse24", "decode", "16bit", None, 16, 64, 256, 4, 3)
_add("dense", "decode", "fp32", None, 16, 64, 64, 4, 3)
_add("sparse24", "decode", "fp32", None, 16, 32, 64, 4, 3)
_add("dense", "prefill", "16bit", None, 128, 128, 64, 8, 3)
# 2:4 prefill: the decode is work per weight element and the MMA per weight element x BLOCK_M, so
# 256 rows of x per program halve the decode per multiply-add. sm_80 (mma.sync keeps both operands
# in registers): 256 x 128 x 64 spills, BLOCK_K 32 does not (250 registers); sm_90 (wgmma reads
# them from shared memory) takes BLOCK_K 64
_add("sparse24", "prefill", "16bit", None, 256, 128, 32, 8, 4)
_add("sparse24", "prefill", "16bit", None, 256, 128, 64, 8, 3, arch=90)
# ... and while ceil(M / 256) * ceil(N / 128) < SMs and ceil(M / 128) * ceil(N / 64) <= SMs (e.g. M <= 256
# at N = 4096 on 132 SMs): 128 x 64 tiles, 4 warps (248 instructions per warp-iteration) spread the
# per-program decode over up to 4x the programs in one wave
_add("sparse24", "prefill", "16bit", None, 128, 64, 64, 4, 4, arch=90, fill=True)
# fp32 "ieee" is an FMA GEMM (no tensor cores): 64 x 64 tiles keep it clear of spills
_add("dense", "prefill", "fp32", None, 64, 64, 32, 4, 3)
_add("sparse24", "prefill", "fp32", None, 64, 64, 32, 8, 3)
# bitmap: the expanded bits, their ranks and the gather addresses of a [BLOCK_N, tile_k] tile live
# in registers. Decode keeps BLOCK_N = 64 at tile_k <= 128 so that re-reads of x (one per N tile)
# stay ~1.5% of the dense bytes (the traffic target); fp32 and tile_k = 256 take smaller tiles.
BITMAP_TILE_KS = (64, 128, 256)
for _tk in BITMAP_TILE_KS:
    _add("bitmap", "decode", "16bit", _tk, 16, 64 if _tk <= 128 else 16, _tk, 8, 3)
    _add("bitmap", "decode", "fp32", _tk, 16, 32 if _tk <= 128 else 16, _tk, 8, 2)
    _add("bitmap", "prefill", "16bit", _tk, 128, 4096 // _tk, _tk, 8, 2)
    _add("bitmap", "prefill", "fp32", _tk, 64, min(32, 4096 // _tk), _tk, 8, 2)


def regime(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "prefill"


def device_arch(device: torch.device) -> int | None:
    """``10 * major + minor`` of a CUDA device (90 for an H100), None elsewhere (CPU, interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _grid(cfg: GemmConfig, m: int, n: int) -> int:
    return triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)


def gemm_config(family: str, m: int, dtype: torch.dtype, tile_k: int | None = None,
                arch: int | None = None, n: int | None = None, sms: int = _DEFAULT_SMS) -> GemmConfig:
    """The config a launch of ``family`` uses for M rows (and N columns: with ``n`` given, an
    architecture row whose grid would not fill ``sms`` SMs gives way to its ``_FILL_TABLE`` row
    when that row's grid fits in one wave)."""
    key = (family, regime(m), "fp32" if dtype == torch.float32 else "16bit", tile_k)
    if arch is not None and key + (arch,) in _ARCH_TABLE:
        cfg = _ARCH_TABLE[key + (arch,)]
        fill = _FILL_TABLE.get(key + (arch,))
        if fill is not None and n is not None and _grid(cfg, m, n) < sms and _grid(fill, m, n) <= sms:
            return fill  # the main tiles leave SMs idle and the smaller ones still fit in one wave
        return cfg
    if key not in _TABLE:
        raise ValueError(f"no {family} GEMM configuration for M={m}, dtype={dtype}, tile_k={tile_k}"
                         + (f" (supported tile_k: {BITMAP_TILE_KS})" if family == "bitmap" else ""))
    return _TABLE[key]


def dot_precision(dtype: torch.dtype, input_precision: str | None) -> str:
    """The DOT_PRECISION constexpr: ignored by tl.dot for 16-bit inputs, so pinned to "ieee" there."""
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    if dtype != torch.float32:
        return "ieee"
    return input_precision or "ieee"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def split_k(cfg: GemmConfig, m: int, n: int, k: int, device: torch.device) -> Tuple[int, int]:
    """(number of K slices, columns per slice) for a decode launch; (1, K) for prefill.

    Decode is bound by weight bandwidth: aim at >= 2 programs per SM, each slice a whole number
    of BLOCK_K tiles, at most 32 slices (the fp32 partials stay tiny at M <= 16).
    """
    k_tiles = triton.cdiv(k, cfg.BLOCK_K)
    if regime(m) != "decode":
        return 1, k_tiles * cfg.BLOCK_K
    programs = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)
    want = min(k_tiles, 32, max(1, triton.cdiv(2 * _num_sms(device), programs)))
    per = triton.cdiv(k_tiles, want)
    return triton.cdiv(k_tiles, per), per * cfg.BLOCK_K


@triton.jit
def grouped_pid(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Tutorial grouped ordering: GROUP row tiles share the column tiles they sweep (L2 reuse)."""
    grid_r = tl.cdiv(n_rows, BLOCK_R)
    grid_c = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP * grid_c
    group_id = pid // per_group
    first_r = group_id * GROUP
    size = tl.minimum(grid_r - first_r, GROUP)
    return first_r + ((pid % per_group) % size), (pid % per_group) // size


@triton.jit
def store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ys, stride_ym, stride_yn,
               HAS_BIAS: tl.constexpr):
    """Add the bias (K slice 0 only) and store the [BLOCK_M, BLOCK_N] tile in y's dtype."""
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _dense_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_xk, stride_wn, stride_wk, stride_ys, stride_ym, stride_yn,
                       HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] (+ slice * stride_ys) = x[M, K-slice] @ W[N, K-slice]^T (+ b)."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ys, stride_ym, stride_yn, HAS_BIAS)


# ----------------------------------------------------------------------------------------
# host side: output / split-K plumbing shared by the three launchers
# ----------------------------------------------------------------------------------------
def launch(kernel, family: str, x: torch.Tensor, weight_args: tuple, weight_strides: tuple, bias, n: int, k: int,
           input_precision: str | None = None, tile_k: int | None = None, consts: dict | None = None,
           arch: int | None = None) -> torch.Tensor:
    """Run ``kernel(x, *weight_args, b, y, M, N, K, K_PER_SPLIT, x strides, *weight_strides, y strides, ...)``.

    consts: extra constexpr arguments of this kernel (after GROUP_M); arch: the architecture whose
    config to use (default: x's device, :func:`device_arch`).

    Returns y [M, N] in x's dtype. With split-K the kernel writes fp32 partials [S, M, N] that are
    summed here (the bias is added by slice 0 only).
    """
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.to(x.dtype).expand(m, n))
    cfg = gemm_config(family, m, x.dtype, tile_k, device_arch(x.device) if arch is None else arch, n=n,
                      sms=_num_sms(x.device))
    splits, k_per = split_k(cfg, m, n, k, x.device)
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    s_ys = 0 if splits == 1 else out.stride(0)
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N), splits)
    kernel[grid](x, *weight_args, bias if bias is not None else out, out, m, n, k, k_per,
                 x.stride(0), x.stride(1), *weight_strides, s_ys, out.stride(-2), out.stride(-1),
                 HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype, input_precision),
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(), **(consts or {}))
    if splits > 1:
        y.copy_(out.sum(0))
    return y


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 input_precision: str | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N] -> y [M, N] in x's dtype (any strides)."""
    n, k = weight.shape
    return launch(_dense_gemm_kernel, "dense", x, (weight,), (weight.stride(0), weight.stride(1)), bias, n, k,
                  input_precision)


# ----------------------------------------------------------------------------------------
# compile specs: derived from the same table the launchers read
# ----------------------------------------------------------------------------------------
def _rows(family: str):
    """(regime, width, config, architectures it is launched on) of every table row of ``family``."""
    for (fam, reg, width, tk), cfg in _TABLE.items():
        if fam == family:
            yield reg, width, cfg, tuple(a for a in ARCHS if (fam, reg, width, tk, a) not in _ARCH_TABLE)
    for (fam, reg, width, _tk, arch), cfg in list(_ARCH_TABLE.items()) + list(_FILL_TABLE.items()):
        if fam == family:
            yield reg, width, cfg, (arch,)


def launchable(family: str) -> List[Tuple[GemmConfig, torch.dtype, str, torch.dtype, bool]]:
    """Every (config, input dtype, DOT_PRECISION, output-pointer dtype, has_bias) a launcher can use."""
    return [c[:5] for c in _launchable(family)]


def _launchable(family: str):
    out = []
    for reg, width, cfg, archs in _rows(family):
        for dtype in ((torch.float32,) if width == "fp32" else (torch.float16, torch.bfloat16)):
            precs = PRECISIONS if dtype == torch.float32 else ("ieee",)
            outs = (dtype, torch.float32) if reg == "decode" and dtype != torch.float32 else (dtype,)
            for prec in precs:
                for out_dtype in outs:
                    for has_bias in (False, True):
                        out.append((cfg, dtype, prec, out_dtype, has_bias, archs, reg))
    return out


def compile_specs(kernel, family: str, weight_sig: Dict[str, str], weight_strides: Dict[str, int | None],
                  tile_weight_bytes: Callable[[int, int, int, float], float] | None = None,
                  extra_consts: Dict[str, object] | None = None) -> List[CompileSpec]:
    """CompileSpecs of a GEMM kernel with the shared argument layout (see :func:`launch`).

    weight_sig: the weight arguments' names -> types, ``"{dt}"`` standing for the input dtype;
    weight_strides: stride argument -> 1 (unit stride: Triton specializes it to a constant at
    launch) or None (a runtime value, a multiple of 16 for the aligned shapes that matter);
    tile_weight_bytes(BLOCK_N, BLOCK_K, itemsize, density): weight bytes (values + metadata) of
    one ``[BLOCK_N, BLOCK_K]`` tile, i.e. of one K-loop iteration (the SASS audit's divisor;
    default: a dense tile); extra_consts: constexpr arguments after GROUP_M and their compiled
    values. Rows of ``_ARCH_TABLE`` give specs compiled for their architecture only. The specs
    describe a launch on row-major tensors with N, K multiples of 16 (e.g. Llama shapes).
    """
    tile_weight_bytes = tile_weight_bytes or (lambda bn, bk, isz, density: bn * bk * isz)
    extra_consts = extra_consts or {}
    specs = []
    for cfg, dtype, prec, out_dtype, has_bias, archs, reg in _launchable(family):
        dt, odt = _TL[dtype], _TL[out_dtype]
        strides = {"stride_xm": None, "stride_xk": 1, **weight_strides, "stride_ys": None, "stride_ym": None,
                   "stride_yn": 1}
        sig = {"x_ptr": f"*{dt}", **{a: t.format(dt=dt) for a, t in weight_sig.items()}, "b_ptr": f"*{dt}",
               "y_ptr": f"*{odt}", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32",
               **{s: ("constexpr" if v == 1 else "i32") for s, v in strides.items()},
               "HAS_BIAS": "constexpr", "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
               **{c: "constexpr" for c in extra_consts}}
        consts = dict(HAS_BIAS=has_bias, DOT_PRECISION=prec, **cfg.meta(),
                      **{s: 1 for s, v in strides.items() if v == 1}, **extra_consts)
        divisible = tuple(a for a, t in sig.items() if t.startswith("*")) + ("N", "K", "K_PER_SPLIT") + tuple(
            s for s, v in strides.items() if v is None)
        name = f"{cfg.name}-{dt}-{prec}-out{odt}" + ("-bias" if has_bias else "")
        # quick-test subset: bf16 with bias (the tensor-core path) and fp32 "ieee" prefill (the FMA
        # path with the largest tile), default bitmap tile only
        rep = has_bias and out_dtype == dtype and cfg.name.split("-tk")[-1] in (cfg.name, "128") and (
            dtype == torch.bfloat16 or (dtype == torch.float32 and prec == "ieee" and "prefill" in cfg.name))
        specs.append(CompileSpec(kernel, sig, consts, cfg.num_warps, cfg.num_stages, name, is_gemm=True,
                                 expect_tensor_core=not (dtype == torch.float32 and prec == "ieee"),
                                 representative=rep, divisible=divisible, family=family,
                                 regime=reg, archs=archs,
                                 loop_weight_bytes=partial(tile_weight_bytes, cfg.BLOCK_N, cfg.BLOCK_K,
                                                           dtype.itemsize)))
    return specs


COMPILE_SPECS = compile_specs(_dense_gemm_kernel, "dense", {"w_ptr": "*{dt}"}, {"stride_wn": None, "stride_wk": 1})
