"""Time model of the SASS audit: what one call launches, and a two-term roofline fitted to H100 rows.

A call of a GEMM op is a list of *launches* (:func:`inference_plan`, :func:`training_plan`),
each ``{name, spec, programs, iterations, bytes}``: the Triton kernel (its CompileSpec, the
number of programs and the average number of steady-state loop iterations each runs, the HBM
bytes it moves) and the torch passes the host adds (the split-K reduction ``out.sum(0)`` and the
cast ``y.copy_``, the ``W * M`` product of the torch training path: bytes only, ``spec`` None).
The plans mirror the host launchers: grid and split-K of ``dense_gemm.launch`` /
``dense_gemm.split_k`` (132 SMs, as on an H100), the training launchers' ``_config`` /
``_dx_config`` / ``_dw_config``. A kernel module whose launcher differs can define
``SASS_LAUNCH_PLAN(spec, m, n, k, density) -> list of launches`` (same keys), used instead.

Features of a launch (:func:`features`), from the spec's SASS loop statistics (``_sass``):
``bytes`` and the thread-instructions the busiest SM issues,
``max(programs / SMS, 1) x (iterations x loop + rest) x 32 x warps`` (``rest`` = the
instructions outside the loop, counted once per program).

Model (:func:`predict_us`), per launch, summed over the launches of a call:
``max`` variant ``L + max(bytes / BW, sm_instructions / IR)``, ``sum`` variant
``L + bytes / BW + sm_instructions / IR``; BW (bytes/us), IR (thread-instructions/us per SM),
L (us per launch) are fitted (:func:`fit`) by least squares on log(predicted / measured).
A third term (``sm_mac`` multiply-adds of the tensor-core loops at a fitted rate, ``max3``) is
fitted for information, not used. Every time it returns is a prediction.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, List, Sequence

import numpy as np
import triton

from laco_kernels.kernels import dense_gemm
from laco_kernels.kernels._compile import CompileSpec, _raw_fn

SMS = 132  # H100 SXM
_ISZ = {"fp16": 2, "bf16": 2, "fp32": 4}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def spec_dtype(spec: CompileSpec) -> str:
    """The input dtype (``fp16`` / ``bf16`` / ``fp32``): the type of the first pointer argument."""
    return next(t for t in spec.signature.values() if t.startswith("*"))[1:]


def spec_out_dtype(spec: CompileSpec) -> str | None:
    t = spec.signature.get("y_ptr")
    return t[1:] if t else None


def block(spec: CompileSpec, name: str) -> int:
    return int(spec.constexprs[name])


def find_spec(specs: Sequence[CompileSpec], *, family: str, regime: str, dtype: str, kernel: str | None = None,
              out_dtype: str | None = None, blocks: Dict[str, int] | None = None, arch: int = 90) -> CompileSpec | None:
    """The spec a launch on ``sm_<arch>`` compiles (the model is an H100's: sm_90 by default): same
    family, regime, input dtype (and kernel name, output dtype, block sizes when given); without a
    bias where both variants exist."""
    cand = [s for s in specs if arch in s.archs and s.family == family and s.regime == regime and spec_dtype(s) == dtype
            and (kernel is None or s.name == kernel) and (out_dtype is None or spec_out_dtype(s) in (None, out_dtype))
            and all(s.constexprs.get(b) == v for b, v in (blocks or {}).items())]
    # the plain launch first: no bias, fp32 "ieee" (the default precision)
    cand.sort(key=lambda s: (bool(s.constexprs.get("HAS_BIAS", False)),
                             s.constexprs.get("DOT_PRECISION", "ieee") != "ieee"))
    return cand[0] if cand else None


def _module_plan(spec: CompileSpec) -> Callable | None:
    mod = importlib.import_module(_raw_fn(spec.kernel).__module__)
    return getattr(mod, "SASS_LAUNCH_PLAN", None)


def _torch_pass(name: str, nbytes: float) -> dict:
    return dict(name=name, spec=None, programs=0, iterations=0.0, bytes=float(nbytes))


def inference_plan(spec: CompileSpec, m: int, n: int, k: int, density: float,
                   specs: Sequence[CompileSpec]) -> List[dict]:
    """Launches of one ``y[m, n] = x[m, k] @ W^T`` call through ``dense_gemm.launch`` with the
    kernel of ``spec`` (its decode or prefill config). The split-K partials are fp32: the spec
    with an fp32 output is used then (looked up in ``specs``)."""
    custom = _module_plan(spec)
    if custom is not None:
        return custom(spec, m, n, k, density)
    dt = spec_dtype(spec)
    missing = [b for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M") if b not in spec.constexprs]
    if missing or spec.loop_weight_bytes is None:
        raise LookupError(f"{spec.name} [{spec.config}]: not launched through dense_gemm.launch (no "
                          f"{missing or 'loop_weight_bytes'}); define SASS_LAUNCH_PLAN in its module")
    cfg = dense_gemm.GemmConfig("audit", block(spec, "BLOCK_M"), block(spec, "BLOCK_N"), block(spec, "BLOCK_K"),
                                block(spec, "GROUP_M"), spec.num_warps, spec.num_stages)
    splits, k_per = dense_gemm.split_k(cfg, m, n, k, _CPU)
    out_dt = "fp32" if splits > 1 else dt
    main = find_spec(specs, family=spec.family, regime=spec.regime, dtype=dt, kernel=spec.name, out_dtype=out_dt,
                     blocks={b: block(spec, b) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}) or spec
    m_tiles, n_tiles, k_tiles = (triton.cdiv(m, cfg.BLOCK_M), triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(k, cfg.BLOCK_K))
    w_bytes = n_tiles * k_tiles * main.loop_weight_bytes(density)  # HBM reads each weight byte once (L2 reuse)
    isz = _ISZ[dt]
    launches = [dict(name=main.name, spec=main, programs=m_tiles * n_tiles * splits, iterations=k_tiles / splits,
                     bytes=w_bytes + m * k * isz + splits * m * n * _ISZ[out_dt])]
    if splits > 1:  # y.copy_(out.sum(0)): a reduction kernel and a cast kernel
        launches.append(_torch_pass("splitk_sum", splits * m * n * 4 + m * n * 4))
        launches.append(_torch_pass("cast_copy", m * n * 4 + m * n * isz))
    return launches


class _Cpu:
    type = "cpu"


_CPU = _Cpu()  # split_k only asks device.type: "cpu" -> the default SM count (132, an H100)


def _train_cfg(regime: str, m: int, n: int, dtype: str, family: str = "masked", k: int | None = None) -> dict:
    """The tile config the training launchers pick (masked_gemm._config / _dx_config / _dw_config,
    sparse24_grad._dx24_config for the 2:4 dX)."""
    import torch

    from laco_kernels.kernels import masked_gemm as mg
    from laco_kernels.kernels import sparse24_grad as sg

    td = getattr(torch, DTYPES[dtype])
    dx = (lambda: sg._dx24_config(m, td, 90, k, n)) if family == "sparse24" else (lambda: mg._dx_config(m, td, k, SMS, n, 90))
    return {"train-fwd": lambda: mg._config(m, td, n, SMS, k, 90), "train-dx": dx,
            "train-dw": lambda: mg._dw_config(n, td, k, SMS)}[regime]()


def training_kernel_plan(spec_family: str, regime: str, m: int, n: int, k: int, dtype: str,
                         specs: Sequence[CompileSpec], kernel: str | None = None) -> List[dict]:
    """One launch of a training kernel for a linear ``y[m, n] = x[m, k] @ W[n, k]^T``:
    ``train-fwd`` computes y, ``train-dx`` dX [m, k] (reduction over n), ``train-dw`` dW [n, k]
    (or dV [n, k/2] for 2:4; reduction over m)."""
    cfg = _train_cfg(regime, m, n, dtype, spec_family, k)
    blocks = {b: cfg[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    # the dX / dW launchers pass EVEN (the loop's dimension a multiple of its step): that variant,
    # else (a config audited without it) the general one
    even = {"train-dx": n % cfg["BLOCK_N"] == 0, "train-dw": m % cfg["BLOCK_M"] == 0}.get(regime)
    splits = 1
    if spec_family == "sparse24" and regime == "train-dx":  # the 2:4 dX may split its reduction over n
        from laco_kernels.kernels import sparse24_grad as sg

        splits = sg._dx24_splits(m, n, k, cfg, SMS)
        blocks["SPLIT"] = splits > 1
    spec = None
    if even is not None:
        spec = find_spec(specs, family=spec_family, regime=regime, dtype=dtype, kernel=kernel,
                         blocks=dict(blocks, EVEN=even)) or find_spec(specs, family=spec_family, regime=regime,
                                                                      dtype=dtype, kernel=kernel,
                                                                      blocks=dict(blocks, EVEN=False))
    spec = spec or find_spec(specs, family=spec_family, regime=regime, dtype=dtype, kernel=kernel, blocks=blocks)
    if spec is None:
        raise LookupError(f"no {spec_family} {regime} {dtype} spec with blocks {cfg}")
    custom = _module_plan(spec)
    if custom is not None:
        return custom(spec, m, n, k, 0.5)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    isz = _ISZ[dtype]
    w_tiles = triton.cdiv(n, bn) * triton.cdiv(k, bk)
    if regime == "train-fwd":
        programs, iters = triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk)
        nbytes = w_tiles * spec.loop_weight_bytes(0.5) + m * k * isz + m * n * isz
    elif regime == "train-dx":
        # split: each slice a whole number of steps (the last one may be shorter; counted as long),
        # its fp32 partial [m, k] written, then summed by _splitk.reduce_partials (one more launch)
        from laco_kernels.kernels import sparse24_grad as sg

        splits, n_per = sg._dx24_slices(n, bn, splits)
        programs, iters = triton.cdiv(m, bm) * triton.cdiv(k, bk) * splits, n_per // bn
        nbytes = w_tiles * spec.loop_weight_bytes(0.5) + m * n * isz + m * k * (isz if splits == 1 else 4 * splits)
        if splits > 1:
            return [dict(name=spec.name, spec=spec, programs=programs, iterations=float(iters), bytes=float(nbytes)),
                    _torch_pass(f"{spec.name}:splitk_reduce", m * k * (4 * splits + isz))]
    else:  # dW / dV: dY and X in, the (masked or kept-half) gradient and the mask / meta words
        programs, iters = w_tiles, triton.cdiv(m, bm)
        grad = n * k * isz / (2 if spec_family == "sparse24" else 1)
        nbytes = m * n * isz + m * k * isz + grad + n * triton.cdiv(k, 32) * 4
    return [dict(name=spec.name, spec=spec, programs=programs, iterations=float(iters), bytes=float(nbytes))]


def dense_plan(m: int, n: int, k: int, dtype: str, specs: Sequence[CompileSpec]) -> List[dict]:
    """The dense Triton GEMM (``dense_gemm``) of the same shape: the yardstick of every plan."""
    spec = find_spec(specs, family="dense", regime=dense_gemm.regime(m), dtype=dtype, kernel="_dense_gemm_kernel")
    return inference_plan(spec, m, n, k, 1.0, specs)


def masked_step_plan(m: int, n: int, k: int, dtype: str, specs: Sequence[CompileSpec]) -> List[dict]:
    """``masked_linear``'s Triton launches for one linear: from ``GUARD_MIN_ROWS`` tokens the guard
    (``pruned_nonzero``: a read of W and its bits) and the forward / dX loops it selects when W is
    zero at the pruned slots (recovery keeps it so: ``masked-zero`` specs), else the masked loops;
    dW is always masked."""
    from laco_kernels.kernels import masked_gemm as mg

    if m < mg.GUARD_MIN_ROWS:
        return [p for r in ("train-fwd", "train-dx", "train-dw") for p in training_kernel_plan("masked", r, m, n, k,
                                                                                                dtype, specs)]
    check = find_spec(specs, family="masked", regime="train-check", dtype=dtype)
    c = mg._CHECK_CFG
    plan = [dict(name=check.name, spec=check, programs=triton.cdiv(n, c["BLOCK_N"]) * triton.cdiv(k, c["BLOCK_K"]),
                 iterations=0.0, bytes=float(n * k * _ISZ[dtype] + n * triton.cdiv(k, 32) * 4))]
    plan += training_kernel_plan("masked-zero", "train-fwd", m, n, k, dtype, specs)
    plan += training_kernel_plan("masked-zero", "train-dx", m, n, k, dtype, specs)
    return plan + training_kernel_plan("masked", "train-dw", m, n, k, dtype, specs)


def _sparse24_forward_spec(m: int, n: int, dtype: str, specs: Sequence[CompileSpec]) -> CompileSpec:
    """The 2:4 forward spec ``dense_gemm.launch`` runs for ``m`` rows and ``n`` output columns on an
    H100 (sm_90, ``SMS`` SMs): its architecture row, or the grid-filling row it gives way to."""
    import torch

    cfg = dense_gemm.gemm_config("sparse24", m, getattr(torch, DTYPES[dtype]), arch=90, n=n, sms=SMS)
    spec = find_spec(specs, family="sparse24", regime=dense_gemm.regime(m), dtype=dtype, kernel="_sparse24_gemm_kernel",
                     blocks=cfg.meta())
    if spec is None:
        raise LookupError(f"no sparse24 forward spec for {cfg}")
    return spec


def training_step_plans(tokens: int, linears: Sequence[tuple], dtype: str,
                        specs: Sequence[CompileSpec]) -> Dict[str, List[dict]]:
    """Launches of one forward + backward of the block's linears ``[(name, n, k)]`` for each path:
    ``torch`` = ``F.linear(x, W * M)`` + autograd (W * M, 3 dense GEMMs, dW * M; GEMMs modelled as
    the dense Triton GEMM), ``masked`` = masked_linear fwd / dX / dW, ``sparse24`` = the 2:4 forward
    (inference kernel) / dX / dV."""
    isz = _ISZ[dtype]
    out: Dict[str, List[dict]] = {"torch": [], "masked": [], "sparse24": [], "masked_expand": [], "sparse24_expand": []}
    for name, n, k in linears:
        wm = n * k * (2 * isz + 1)  # read W and a bool mask, write the product
        out["torch"] += [_torch_pass(f"{name}:W*M", wm), *dense_plan(tokens, n, k, dtype, specs),
                         *dense_plan(tokens, k, n, dtype, specs), *dense_plan(n, k, tokens, dtype, specs),
                         _torch_pass(f"{name}:dW*M", wm)]
        out["masked"] += masked_step_plan(tokens, n, k, dtype, specs)
        fwd24 = _sparse24_forward_spec(tokens, n, dtype, specs)
        out["sparse24"] += [*inference_plan(fwd24, tokens, n, k, 0.5, specs),
                            *[p for r in ("train-dx", "train-dw")
                              for p in training_kernel_plan("sparse24", r, tokens, n, k, dtype, specs)]]
        # the expand path: the dense weight written once per GEMM that reads it (forward, dX),
        # cuBLAS GEMMs (modelled as the torch path's), the weight gradient in our kernels
        for fam in ("masked", "sparse24"):
            exp = expand_plan(fam, n, k, dtype, specs)
            out[f"{fam}_expand"] += [*exp, *dense_plan(tokens, n, k, dtype, specs), *exp,
                                     *dense_plan(tokens, k, n, dtype, specs),
                                     *training_kernel_plan(fam, "train-dw", tokens, n, k, dtype, specs)]
    return out


def expand_plan(family: str, n: int, k: int, dtype: str, specs: Sequence[CompileSpec]) -> List[dict]:
    """One launch of ``kernels/weight_expand.py``'s kernel of ``family`` (no loop: one tile a program)."""
    from laco_kernels.kernels import weight_expand as we

    spec = find_spec(specs, family=family, regime="train-expand", dtype=dtype)
    if spec is None:
        raise LookupError(f"no {family} train-expand {dtype} spec")
    programs = triton.cdiv(n, we._CFG["BLOCK_N"]) * triton.cdiv(k, we._CFG["BLOCK_K"])
    return [dict(name=spec.name, spec=spec, programs=programs, iterations=0.0,
                 bytes=we.expand_bytes(family, n, k, _ISZ[dtype]))]


# ----------------------------------------------------------------------------------------
# features and the fitted model
# ----------------------------------------------------------------------------------------
def features(plan: Sequence[dict], stats: Callable[[CompileSpec], dict]) -> List[dict]:
    """``[{name, bytes, sm_instr, sm_mac}]`` per launch (``sm_*``: on the busiest SM);
    ``stats(spec)`` gives the spec's sm_90 loop statistics and compile record."""
    out = []
    for p in plan:
        sm_mac = 0.0
        if p["spec"] is not None:
            st = stats(p["spec"])
            loop, rest = st["loop_instructions"], st["total_instructions"] - st["loop_instructions"]
            per_sm = max(p["programs"] / SMS, 1.0)
            sm_instr = per_sm * (p["iterations"] * loop + rest) * 32 * st["num_warps"]
            c = p["spec"].constexprs
            if st["classes"].get("tensor_core") and all(b in c for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
                sm_mac = per_sm * p["iterations"] * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"]
            out.append(dict(name=p["name"], bytes=float(p["bytes"]), sm_instr=float(sm_instr), sm_mac=float(sm_mac)))
        else:
            out.append(dict(name=p["name"], bytes=float(p["bytes"]), sm_instr=0.0, sm_mac=0.0))
    return out


def predict_us(feats: Sequence[dict], params: Dict[str, float], kind: str) -> float:
    """Predicted microseconds of one call (sum over its launches)."""
    total = 0.0
    for f in feats:
        tb, ti = f["bytes"] / params["bw_bytes_per_us"], f["sm_instr"] / params["ir_thread_instr_per_us_per_sm"]
        if kind == "max3":  # the tensor-core variant: MMA multiply-adds at their own rate
            total += params["launch_us"] + max(tb, ti, f.get("sm_mac", 0.0) / params["tc_mac_per_us_per_sm"])
        else:
            total += params["launch_us"] + (max(tb, ti) if kind == "max" else tb + ti)
    return total


def _errors(rows, params, kind):
    return np.array([math.log(predict_us(r["features"], params, kind) / r["measured_us"]) for r in rows])


# physical starting points (H100): 3.35 TB/s; 4 warp-issues a clock at 1.755 GHz; ~1000 dense fp16
# TFLOP/s = 500e6 multiply-adds per us over 132 SMs
_START = dict(bw_bytes_per_us=3.35e6, ir_thread_instr_per_us_per_sm=4 * 32 * 1755.0, launch_us=2.0,
              tc_mac_per_us_per_sm=500e6 / SMS)


def _fit_variant(rows, kind: str, launch: bool) -> dict:
    from scipy.optimize import least_squares

    keys = ["bw_bytes_per_us", "ir_thread_instr_per_us_per_sm"] + (["launch_us"] if launch else []) + (
        ["tc_mac_per_us_per_sm"] if kind == "max3" else [])

    def params_of(z):
        p = dict(launch_us=0.0)
        p.update({key: math.exp(v) for key, v in zip(keys, z)})
        return p

    res = least_squares(lambda z: _errors(rows, params_of(z), kind), [math.log(_START[key]) for key in keys])
    p = params_of(res.x)
    e = _errors(rows, p, kind)
    return dict(kind=kind, launch_term=launch, params=p, rms_log_error=float(np.sqrt(np.mean(e ** 2))),
                max_abs_rel_error=float(np.max(np.abs(np.exp(e) - 1))))


def fit(rows: Sequence[dict]) -> dict:
    """Fit the model to ``rows`` (``{features, measured_us}``) by least squares on log(pred / meas).

    Variants: max or sum of the two terms, each with and without a launch term; the chosen model
    is the variant with the lowest RMS log error, a launch term kept only if it lowers that error
    by more than 5%. ``max3`` (a third, tensor-core term, with launch) is fitted for information
    only. Returns ``{kind, launch_term, params, rms_log_error, max_abs_rel_error, variants}``."""
    variants = [_fit_variant(rows, k, launch) for k in ("max", "sum") for launch in (False, True)]
    variants.append(_fit_variant(rows, "max3", True))
    best = None
    for kind in ("max", "sum"):
        no_l, with_l = (v for v in variants if v["kind"] == kind)
        cand = with_l if with_l["rms_log_error"] < 0.95 * no_l["rms_log_error"] else no_l
        if best is None or cand["rms_log_error"] < best["rms_log_error"]:
            best = cand
    return dict(best, variants=variants)
