"""Compile report: the representative kernel configurations compile for sm_80 and sm_90 without spills.

Runs ``bench/compile_report.py --subset`` in a fresh process without ``TRITON_INTERPRET``: once an
interpreted kernel has run in a process, Triton 3.9's interpreter leaves ``triton.language``
patched (tensor operators route to the interpreter builder), and lowering a kernel for a real GPU
in that process fails. A clean process is also exactly what a user running the report gets.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compile_report  # noqa: E402


def test_representative_specs_compile_without_spills_and_with_tensor_cores(tmp_path):
    specs = compile_report.all_specs(subset=True)
    names = {s.name for s in specs}
    assert {"_dense_gemm_kernel", "_sparse24_gemm_kernel", "_bitmap_gemm_kernel", "_masked_linear_fwd_kernel",
            "_masked_linear_dw_kernel", "_sparse24_dv_kernel", "_recon_loss_fwd_kernel", "_sparse24_gemv_kernel",
            "_bitmap_gemv_kernel", "_splitk_reduce_kernel", "_sparse24_expand_kernel", "_masked_expand_kernel",
            "_bitmap_expand_kernel"} <= names
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_report.py"), "--subset",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert len(records) == sum(len(s.archs) for s in specs)  # sm_90-only table rows compile for sm_90 only
    assert compile_report.violations(records) == []
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    by = {(r["kernel"], r["arch"]): r for r in records if "bf16" in r["config"] and "prefill" in r["config"]}
    assert by[("_sparse24_gemm_kernel", "sm_90")]["tensor_core"] == "wgmma"
    assert by[("_sparse24_gemm_kernel", "sm_80")]["tensor_core"] == "mma"


def test_violations_flags_spills_and_missing_tensor_cores():
    ok = dict(kernel="k", config="c", arch="sm_80", spill_bytes=0, expect_tensor_core=True, tensor_core="mma")
    assert compile_report.violations([ok]) == []
    assert compile_report.violations([dict(ok, spill_bytes=8)])
    assert compile_report.violations([dict(ok, tensor_core="none")])
    assert compile_report.violations([dict(ok, expect_tensor_core=False, tensor_core="none")]) == []
