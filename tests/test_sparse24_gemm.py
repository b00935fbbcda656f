"""kernels/sparse24_gemm.py in the Triton interpreter against reference.sparse24_linear."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import Sparse24Weight
from laco_kernels.kernels import _bits, dense_gemm
from laco_kernels.kernels import sparse24_gemm as sg
from laco_kernels.kernels.dense_gemm import gemm_config, split_k

# (M, N, K): M = 1 / 3 / 16 (decode, split-K), 67 / 256 (prefill); N, K not multiples of the tiles;
# K = 1028 is the "large K" case (9 K tiles, K % 32 != 0: a half-used meta word)
CASES = [(1, 37, 72, torch.float16, True), (1, 70, 1028, torch.float32, False), (3, 45, 100, torch.float16, False),
         (16, 33, 136, torch.float32, True), (67, 70, 200, torch.float16, True), (256, 40, 136, torch.float32, False)]


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("m,n,k,dtype,bias", CASES)
def test_matches_reference(m, n, k, dtype, bias):
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).to(dtype), prune=True)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = sg.sparse24_linear(x, w24.values, w24.meta, w24.shape, b)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, reference.sparse24_linear(x, w24, b), dtype)


def test_non_contiguous_inputs_and_values():
    n, k = 50, 96
    w24 = Sparse24Weight.from_dense(torch.randn(n, k), prune=True)
    values = w24.values.t().contiguous().t()  # same numbers, column-major
    x = torch.randn(k, 5).t()
    assert not (x.is_contiguous() or values.is_contiguous())
    close(sg.sparse24_linear(x, values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float32)


def test_decode_uses_split_k_and_prefill_does_not():
    cfg = gemm_config("sparse24", 1, torch.float16)
    assert cfg.BLOCK_M == 16 and split_k(cfg, 1, 37, 1028, torch.device("cpu"))[0] > 1
    assert split_k(gemm_config("sparse24", 67, torch.float16), 67, 70, 1028, torch.device("cpu"))[0] == 1


def test_empty_batch():
    w24 = Sparse24Weight.from_dense(torch.randn(8, 32), prune=True)
    assert sg.sparse24_linear(torch.randn(0, 32), w24.values, w24.meta, w24.shape).shape == (0, 8)


# prefill (M > 16) with 16-bit weights takes the int32-pair decode (kernels/_bits.expand_24_prmt):
# N odd, K not a multiple of BLOCK_K or of 32 (a half-used meta word), every nibble pattern
PREFILL = [(17, 37, 100, True), (67, 71, 1028, False), (256, 45, 228, True)]


@pytest.mark.parametrize("m,n,k,bias", PREFILL)
def test_prefill_16bit_pairs_match_reference(m, n, k, bias):
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).half(), prune=True)
    x = torch.randn(m, k).half()
    b = torch.randn(n).half() if bias else None
    close(sg.sparse24_linear(x, w24.values, w24.meta, w24.shape, b), reference.sparse24_linear(x, w24, b),
          torch.float16)


def test_prefill_all_six_patterns_exact():
    """Each of the six (i0, i1) patterns in every nibble slot of a word, values exact in fp16."""
    pats = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                        dtype=torch.bool)
    n, k = 6, 96  # 24 groups: row r uses pattern (r + g) % 6 in group g
    mask = torch.stack([torch.cat([pats[(r + g) % 6] for g in range(k // 4)]) for r in range(n)])
    w = (torch.arange(n * k).reshape(n, k) % 7 + 1).half() * mask
    w24 = Sparse24Weight.from_dense(w)
    x = torch.eye(k).half()[:40]  # y = W[:, :40]^T: every weight lands alone in an output
    y = sg.sparse24_linear(x, w24.values, w24.meta, w24.shape)
    assert torch.equal(y, w[:, :40].t())


def test_prefill_non_contiguous_16bit_values_and_x():
    n, k = 50, 96
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).half(), prune=True)
    values = w24.values.t().contiguous().t()  # column-major: the launcher copies before the int32 view
    x = torch.randn(k, 20).half().t()
    assert not (x.is_contiguous() or values.is_contiguous())
    close(sg.sparse24_linear(x, values, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float16)
    odd = torch.randn(n, k // 2 + 1).half()[:, 1:]  # unit stride along K but 2-byte aligned rows
    odd.copy_(w24.values)
    close(sg.sparse24_linear(x, odd, w24.meta, w24.shape), reference.sparse24_linear(x, w24), torch.float16)


def test_16bit_specs_pass_int32_words():
    """The compile specs mirror the launcher: 16-bit weights (decode and prefill) get int32 words, fp32 the values."""
    assert all(s.signature["v_ptr"] == "*i32" for s in sg.COMPILE_SPECS if "-16bit-" in s.config)
    assert all(s.signature["v_ptr"] != "*i32" for s in sg.COMPILE_SPECS if "-16bit-" not in s.config)


@pytest.mark.parametrize("m,n,k,bias", [(4, 37, 100, True), (7, 70, 1028, False), (16, 45, 4100, True)])
def test_decode_16bit_pairs_match_reference(monkeypatch, m, n, k, bias):
    """M = 4..16 (below prefill): the tl.dot kernel on int32 pair words, split-K on. It is the fallback of
    the sparse tensor-core kernel (sparse24_mma.py) where that fails its GPU self-check: forced here."""
    monkeypatch.setattr(sg, "mma_verified", lambda device, dtype: False)
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).half(), prune=True)
    x = torch.randn(k, m).half().t()  # non-contiguous x
    b = torch.randn(n).half() if bias else None
    y = sg.sparse24_linear(x, w24.values, w24.meta, w24.shape, b)
    close(y, reference.sparse24_linear(x, w24, b), torch.float16)


@pytest.mark.parametrize("m,n,k,bias,sms,block_m", [(17, 37, 100, False, 1, 256), (256, 45, 228, True, 1, 256),
                                                     (300, 33, 136, False, 1, 256), (67, 70, 200, True, 132, 128)])
def test_prefill_sm90_tiles_match_reference(monkeypatch, m, n, k, bias, sms, block_m):
    """The sm_90-only prefill tiles (dense_gemm._ARCH_TABLE 256 x 128, and _FILL_TABLE 128 x 64 while
    the big tiles would leave SMs idle), run in the interpreter."""
    monkeypatch.setattr(dense_gemm, "device_arch", lambda device: 90)
    monkeypatch.setattr(dense_gemm, "_num_sms", lambda device: sms)
    assert dense_gemm.gemm_config("sparse24", m, torch.float16, arch=90, n=n, sms=sms).BLOCK_M == block_m
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).half(), prune=True)
    x = torch.randn(m, k).half()
    b = torch.randn(n).half() if bias else None
    close(sg.sparse24_linear(x, w24.values, w24.meta, w24.shape, b), reference.sparse24_linear(x, w24, b),
          torch.float16)


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32 d, a, b, sel`` (default mode), from the PTX ISA description."""
    src = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    out = 0
    for j in range(4):
        c = (sel >> (4 * j)) & 0xF
        byte = (src >> (8 * (c & 7))) & 0xFF
        if c & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * j)
    return out


