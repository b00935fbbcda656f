"""SASS audit: the steady-state loop of every GEMM kernel, and a fitted time model (no GPU needed).

For every GEMM ``CompileSpec`` that declares a ``family`` and ``regime`` (discovered from every
module of ``laco_kernels.kernels``, as ``bench/compile_report.py`` does), compiled for sm_80 and
sm_90: the loop's instructions per warp and iteration, its STS / LDS outside the load pipeline,
thread-instructions per weight byte (2:4 at its fixed density, bitmap at 50% and 70% sparsity)
and per multiply-add (and that figure over the dense prefill GEMM's: the training kernels'
yardstick). Then a two-term roofline (``bench/sass_model.py``) is fitted to the H100 rows of
``bench/results/gpu_gemm_graph_h100.json`` and printed beside them, and used to PREDICT:

- every inference kernel (decode / prefill regimes) on 4096 x 4096, 11008 x 4096, 4096 x 11008,
  M in {1, 4, 16, 256, 4096}, fp16 and bf16, with the dense Triton GEMM's prediction beside it;
- one recovery step (forward + backward of an MLP block's three linears) of SmolLM2 (576 / 1536)
  and 7B (4096 / 11008) blocks at 1,024 and 8,192 tokens, fp32 / bf16 / fp16, for the masked and
  2:4 training kernels and for ``F.linear(x, W * M)`` + autograd (modelled as dense GEMMs);
- the rows of ``bench/results/gpu_training_h100.json`` (an out-of-sample check of the training plans).

The H200 run of 2026-12-04 (``gpu_gemm_graph.json``, ``gpu_decode_sweep.json``, ``gpu_training*.json``)
is not in the fit: it timed kernels whose launch configuration changed afterwards (the 2:4 decode's
K slices), and those measurements replace the predictions where they exist (README, dispatch).

The fit uses the loop statistics of the kernels as they were when the H100 rows were measured,
frozen in ``bench/results/sass_fit_basis.json`` (``--write-fit-basis`` rewrites it from the
current kernels: do that only together with new measurements). Everything predicted is labelled
"predicted". Writes ``bench/results/sass_audit.json``.

    python bench/sass_audit.py                    # everything (10+ minutes on 2 busy cores)
    python bench/sass_audit.py --subset           # representative specs only (+ what the model needs)
    python bench/sass_audit.py --specs sparse24   # specs whose kernel name or config contains it
    python bench/sass_audit.py --specs dense-decode --arch 90 --skip-training   # seconds
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import sys
import time
from typing import Dict, List

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compile_report  # noqa: E402
import sass_model as sm  # noqa: E402
import triton  # noqa: E402

from laco_kernels.kernels import _sass  # noqa: E402
from laco_kernels.kernels._compile import ARCHS, CompileSpec  # noqa: E402
from laco_kernels.kernels.dense_gemm import regime as m_regime  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DEFAULT_OUT = os.path.join(RESULTS, "sass_audit.json")
MEASURED = os.path.join(RESULTS, "gpu_gemm_graph_h100.json")  # the fit basis froze the kernels of the H100 run
TRAINING_MEASURED = os.path.join(RESULTS, "gpu_training_h100.json")
BASIS = os.path.join(RESULTS, "sass_fit_basis.json")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)
MS = [1, 2, 3, 4, 8, 16, 256, 4096]
INFER_DTYPES = ("fp16", "bf16")
DENSITIES = {"bitmap": (0.5, 0.3)}  # kept fraction: 50% and 70% sparsity; others one fixed figure
BLOCKS = {"smollm2": (576, 1536), "7b": (4096, 11008)}  # (hidden, intermediate)
TOKENS = (1024, 8192)
TRAIN_DTYPES = ("fp32", "bf16", "fp16")
# measured method -> (family, kernel, density, bitmap tile_k)
METHODS = {"dense_triton": ("dense", "_dense_gemm_kernel", 1.0), "sparse24": ("sparse24", "_sparse24_gemm_kernel", 0.5),
           "bitmap50": ("bitmap", "_bitmap_gemm_kernel", 0.5), "bitmap70": ("bitmap", "_bitmap_gemm_kernel", 0.3)}
MEASURED_TILE_K = 128  # BitmapWeight.from_dense's default, what gpu_gemm.py timed


class Stats:
    """Loop statistics per (spec, arch), compiled on first use."""

    def __init__(self):
        self.cache: Dict[tuple, dict] = {}

    def get(self, spec: CompileSpec, arch: int = 90) -> dict:
        key = (id(spec), arch)
        if key not in self.cache:
            self.cache[key] = _sass.spec_stats(spec, arch, densities=DENSITIES["bitmap"])
        return self.cache[key]

    def sm90(self, spec: CompileSpec) -> dict:
        return self.get(spec, 90)


def audited(spec: CompileSpec) -> bool:
    """GEMM specs with audit metadata, and the guard checks and weight expansions the training plans
    launch (no loop)."""
    return ((spec.is_gemm or spec.regime in ("train-check", "train-expand")) and spec.family is not None
            and spec.regime is not None)


def select(specs: List[CompileSpec], subset: bool, pattern: str | None) -> List[CompileSpec]:
    out = [s for s in specs if audited(s) and (not subset or s.representative)]
    if pattern:
        out = [s for s in out if pattern in s.name or pattern in s.config
               or fnmatch.fnmatch(f"{s.name} {s.config}", pattern)]
    return out


def _measured_spec(specs, method, m, dtype="fp16"):
    family, kernel, _ = METHODS[method]
    blocks = {"BLOCK_K": MEASURED_TILE_K} if family == "bitmap" else None
    specs = [s for s in specs if 90 in s.archs]  # the H100 rows ran the sm_90 configs
    return sm.find_spec(specs, family=family, regime=m_regime(m), dtype=dtype, kernel=kernel, blocks=blocks)


def fit_rows(specs, stats: Stats, use_basis: bool) -> tuple:
    """(rows {method, M, N, K, dtype, measured_us, features}, source of the features)."""
    if use_basis and os.path.exists(BASIS):
        with open(BASIS) as f:
            return json.load(f)["rows"], os.path.relpath(BASIS, os.path.dirname(HERE))
    with open(MEASURED) as f:
        measured = json.load(f)["records"]
    rows = []
    for r in measured:
        if r["method"] not in METHODS:
            continue
        dt = {"float16": "fp16", "bfloat16": "bf16"}[r["dtype"]]
        spec = _measured_spec(specs, r["method"], r["M"], dt)
        plan = sm.inference_plan(spec, r["M"], r["N"], r["K"], METHODS[r["method"]][2], specs)
        rows.append(dict(method=r["method"], M=r["M"], N=r["N"], K=r["K"], dtype=dt, measured_us=r["us"],
                         features=sm.features(plan, stats.sm90)))
    return rows, "current kernels"


def write_basis(rows):
    with open(MEASURED) as f:
        meta = json.load(f)["meta"]
    doc = dict(note=f"SASS features (sm_90, Triton {triton.__version__}) of the kernels timed in gpu_gemm_graph_h100.json; "
               "the audit fits its model on these. Rewrite (--write-fit-basis) only with new measurements.",
               measured_meta=meta, written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               rows=rows)
    _atomic_json(BASIS, doc)


def _atomic_json(path, doc):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _launched_on_h100(spec, cfg_name, m, n, dt) -> bool:
    """Whether the host launcher would pick ``spec``'s table row for (M, N) on an H100 (sm_90, 132
    SMs): e.g. a grid-filling row only while the main sm_90 row leaves SMs idle. Specs of kernels
    without a config table (or unknown names) always count."""
    from laco_kernels.kernels import dense_gemm

    if spec.family not in ("dense", "sparse24", "bitmap") or cfg_name is None:
        return True
    if spec.family in ("sparse24", "bitmap"):  # the launchers send M <= GEMV_MAX_M to the GEMV kernels
        from laco_kernels.kernels import bitmap_gemv, sparse24_gemv

        gemv_max = (sparse24_gemv if spec.family == "sparse24" else bitmap_gemv).GEMV_MAX_M
        if spec.name == "_bitmap_gemv_kernel":  # the canonical-layout GEMV (LACO_BITMAP_GPU_LAYOUT=canonical)
            gemv_max = bitmap_gemv.CANONICAL_GEMV_MAX_M
        if spec.family == "sparse24" and dt in ("fp16", "bf16"):  # 16-bit: the sparse tensor-core kernel first
            from laco_kernels.kernels import sparse24_mma

            if spec.name == "_sparse24_mma_kernel":
                return m <= sparse24_mma.MMA_MAX_M
            if m <= sparse24_mma.MMA_MAX_M:  # the GEMV and the tl.dot tile are its fallbacks only
                return False
        if "gemv" in spec.name:
            return m <= gemv_max
        if m <= gemv_max:
            return False
    import torch

    tk = spec.constexprs.get("BLOCK_K") if spec.family == "bitmap" else None
    try:
        cfg = dense_gemm.gemm_config(spec.family, m, getattr(torch, sm.DTYPES[dt]), tk, arch=90, n=n, sms=132)
    except ValueError:
        return True
    return cfg.name == cfg_name


def predictions(selected, specs, stats: Stats, fitted, skipped: List[str]) -> List[dict]:
    """Predicted time of every selected inference kernel at every audited (shape, M, dtype); specs
    without a launch plan are listed in ``skipped``."""
    with open(MEASURED) as f:
        measured = {(r["method"], r["M"], r["N"], r["K"], r["dtype"]): r["us"] for r in json.load(f)["records"]}
    kind, params = fitted["kind"], fitted["params"]
    seen, out = set(), []
    for spec in selected:
        if spec.regime not in ("decode", "prefill") or sm.spec_dtype(spec) not in INFER_DTYPES:
            continue
        if 90 not in spec.archs:  # predictions are for sm_90: its own table row where there is one
            continue
        dt = sm.spec_dtype(spec)
        cfg_name = spec.config[:spec.config.index(f"-{dt}-")] if f"-{dt}-" in spec.config else None
        key = (spec.name, spec.family, spec.regime, dt,
               spec.constexprs.get("BLOCK_K") if spec.family == "bitmap" else None, cfg_name)
        if key in seen:
            continue
        seen.add(key)
        for n, k in SHAPES:
            for m in (m for m in MS if m_regime(m) == spec.regime and _launched_on_h100(spec, cfg_name, m, n, dt)):
                dense = sm.predict_us(sm.features(sm.dense_plan(m, n, k, dt, specs), stats.sm90), params, kind)
                for density in DENSITIES.get(spec.family, (0.5,)):
                    try:
                        plan = sm.inference_plan(spec, m, n, k, density, specs)
                    except LookupError as e:  # a launcher the default plan does not know: say so, go on
                        skipped.append(str(e))
                        continue
                    feats = sm.features(plan, stats.sm90)
                    pred = sm.predict_us(feats, params, kind)
                    meas = None
                    for method, (fam, kern, dens) in METHODS.items():
                        if (fam, kern) == (spec.family, spec.name) and (fam != "bitmap" or (
                                dens == density and key[4] == MEASURED_TILE_K)):
                            meas = measured.get((method, m, n, k, sm.DTYPES[dt]))
                    cfg = plan[0]["spec"].config if plan[0]["spec"] else spec.config
                    out.append(dict(kernel=spec.name, family=spec.family, regime=spec.regime, config=cfg, dtype=dt,
                                    N=n, K=k, M=m,
                                    density=density if spec.family == "bitmap" else None, arch="sm_90",
                                    launches=[f["name"] for f in feats], predicted_us=pred,
                                    predicted_dense_triton_us=dense, predicted_speedup_vs_dense_triton=dense / pred,
                                    measured_h100_us=meas))
    return out


def training(specs, stats: Stats, fitted) -> tuple:
    """Predicted recovery steps of MLP blocks, and the check against gpu_training_h100.json."""
    kind, params = fitted["kind"], fitted["params"]

    def time_of(plan):
        return sm.predict_us(sm.features(plan, stats.sm90), params, kind)

    def per_launch(plan):
        return [dict(name=f["name"], regime=p["spec"].regime if p["spec"] else None,
                     predicted_us=sm.predict_us([f], params, kind))
                for p, f in zip(plan, sm.features(plan, stats.sm90))]

    steps = []
    for block, (h, inter) in BLOCKS.items():
        linears = [("gate", inter, h), ("up", inter, h), ("down", h, inter)]
        for tokens in TOKENS:
            for dt in TRAIN_DTYPES:
                plans = sm.training_step_plans(tokens, linears, dt, specs)
                t = {path: time_of(p) for path, p in plans.items()}
                steps.append(dict(block=block, hidden=h, intermediate=inter, tokens=tokens, dtype=dt,
                                  predicted_step_us={p: v for p, v in t.items()},
                                  predicted_speedup_vs_torch={p: t["torch"] / v for p, v in t.items() if p != "torch"},
                                  predicted_launches={p: per_launch(plan) for p, plan in plans.items()}))
    checks = []
    if os.path.exists(TRAINING_MEASURED):
        with open(TRAINING_MEASURED) as f:
            rows = json.load(f).get("timing", [])
        for r in rows:
            dt = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[r["dtype"]]
            m, n, k = r["shape"]
            plans = sm.training_step_plans(m, [("linear", n, k)], dt, specs)
            checks.append(dict(dtype=dt, shape=[m, n, k], predicted_masked_kernels_ms=time_of(plans["masked"]) / 1e3,
                               measured_masked_kernels_ms=r["ms_masked_kernels"],
                               predicted_torch_ms=time_of(plans["torch"]) / 1e3,
                               measured_torch_ms=r["ms_torch_W_times_M_autograd"]))
    return steps, checks


def mac_ratios(records, specs, stats: Stats):
    """thread-instructions per MAC over the dense prefill GEMM's (same dtype and arch)."""
    for r, spec in records:
        dense = sm.find_spec(specs, family="dense", regime="prefill", dtype=sm.spec_dtype(spec),
                             kernel="_dense_gemm_kernel", arch=int(r["arch"][3:]))
        d = stats.get(dense, int(r["arch"][3:]))["thread_instr_per_mac"]
        r["mac_ratio_vs_dense_prefill"] = r["thread_instr_per_mac"] / d if r["thread_instr_per_mac"] and d else None


