"""kernels/sparse24_mma.py (2:4 decode on the sparse tensor cores): the interpreter path against
reference.sparse24_linear, the PTX fragment mapping lane by lane, and the sm_80 / sm_90 compile."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TOLERANCES, check_24_kernel, check_self_check_fallback
from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight
from laco_kernels.kernels import sparse24_gemm as sg
from laco_kernels.kernels import sparse24_mma as sm

# (M, N, K, dtype, bias, splits): M = 1 (a single token), 3, 8 (one mma per tile), 9 and 16 (two);
# N odd / not a multiple of the 64 rows of a program; K: 4 unrolled tiles + a single tile + a partial
# tile (K = 164: 5 tiles and 4 groups), K % 32 != 0 with a forced split (only the last slice has the
# tail), K = 544 (whole unrolled steps), large K with the launcher's split
CASES = [(1, 37, 164, torch.float16, True, None), (3, 70, 72, torch.float16, False, None),
         (8, 19, 544, torch.bfloat16, True, None), (9, 45, 300, torch.float16, False, 2),
         (16, 5, 100, torch.bfloat16, True, None), (11, 33, 1028, torch.float16, True, None)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("m,n,k,dtype,bias,splits", CASES)
def test_matches_reference(m, n, k, dtype, bias, splits):
    check_24_kernel(sm.sparse24_mma, m, n, k, dtype, bias, splits=splits)


@pytest.mark.parametrize("m,n,k,dtype,bias,splits", CASES + [(2, 40, 1056, torch.float16, False, 1)])
def test_prefetch_variant_matches_reference(m, n, k, dtype, bias, splits, monkeypatch):
    """PREFETCH (register double buffering of whole unrolled steps): same results, the last step's
    prefetch predicated off (K = 1056: 8 whole steps in one slice, so the loop runs many iterations)."""
    monkeypatch.setitem(sm._CFG, "PREFETCH", True)
    check_24_kernel(sm.sparse24_mma, m, n, k, dtype, bias, splits=splits)


def test_non_contiguous_misaligned_and_3d_inputs(triton_backend):
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    n, k = 21, 72
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).half(), prune=True)
    values = w24.values.t().contiguous().t()  # column-major values: copied
    for x in (torch.randn(k, 4).half().t(),  # column-major x
              torch.randn(5, k + 1).half()[:, 1:]):  # rows start 2 bytes in: not 4-byte aligned, copied
        close(sm.sparse24_mma(x, values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float16)
    x3 = torch.randn(k, 3, 2).half().permute(2, 1, 0)  # [2, 3, k], M = 6 tokens through the public op
    b = torch.randn(n).half()
    close(sparse24_linear(x3, w24, b), reference.sparse24_linear(x3, w24, b), torch.float16)


def test_bad_input_is_refused():
    w24 = Sparse24Weight.from_dense(torch.randn(8, 32), prune=True)
    with pytest.raises(ValueError, match="fp16 / bf16"):
        sm.sparse24_mma(torch.randn(2, 32), w24.values, w24.meta, w24.shape)
    w16 = Sparse24Weight.from_dense(torch.randn(8, 32).half(), prune=True)
    with pytest.raises(ValueError, match="M = 17"):
        sm.sparse24_mma(torch.randn(17, 32).half(), w16.values, w16.meta, w16.shape)


def test_launcher_routes_16bit_decode_to_the_mma_kernel(monkeypatch):
    w24 = Sparse24Weight.from_dense(torch.randn(24, 64).half(), prune=True)
    calls = []
    real = sg.sparse24_mma
    monkeypatch.setattr(sg, "sparse24_mma", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, sm.MMA_MAX_M, sm.MMA_MAX_M + 1):
        x = torch.randn(m, 64).half()
        close(sg.sparse24_linear(x, w24.values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float16)
    assert calls == [1, sm.MMA_MAX_M]
    x = torch.randn(2, 64)  # fp32: never the mma kernel
    w32 = Sparse24Weight.from_dense(torch.randn(24, 64), prune=True)
    close(sg.sparse24_linear(x, w32.values, w32.meta, w32.shape), reference.sparse24_linear(x, w32), torch.float32)
    assert calls == [1, sm.MMA_MAX_M]


def test_failed_gpu_self_check_warns_and_falls_back(monkeypatch):
    """On CUDA a kernel that disagrees with the dense product is not used: one warning, then the
    GEMV / tl.dot decode (simulated: the check runs on CPU tensors with a fake CUDA device)."""
    check_self_check_fallback(monkeypatch, sm, "sparse24_mma", sm.mma_verified)


def test_compile_specs_describe_the_decode_loop():
    specs = [s for s in sm.COMPILE_SPECS if s.name == "_sparse24_mma_kernel"]
    assert {(s.constexprs["DT"], s.constexprs["HALVES"]) for s in specs} == {
        ("fp16", 1), ("fp16", 2), ("bf16", 1), ("bf16", 2)}
    for s in specs:
        assert (s.family, s.regime) == ("sparse24", "decode") and s.expect_tensor_core
        assert s.loop_weight_bytes(0.5) == 16 * s.constexprs["WARPS"] * s.constexprs["UNROLL"] * 36


# ---- the PTX path cannot run in the interpreter: the operands each lane builds (the kernel's index
# ---- formulas) are fed to a lane-level model of sparse mma.m16n8k32 (PTX ISA fragment rules)

def _prmt(a, b, sel):
    """PTX prmt.b32 default mode on Python ints (selector bit 3 unused here)."""
    src = (int(b) << 32) | int(a)
    return sum(((src >> (8 * ((sel >> (4 * j)) & 7))) & 0xFF) << (8 * j) for j in range(4))


def _half(bits, dt):
    bits = np.array([bits & 0xFFFF], dtype=np.uint16)
    return float(bits.view(np.float16)[0]) if dt == torch.float16 else float(
        (bits.astype(np.uint32) << 16).view(np.float32)[0])


def _mma_sp(A, B, E, C, dt):
    """Sparse mma.m16n8k32 (16-bit, selector 0) on per-lane registers: A[lane] = 4 pair words, B[lane] =
    4 x words, E[lane] = metadata word, C[lane] = 4 floats; returns D per lane (fp64 model)."""
    a = np.zeros((16, 32))
    for lane in range(32):
        gid, tig = divmod(lane, 4)
        for r in range(4):
            row, slot = gid + 8 * (r % 2), tig + 4 * (r // 2)
            e = E[4 * gid + slot // 4]  # lanes tig 0 / 1 hold groups 0-3 / 4-7; rows gid (bits 0-15), gid + 8
            nib = (e >> (16 * (row // 8) + 4 * (slot % 4))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1, f"invalid metadata nibble {nib:#x} (ordered_metadata needs i0 < i1)"
            a[row, 4 * slot + i0] = _half(A[lane][r], dt)
            a[row, 4 * slot + i1] = _half(A[lane][r] >> 16, dt)
    b = np.zeros((32, 8))
    for lane in range(32):
        gid, tig = divmod(lane, 4)
        for j in range(4):
            for h in range(2):
                b[2 * tig + 8 * j + h, gid] = _half(B[lane][j] >> (16 * h), dt)
    d = a @ b
    return [[d[gid, 2 * tig] + C[lane][0], d[gid, 2 * tig + 1] + C[lane][1], d[gid + 8, 2 * tig] + C[lane][2],
             d[gid + 8, 2 * tig + 1] + C[lane][3]] for lane, (gid, tig) in ((l, divmod(l, 4)) for l in range(32))]


def _model_warp(x, w24, row_base, dt):
    """One warp's 16 rows through the kernel's per-lane operand construction (all tiles of K, the tail
    patched as the kernel does), mma.sp modelled; returns y [M, 16] (fp64)."""
    m, k = x.shape
    V = w24.values.contiguous().view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    X = x.contiguous().view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    meta = w24.meta.numpy().astype(np.int64) & 0xFFFFFFFF
    n_groups = k // 4
    halves = 1 if m <= 8 else 2
    acc = [[[0.0] * 4 for _ in range(32)] for _ in range(halves)]
    for gt in range(0, n_groups, 8):
        A, E, B = [], [], [[] for _ in range(halves)]
        for lane in range(32):
            gid, tig = divmod(lane, 4)
            r0, r1 = row_base + gid, row_base + gid + 8
            word = lambda r, g: int(V[r, g]) if g < n_groups else 0  # noqa: E731
            A.append([word(r0, gt + tig), word(r1, gt + tig), word(r0, gt + tig + 4), word(r1, gt + tig + 4)])
            w0, w1 = int(meta[r0, gt // 8]), int(meta[r1, gt // 8])
            if n_groups - gt < 8:  # the tail tile: absent groups get nibble 0b0100
                keep = (1 << (4 * (n_groups - gt))) - 1
                pad = 0x44444444 & ~keep & 0xFFFFFFFF
                w0, w1 = (w0 & keep) | pad, (w1 & keep) | pad
            # lane tig 0 loads row gid's word, lane 1 row gid + 8's (lanes 2, 3: nothing); shfl.bfly 1, prmt
            own = {0: w0, 1: w1}.get(tig, 0)
            partner = {0: w1, 1: w0}.get(tig, 0)
            E.append(_prmt(own, partner, 0x5410 if tig == 0 else 0x3276))
            for h in range(halves):
                tok = gid + 8 * h  # tokens past M load nothing
                B[h].append([int(X[tok, 2 * gt + tig + 4 * j]) if tok < m and 2 * gt + tig + 4 * j < 2 * n_groups
                             else 0 for j in range(4)])
        for h in range(halves):
            acc[h] = _mma_sp(A, B[h], E, acc[h], dt)
    y = np.zeros((m, 16))
    for h in range(halves):
        for lane in range(32):
            gid, tig = divmod(lane, 4)
            for i, (row, tok) in enumerate([(gid, 2 * tig), (gid, 2 * tig + 1), (gid + 8, 2 * tig),
                                            (gid + 8, 2 * tig + 1)]):
                if tok + 8 * h < m:
                    y[tok + 8 * h, row] = acc[h][lane][i]
    return y


@pytest.mark.parametrize("m,k,dtype", [(5, 164, torch.float16), (16, 96, torch.bfloat16), (12, 36, torch.float16)])
def test_lane_model_of_the_ptx_path_matches_reference(m, k, dtype):
    w24 = Sparse24Weight.from_dense(torch.randn(32, k).to(dtype), prune=True)
    x = torch.randn(m, k).to(dtype)
    want = reference.sparse24_linear(x.float(), Sparse24Weight(w24.values.float(), w24.meta, w24.shape)).double()
    for base in (0, 16):
        got = torch.from_numpy(_model_warp(x, w24, base, dtype))
        torch.testing.assert_close(got, want[:, base:base + 16], rtol=1e-5, atol=1e-4)


_COMPILE = r"""
import dataclasses, itertools, json, re, sys
sys.path.insert(0, sys.argv[1])
from laco_kernels.kernels import _sass, sparse24_mma as sm
from laco_kernels.kernels._compile import compile_kernel, tensor_core_kind
out = {}
for spec in sm.COMPILE_SPECS:  # one spec per (dtype, halves) pairing the test suite can afford: fp16 x 1, bf16 x 2
    if spec.config not in ("sparse24-mma-fp16-m8-out", "sparse24-mma-bf16-m16-partial"):
        continue
    variants = [("", spec), ("/prefetch", dataclasses.replace(spec, constexprs={**spec.constexprs, "PREFETCH": True}))]
    for (tag, sp), arch in itertools.product(variants, (80, 90)):
        k, log = compile_kernel(sp, arch)
        st = _sass.loop_stats(_sass.disassemble(k.asm["cubin"]), sp.num_warps)
        ops = st["opcodes"]
        out[f"{spec.config}/sm_{arch}{tag}"] = dict(
            sts=st["sts"], lds=st["lds"], loop=st["loop_instructions"], hmma_sp=_sass.disassemble(
                k.asm["cubin"]).count("HMMA.SP."), loop_hmma=ops.get("HMMA", 0), tc=tensor_core_kind(k.asm["ptx"]),
            layouts=len(re.findall(r"^#\w+ = #ttg\.", k.asm["ttgir"], re.M)),
            converts=k.asm["ttgir"].count("ttg.convert_layout"), spills="bytes spill" in log and not re.search(
                r"\b0 bytes spill stores", log))
print(json.dumps(out))
"""


def test_compiled_loop_runs_on_the_sparse_tensor_cores():
    """sm_80 and sm_90: mma.sp in the PTX, HMMA.SP in the SASS (UNROLL x HALVES per loop iteration),
    one register layout in the TTGIR (no conversions), no STS / LDS in the loop (compiled in a clean
    process: lowering fails in a process that ran the interpreter)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, root], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # (fp16, 1 half, out) and (bf16, 2 halves, partial) x sm_80 / sm_90 x (plain, PREFETCH); the audit compiles all
    assert len(res) == 8
    for name, r in res.items():
        halves = 2 if "-m16-" in name else 1
        assert r["tc"] == "mma.sp" and r["hmma_sp"] > 0, (name, r)
        assert r["loop_hmma"] == sm._CFG["UNROLL"] * halves, (name, r)
        assert r["sts"] == r["lds"] == 0 and r["converts"] == 0 and r["layouts"] == 1, (name, r)
        assert not r["spills"], (name, r)
        # sm_90 when written: 66 (M <= 8) / 95 (M <= 16); PREFETCH (loads of the next step in the loop) 101 / 133
        assert r["loop"] <= (110 if name.endswith("/prefetch") else 100) * halves, (name, r)
