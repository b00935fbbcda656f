"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

For a linear ``W [R, C]`` with calibration inputs ``X [n, C]``, the layer objective is
``||W X^T - W' X^T||^2``, whose Hessian (in each row's weights) is ``H = (2/n) X^T X`` ``[C, C]``
(the same for every row). Removing weight ``q`` of a row and updating the remaining ones optimally
(Optimal Brain Surgeon) costs ``w_q^2 / [H^-1]_qq / 2`` and changes the row by
``-(w_q / [H^-1]_qq) [H^-1]_{q,:}``. SparseGPT processes the columns left to right: once column
``j`` is decided, it is never changed again, so the inverse Hessians of the remaining columns are
the successive Schur complements, whose rows are exactly the rows of the upper Cholesky factor
``U`` of ``H^-1`` (``H^-1 = U^T U``). Hence, for column j with ``d = U_jj``:

    err = (w_j - q_j) / d;   W[:, j:] -= err (outer) U[j, j:]

with ``q_j`` the column after masking. Implementation details, as in the paper:

- dampening: ``H += 0.01 * mean(diag H) * I`` (``percdamp``); dead inputs (``H_jj = 0``) get
  ``H_jj = 1`` and zero weights;
- columns in blocks of ``blocksize`` (128): updates inside a block are applied column by column on
  the block only, the accumulated errors are applied to the rest of the matrix in one GEMM at the
  end of the block (lazy batch updates);