def _tpb(r):
    t = r["thread_instr_per_byte"]
    if not t:
        return "-"
    vals = sorted(set(round(v, 1) for v in t.values()))
    return "/".join(f"{v:.1f}" for v in vals)


def report(doc):
    fit = doc["fit"]
    print(f"\n== fitted model ({fit['kind']} of the two terms{' + launch' if fit['launch_term'] else ''}; "
          f"features from {fit['basis']}); RMS log error {fit['rms_log_error']:.3f}")
    for k, v in fit["params"].items():
        print(f"   {k:32s} {v:12.4g}")
    p = fit["params"]
    print(f"   = {p['bw_bytes_per_us'] / 1e6:.2f} TB/s, {p['ir_thread_instr_per_us_per_sm'] / 32 / 1755:.2f} "
          f"warp-instructions per clock per SM at 1.755 GHz, {p['launch_us']:.2f} us per launch")
    for v in fit["variants"]:
        print(f"   variant {v['kind']:3s} launch={v['launch_term']!s:5s} RMS log err {v['rms_log_error']:.3f}  "
              f"max |rel err| {v['max_abs_rel_error']:.2f}")
    print(f"\n{'method':14s} {'N':>6s} {'K':>6s} {'M':>5s} {'measured us':>12s} {'predicted us':>13s} {'err':>7s}")
    for r in fit["rows"]:
        print(f"{r['method']:14s} {r['N']:6d} {r['K']:6d} {r['M']:5d} {r['measured_us']:12.1f} "
              f"{r['predicted_us']:13.1f} {r['predicted_us'] / r['measured_us'] - 1:+7.0%}")
    print("   predicted / measured by group (mean, min, max):")
    for g, v in fit["predicted_over_measured_by_group"].items():
        print(f"   {g:24s} {v['mean']:.2f}  {v['min']:.2f}  {v['max']:.2f}")
    print(f"\n{'kernel':28s} {'config':46s} {'arch':5s} {'w':>2s} {'loop':>5s} {'STS/LDS':>8s} {'thr/B':>10s} "
          f"{'thr/MAC':>8s} {'xdense':>6s}")
    for r in doc["specs"]:
        mac = f"{r['thread_instr_per_mac']:.4f}" if r["thread_instr_per_mac"] else "-"
        ratio = f"{r['mac_ratio_vs_dense_prefill']:.2f}" if r.get("mac_ratio_vs_dense_prefill") else "-"
        print(f"{r['kernel']:28s} {r['config'][:46]:46s} {r['arch']:5s} {r['num_warps']:2d} "
              f"{r['loop_instructions']:5d} "
              f"{r['sts']:3d}/{r['lds']:<4d} {_tpb(r):>10s} {mac:>8s} {ratio:>6s}")
    print(f"\nPREDICTED (sm_90 SASS, fitted H100 model) vs the dense Triton GEMM")
    print(f"{'kernel':28s} {'dt':4s} {'N':>6s} {'K':>6s} {'M':>5s} {'dens':>5s} {'pred us':>9s} {'pred dense':>10s} "
          f"{'pred x':>7s} {'meas us':>8s}")
    for p in doc["predictions"]:
        meas = f"{p['measured_h100_us']:.1f}" if p["measured_h100_us"] else "-"
        dens = f"{p['density']:.1f}" if p["density"] else "-"
        print(f"{p['kernel']:28s} {p['dtype']:4s} {p['N']:6d} {p['K']:6d} {p['M']:5d} {dens:>5s} "
              f"{p['predicted_us']:9.1f} "
              f"{p['predicted_dense_triton_us']:10.1f} {p['predicted_speedup_vs_dense_triton']:7.2f} {meas:>8s}")
    for reason in doc["predictions_skipped"]:
        print("   no prediction:", reason)
    print("\nPREDICTED recovery step (MLP block linears, fwd + bwd; torch = F.linear(x, W*M) + autograd, "
          "its GEMMs as dense GEMMs)")
    paths = ("masked", "masked_expand", "sparse24", "sparse24_expand")
    print(f"{'block':8s} {'tokens':>6s} {'dt':4s} {'torch us':>9s} "
          + " ".join(f"{p + ' us':>20s} {'x':>5s}" for p in paths))
    for s in doc["training"]:
        t, x = s["predicted_step_us"], s["predicted_speedup_vs_torch"]
        print(f"{s['block']:8s} {s['tokens']:6d} {s['dtype']:4s} {t['torch']:9.0f} "
              + " ".join(f"{t[p]:20.0f} {x[p]:5.2f}" for p in paths))
    if doc["training_check"]:
        print("\ncheck vs gpu_training_h100.json (do_bench, eager launches; not in the fit): predicted / measured ms")
        for c in doc["training_check"]:
            print(f"   {c['dtype']:4s} {str(c['shape']):18s} masked kernels {c['predicted_masked_kernels_ms']:.3f} / "
                  f"{c['measured_masked_kernels_ms']:.3f}   torch {c['predicted_torch_ms']:.3f} / "
                  f"{c['measured_torch_ms']:.3f}")


