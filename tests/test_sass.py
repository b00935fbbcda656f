"""SASS reading (kernels/_sass.py): parsing, loop finding, and the loop statistics of real compiles.

The compile test runs in a fresh process without ``TRITON_INTERPRET`` (see test_compile_report.py
for why: an interpreted kernel leaves ``triton.language`` patched in its process).
"""
import json
import os
import subprocess
import sys

import pytest

from laco_kernels.kernels import _sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a hand-written listing in cuobjdump's format: 2-instruction prologue, a 5-instruction loop
# closed by a backward branch (one @!PT placeholder LDS inside), a short inner loop, the exit trap
_SASS = """
        code for sm_90a
                Function : _toy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000ff00000000800 */
        /*0010*/                   S2R R9, SR_CTAID.X ;                   /* 0x0000000000097919 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R17], desc[UR14][R10.64], P5 ;
        /*0030*/                   STS.128 [R3], R4 ;
        /*0040*/               @!PT LDS RZ, [RZ] ;
        /*0050*/                   HMMA.16816.F32 R12, R16, R8, R12 ;
        /*0060*/              @!P3 BRA 0x20 ;
        /*0070*/                   LDS.64 R4, [R2] ;
        /*0080*/                   FFMA R4, R4, R5, R6 ;
        /*0090*/               @P0 BRA 0x70 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_parse_and_steady_loop_on_a_listing():
    ins = _sass.parse(_SASS)
    assert [i.addr for i in ins] == list(range(0, 0xc0, 0x10))
    assert ins[4].pred == "!PT" and ins[4].never and ins[4].base == "LDS"
    assert ins[6].pred == "!P3" and ins[6].opcode == "BRA"
    assert _sass.loops(ins) == [(2, 6), (7, 9)]  # the self-branch trap at 0xb0 is not a loop
    assert _sass.steady_loop(ins) == (2, 6)
    st = _sass.loop_stats(_SASS, num_warps=4)
    assert st["loop_instructions"] == 5 and st["loop_span"] == [0x20, 0x60]
    assert (st["sts"], st["lds"], st["ldgsts"], st["guards"]) == (1, 0, 1, 1)
    assert st["classes"] == {"async_copy": 1, "control": 1, "guard": 1, "sts": 1, "tensor_core": 1}
    assert sum(st["classes"].values()) == st["loop_instructions"]
    assert _sass.thread_instr_per_byte(5, 4, 640) == 1.0
    assert _sass.thread_instr_per_byte(5, 4, 0) is None


# a dW-like kernel: a long loop without MMAs (the db row sum) before a shorter GEMM loop
_SASS_TWO_LOOPS = """
        /*0000*/                   S2R R9, SR_CTAID.X ;
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   HADD2.F32 R5, -RZ, R4.H0_H0 ;
        /*0030*/                   FADD R6, R6, R5 ;
        /*0040*/                   HADD2.F32 R5, -RZ, R4.H1_H1 ;
        /*0050*/                   FADD R7, R7, R5 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R17], desc[UR14][R10.64] ;
        /*0080*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0090*/               @P2 BRA 0x70 ;
        /*00a0*/                   EXIT ;
"""


def test_steady_loop_prefers_the_tensor_core_loop():
    ins = _sass.parse(_SASS_TWO_LOOPS)
    assert _sass.loops(ins) == [(1, 6), (7, 9)]
    assert _sass.steady_loop(ins) == (7, 9)  # not the longer db loop
    st = _sass.loop_stats(_SASS_TWO_LOOPS, num_warps=4)
    assert st["loop_instructions"] == 3 and st["classes"]["tensor_core"] == 1
    # without tensor-core instructions anywhere the largest span wins (FMA kernels)
    no_tc = _SASS_TWO_LOOPS.replace("HGMMA.64x128x16.F32 R24, gdesc[UR4], R24", "FFMA R24, R25, R26, R24")
    assert _sass.steady_loop(_sass.parse(no_tc)) == (1, 6)


def test_no_loop_and_bad_listings():
    st = _sass.loop_stats("/*0000*/  EXIT ;\n/*0010*/  BRA 0x10;", num_warps=1)
    assert st["loop_instructions"] == 0 and st["loop_span"] is None
    with pytest.raises(ValueError, match="no SASS instruction"):
        _sass.parse("garbage")
    with pytest.raises(ValueError, match="more than one function"):
        _sass.parse("Function : a\n/*0000*/ EXIT ;\nFunction : b\n/*0000*/ EXIT ;")


_SCRIPT = r"""
import json, sys
from laco_kernels.kernels import _sass, dense_gemm, masked_gemm, sparse24_gemm
def pick(specs, cond):
    return next(s for s in specs if cond(s))