def test_prmt_table_places_every_pattern():
    """PRMT_LUT_24[nibble] fed to the real prmt semantics rebuilds the group; invalid nibbles give zeros."""
    v0, v1 = 0xA1B2, 0xC3D4
    pair = v0 | v1 << 16
    for nib, sel in enumerate(_bits.PRMT_LUT_24):
        assert 0 <= sel < 1 << 32 and all((sel >> (4 * j)) & 8 == 0 for j in range(8))  # no sign mode
        i0, i1 = nib & 3, nib >> 2
        want = [0] * 4
        if i0 < i1:
            want[i0], want[i1] = v0, v1
        q0, q1 = _prmt(pair, 0, sel), _prmt(pair, 0, sel >> 16)
        assert [q0 & 0xFFFF, q0 >> 16, q1 & 0xFFFF, q1 >> 16] == want, nib


_PACK_CHECK = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
from laco_kernels.kernels import _compile, sparse24_gemm
out = {}
for spec in sparse24_gemm.COMPILE_SPECS:
    if "-prefill-16bit-" in spec.config and spec.config.endswith("-fp16-ieee-outfp16"):
        for arch in spec.archs:
            k, _ = _compile.compile_kernel(spec, arch)
            # OPAQUE (side-effecting) asm prints as "asm sideeffect"
            calls = re.findall(r'asm (?:sideeffect )?"[^"]*prmt[^"]*", "[^"]*"\(([^)]*)\)', k.asm["llir"])
            ops = [[o.split()[-1] for o in c.split(",")] for c in calls]
            c = spec.constexprs
            out[f"{spec.config}@{arch}"] = dict(calls=len(calls), groups=c["BLOCK_N"] * c["BLOCK_K"] // (4 * 32 * spec.num_warps), quartets=all(
                len(o) == 8 and len(set(o[:4])) == 1 and len(set(o[4:])) == 1 for o in ops))
