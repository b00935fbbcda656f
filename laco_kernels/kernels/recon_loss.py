"""Fused block-reconstruction loss: one pass forward, one pass backward.

``pred`` and ``target`` are viewed as ``[R, D]`` (rows = tokens). Kinds (the oracle is
``reference.reconstruction_loss``, eps handling identical):

    mse     sum (p - t)^2 / (R * D)
    nmse    sum (p - t)^2 / max(sum t^2, 1e-12)
    cosine  mean_r 1 - dot_r / max(|p_r| |t_r|, 1e-8)

Forward: each program owns ``BLOCK_R`` rows, sweeps D in ``BLOCK_D`` chunks accumulating in
fp32, and writes its partial sums (no atomics, so the loss is deterministic); the host adds
the per-program partials (a few floats). For cosine it also writes the per-row statistics
``[R, 3]`` = (dot, |p|, |t|) the backward needs.

Backward: reads pred and target once and writes only grad_pred; the scalar upstream gradient
and the statistics are read on the device (no host sync). The target is a constant: it gets
no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KINDS = ("mse", "nmse", "cosine")
_KIND_ID = {"mse": 0, "nmse": 1, "cosine": 2}
_NMSE_EPS = 1e-12
_COS_EPS = 1e-8


def _config(r: int, d: int) -> dict:
    block_d = min(1024, triton.next_power_of_2(max(d, 16)))
    block_r = max(1, min(64, 4096 // block_d, triton.next_power_of_2(r)))
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_r * block_d <= 2048 else 8)


@triton.jit
def _recon_loss_fwd_kernel(p_ptr, t_ptr, partial_ptr, stats_ptr, R, D, stride_pr, stride_pd, stride_tr, stride_td,
                           KIND: tl.constexpr, COS_EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """partial[pid, 0:2] = (sum (p-t)^2, sum t^2) over the program's rows (mse / nmse), or
    (sum_r 1 - cos_r, 0) for cosine with stats[r] = (dot_r, |p_r|, |t_r|)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)   # sum (p-t)^2, or sum p^2 for cosine
    tt = tl.zeros((BLOCK_R,), dtype=tl.float32)   # sum t^2
    pt = tl.zeros((BLOCK_R,), dtype=tl.float32)   # sum p*t (cosine)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        inside = row_in[:, None] & (cols[None, :] < D)
        p = tl.load(p_ptr + rows[:, None] * stride_pr + cols[None, :] * stride_pd, mask=inside, other=0.0)
        t = tl.load(t_ptr + rows[:, None] * stride_tr + cols[None, :] * stride_td, mask=inside, other=0.0)
        p = p.to(tl.float32)
        t = t.to(tl.float32)
        tt += tl.sum(t * t, axis=1)
        if KIND == 2:
            sq += tl.sum(p * p, axis=1)
            pt += tl.sum(p * t, axis=1)
        else:
            diff = p - t
            sq += tl.sum(diff * diff, axis=1)
    if KIND == 2:
        pn = tl.sqrt(sq)
        tn = tl.sqrt(tt)
        cos = pt / tl.maximum(pn * tn, COS_EPS)
        tl.store(stats_ptr + rows * 3, pt, mask=row_in)
        tl.store(stats_ptr + rows * 3 + 1, pn, mask=row_in)
        tl.store(stats_ptr + rows * 3 + 2, tn, mask=row_in)
        tl.store(partial_ptr + pid * 2, tl.sum(tl.where(row_in, 1.0 - cos, 0.0), axis=0))
        tl.store(partial_ptr + pid * 2 + 1, 0.0)
    else:
        tl.store(partial_ptr + pid * 2, tl.sum(sq, axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(tt, axis=0))


@triton.jit
def _recon_loss_bwd_kernel(p_ptr, t_ptr, g_ptr, scale_ptr, stats_ptr, R, D, stride_pr, stride_pd, stride_tr,
                           stride_td, stride_gr, stride_gd, inv_count,
                           KIND: tl.constexpr, COS_EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_pred = dL/dp. mse / nmse: 2 (p - t) * scale, scale = g / (R*D) or g / max(sum t^2, eps)
    (precomputed on the device in scale_ptr[0]). cosine: with den = max(|p||t|, eps),
    d(1 - dot/den)/dp = -t/den + [|p||t| >= eps] dot |t| p / (den^2 |p|), times g / R."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    scale = tl.load(scale_ptr)
    if KIND == 2:
        dot = tl.load(stats_ptr + rows * 3, mask=row_in, other=0.0)
        pn = tl.load(stats_ptr + rows * 3 + 1, mask=row_in, other=0.0)
        tn = tl.load(stats_ptr + rows * 3 + 2, mask=row_in, other=0.0)
        raw = pn * tn
        den = tl.maximum(raw, COS_EPS)
        c_t = -scale * inv_count / den
        # clamp_min passes the gradient where raw >= eps (torch's convention); |p| > 0 there
        c_p = tl.where(raw >= COS_EPS, scale * inv_count * dot * tn / (den * den * tl.where(pn > 0, pn, 1.0)), 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        inside = row_in[:, None] & (cols[None, :] < D)
        p = tl.load(p_ptr + rows[:, None] * stride_pr + cols[None, :] * stride_pd, mask=inside, other=0.0)
        t = tl.load(t_ptr + rows[:, None] * stride_tr + cols[None, :] * stride_td, mask=inside, other=0.0)
        p = p.to(tl.float32)
        t = t.to(tl.float32)
        if KIND == 2:
            g = c_t[:, None] * t + c_p[:, None] * p
        else:
            g = 2.0 * scale * (p - t)
        tl.store(g_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gd, g.to(g_ptr.dtype.element_ty),
                 mask=inside)


# ----------------------------------------------------------------------------------------
# host launchers (pred / target as 2-D [R, D] views, any strides)
# ----------------------------------------------------------------------------------------
def recon_loss_fwd(pred: torch.Tensor, target: torch.Tensor, kind: str):
    """-> (loss fp32 0-dim, stats): stats is sum t^2 clamped ``[1]`` (nmse), ``[R, 3]`` (cosine) or empty."""
    r, d = pred.shape
    cfg = _config(r, d)
    programs = triton.cdiv(r, cfg["BLOCK_R"])
    partial = torch.empty(programs, 2, dtype=torch.float32, device=pred.device)
    stats = torch.empty(r if kind == "cosine" else 0, 3, dtype=torch.float32, device=pred.device)
    _recon_loss_fwd_kernel[(programs,)](
        pred, target, partial, stats, r, d, pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
        KIND=_KIND_ID[kind], COS_EPS=_COS_EPS, **cfg)
    sums = partial.sum(0)
    if kind == "mse":
        return sums[0] / (r * d), stats
    if kind == "nmse":
        denom = sums[1:2].clamp_min(_NMSE_EPS)
        return sums[0] / denom[0], denom
    return sums[0] / r, stats


def recon_loss_bwd(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, kind: str,
                   stats: torch.Tensor) -> torch.Tensor:
    """d loss / d pred as a new ``[R, D]`` tensor in pred's dtype; ``stats`` from :func:`recon_loss_fwd`."""
    r, d = pred.shape
    cfg = _config(r, d)
    g = torch.empty(r, d, dtype=pred.dtype, device=pred.device)
    go = grad_out.detach().to(torch.float32).reshape(1)
    scale = {"mse": lambda: go / (r * d), "nmse": lambda: go / stats, "cosine": lambda: go}[kind]()
    _recon_loss_bwd_kernel[(triton.cdiv(r, cfg["BLOCK_R"]),)](
        pred, target, g, scale, stats if kind == "cosine" else scale, r, d, pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1), g.stride(0), g.stride(1), 1.0 / r,
        KIND=_KIND_ID[kind], COS_EPS=_COS_EPS, **cfg)
    return g


# ----------------------------------------------------------------------------------------
# compile checks (bench/compile_report.py)
# ----------------------------------------------------------------------------------------
def _compile_specs():
    import inspect

    from ._compile import CompileSpec

    types = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
    specs = []
    for dt, p in types.items():
        for r, d in ((4096, 64), (512, 576), (512, 4096)):
            cfg = _config(r, d)
            warps = cfg.pop("num_warps")
            for kind, kid in _KIND_ID.items():
                for kernel, ptrs in ((_recon_loss_fwd_kernel, dict(p_ptr=p, t_ptr=p, partial_ptr="*fp32",
                                                                    stats_ptr="*fp32")),
                                     (_recon_loss_bwd_kernel, dict(p_ptr=p, t_ptr=p, g_ptr=p, scale_ptr="*fp32",
                                                                   stats_ptr="*fp32", inv_count="fp32"))):
                    consts = dict(KIND=kid, COS_EPS=_COS_EPS, stride_pd=1, stride_td=1, stride_gd=1, **cfg)
                    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32")
                           for n in inspect.signature(kernel.fn).parameters}
                    consts = {k: v for k, v in consts.items() if k in sig}
                    divisible = tuple(a for a, t in sig.items() if t.startswith("*") or a in ("D", "stride_pr",
                                                                                              "stride_tr", "stride_gr"))
                    specs.append(CompileSpec(kernel, sig, consts, warps, 1, f"{dt} {kind} D={d}", is_gemm=False,
                                             representative=dt == "bfloat16" and kind == "cosine" and d == 576,
                                             divisible=divisible, family="recon_loss", regime="train-loss"))
    return specs


COMPILE_SPECS = _compile_specs()
