"""Split-K plumbing of the decode GEMVs (``sparse24_gemv.py``, ``bitmap_gemv.py``).

A decode GEMV splits K over ``S`` programs per output tile so that a few hundred rows still
fill every SM. Each slice writes fp32 partials ``[S, M, N]``; :func:`reduce_partials` sums them,
adds the bias and casts to the output dtype in ONE small kernel (``_splitk_reduce_kernel``), where
``out.sum(0)`` followed by a copy would launch two. With ``S == 1`` the GEMV stores ``y`` itself
and nothing else is launched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compile import CompileSpec

_DEFAULT_SMS = 132  # H100 SXM; used when no CUDA device tells us (interpreter)
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def choose_splits(programs: int, k_chunks: int, device: torch.device, max_splits: int = 16, per_sm: int = 1) -> int:
    """Number of K slices: enough programs for ``per_sm`` per SM (fewer slices mean fewer partial sums and
    no reduce launch; each program's prologue / epilogue is paid once per slice), each slice a whole
    number of ``k_chunks`` (the GEMV's unrolled K step), at most ``max_splits``."""
    want = min(k_chunks, max_splits, max(1, triton.cdiv(per_sm * num_sms(device), max(programs, 1))))
    per = triton.cdiv(k_chunks, want)
    return triton.cdiv(k_chunks, per)


def slice_k(programs: int, k: int, chunk: int, device, splits: int | None = None, granule: int = 32,
            per_sm: int = 1) -> tuple:
    """(K slices, columns per slice) of a split-K decode launch with ``programs`` per slice: slices of
    whole ``chunk``-column steps chosen by :func:`choose_splits`, or (``splits`` given, tests) of whole
    ``granule``-column steps, so a test can reach a kernel's remainder paths."""
    if splits is None:
        s = choose_splits(programs, triton.cdiv(k, chunk), device, per_sm=per_sm)
        k_per = triton.cdiv(triton.cdiv(k, s), chunk) * chunk
    else:
        k_per = triton.cdiv(triton.cdiv(k, splits), granule) * granule
    return triton.cdiv(k, k_per), k_per


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[MN] = sum_s p[s, MN] (+ b[n]) in y's dtype; p fp32 ``[S, M, N]`` contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


_REDUCE_BLOCK = 1024


@triton.jit
def store_gemv_row(out, y_ptr, b_ptr, offs_n, N, pid_k, pid_m, stride_ys, stride_ym,
                   PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store one GEMV output row ``out`` [BLOCK_N] (fp32): the raw partial of K slice ``pid_k``, or
    (+ bias) cast to y's dtype when K is not split."""
    dst = y_ptr + pid_k * stride_ys + pid_m * stride_ym + offs_n
    if PARTIAL:
        tl.store(dst, out, mask=offs_n < N)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(dst, out.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def reduce_partials(partials: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """partials fp32 ``[S, M, N]`` (contiguous) -> y ``[M, N]`` (contiguous) = sum + bias, in y's dtype."""
    s, m, n = partials.shape
    mn = m * n
    _splitk_reduce_kernel[(triton.cdiv(mn, _REDUCE_BLOCK),)](
        partials, bias if bias is not None else partials, y, mn, n, s, HAS_BIAS=bias is not None,
        BLOCK=_REDUCE_BLOCK, num_warps=4, num_stages=1)
    return y


def reduce_specs():
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for has_bias in (False, True):
            specs.append(CompileSpec(
                _splitk_reduce_kernel, dict(p_ptr="*fp32", b_ptr=f"*{dt}", y_ptr=f"*{dt}", MN="i32", N="i32", S="i32",
                                            HAS_BIAS="constexpr", BLOCK="constexpr"),
                dict(HAS_BIAS=has_bias, BLOCK=_REDUCE_BLOCK), 4, 1, f"splitk-reduce-{dt}" + ("-bias" if has_bias else ""),
                is_gemm=False, representative=has_bias and dt == "bf16",
                divisible=("p_ptr", "b_ptr", "y_ptr", "MN", "N")))
    return specs


REDUCE_SPECS = reduce_specs()  # registered once, in sparse24_gemv.COMPILE_SPECS


def reduce_launch(m: int, n: int, s: int, dt: str, has_bias: bool = False) -> dict:
    """The SASS audit's launch record (``bench/sass_model.py``) of :func:`reduce_partials`."""
    spec = next(sp for sp in REDUCE_SPECS if sp.config == f"splitk-reduce-{dt}" + ("-bias" if has_bias else ""))
    isz = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    return dict(name=spec.name, spec=spec, programs=triton.cdiv(m * n, _REDUCE_BLOCK), iterations=float(s),
                bytes=float(s * m * n * 4 + m * n * isz + (n * isz if has_bias else 0)))


class AuditDevice:
    """What ``choose_splits`` sees in the SASS audit: no CUDA device -> 132 SMs (an H100)."""
    type = "cpu"


def splitk_plan(main, programs: int, iterations: float, weight_bytes: float, m: int, n: int, k: int, isz: int,
                s: int, dt: str) -> list:
    """The audit's launch records (``bench/sass_model.py``) of one split-K decode call: the main kernel
    (the weight from HBM once: the programs sharing a row block run together; x; the output or the fp32
    partials) and, with ``s > 1`` slices, :func:`reduce_partials`."""
    launches = [dict(name=main.name, spec=main, programs=programs, iterations=iterations,
                     bytes=float(weight_bytes) + m * k * isz + (s * m * n * 4 if s > 1 else m * n * isz))]
    if s > 1:
        launches.append(reduce_launch(m, n, s, dt))
    return launches