print(json.dumps(out))
"""


def test_prmt_pack4_operands_are_one_group():
    """The GPU path's ``inline_asm_elementwise(pack=4)`` must see the 4 positions of ONE group in each
    call: in the compiled LLVM IR every prmt call gets one pair value 4 times and one selector 4 times
    (compiled in a clean process: lowering fails in a process that ran the interpreter), and each thread
    expands its own share of the weight tile once (with kWidth 4 operands, before ``OPAQUE``, sm_80's
    tile made 16 calls per thread for 4 groups: every group expanded in four threads)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PACK_CHECK, root], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res) == {"sparse24-prefill-16bit-fp16-ieee-outfp16@80",  # the base row serves sm_80
                        "sparse24-prefill-16bit-sm90-fp16-ieee-outfp16@90",
                        "sparse24-prefill-16bit-sm90-fill-fp16-ieee-outfp16@90"}, res
    for name, r in res.items():  # every group of the thread's share of the tile expanded exactly once
        assert r["calls"] == r["groups"] >= 4 and r["quartets"], (name, r)


def test_prefill_3d_non_contiguous_x_through_the_op(triton_backend):
    from laco_kernels import sparse24_linear

    n, k = 30, 96
    w24 = Sparse24Weight.from_dense(torch.randn(n, k).half(), prune=True)
    x = torch.randn(3, k, 8).half().transpose(1, 2)  # [3, 8, K] -> 24 rows (prefill), strided
    b = torch.randn(n).half()
    y = sparse24_linear(x, w24, b)
    assert y.shape == (3, 8, n)
    close(y, reference.sparse24_linear(x, w24, b), torch.float16)


def test_fill_tile_choice():
    """sm_90: the 128 x 64 tiles only while 256 x 128 tiles leave SMs idle and 128 x 64 ones fit one wave."""
    def bm(m, n):
        return dense_gemm.gemm_config("sparse24", m, torch.float16, arch=90, n=n, sms=132).BLOCK_M

    assert bm(17, 4096) == bm(256, 4096) == 128  # 32 -> 64 / 128 programs
    assert bm(512, 4096) == 256  # 128 x 64 tiles would need 256 programs
    assert bm(256, 11008) == 256  # 86 programs of 256 x 128; 344 of 128 x 64
    assert bm(4096, 4096) == 256
    assert dense_gemm.gemm_config("sparse24", 256, torch.float16, arch=80, n=4096).BLOCK_K == 32  # base row
    assert dense_gemm.gemm_config("sparse24", 256, torch.float32, arch=90, n=4096).BLOCK_M == 64  # fp32 row