def run(subset=False, pattern=None, archs=ARCHS, out=DEFAULT_OUT, use_basis=True, write_fit_basis=False,
        with_training=True, verbose=True) -> dict:
    t0 = time.time()
    specs = compile_report.all_specs()
    selected = select(specs, subset, pattern)
    stats = Stats()
    records = []
    for i, spec in enumerate(selected):
        for arch in archs:
            if arch in spec.archs:  # an sm_90-only table row is not launched (nor audited) on sm_80
                records.append((stats.get(spec, arch), spec))
        if verbose:
            print(f"[{i + 1}/{len(selected)}] {spec.name} {spec.config} ({time.time() - t0:.0f} s)", flush=True)
    mac_ratios(records, specs, stats)
    rows, basis = fit_rows(specs, stats, use_basis and not write_fit_basis)
    if write_fit_basis:
        write_basis(rows)
        basis = os.path.relpath(BASIS, os.path.dirname(HERE)) + " (rewritten now)"
    fitted = sm.fit(rows)
    groups: Dict[str, list] = {}
    for r in rows:
        r["predicted_us"] = sm.predict_us(r["features"], fitted["params"], fitted["kind"])
        groups.setdefault(f"{r['method']} {m_regime(r['M'])}", []).append(r["predicted_us"] / r["measured_us"])
    fitted["predicted_over_measured_by_group"] = {g: dict(mean=sum(v) / len(v), min=min(v), max=max(v))
                                                  for g, v in groups.items()}
    steps, checks = training(specs, stats, fitted) if with_training else ([], [])
    skipped: List[str] = []
    doc = dict(
        meta=dict(triton=triton.__version__, archs=[f"sm_{a}" for a in archs], subset=subset, specs_pattern=pattern,
                  seconds=round(time.time() - t0, 1), training=with_training, load=os.getloadavg()[0],
                  note="predicted_* values come from the fitted model, not from a GPU; measured_* from "
                       "gpu_gemm_graph_h100.json / gpu_training_h100.json (H100, Triton 3.6, the kernels as they were then)"),
        fit=dict(fitted, basis=basis, rows=[{k: v for k, v in r.items() if k != "features"} for r in rows]),
        specs=[r for r, _ in records], predictions=predictions(selected, specs, stats, fitted, skipped),
        predictions_skipped=sorted(set(skipped)),
        training=steps, training_check=checks)
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _atomic_json(out, doc)
    if verbose:
        report(doc)
        print(f"\n{len(records)} spec compiles, {time.time() - t0:.0f} s" + (f"; wrote {out}" if out else ""))
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", action="store_true", help="only the representative specs (what the test compiles)")
    ap.add_argument("--specs", default=None, metavar="PATTERN",
                    help="substring (or glob on 'kernel config') of the specs to audit")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--no-basis", action="store_true",
                    help="fit on the current kernels' features, not the frozen basis")
    ap.add_argument("--write-fit-basis", action="store_true",
                    help="freeze the current kernels' features as the fit basis (only with new measurements)")
    ap.add_argument("--skip-training", action="store_true", help="no recovery-step predictions (quick runs)")
    args = ap.parse_args(argv)
    run(args.subset, args.specs, tuple(args.arch), args.out, not args.no_basis, args.write_fit_basis,
        not args.skip_training)
    return 0


if __name__ == "__main__":
    sys.exit(main())
