"""Regenerate ``laco_kernels/ops/_train_dispatch_table.py`` from the SASS audit and GPU timings (no GPU needed).

For one linear ``y[M, N] = x[M, K] @ W[N, K]^T`` trained for one step (forward + dX + dW), on a
grid of token counts M, shapes (N, K) and dtypes, this predicts with the audit's fitted model
(``bench/sass_model.py``, parameters and sm_90 loop statistics read from
``bench/results/sass_audit.json``) the time of:

- ``torch``: ``F.linear(x, W * M)`` + autograd (W * M, three dense GEMMs, dW * M),
- ``masked``: ``masked_linear``'s Triton forward / dX / masked dW,
- ``sparse24``: the 2:4 forward + ``sparse24_grad``'s dX / dV,
- ``masked_expand`` / ``sparse24_expand``: the expand path (``kernels/weight_expand.py`` writes the
  dense weight before the forward and again before dX, both GEMMs modelled as the torch path's,
  the weight gradient in our dW / dV kernel),

and writes the ratio predicted torch time / predicted Triton time per grid point (> 1: Triton
predicted faster; ``RATIO`` for the fused kernels, ``RATIO_EXPAND`` for the expand path), scaled
down where an H100 measurement showed the model too kind to Triton: per dtype, the smallest (measured torch / measured Triton) / (predicted torch / predicted Triton)
over the audit's ``training_check`` rows (the H100 run of ``bench/gpu_training.py``, old kernels;
kept as ``gpu_training_h100.json``), when below 1. fp32 has such rows
(cuBLAS's fp32 GEMM beat the model's yardstick, our FMA GEMM, by up to 3.6x at 512-4096 tokens):
fp32 ratios are scaled by about 0.28, i.e. the predictions send fp32 to the torch path. A factor
above 1 (the 16-bit rows, where eager torch launches were slower than predicted) is not applied:
the predictions only err towards the torch path.

It also copies the GPU MEASUREMENTS of the training paths into ``MEASURED``: from
``bench/results/gpu_training.json`` (SmolLM2 MLP shapes) and ``gpu_training_7b.json`` (Llama-7B MLP
shapes), both written by ``bench/gpu_training.py``, the ms of one forward + backward through the
public op with each path forced (``ms_{masked|sparse24}_{triton|expand|torch}_path``), keyed by
(op, dtype, tokens M, N, K), and the device they ran on (``MEASURED_DEVICE``; every file must name
the same one). ``ops/train_dispatch.py`` reads both: measurements first, predictions where a dtype
has none. Run after the audit or a GPU run:

    python bench/sass_audit.py                 # rewrites bench/results/sass_audit.json
    python bench/gpu_training.py               # on a GPU (bench/gpu_suite.sh): gpu_training.json
    GPU_TRAINING_OUT=bench/results/gpu_training_7b.json python bench/gpu_training.py --shapes 7b --skip-check
    python bench/train_dispatch_table.py       # rewrites laco_kernels/ops/_train_dispatch_table.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compile_report  # noqa: E402
import sass_model as sm  # noqa: E402

from laco_kernels.ops.train_dispatch import best_path  # noqa: E402

ROOT = os.path.dirname(HERE)
AUDIT = os.path.join(HERE, "results", "sass_audit.json")
MEASURED_FILES = (os.path.join(HERE, "results", "gpu_training.json"),  # SmolLM2 MLP shapes, 512 / 4096 tokens
                  os.path.join(HERE, "results", "gpu_training_7b.json"))  # Llama-7B MLP shapes, 4096 / 8192 tokens
OUT = os.path.join(os.path.dirname(HERE), "laco_kernels", "ops", "_train_dispatch_table.py")
TOKENS = (1, 16, 64, 256, 1024, 4096, 8192)
SHAPES = ((1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008))  # (N, K): SmolLM2, 7B
DTYPES = ("fp32", "bf16", "fp16")
OPS = {"masked_linear": "masked", "sparse24_linear": "sparse24"}  # op -> fused plan; + "_expand": expand plan
PATHS = ("triton", "expand", "torch")
TORCH_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def audit_stats(doc):
    """``stats(spec)`` for ``sm.features``: the sm_90 record of the spec in the audit JSON."""
    recs = {(r["kernel"], r["config"]): r for r in doc["specs"] if r["arch"] == "sm_90"}

    def stats(spec):
        try:
            return recs[(spec.name, spec.config)]
        except KeyError:
            raise LookupError(f"{spec.name} [{spec.config}] is not in {AUDIT} (sm_90); re-run bench/sass_audit.py")
    return stats


def calibration(doc) -> dict:
    """``{dtype: factor <= 1}``: the smallest measured-over-predicted torch/Triton ratio of the
    audit's ``training_check`` rows of that dtype, capped at 1 (1 where no row was measured)."""
    out = {dt: 1.0 for dt in DTYPES}
    for c in doc.get("training_check", []):
        pred = c["predicted_torch_ms"] / c["predicted_masked_kernels_ms"]
        meas = c["measured_torch_ms"] / c["measured_masked_kernels_ms"]
        out[c["dtype"]] = min(out[c["dtype"]], round(meas / pred, 4))
    return out


