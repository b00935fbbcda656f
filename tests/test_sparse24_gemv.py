"""kernels/sparse24_gemv.py (2:4 decode GEMV) in the Triton interpreter against reference.sparse24_linear."""
import pytest
import torch

from conftest import TOLERANCES, check_24_kernel, check_self_check_fallback
from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight
from laco_kernels.kernels import sparse24_gemm as sg
from laco_kernels.kernels import sparse24_gemv as sv

# (M, N, K, dtype, bias, splits): M in {1, 2, 3, 7, 16}; N odd / not a multiple of BLOCK_N; K a multiple of
# 4 but not of 32 (half-used meta word) or of the unrolled step; K = 4100 the large-K case (4 unrolled
# steps + remainder); splits None = the launcher's choice, an int forces split-K (partials + reduce kernel)
CASES = [(1, 37, 72, torch.float16, True, None), (1, 70, 4100, torch.float16, False, None),
         (2, 45, 1028, torch.float32, True, 3), (3, 33, 136, torch.float16, False, 2),
         (7, 19, 2056, torch.float16, True, None), (16, 5, 100, torch.float32, False, None),
         (1, 17, 4100, torch.float32, True, 5), (3, 40, 260, torch.bfloat16, True, None)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("m,n,k,dtype,bias,splits", CASES)
def test_matches_reference(m, n, k, dtype, bias, splits):
    check_24_kernel(sv.sparse24_gemv, m, n, k, dtype, bias, splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_contiguous_and_misaligned_inputs(dtype):
    n, k = 21, 200
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    values = w24.values.t().contiguous().t()  # column-major values
    xs = [torch.randn(k, 2).to(dtype).t(),  # column-major x
          torch.randn(2, k + 1).to(dtype)[:, 1:],  # rows start off the 8-byte boundary of the int64 view
          torch.randn(3, k + 4).to(dtype)[1:, :k]]  # 8-byte aligned, not 16 (fp16): viewed in place
    for x in xs:
        assert not x.is_contiguous() or x.data_ptr() % 16
        close(sv.sparse24_gemv(x, values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), dtype)


def test_row_block_values_off_the_16_byte_boundary():
    w24 = Sparse24Weight.from_dense(torch.randn(9, 200).half(), prune=True)
    part = w24.row_block(slice(1, 9))  # values start 200 bytes in: 4-byte aligned, read in place
    x = torch.randn(1, 200).half()
    close(sv.sparse24_gemv(x, part.values, part.meta, part.shape), reference.sparse24_linear(x, part), torch.float16)


def test_launcher_routes_small_m_to_the_gemv(monkeypatch):
    w24 = Sparse24Weight.from_dense(torch.randn(24, 64), prune=True)
    calls = []
    real = sg.sparse24_gemv
    monkeypatch.setattr(sg, "sparse24_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, sv.GEMV_MAX_M, sv.GEMV_MAX_M + 1):
        x = torch.randn(m, 64)
        close(sg.sparse24_linear(x, w24.values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float32)
    assert calls == [1, sv.GEMV_MAX_M]


def test_3d_input_through_the_public_op(triton_backend):
    from laco_kernels.ops.sparse_gemm import sparse24_linear

    w24 = Sparse24Weight.from_dense(torch.randn(30, 96).half(), prune=True)
    x = torch.randn(96, 2, 1).half().permute(2, 1, 0)  # [1, 2, 96], non-contiguous, M = 2 tokens
    b = torch.randn(30).half()
    close(sparse24_linear(x, w24, b), reference.sparse24_linear(x, w24, b), torch.float16)


def test_empty_batch():
    w24 = Sparse24Weight.from_dense(torch.randn(8, 32), prune=True)
    assert sv.sparse24_gemv(torch.randn(0, 32), w24.values, w24.meta, w24.shape).shape == (0, 8)


def test_compile_specs_describe_the_decode_loop():
    specs = [s for s in sv.COMPILE_SPECS if s.name == "_sparse24_gemv_kernel"]
    assert {s.constexprs["DT"] for s in specs} == {"fp16", "bf16", "fp32"}
    for s in specs:
        assert (s.family, s.regime) == ("sparse24", "decode")
        per_group = 2 * (4 if s.constexprs["DT"] == "fp32" else 2) + 0.5
        groups = s.constexprs["BLOCK_N"] * s.constexprs["UNROLL"] * 8 * s.constexprs["BLOCK_W"]
        assert s.loop_weight_bytes(0.3) == s.loop_weight_bytes(0.7) == groups * per_group


# ---- the GPU 16-bit path (two mma.sync per quad of groups) cannot run in the interpreter: its
# ---- lane mapping is checked against the compiled layout, and its arithmetic by a lane-level model

_COMPILE_16BIT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
from laco_kernels.kernels import _sass, sparse24_gemv as sv
from laco_kernels.kernels._compile import compile_kernel
pat = re.compile(r"#blocked\d* = #ttg.blocked<\{sizePerThread = \[1, 1, 4\], threadsPerWarp = \[(\d+), (\d+), (\d+)\], "
                 r"warpsPerCTA = \[(\d+), (\d+), (\d+)\], order = \[2, 1, 0\]\}>")
out = {}
for spec in sv.COMPILE_SPECS:
    if spec.name != "_sparse24_gemv_kernel" or spec.constexprs["DT"] == "fp32":
        continue
    k = compile_kernel(spec, 90)[0]
    layouts = [tuple(int(v) for v in m.groups()) for m in map(pat.match, k.asm["ttgir"].splitlines()) if m]
    st = _sass.loop_stats(_sass.disassemble(k.asm["cubin"]), spec.num_warps)
    out[spec.config] = dict(layouts=layouts, sts=st["sts"], lds=st["lds"], hmma=st["opcodes"].get("HMMA", 0))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_16bit():
    """sm_90 facts of the 16-bit GEMV specs: the [1, 1, 4] blocked layouts of the TTGIR and the
    loop's STS / LDS / HMMA counts (compiled in a clean process: lowering fails in a process that
    ran the interpreter)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_16BIT, root], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prmt(a, b, sel):
    """PTX prmt.b32 default mode on Python ints (selector bit 3 unused here)."""
    a, b, sel = int(a), int(b), int(sel)
    src = (b << 32) | a
    return sum(((src >> (8 * ((sel >> (4 * j)) & 7))) & 0xFF) << (8 * j) for j in range(4))


def _simulate_quad_mma(pairs, xw, nib, layout, dtype):
    """Run the kernel's per-step quad asm + _mma_diagonal as the hardware would, lane by lane.

    pairs: int [R, W, 8] kept pairs (v0 | v1 << 16), xw: int [W, 8] the 64-bit x words of a
    groups, nib: int [R, W, 8] nibbles. Returns the per-row sums [R] (float64)."""
    import numpy as np

    tr, tw, tq, wr, ww, wq = layout
    assert (ww, wq) == (1, 1) and tq * 4 == 8 and tw == pairs.shape[1]
    half = (lambda v: float(np.array([v], dtype=np.uint16).view(np.float16)[0])) if dtype == "fp16" else \
        (lambda v: float(np.array([v << 16], dtype=np.uint32).view(np.float32)[0]))
    R = pairs.shape[0]
    out = np.zeros(R)
    rows_per_rep = tr * wr
    for rep in range(R // rows_per_rep):       # register repetitions along rows
        for warp in range(wr):
            # lane -> (row, w, quad)
            lanes = {}
            for lane in range(32):
                r_in, rest = divmod(lane, tw * tq)
                w, qh = divmod(rest, tq)
                lanes[lane] = (rep * rows_per_rep + warp * tr + r_in, w, qh)
            acc = {lane: np.zeros(4) for lane in range(32)}
            acc2 = {lane: np.zeros(4) for lane in range(32)}
            # per lane: the quad's selectors / picks, as the asm computes them
            A, B1, B2 = {}, {}, {}
            for lane, (r, w, qh) in lanes.items():
                g = [4 * qh + j for j in range(4)]
                word = sum(int(nib[r, w, q]) << (4 * q) for q in range(8))
                t = (word >> (16 * qh)) & 0xFFFFFFFF
                u = _prmt(t, 0, 0x4140)
                s = ((((u & 0x00030003) + (u & 0x000C000C) * 64) * 34) + 0x10101010) & 0xFFFFFFFF
                u4 = u >> 4
                tt = ((((u4 & 0x00030003) + (u4 & 0x000C000C) * 64) * 34) + 0x10101010) & 0xFFFFFFFF
                lo = [int(xw[w, q]) & 0xFFFFFFFF for q in g]
                hi = [int(xw[w, q]) >> 32 for q in g]
                x0, x2 = _prmt(lo[0], hi[0], s & 0xFFFF), _prmt(lo[2], hi[2], s >> 16)
                x1, x3 = _prmt(lo[1], hi[1], tt & 0xFFFF), _prmt(lo[3], hi[3], tt >> 16)
                A[lane] = [int(pairs[r, w, q]) for q in g]
                B1[lane], B2[lane] = (x0, x2), (x1, x3)
            # mma.sync m16n8k16 (A row-major 16x16, B col 16x8), fragments per the PTX ISA
            for Bs, accs in ((B1, acc), (B2, acc2)):
                Am, Bm = np.zeros((16, 16)), np.zeros((16, 8))
                for lane in range(32):
                    gid, tig = divmod(lane, 4)
                    a0, a1, a2, a3 = A[lane]
                    for h in range(2):
                        Am[gid, 2 * tig + h] = half((a0 >> (16 * h)) & 0xFFFF)
                        Am[gid + 8, 2 * tig + h] = half((a1 >> (16 * h)) & 0xFFFF)
                        Am[gid, 2 * tig + 8 + h] = half((a2 >> (16 * h)) & 0xFFFF)
                        Am[gid + 8, 2 * tig + 8 + h] = half((a3 >> (16 * h)) & 0xFFFF)
                        Bm[2 * tig + h, gid] = half((Bs[lane][0] >> (16 * h)) & 0xFFFF)
                        Bm[2 * tig + 8 + h, gid] = half((Bs[lane][1] >> (16 * h)) & 0xFFFF)
                D = Am @ Bm
                for lane in range(32):
                    gid, tig = divmod(lane, 4)
                    accs[lane] += [D[gid, 2 * tig], D[gid, 2 * tig + 1], D[gid + 8, 2 * tig], D[gid + 8, 2 * tig + 1]]
            # _mma_diagonal, then the kernel's sum over the row's elements
            for lane, (r, w, qh) in lanes.items():
                gid, tig = divmod(lane, 4)
                if tig == gid >> 1:
                    out[r] += acc[lane][gid & 1] + acc2[lane][2 + (gid & 1)]
    return out


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_quad_mma_lane_model_matches_reference(dt, compiled_16bit):
    """The compiled layout puts a row's quads on 4 consecutive lanes, and with that layout the two
    mma.sync per quad + the diagonal pick compute exactly the row dot products (model of the PTX
    fragment rules, run lane by lane on the layout read from the sm_90 TTGIR)."""
    import numpy as np

    spec = next(s for s in sv.COMPILE_SPECS if s.name == "_sparse24_gemv_kernel" and s.constexprs["DT"] == dt
                and not s.constexprs["PARTIAL"] and not s.constexprs["HAS_BIAS"])
    layouts = compiled_16bit[spec.config]["layouts"]
    assert len(layouts) == 1, layouts  # one layout with 4 elements per thread: the one the quad asm runs in
    layout = layouts[0]
    tr, tw, tq = layout[:3]
    assert tr * tw * tq == 32 and (tw * tq) % 4 == 0, layout  # lanes 4G..4G+3 share one row
    R, W = spec.constexprs["BLOCK_N"], spec.constexprs["BLOCK_W"]
    tdt = torch.float16 if dt == "fp16" else torch.bfloat16
    w24 = Sparse24Weight.from_dense(torch.randn(R, W * 32).to(tdt), prune=True)  # one step: W meta words per row
    x = torch.randn(1, W * 32).to(tdt)
    pairs = w24.values.contiguous().view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    meta = w24.meta.numpy().astype(np.int64) & 0xFFFFFFFF
    nib = np.stack([(meta >> (4 * q)) & 0xF for q in range(8)], axis=-1)  # [R, W, 8]
    xw = x.view(torch.int64).numpy().astype(object).reshape(W, 8)
    xw = np.vectorize(lambda v: int(v) & 0xFFFFFFFFFFFFFFFF, otypes=[object])(xw)
    got = _simulate_quad_mma(pairs.reshape(R, W, 8), xw, nib, layout, dt)
    want = reference.sparse24_linear(x.float(), Sparse24Weight(w24.values.float(), w24.meta, w24.shape))[0].double()
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-4)


def test_gpu_16bit_loop_has_no_shared_memory_round_trip(compiled_16bit):
    assert len(compiled_16bit) == 6  # fp16 / bf16 x (out, out + bias, partial)
    for config, r in compiled_16bit.items():
        assert r["sts"] == r["lds"] == 0 and r["hmma"] > 0, (config, r)


def test_self_check_problem_is_a_valid_24_weight():
    from laco_kernels.formats import Sparse24Weight

    x, values, meta, dense, shape = sv._self_check_problem(torch.float16, torch.device("cpu"))
    w = Sparse24Weight(values, meta, shape)
    torch.testing.assert_close(w.to_dense(), dense)
    close(sv.sparse24_gemv(x, values, meta, shape), x.float() @ dense.float().t(), torch.float16)


def test_failed_gpu_self_check_warns_and_routes_to_the_tile_kernel(monkeypatch):
    """On CUDA a GEMV that disagrees with the dense product is not used: one warning, then the
    tl.dot decode kernel (simulated: the check is run on CPU tensors with a fake CUDA device)."""
    check_self_check_fallback(monkeypatch, sv, "sparse24_gemv", sv.gemv_verified)

