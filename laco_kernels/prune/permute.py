"""Channel permutation before N:M selection: choose which input channels share a group of M.

An N:M pattern keeps N of every M *consecutive* input weights of a row, so which channels are
neighbours decides what can be kept. Two places of a decoder block let us reorder input channels
without changing the function the block computes:

- the MLP's hidden channels: permuting the rows of ``gate`` / ``up`` (their outputs) and the
  columns of ``down`` (its inputs) the same way leaves the block's output unchanged; and
- the value channels inside each key-value head: permuting the rows of ``v`` within each head and
  the matching columns of ``o`` for every query head that reads that value head (the softmax
  weights mix whole value vectors, so a permutation of their coordinates passes through).

The permutation is chosen to minimise the saliency the N:M mask would drop: for a saliency matrix
``S [R, C]`` (e.g. ``w^2 * diag(H)``, SparseGPT's pruning cost without the update), the cost of a
group of M columns is, summed over the rows, its M - N smallest entries. The search (after Pool &
Yu, NeurIPS 2021, "Channel Permutations for N:M Sparsity"; our own implementation) starts from
the better of the identity and a round-robin of the columns sorted by total saliency (each group
gets one column of every quantile), then improves it by rounds of single swaps: each round pairs
the groups at random and applies, for every pair, the best of its M * M one-channel swaps if it
lowers the pair's cost (scored on the rows of largest saliency, ``max_rows``). The result is never
worse than the identity on all rows (checked at the end).

``docs/recovery.md`` has the measured effect on SmolLM2 (``permute=True`` of ``prune_model``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.adapters import get_module

PERMUTE_PARTS = ("mlp", "value")  # MLP hidden channels; value channels within each kv head
MARK = "laco_channels_permuted"  # config attribute: which channel groups prune_model reordered


def _dropped(g: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Sum of the ``m - n`` smallest entries along ``dim`` (of size m) of ``g``."""
    if (n, m) == (2, 4):  # a min/max network: several times faster than topk on a dim of 4
        a, b, c, d = g.unbind(dim)
        lo1, hi1 = torch.minimum(a, b), torch.maximum(a, b)
        lo2, hi2 = torch.minimum(c, d), torch.maximum(c, d)
        return torch.minimum(lo1, lo2) + torch.minimum(torch.maximum(lo1, lo2), torch.minimum(hi1, hi2))
    return torch.topk(g, m - n, dim=dim, largest=False, sorted=False).values.sum(dim)


