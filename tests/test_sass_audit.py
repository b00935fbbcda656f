"""SASS audit (bench/sass_audit.py, bench/sass_model.py): launch plans, the fit, and a quick run.

The run goes through the CLI in a fresh process without ``TRITON_INTERPRET`` (see
test_compile_report.py), on one spec pattern and sm_90 only, so it stays quick.
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compile_report  # noqa: E402
import sass_model as sm  # noqa: E402

from laco_kernels.kernels import dense_gemm  # noqa: E402


@pytest.fixture(scope="module")
def specs():
    return compile_report.all_specs()


def test_every_gemm_spec_declares_audit_metadata(specs):
    gemm = [s for s in specs if s.is_gemm]
    assert gemm and all(s.family and s.regime for s in gemm)
    # the weight-reading loops say how many bytes an iteration loads
    for s in gemm:
        if s.regime in ("decode", "prefill", "train-fwd", "train-dx"):
            assert s.loop_weight_bytes is not None and s.loop_weight_bytes(0.5) > 0, s.config


def test_inference_plan_mirrors_the_launcher(specs):
    spec = sm.find_spec(specs, family="dense", regime="decode", dtype="fp16", kernel="_dense_gemm_kernel")
    cfg = dense_gemm.gemm_config("dense", 1, __import__("torch").float16)
    splits, _ = dense_gemm.split_k(cfg, 1, 4096, 4096, sm._CPU)
    plan = sm.inference_plan(spec, 1, 4096, 4096, 1.0, specs)
    assert splits > 1 and [p["name"] for p in plan] == ["_dense_gemm_kernel", "splitk_sum", "cast_copy"]
    assert sm.spec_out_dtype(plan[0]["spec"]) == "fp32"  # split-K partials are fp32
    assert plan[0]["programs"] == (4096 // cfg.BLOCK_N) * splits
    assert plan[0]["iterations"] * splits == 4096 // cfg.BLOCK_K
    assert plan[0]["bytes"] >= 4096 * 4096 * 2  # the whole weight once
    pre = sm.inference_plan(sm.find_spec(specs, family="dense", regime="prefill", dtype="fp16"), 4096, 4096, 4096,
                            1.0, specs)
    assert len(pre) == 1 and pre[0]["programs"] == 32 * 32


def test_find_spec_picks_the_rows_launched_on_the_arch(specs):
    import dataclasses

    dense = sm.find_spec(specs, family="dense", regime="prefill", dtype="fp16")
    sm80_only = dataclasses.replace(dense, archs=(80,), config=dense.config + "-sm80")
    assert sm.find_spec([sm80_only, dense], family="dense", regime="prefill", dtype="fp16") is dense
    assert sm.find_spec([sm80_only, dense], family="dense", regime="prefill", dtype="fp16", arch=80) is sm80_only
    assert sm.find_spec([sm80_only], family="dense", regime="prefill", dtype="fp16") is None


def test_training_step_plans(specs):
    plans = sm.training_step_plans(1024, [("gate", 1536, 576)], "bf16", specs)
    # guarded (>= GUARD_MIN_ROWS tokens): the check, the plain loops it selects, the masked dW
    assert [(p["spec"].family, p["spec"].regime) for p in plans["masked"]] == [
        ("masked", "train-check"), ("masked-zero", "train-fwd"), ("masked-zero", "train-dx"), ("masked", "train-dw")]
    assert plans["masked"][0]["bytes"] == 1536 * 576 * 2 + 1536 * 18 * 4  # W and its bits, once
    # the EVEN variants where the loop dimension divides: N = 1536 (dX), M = 1024 (dW)
    assert [p["spec"].constexprs.get("EVEN") for p in plans["masked"]] == [None, None, True, True]
    few = sm.training_step_plans(16, [("gate", 1536, 576)], "bf16", specs)
    assert [(p["spec"].family, p["spec"].regime) for p in few["masked"]] == [
        ("masked", "train-fwd"), ("masked", "train-dx"), ("masked", "train-dw")]
    # the 2:4 dX: sm_90's 256-row tile (20 programs on 132 SMs, N = 1536 >= 2K) split in 4 slices of
    # 6 steps, then the reduction of the fp32 partials (a pass without a compiled spec)
    assert [p["spec"].regime if p["spec"] else p["name"] for p in plans["sparse24"]] == [
        "prefill", "train-dx", "_sparse24_dx_kernel:splitk_reduce", "train-dw"]
    dx, red = plans["sparse24"][1:3]
    assert dx["spec"].constexprs["SPLIT"] and dx["spec"].constexprs["BLOCK_M"] == 256
    assert (dx["programs"], dx["iterations"]) == (4 * 5 * 4, 6.0)
    assert red["bytes"] == 1024 * 576 * (4 * 4 + 2)
    assert [p["name"] for p in plans["torch"]][0] == "gate:W*M" and len(plans["torch"]) == 5
    # the 2:4 forward is the config the launcher picks (here the 256-row sm_90 row: 48 programs, and
    # its 128 x 64 fill row would need 192 > 132); a down projection (N = 576) takes the fill row
    assert plans["sparse24"][0]["spec"].constexprs["BLOCK_M"] == 256
    down = sm.training_step_plans(1024, [("down", 576, 1536)], "bf16", specs)
    assert down["sparse24"][0]["spec"].config.startswith("sparse24-prefill-16bit-sm90-fill")
    # the weight gradients are the bias-free launches (Llama-style linears) on the small-grid tile
    for path in ("masked", "sparse24"):
        dw = plans[path][-1]["spec"]
        assert dw.constexprs["HAS_BIAS"] is False and dw.constexprs["BLOCK_N"] == 64 and dw.num_warps == 4
    # the expand paths: expansion, cuBLAS-modelled forward, expansion again, dX, our weight gradient
    for fam in ("masked", "sparse24"):
        ex = plans[f"{fam}_expand"]
        assert [p["spec"].regime for p in ex] == ["train-expand", "prefill", "train-expand", "prefill", "train-dw"]
        assert ex[0]["spec"].family == fam and ex[0]["iterations"] == 0.0
        assert ex[1]["name"] == ex[3]["name"] == "_dense_gemm_kernel"
    assert plans["sparse24_expand"][0]["bytes"] == 1536 * 288 * 2 + 1536 * 18 * 4 + 1536 * 576 * 2


def test_fit_recovers_known_constants():
    truth = dict(bw_bytes_per_us=3.0e6, ir_thread_instr_per_us_per_sm=1.0e5, launch_us=2.0)
    rows = []
    for b, i in [(1e7, 1e4), (3e7, 1e5), (1e6, 2e6), (5e7, 5e6), (2e5, 1e3), (8e7, 3e5)]:
        feats = [dict(name="k", bytes=b, sm_instr=i, sm_mac=0.0)]
        rows.append(dict(features=feats, measured_us=sm.predict_us(feats, truth, "sum")))
    f = sm.fit(rows)
    assert f["kind"] == "sum" and f["launch_term"] and f["rms_log_error"] < 1e-4
    for k, v in truth.items():
        assert f["params"][k] == pytest.approx(v, rel=1e-3)


def test_quick_audit_run(tmp_path):
    out = tmp_path / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "sass_audit.py"), "--specs",
           "dense-decode-16bit-fp16-ieee-outfp16", "--arch", "90", "--skip-training", "--out", str(out)]
    proc = subprocess.run(cmd,
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "PREDICTED" in proc.stdout and "fitted model" in proc.stdout
    (rec,) = [r for r in doc["specs"] if r["config"] == "dense-decode-16bit-fp16-ieee-outfp16"]
    assert rec["arch"] == "sm_90" and rec["sts"] == 0 and rec["loop_instructions"] > 0
    fit = doc["fit"]
    assert fit["kind"] in ("max", "sum") and math.isfinite(fit["rms_log_error"])
    assert len(fit["rows"]) == 60 and all(r["predicted_us"] > 0 for r in fit["rows"])
    preds = doc["predictions"]
    assert {(p["N"], p["K"]) for p in preds} == {(4096, 4096), (11008, 4096), (4096, 11008)}
    assert {p["M"] for p in preds} == {1, 2, 3, 4, 8, 16}  # the decode regime
    for p in preds:  # the dense kernel is its own yardstick; every predicted figure says so in its name
        assert p["predicted_speedup_vs_dense_triton"] == pytest.approx(1.0)
        assert p["launches"][0] == "_dense_gemm_kernel"
        assert (p["measured_h100_us"] is not None) == (p["M"] in (1, 4, 16))  # the M the H100 run timed
    assert all(k.startswith(("predicted", "measured")) or not isinstance(v, float) for p in preds for k, v in p.items())
