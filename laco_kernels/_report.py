"""The short report of ``laco run``: ``report.md`` plus a plot of per-block reconstruction error."""
from __future__ import annotations

import os
from typing import List, Optional

from ._atomic import atomic_file


def plot_block_error(errors: List[float], path: str, title: str) -> None:
    """Log-scale bar chart of the per-block MSE (pruned vs dense block output), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    ax.bar(range(len(errors)), errors, color="#3b6ea5")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("output MSE, pruned vs dense block")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def plot_recovery_error(before: List[float], after: List[float], path: str, title: str) -> None:
    """Per-block normalised error of the pruned stream against the dense stream, before and after
    recovery (log scale), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    xs = range(len(before))
    ax.plot(xs, before, "o-", color="#b5523b", label="before recovery")
    ax.plot(xs, after, "o-", color="#3b6ea5", label="after recovery")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("||out - dense||² / ||dense||²")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def write_report(out: str, r: dict) -> str:
    """Write ``out/report.md`` (and ``out/block_error.png`` when the pruning report has block errors)."""
    prune = r["prune"]
    shape = r["pattern"] or "{:.0%} unstructured".format(r["sparsity"])
    what = f"{r['method']} {shape}"
    errors: Optional[List[float]] = prune.get("block_error")
    lines = [f"# laco run: {r['model']}, {what}", "",
             f"WikiText-2 test perplexity, seqlen {r['eval']['seqlen']}, first {r['eval']['max_windows']} windows; "
             f"calibration {r['calibration'][0]} x {r['calibration'][1]} C4 tokens (seed-fixed windows), "
             "pruned block by block on the already-pruned stream.", "",
             "| model | perplexity |", "| --- | --- |"]
    lines += [f"| {name} | {value:.2f} |" for name, value in r["ppl"].items()]
    lines += ["", f"Achieved sparsity of the decoder linears: {prune['overall_sparsity']:.4f}."]
    saved = r.get("saved") or {}
    if saved.get("swapped"):
        lines.append(f"Saved to `model/` with {saved['swapped']} packed linears: "
                     f"{_fmt_bytes(saved['bytes_before'])} dense -> {_fmt_bytes(saved['bytes_after'])} packed.")
    rec = r.get("recovery")
    if rec:
        lines.append(f"Recovery: {rec['method']} ({rec.get('seconds', 0):.0f} s).")
        ppl = r["ppl"]
        if {"dense", "pruned", "recovered"} <= set(ppl) and ppl["pruned"] != ppl["dense"]:
            closed = (ppl["pruned"] - ppl["recovered"]) / (ppl["pruned"] - ppl["dense"])
            lines.append(f"Recovery closed {closed:.0%} of the perplexity gap between the pruned and the dense model.")
        blocks = [b for b in rec.get("blocks") or [] if "nmse_before" in b and "nmse_after" in b]
        if blocks:
            before, after = [b["nmse_before"] for b in blocks], [b["nmse_after"] for b in blocks]
            plot_recovery_error(before, after, os.path.join(out, "recovery_error.png"),
                                f"{r['model']}: {what}, {rec['method']} recovery")
            n = blocks[-1].get("error_samples")
            over = f"over the first {n} windows of the recovery calibration set" if n else "over the recovery calibration set"
            lines += ["", "## Per-block error before and after recovery", "",
                      "Normalised error of each block's output on the pruned stream against the dense stream, "
                      f"{over} (last block: {before[-1]:.4g} -> {after[-1]:.4g}).", "",
                      "![recovery error](recovery_error.png)"]
    if errors:
        plot_block_error(errors, os.path.join(out, "block_error.png"), f"{r['model']}: {what}, per-block error")
        worst = max(range(len(errors)), key=errors.__getitem__)
        lines += ["", "## Per-block reconstruction error", "",
                  "MSE between each pruned block's output and the dense block's output on the same input "
                  f"(worst: block {worst}, {errors[worst]:.4g}).", "", "![per-block error](block_error.png)"]
    lines += ["", "## Time (s)", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in r["seconds"].items()]
    lines += [f"| total | {r['total_seconds']} |", ""]
    path = os.path.join(out, "report.md")
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))
    return path