chosen = [
    (pick(dense_gemm.COMPILE_SPECS, lambda s: s.regime == "decode" and s.config.endswith("fp16-ieee-outfp16")), 90),
    (pick(sparse24_gemm.COMPILE_SPECS, lambda s: s.regime == "decode" and s.config.endswith("fp16-ieee-outfp16")), 90),
    (pick(masked_gemm.COMPILE_SPECS, lambda s: s.regime == "train-fwd" and "bfloat16 prefill" in s.config), 80),
]
json.dump([_sass.spec_stats(s, arch) for s, arch in chosen], open(sys.argv[1], "w"))
"""


def _run_clean(script: str, *args) -> None:
    """Run ``script`` in a fresh Python without TRITON_INTERPRET (compiling fails in a process that
    ran the interpreter); fail the test with its output when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_loop_stats_of_compiled_kernels(tmp_path):
    out = tmp_path / "stats.json"
    _run_clean(_SCRIPT, out)
    dense, s24, masked = json.loads(out.read_text())
    for r in (dense, s24, masked):
        assert r["loop_instructions"] > 0 and r["loops"] >= 1
        assert sum(r["classes"].values()) == r["loop_instructions"]
        assert r["classes"].get("tensor_core", 0) > 0  # the dot is inside the loop
        assert r["spill_bytes"] == 0
    # dense decode: a plain LDGSTS -> LDSM -> HMMA pipeline, no layout round trip, bandwidth-bound
    assert dense["arch"] == "sm_90" and dense["family"] == "dense" and dense["regime"] == "decode"
    assert dense["sts"] == 0 and dense["lds"] == 0 and dense["ldgsts"] > 0
    tpb = dense["thread_instr_per_byte"]["0.5"]
    assert tpb == pytest.approx(dense["loop_instructions"] * 32 * dense["num_warps"] / (64 * 128 * 2))
    assert tpb < 3
    # 2:4 decode: fewer bytes per tile (values + meta) than dense, more work per byte
    assert s24["loop_weight_bytes"]["0.5"] == 64 * 128 * 2 + 64 * 8 * 4  # 16 x 64 x 256 tile
    assert s24["thread_instr_per_byte"]["0.5"] > tpb
    # a training kernel on sm_80: mma.sync (HMMA), thread-instructions per multiply-add defined
    assert masked["arch"] == "sm_80" and masked["regime"] == "train-fwd" and masked["opcodes"].get("HMMA", 0) > 0
    assert masked["thread_instr_per_mac"] == pytest.approx(
        masked["loop_instructions"] * 32 * masked["num_warps"] / (128 * 128 * 64))  # BLOCK_K 64 at prefill


_GUARD_SCRIPT = r"""
import json, sys
from laco_kernels.kernels import _sass, masked_gemm as mg
from laco_kernels.kernels._compile import compile_kernel
out = {}
for label in ("bfloat16 prefill guarded+bias", "bfloat16 prefill zero-pruned+bias", "bfloat16 prefill masked+bias",
              "bfloat16 prefill guarded even", "bfloat16 prefill zero-pruned even"):
    spec = next(s for s in mg.COMPILE_SPECS if s.config == label)
    ins = _sass.parse(_sass.disassemble(compile_kernel(spec, 90)[0].asm["cubin"]))
    out[label] = sorted(b - a + 1 for a, b in _sass.loops(ins))
json.dump(out, open(sys.argv[1], "w"))
"""


def test_guarded_kernels_hold_the_plain_loop(tmp_path):
    """The audit models a passing guard with the "zero-pruned" specs: the guarded kernels the ops
    layer launches must contain that very loop (sm_90) beside the masked one."""
    out = tmp_path / "loops.json"
    _run_clean(_GUARD_SCRIPT, out)
    loops = json.loads(out.read_text())
    fwd, dx = loops["bfloat16 prefill guarded+bias"], loops["bfloat16 prefill guarded even"]
    assert max(loops["bfloat16 prefill zero-pruned+bias"]) in fwd
    assert max(loops["bfloat16 prefill masked+bias"]) in fwd
    assert max(loops["bfloat16 prefill zero-pruned even"]) in dx
    assert max(fwd) > 2 * min(fwd) and max(dx) > 2 * min(dx)  # the plain loop is well under half the masked one
