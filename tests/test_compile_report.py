"""bench/compile_report.py on the representative subset of COMPILE_SPECS (every kernel module).

The subset (``CompileSpec.representative``) holds, for the inference GEMMs, each shape regime's
bf16 config with bias (the tensor-core path) and the fp32 "ieee" prefill config (the FMA path with
the largest tiles), bitmap at the default tile_k = 128; other modules choose their own. The full
report (every spec, sm_80 and sm_90) is ``python bench/compile_report.py``. Fails on any spill or
on a GEMM expected on tensor cores without mma / wgmma in its PTX.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import compile_report  # noqa: E402


def test_representative_specs_compile_without_spills_and_with_tensor_cores(tmp_path):
    specs = compile_report.all_specs(subset=True)
    names = {s.name for s in specs}
    assert {"_dense_gemm_kernel", "_sparse24_gemm_kernel", "_bitmap_gemm_kernel"} <= names
    records = compile_report.run(specs, out=str(tmp_path / "compile.json"), verbose=False)
    assert len(records) == 2 * len(specs)
    assert compile_report.violations(records) == []
    by = {(r["kernel"], r["arch"]): r for r in records if "bf16" in r["config"] and "prefill" in r["config"]}
    assert by[("_sparse24_gemm_kernel", "sm_90")]["tensor_core"] == "wgmma"
    assert by[("_sparse24_gemm_kernel", "sm_80")]["tensor_core"] == "mma"
    assert (tmp_path / "compile.json").exists()