def table(doc) -> tuple:
    """(RATIO, RATIO_EXPAND): ``{(op, dtype, M, N, K): calibrated torch_us / path_us}``."""
    specs = compile_report.all_specs()
    stats = audit_stats(doc)
    kind, params = doc["fit"]["kind"], doc["fit"]["params"]
    cal = calibration(doc)
    fused, expand = {}, {}
    for dt in DTYPES:
        for m in TOKENS:
            for n, k in SHAPES:
                plans = sm.training_step_plans(m, [("linear", n, k)], dt, specs)
                t = {p: sm.predict_us(sm.features(plan, stats), params, kind) for p, plan in plans.items()}
                for op, path in OPS.items():
                    fused[(op, dt, m, n, k)] = round(cal[dt] * t["torch"] / t[path], 4)
                    expand[(op, dt, m, n, k)] = round(cal[dt] * t["torch"] / t[path + "_expand"], 4)
    return fused, expand


def measured(paths=MEASURED_FILES) -> tuple:
    """(device, sources, {(op, dtype, M, N, K): {path: ms}}) from ``bench/gpu_training.py`` result
    files: the timing rows' ``ms_{masked|sparse24}_{path}_path`` (one forward + backward through the
    public op with that path forced, ``do_bench``), rounded to 0.1 us. Every file must come from the
    same device; a point present in two files must agree."""
    devices, sources, out = set(), [], {}
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        devices.add(res["device"])
        sources.append((os.path.relpath(os.path.abspath(path), ROOT).replace(os.sep, "/"),
                        res.get("torch"), res.get("triton")))
        for r in res["timing"]:
            dt = TORCH_DTYPES[r["dtype"]]
            m, n, k = (int(v) for v in r["shape"])
            for op, short in OPS.items():
                key = (op, dt, m, n, k)
                times = {p: round(float(r[f"ms_{short}_{p}_path"]), 4) for p in PATHS}
                if out.setdefault(key, times) != times:
                    raise ValueError(f"{path}: {key} measured twice with different times")
    if len(devices) != 1:
        raise ValueError(f"measurement files come from {sorted(devices)}; expected one device")
    return devices.pop(), tuple(sources), dict(sorted(out.items()))