def group_cost(sal: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dropped saliency of each group of ``m`` consecutive columns under an ``n:m`` mask.

    sal: ``[R, C]`` non-negative, C divisible by m. Returns ``[C // m]`` (fp64 sums).
    """
    _check(sal, n, m)
    r, c = sal.shape
    return _dropped(sal.reshape(r, c // m, m), n, m).double().sum(0)


def _check(sal: torch.Tensor, n: int, m: int) -> None:
    if not isinstance(sal, torch.Tensor) or sal.dim() != 2 or not sal.is_floating_point():
        raise ValueError(f"saliency must be a 2-D float tensor [rows, columns], got "
                         f"{getattr(sal, 'shape', type(sal).__name__)}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"need integers 0 < n < m for an n:m pattern, got {n}:{m}")
    if sal.shape[1] % m:
        raise ValueError(f"columns ({sal.shape[1]}) must be a multiple of m={m}")
    if not bool(torch.isfinite(sal).all()) or bool((sal < 0).any()):
        raise ValueError("saliency must be finite and non-negative")


_GATHER_ELEMS = 1 << 25  # largest gathered block of one swap round (128 MB of fp32)


def _round_robin(sal: torch.Tensor, m: int) -> torch.Tensor:
    """Columns sorted by total saliency, dealt one per quantile into each group."""
    c = sal.shape[1]
    order = torch.argsort(sal.double().sum(0), descending=True)
    return order.reshape(m, c // m).t().reshape(-1)


def _swap_round(sal_t: torch.Tensor, perm: torch.Tensor, n: int, m: int, gen: torch.Generator) -> int:
    """One round of best single swaps between randomly paired groups; returns how many were applied.

    sal_t: the saliency transposed, ``[C, R]`` contiguous (a column is one contiguous gather)."""
    c, r = sal_t.shape
    n_groups = c // m
    pairs = torch.randperm(n_groups, generator=gen)[: n_groups // 2 * 2].reshape(-1, 2)  # [P, 2]
    p = pairs.shape[0]
    cols = perm.reshape(n_groups, m)[pairs]  # [P, 2, m] channel ids
    a, b = cols[:, 0], cols[:, 1]  # [P, m]
    # candidate (i, j): swap a[i] and b[j]; index 0 .. m*m - 1, plus "no swap" as the last
    ii = torch.arange(m).repeat_interleave(m)
    jj = torch.arange(m).repeat(m)
    k = m * m
    ga = a.unsqueeze(1).expand(p, k, m).clone()
    gb = b.unsqueeze(1).expand(p, k, m).clone()
    ar = torch.arange(k)
    ga[:, ar, ii] = b[:, jj]
    gb[:, ar, jj] = a[:, ii]
    ga = torch.cat([ga, a.unsqueeze(1)], 1)  # [P, k+1, m]
    gb = torch.cat([gb, b.unsqueeze(1)], 1)
    both = torch.stack([ga, gb], 2).reshape(-1)  # [P*(k+1)*2*m]
    cost = torch.zeros(p, k + 1, dtype=torch.float64)
    step = max(1, _GATHER_ELEMS // max(both.numel(), 1))  # rows per chunk: bounded temporaries
    for r0 in range(0, r, step):
        vals = sal_t[:, r0:r0 + step].index_select(0, both).reshape(p, k + 1, 2, m, -1)
        cost += _dropped(vals, n, m, dim=3).double().sum(dim=(2, 3))  # [P, k+1]
    best = torch.argmin(cost, dim=1)
    better = cost.gather(1, best[:, None]).squeeze(1) < cost[:, k] * (1 - 1e-12)
    idx = torch.nonzero(better).flatten()
    if idx.numel():
        new = perm.clone().reshape(n_groups, m)
        new[pairs[idx, 0]] = ga[idx, best[idx]]
        new[pairs[idx, 1]] = gb[idx, best[idx]]
        perm.copy_(new.reshape(-1))
    return int(idx.numel())


@torch.no_grad()
def nm_channel_permutation(sal: torch.Tensor, n: int = 2, m: int = 4, *, rounds: int = 64,
                           seed: int = 0, max_rows: Optional[int] = None) -> torch.Tensor:
    """A column order ``perm`` ``[C]`` (int64) with lower N:M cost than the identity's (or equal).

    The permuted matrix is ``sal[:, perm]``: its column j is the old column ``perm[j]``.
    sal: ``[R, C]`` non-negative float (C a multiple of m). rounds: swap rounds after the start
    (each pairs every group once). max_rows: score swaps on this many rows of largest total
    saliency only (faster for tall matrices; the start and the final check use all rows).
    """
    _check(sal, n, m)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
    sal = sal.detach().float().cpu()  # a small search: on the CPU wherever the weights live
    c = sal.shape[1]
    ident = torch.arange(c)
    ident_cost = group_cost(sal, n, m).sum()
    start = _round_robin(sal, m)
    perm = start if group_cost(sal[:, start], n, m).sum() < ident_cost else ident.clone()
    work = sal
    if max_rows is not None and max_rows < sal.shape[0]:
        work = sal[torch.topk(sal.sum(1), max_rows).indices]
    work = work.t().contiguous()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        _swap_round(work, perm, n, m, gen)
    if group_cost(sal[:, perm], n, m).sum() > ident_cost:  # the rows subset misled it
        perm = ident
    return perm


class PermutedStats:
    """An accumulator's ``result()`` seen through an input-channel permutation (vector or matrix)."""

    def __init__(self, stats, perm: torch.Tensor):
        self.stats, self.perm = stats, perm

    def result(self) -> torch.Tensor:
        r = self.stats.result()
        p = self.perm.to(r.device)
        return r[p] if r.dim() == 1 else r[p][:, p]


def _input_diag(stats) -> torch.Tensor:
    """Per-input-channel second moment from a Wanda (``[in]``) or SparseGPT (``[in, in]``) accumulator."""
    r = stats.result()
    return r.float() if r.dim() == 1 else r.diagonal().float()


def _saliency(linear, stats) -> torch.Tensor:
    w = linear.weight.detach().float()
    d = _input_diag(stats).to(w.device) if stats is not None else torch.ones(w.shape[1], device=w.device)
    return w * w * d.unsqueeze(0)


def _take_rows_(linear, perm: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[perm.to(linear.weight.device)])
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_(linear.bias[perm.to(linear.bias.device)])


def _take_cols_(linear, perm: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[:, perm.to(linear.weight.device)])


def _heads(config):
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, hd


@torch.no_grad()
def permute_block_(block, adapter, config, stats: dict, n: int, m: int, *, names=None,
                   parts: Sequence[str] = PERMUTE_PARTS, rounds: int = 16, seed: int = 0,
                   max_rows: Optional[int] = 256) -> dict:
    """Reorder the MLP hidden channels and the value channels of ``block`` in place (the block's
    function is unchanged) so that the ``down`` and ``o`` inputs group well under ``n:m``.

    stats: ``{block-relative linear name: accumulator}`` of the block's dense run (Wanda or
    SparseGPT; missing or None = weights only). The entries of ``down`` and ``o`` are replaced by
    views in the new channel order, so pruning that follows reads consistent statistics.
    names: the block-relative linear names that will be pruned (default: all); ``down`` / ``o``
    are only reordered when they are among them. parts: ``"mlp"`` and / or ``"value"``; what was
    reordered is recorded on ``config`` (:func:`mark_permuted`).
    Returns ``{"down": (cost before, after), "o": (...)}`` (dropped saliency) for what was permuted.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"need integers 0 < n < m for an n:m pattern, got {n}:{m}")
    if isinstance(parts, str) or not set(parts) <= set(PERMUTE_PARTS):
        raise ValueError(f"parts must be a subset of {PERMUTE_PARTS}, got {parts!r}")
    names = set(adapter.linear_names() if names is None else names)
    # every order is chosen (and every input checked) before any weight moves: never half-applied
    plans = {}  # report key -> (saliency, order of its columns, [(module, "rows" / "cols", order)], stats key)
    if "mlp" in parts and adapter.down in names:  # MLP hidden channels: rows of gate/up, columns of down
        down = get_module(block, adapter.down)
        feeders = [get_module(block, name) for name in (adapter.gate, adapter.up) if name]
        if down.weight.shape[1] % m == 0 and all(f.weight.shape[0] == down.weight.shape[1] for f in feeders):
            sal = _saliency(down, stats.get(adapter.down))
            perm = nm_channel_permutation(sal, n, m, rounds=rounds, seed=seed, max_rows=max_rows)
            moves = [(f, "rows", perm) for f in feeders] + [(down, "cols", perm)]
            plans["down"] = (sal, perm, moves, adapter.down)
    geo = _heads(config)
    if "value" in parts and adapter.v and adapter.o in names and geo:  # value channels within each kv head
        heads, kv, hd = geo
        v, o = get_module(block, adapter.v), get_module(block, adapter.o)
        if (hd % m == 0 and heads % kv == 0 and v.weight.shape[0] == kv * hd
                and o.weight.shape[1] == heads * hd):
            sal = _saliency(o, stats.get(adapter.o))
            per_q = heads // kv
            o_perm = torch.empty(heads * hd, dtype=torch.long)
            v_perm = torch.empty(kv * hd, dtype=torch.long)
            for g in range(kv):
                hs = range(g * per_q, (g + 1) * per_q)
                sal_g = torch.cat([sal[:, h * hd:(h + 1) * hd] for h in hs], 0)
                sigma = nm_channel_permutation(sal_g, n, m, rounds=rounds, seed=seed + g, max_rows=max_rows)
                v_perm[g * hd:(g + 1) * hd] = g * hd + sigma
                for h in hs:
                    o_perm[h * hd:(h + 1) * hd] = h * hd + sigma
            plans["o"] = (sal, o_perm, [(v, "rows", v_perm), (o, "cols", o_perm)], adapter.o)
    out = {}
    for key, (sal, perm, moves, stats_key) in plans.items():
        out[key] = (float(group_cost(sal, n, m).sum()), float(group_cost(sal[:, perm], n, m).sum()))
        for mod, axis, p in moves:
            (_take_rows_ if axis == "rows" else _take_cols_)(mod, p)
        if stats.get(stats_key) is not None:
            stats[stats_key] = PermutedStats(stats[stats_key], perm)
    mark_permuted(config, [{"down": "mlp", "o": "value"}[k] for k in out])
    return out




def mark_permuted(config, parts) -> None:
    """Record on the model config (saved with it) which channel groups were reordered."""
    done = sorted(set(getattr(config, MARK, None) or []) | set(parts))
    setattr(config, MARK, done)


def check_not_permuted(model, parts, what: str) -> None:
    """ValueError when ``model`` had any of ``parts`` ("mlp", "value") reordered by ``prune_model``:
    ``what`` compares those channels with another model's or another block's, position by position."""
    done = set(getattr(getattr(model, "config", None), MARK, None) or [])
    hit = sorted(done & set(parts))
    if hit:
        raise ValueError(f"{what} compares the {' and '.join(hit)} channels position by position, but this model's "
                         f"were reordered by prune_model(permute=...) (config.{MARK} = {sorted(done)}); prune "
                         "with permute=False (laco: --no-permute) for it")