- mask selection is adaptive: unstructured masks are chosen once per block of columns, pruning the
  ``round(R * b * sparsity)`` weights of the ``[R, b]`` block with the smallest ``w^2 / d^2``
  (so rows may differ, the layer's sparsity is exact per block); N:M masks are chosen per group of
  M columns when the loop reaches the group, from the already-updated weights (the block size is
  rounded down to a multiple of M).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .masks import check_sparsity, n_pruned, nm_mask, parse_pattern


def _gram(x: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """``X^T X`` ``[in, in]`` fp32 of ``x`` ``[..., in]``.

    Symmetric: computed as ``parts`` column strips, each only from its diagonal block rightwards
    (``X_a^T X_{a:}``), the rest mirrored, i.e. about (parts + 1) / (2 parts) of the full GEMM's
    multiply-adds. By their multiply-adds the Gram matrices are about a fifth of the main job's
    pruning stage (an estimate); measured at 2 threads, 4,096 tokens: 1536 columns 108 -> 77 ms,
    576 columns 17 -> 11 ms (``/tmp`` benchmark, docs/recovery.md stop 31).
    """
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    cols = flat.shape[1]
    if parts <= 1 or cols < 128 * parts:
        return flat.t() @ flat
    out = torch.empty(cols, cols, dtype=flat.dtype, device=flat.device)
    edges = [round(i * cols / parts) for i in range(parts + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        strip = flat[:, a:b].t() @ flat[:, a:]  # [b - a, cols - a]
        out[a:b, a:] = strip
        out[b:, a:b] = strip[:, b - a:].t()
    return out


def _version(x: torch.Tensor):
    """The in-place version counter of ``x`` (None for inference tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return None


class SharedInputGram:
    """``X^T X`` of the last input seen, reused when the next linear gets the *same tensor object*.

    q / k / v (and gate / up) of a block read one tensor; sharing one cache among their
    accumulators computes its Gram matrix once instead of three (two) times. The cache holds the
    input itself, so the tensor cannot be freed and its memory reused by a different one while a
    later call could mistake it for the cached one.
    """

    def __init__(self):
        self._x: Optional[torch.Tensor] = None
        self._version = None
        self._gram: Optional[torch.Tensor] = None

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        version = _version(x)
        if x is not self._x or version is None or self._version != version:
            self._x, self._version, self._gram = x, version, _gram(x)
        return self._gram

    def clear(self) -> None:
        self._x = self._gram = None


class HessianAccumulator:
    """Running ``X^T X`` ``[in, in]`` (fp32) over the inputs ``x`` ``[..., in]`` a linear sees.

    :meth:`result` returns ``H = (2/n) X^T X`` with n the number of tokens. ``shared``: a
    :class:`SharedInputGram` common to the linears that read the same tensor.
    """

    def __init__(self, shared: Optional[SharedInputGram] = None):
        self.xtx: Optional[torch.Tensor] = None
        self.tokens = 0
        self.shared = shared

    def add(self, x: torch.Tensor) -> None:
        upd = _gram(x) if self.shared is None else self.shared.gram(x)
        if self.xtx is None:  # a shared Gram matrix is read by the other accumulators too: copy it
            self.xtx = upd if self.shared is None else upd.clone()
        else:
            self.xtx.add_(upd)
        self.tokens += x.numel() // x.shape[-1]

    def result(self) -> torch.Tensor:
        if self.xtx is None:
            raise RuntimeError("no inputs were recorded for this linear (was the block run?)")
        return self.xtx * (2.0 / self.tokens)


def _live_hessian(hessian: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 copy of ``hessian`` with dead inputs (``H_jj = 0``) given ``H_jj = 1``, and their mask;
    their weights are zeroed by the callers."""
    h = hessian.detach().to(device, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return h, dead


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dampened ``H`` -> upper Cholesky factor ``U`` of ``H^-1`` (computed in fp64, returned fp32)."""
    h = hessian.double()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        lower = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(hinv, upper=True).float()
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise RuntimeError(f"SparseGPT: the dampened Hessian is not positive definite ({e}); "
                           f"use a larger percdamp than {percdamp} or more calibration data") from e


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Optional[str] = None,
                    *, blocksize: int = 128, percdamp: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Prune and reconstruct one linear's weight.

    weight: ``[R, C]`` any float dtype; hessian: ``[C, C]`` = (2/n) X^T X (any positive scaling
    gives the same result). Returns ``(new weight [R, C] fp32 on weight's device, keep-mask [R, C]
    bool, OBS loss = sum over pruned weights of (w - q)^2 / d^2 / 2)``. ``pattern`` "N:M" overrides
    ``sparsity``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if blocksize < 1 or percdamp < 0:
        raise ValueError(f"need blocksize >= 1 and percdamp >= 0, got {blocksize}, {percdamp}")
    nm = None
    if pattern is not None:
        nm = parse_pattern(pattern)
        if cols % nm[1]:
            raise ValueError(f"in_features={cols} is not a multiple of M={nm[1]} for pattern {pattern!r}")
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    else:
        sparsity = check_sparsity(sparsity)

    w = weight.detach().float().clone()
    h, dead = _live_hessian(hessian, w.device)
    w[:, dead] = 0.0
    u = _upper_cholesky_of_inverse(h, percdamp)

    mask = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    # the column loop is thousands of tiny ops: on the CPU, intra-op threads only add sync overhead
    # (measured 10x slower with 2 threads on a busy 2-core machine), so run it single-threaded
    threads = torch.get_num_threads()
    if w.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        if nm is None:
            _prune_columns(w, u, mask, loss, sparsity, nm, blocksize)
        else:
            _prune_columns_nm(w, u, mask, loss, nm[0], nm[1], blocksize)
    finally:
        torch.set_num_threads(threads)
    return w, mask, float(loss)


def _prune_columns(w, u, mask, loss, sparsity, nm, blocksize) -> None:
    """The blocked OBS sweep over the columns of ``w`` (in place), filling ``mask`` and ``loss``.

    Column by column, each column's update applied at once to the rest of its block: the reference
    for :func:`_prune_columns_nm` (N:M), and the unstructured path."""
    rows, cols = w.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        err1 = torch.zeros_like(w1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if nm is None:
            k = n_pruned(w1.numel(), sparsity)
            if k:
                score = (w1 * w1) / (d * d).unsqueeze(0)
                idx = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
                keep1.view(-1)[idx] = False
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                keep1[:, g] = nm_mask(w1[:, g] ** 2 / (d[g] ** 2).unsqueeze(0), nm[0], nm[1])
            col = w1[:, i]
            q = col * keep1[:, i]
            e = (col - q) / d[i]
            loss += (e * e).sum().double() / 2
            # OBS update of this block's remaining columns (column i itself becomes q exactly)
            w1[:, i:].sub_(torch.outer(e, u1[i, i:]))
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        mask[:, i1:i2] = keep1
        # lazy batch update: the block's accumulated errors hit the later columns in one GEMM
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])


@torch.no_grad()
def refit_masked(weight: torch.Tensor, original: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                 iters: int, percdamp: float = 0.01) -> Tuple[torch.Tensor, float, float]:
    """Least-squares refit of the kept weights on a fixed mask, a few CG steps from ``weight``.

    Minimises ``f(W) = tr((W - W0) H_d (W - W0)^T)`` over ``W`` with ``W = 0`` where ``mask`` is
    False, ``W0 = original`` and ``H_d`` the Hessian dampened as :func:`sparsegpt_prune` does.
    SparseGPT never revisits a column once decided, so its kept weights are not this minimum; the
    exact minimum needs one ``[C/2, C/2]`` solve per row (each row keeps other columns), so this
    runs ``iters`` steps of conjugate gradients instead, all rows at once (one ``[R, C] x [C, C]``
    GEMM a step; per-row step sizes; Jacobi preconditioner ``1 / diag(H_d)``).

    weight, original: ``[R, C]``; hessian ``[C, C]``; mask ``[R, C]`` bool. Returns ``(W fp32,
    f before, f after)``; ``f`` never increases (CG on a convex quadratic from a feasible start).
    """
    if weight.shape != original.shape or weight.shape != mask.shape or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"refit_masked: weight {tuple(weight.shape)}, original {tuple(original.shape)}, "
                         f"mask {tuple(mask.shape)} and hessian {tuple(hessian.shape)} do not fit")
    if iters < 0:
        raise ValueError(f"refit_masked: iters must be >= 0, got {iters}")
    h, dead = _live_hessian(hessian, weight.device)
    h.diagonal().add_(percdamp * h.diagonal().mean())
    keep = mask.to(torch.float32) * (~dead).to(torch.float32)  # dead inputs stay 0, as in SparseGPT
    w0 = original.detach().float() * (~dead).to(torch.float32)
    w = weight.detach().float() * keep
    inv_diag = 1.0 / h.diagonal()

    def f(x):
        d = x - w0
        return float(((d @ h) * d).sum())

    before = f(w)
    r = ((w0 - w) @ h) * keep  # minus the gradient, on the kept weights only
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        q = (p @ h) * keep
        pq = (p * q).sum(1, keepdim=True)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-30), torch.zeros_like(pq))
        w.add_(alpha * p)
        r.sub_(alpha * q)
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return w, before, f(w)


def _prune_columns_nm(w, u, mask, loss, n, m, blocksize) -> None:
    """:func:`_prune_columns` for an N:M pattern, group by group (same result up to rounding).

    Inside a group of ``m`` columns the OBS updates stay column by column, but only on the group's
    own later columns; the group's errors reach the rest of the block in one rank-``m`` GEMM once the
    group is done, before the next group's mask is chosen from its updated weights. Each column
    therefore sees exactly the updates it sees in the column-by-column sweep. The sweep runs on
    ``W^T`` so that a column is a contiguous vector and the N-of-M choice is elementwise over rows
    (``torch.topk`` over a dimension of 4 cost more than the rest of a group's step). This loop is
    Python-bound: SmolLM2's 210 linears took 33 s column by column in a profile of the main job's
    pruning stage (131 s in that profile).
    ``blocksize`` is a multiple of ``m``.
    """
    rows, cols = w.shape
    wt = w.t().contiguous()  # [C, R]
    keep_t = torch.empty(cols, rows, dtype=torch.bool, device=w.device)
    before = torch.ones(m, m, dtype=torch.bool, device=w.device).tril(-1).unsqueeze(2)  # [j, i, 1]: i < j
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        dd = (d * d).unsqueeze(1)
        err1 = torch.zeros_like(w1)
        width = i2 - i1
        for g0 in range(0, width, m):
            g1 = g0 + m
            wg = w1[g0:g1]  # [m, R]
            score = wg * wg / dd[g0:g1]  # w^2 / d^2, as the column-by-column sweep scores it
            # rank of each column in its row's group (ties: lower column first); keep the n best
            a, b = score.unsqueeze(0), score.unsqueeze(1)  # [1, i, R], [j, 1, R]
            rank = (a > b).sum(1) + ((a == b) & before).sum(1)
            keep = rank < n
            keep_t[i1 + g0:i1 + g1] = keep
            scale = (~keep).to(w1.dtype) / d[g0:g1].unsqueeze(1)  # e = (w - q) / d: w / d where pruned
            for j in range(m):
                c = g0 + j
                e = torch.mul(wg[j], scale[j], out=err1[c])
                if j + 1 < m:  # OBS update of the group's later columns
                    wg[j + 1:].addr_(u1[c, c + 1:g1], e, alpha=-1.0)
            wg.mul_(keep)  # each column becomes q exactly
            if g1 < width:  # the group's errors hit the block's later columns in one GEMM
                w1[g1:].addmm_(u1[g0:g1, g1:].t(), err1[g0:g1], alpha=-1.0)
        loss += (err1.double() ** 2).sum() / 2
        # lazy batch update: the block's accumulated errors hit the later columns in one GEMM
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)
    w.copy_(wt.t())
    mask.copy_(keep_t.t())