def render(tabs: tuple, doc, meas: tuple) -> str:
    device, sources, times = meas
    files = ", ".join(s for s, _, _ in sources)
    versions = ", ".join(sorted({f"torch {t} / triton {tr}" for _, t, tr in sources}))
    lines = ['"""GENERATED by bench/train_dispatch_table.py from bench/results/sass_audit.json and',
             f"{files}; do not edit.",
             "",
             f"MEASURED on {device} ({versions}; bench/gpu_training.py):",
             "ms of one forward + backward of one linear through the public op with the training path forced",
             "(do_bench), per (op, dtype, tokens M, N, K) and path. ops/train_dispatch.py's auto rule takes",
             "the fastest measured path at the nearest measured point of the op and dtype (fp16: the bf16",
             "points), before any prediction.",
             "",
             "PREDICTED (audit model fitted to H100 timings, sm_90 loop statistics; not measured) time of",
             "F.linear(x, W * M) + autograd over the Triton training kernels' time, for one linear trained",
             "one step (forward + dX + dW / dV): > 1 means the Triton path is predicted faster (RATIO: the",
             "fused kernels; RATIO_EXPAND: the expand path, kernels/weight_expand.py + cuBLAS). Scaled by",
             "CALIBRATION[dtype] (<= 1): where an H100 measurement of the old kernels (the audit's",
             "training_check rows; gpu_training_h100.json) showed the model too kind to the Triton path, by",
             "that measured factor. The auto rule uses them only for a dtype without measurements;",
             "predicted_ratio() still returns them.",
             f"Audit: Triton {doc['meta']['triton']}, fit kind {doc['fit']['kind']!r}.",
             "Regenerate: python bench/sass_audit.py && python bench/train_dispatch_table.py",
             '"""', "",
             f"TOKENS = {TOKENS!r}", f"SHAPES = {SHAPES!r}  # (N, K)",
             f"CALIBRATION = {calibration(doc)!r}  # applied to RATIO and RATIO_EXPAND below"]
    for name, tab, what in (("RATIO", tabs[0], "triton_us (fused kernels)"),
                            ("RATIO_EXPAND", tabs[1], "expand_us (expand path)")):
        lines += ["", f"# (op, dtype, tokens M, N, K) -> predicted torch_us / {what}", f"{name} = {{"]
        lines += [f"    {key!r}: {v!r}," for key, v in tab.items()]
        lines.append("}")
    lines += ["", f"MEASURED_DEVICE = {device!r}",
              "MEASURED_SOURCES = (  # (file, torch, triton)",
              *[f"    {src!r}," for src in sources], ")",
              "# (op, dtype, tokens M, N, K) -> measured ms per path (forward + backward, path forced)",
              "MEASURED = {"]
    lines += [f"    {key!r}: {v!r}," for key, v in times.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--audit", default=AUDIT)
    ap.add_argument("--measured", nargs="+", default=list(MEASURED_FILES),
                    help="bench/gpu_training.py result files (one device) copied into MEASURED")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    with open(args.audit) as f:
        doc = json.load(f)
    tabs = table(doc)
    meas = measured(args.measured)
    text = render(tabs, doc, meas)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    fused, expand = tabs
    paths = {key: best_path(fused[key], expand[key]) for key in fused}
    counts = {p: sum(v == p for v in paths.values()) for p in ("triton", "expand", "torch")}
    print(f"wrote {args.out}: {len(fused)} predicted points (auto's rule only for unmeasured dtypes); "
          f"predicted fastest: triton at {counts['triton']}, "
          f"expand at {counts['expand']}, torch at {counts['torch']}")
    for op in OPS:
        for dt in DTYPES:
            vals = [v for key, v in fused.items() if key[0] == op and key[1] == dt]
            ex = [v for key, v in expand.items() if key[0] == op and key[1] == dt]
            print(f"  {op:16s} {dt}: torch/triton {min(vals):.2f} .. {max(vals):.2f}, "
                  f"torch/expand {min(ex):.2f} .. {max(ex):.2f}")
    device, _, times = meas
    print(f"MEASURED ({device}): {len(times)} points; fastest path (auto's choice there):")
    for (op, dt, m, n, k), t in times.items():
        fastest = min(PATHS, key=t.__getitem__)
        print(f"  {op:16s} {dt} {m:5d} x {n:5d} x {k:5d}: " + "  ".join(f"{p} {t[p]:.3f}" for p in PATHS)
              + f"  -> {fastest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
