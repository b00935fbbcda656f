"""Massive activations of SmolLM2-135M and what 2:4 pruning does to them (issue 14).

    OMP_NUM_THREADS=2 python bench/massive_activations.py --start wanda sparsegpt

For a few C4 windows (``calibration_windows(seed=7)``, not the pruning or recovery ones):

1. the dense model's hidden states after every block; a token is *massive* at block l when its
   largest |h| is over ``--factor`` times the median over tokens of that largest |h|;
2. the block where they first appear, the hidden dims that carry them, and, in that block's
   ``down_proj``, the intermediate channel that feeds them and the *super weight*
   ``down_proj.weight[dim, channel]`` (the largest |w x| contribution);
3. per pruned start (cached by ``recovery_recipe.pruned_start``): whether the super weights are
   still non-zero, and the normalised error ``||h' - h||^2 / ||h||^2`` of the last hidden state,
   separately for massive and ordinary tokens, and per block.

Writes one record ``massive/<start>`` per start into ``bench/results/recovery.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from recovery import DEFAULT_OUT, _record  # noqa: E402
from recovery_recipe import pruned_start  # noqa: E402


@torch.no_grad()
def hidden_states(model, ids):
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return [h.float() for h in out.hidden_states]  # [embeddings, block 0, ..., block L-1 (normed last)]


@torch.no_grad()
def down_proj_inputs(model, ids, block):
    grab = {}
    mod = model.model.layers[block].mlp.down_proj
    h = mod.register_forward_hook(lambda m, a, o: grab.__setitem__("x", a[0].float()))  # returns None
    model(input_ids=ids, use_cache=False)
    h.remove()
    return grab["x"]


def split_error(hp, hd, massive):
    """(nmse of massive tokens, nmse of ordinary tokens) of hp against hd, both [S, T, D]."""
    e = ((hp - hd) ** 2).sum(-1)
    n = (hd ** 2).sum(-1)
    m = massive
    return (float(e[m].sum() / n[m].sum()) if m.any() else None, float(e[~m].sum() / n[~m].sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--start", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--factor", type=float, default=20.0)
    ap.add_argument("--scratch", default="/tmp/laco_recipe")
    ap.add_argument("--recovered", default=None, help="also a recovered model's safetensors (blocks)")
    args = ap.parse_args()

    from laco_kernels.data import calibration_windows
    from laco_kernels.models.loading import load_model

    model, tok = load_model("smollm2-135m")
    ids = calibration_windows(tok, args.nsamples, args.seqlen, seed=7)
    hd = hidden_states(model, ids)
    L = len(model.model.layers)
    tokmax = [h.abs().amax(-1) for h in hd[1:L]]  # after blocks 0..L-2 (the last one is normed)
    massive = [t > args.factor * t.median() for t in tokmax]
    first = next((l for l, m in enumerate(massive) if m.any()), None)
    info = {"factor": args.factor, "tokens": int(ids.numel()), "first_block": first,
            "massive_tokens_per_block": [int(m.sum()) for m in massive],
            "token_max_median_per_block": [round(float(t.median()), 2) for t in tokmax],
            "token_max_max_per_block": [round(float(t.max()), 1) for t in tokmax]}
    supers = []
    # where massive states first appear, and where they grow most (SmolLM2: blocks 2 and 11)
    growth = [float(tokmax[l].max() / tokmax[l - 1].max()) if l else 0.0 for l in range(len(tokmax))]
    jump = max(range(len(growth)), key=growth.__getitem__)
    info["largest_growth_block"] = jump
    for blk in sorted({b for b in (first, jump) if b is not None}):
        m = massive[blk]
        before = hd[blk] if blk else hd[0]
        delta = (hd[blk + 1] - before)[m]  # what block `blk` adds on massive tokens [n, D]
        dims = delta.abs().amax(0).topk(3).indices.tolist()
        x = down_proj_inputs(model, ids, blk)[m]  # [n, I]
        w = model.model.layers[blk].mlp.down_proj.weight.float()
        info.setdefault("massive_dims", {})[blk] = dims
        for d in dims:
            contrib = (x * w[d]).abs().amax(0)  # [I]
            c = int(contrib.argmax())
            supers.append({"block": blk, "dim": d, "channel": c, "weight": float(w[d, c]),
                           "max_input": float(x[:, c].abs().max()), "contribution": float(contrib[c]),
                           "next_contribution": float(contrib.topk(2).values[1]),
                           "group_of_4": [round(float(v), 5) for v in w[d, c // 4 * 4:c // 4 * 4 + 4]]})
    info["super_weights"] = supers
    mask_last = massive[-1] if massive else None
    _record(args.out, f"massive/dense/{args.nsamples}x{args.seqlen}", lambda: dict(info))

    for start in args.start:
        def run(start=start):
            pm, _ = pruned_start(model, tok, start, args.scratch)
            hp = hidden_states(pm, ids)
            kept = []
            for s in supers:
                w = pm.model.layers[s["block"]].mlp.down_proj.weight
                g = s["channel"] // 4 * 4
                kept.append({"block": s["block"], "dim": s["dim"], "channel": s["channel"],
                             "weight_after": float(w[s["dim"], s["channel"]]),
                             "group_of_4_after": [round(float(v), 5) for v in w[s["dim"], g:g + 4]]})
            per_block = []
            for l in range(L - 1):
                mm, mo = split_error(hp[l + 1], hd[l + 1], massive[l])
                per_block.append({"block": l, "nmse_massive": mm, "nmse_ordinary": mo, "n_massive": int(massive[l].sum())})
            return {"start": start, "super_weights_after_pruning": kept, "per_block": per_block,
                    "last_block_massive_mask_from": L - 2, "command": "python bench/massive_activations.py " +
                    " ".join(sys.argv[1:])}
        _record(args.out, f"massive/{start}/{args.nsamples}x{args.seqlen}", run)


if __name__ == "__main__":
    main()
