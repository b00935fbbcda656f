"""kernels/dense_gemm.py: the dense baseline kernel, the shared config table, and that every
launch uses a configuration listed in COMPILE_SPECS (the compile report checks exactly those)."""
import pytest
import torch

from conftest import TOLERANCES
from laco_kernels.formats import BitmapWeight, Sparse24Weight
from laco_kernels.kernels import (bitmap_chunks, bitmap_gemm, bitmap_gemv, dense_gemm, sparse24_gemm, sparse24_gemv,
                                  sparse24_mma)


@pytest.mark.parametrize("m,n,k,dtype,bias", [(1, 37, 72, torch.float16, True), (3, 70, 1028, torch.float32, False),
                                              (67, 45, 100, torch.float32, True), (256, 40, 72, torch.float16, False)])
def test_matches_torch(m, n, k, dtype, bias):
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = dense_gemm.dense_linear(x, w, b)
    ref = x.float() @ w.float().t() + (b.float() if bias else 0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, **TOLERANCES[dtype])


def test_non_contiguous_weight_and_x():
    x, w = torch.randn(40, 3).t(), torch.randn(40, 30).t()
    torch.testing.assert_close(dense_gemm.dense_linear(x, w), x @ w.t(), **TOLERANCES[torch.float32])


def test_config_table_invariants():
    for (family, reg, width, tile_k), cfg in dense_gemm._TABLE.items():
        assert cfg.BLOCK_K % 32 == 0, cfg  # one packed word per 32 columns
        assert (reg == "decode") == (cfg.BLOCK_M == 16), cfg
        if family == "bitmap":
            assert cfg.BLOCK_K == tile_k, cfg
    with pytest.raises(ValueError, match="tile_k"):
        dense_gemm.gemm_config("bitmap", 1, torch.float16, tile_k=96)
    with pytest.raises(ValueError, match="input_precision"):
        dense_gemm.dot_precision(torch.float32, "tf16")


def _launched(monkeypatch, kernel):
    """Record (constexprs, num_warps, num_stages, y dtype) of every launch of ``kernel``."""
    seen = []
    orig = kernel.run

    def run(*args, **kwargs):
        names = kernel.arg_names
        y = args[names.index("y_ptr")]
        # EMULATE (sparse24): True only in the interpreter, which cannot run the kernel's PTX
        assert kwargs.get("EMULATE", True) is True
        seen.append(({k: v for k, v in kwargs.items() if k not in ("grid", "warmup", "num_warps", "num_stages", "EMULATE")},
                     kwargs.get("num_warps"), kwargs.get("num_stages"), y.dtype))
        return orig(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    return seen


_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@pytest.mark.parametrize("m,dtype,prec,arch", [(1, torch.float16, None, None), (3, torch.float32, "tf32", None),
                                               (20, torch.float16, None, None), (20, torch.float32, None, None),
                                               (20, torch.float16, None, 90), (20, torch.float16, None, 80)])
def test_launched_configs_are_compile_specs(monkeypatch, m, dtype, prec, arch):
    """Every launch (on the architecture ``arch`` would pick, e.g. the sm_90-only rows) is a compile spec
    compiled for that architecture."""
    monkeypatch.setattr(dense_gemm, "device_arch", lambda device: arch)
    n, k = 40, 256
    w = torch.randn(n, k)
    w24 = Sparse24Weight.from_dense(w.to(dtype), prune=True)
    bw = BitmapWeight.from_dense(w24.to_dense(), tile_k=128)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    # small M runs the decode kernels (16-bit 2:4: sparse24_mma, fp32: sparse24_gemv; bitmap_chunks: the bitmap
    # GEMV's default layout), whose specs live in their modules
    if dtype != torch.float32 and m <= sparse24_mma.MMA_MAX_M:
        s24 = sparse24_mma
    else:
        s24 = sparse24_gemv if m <= sparse24_gemv.GEMV_MAX_M else sparse24_gemm
    sbm = bitmap_chunks if m <= bitmap_gemv.GEMV_MAX_M else bitmap_gemm
    jobs = [(dense_gemm, lambda: dense_gemm.dense_linear(x, w.to(dtype), b, input_precision=prec)),
            (s24, lambda: sparse24_gemm.sparse24_linear(x, w24.values, w24.meta, w24.shape, b, prec)),
            (sbm, lambda: bitmap_gemm.bitmap_linear(x, bw.values, bw.bitmap, bw.offsets, bw.shape, 128, b, prec))]
    for mod, call in jobs:
        kernel = next(v for kname, v in vars(mod).items() if kname.endswith(("_gemm_kernel", "_gemv_kernel",
                                                                                   "_mma_kernel")))
        seen = _launched(monkeypatch, kernel)
        call()
        assert seen, mod.__name__
        for consts, warps, stages, y_dtype in seen:
            match = [s for s in mod.COMPILE_SPECS if s.num_warps == warps and s.num_stages == stages
                     and s.signature.get("x_ptr") == _TL[dtype] and s.signature.get("y_ptr") == _TL[y_dtype]
                     and all(s.constexprs.get(key) == val for key, val in consts.items()
                             if key not in ("HW_POPC", "EMULATE"))]  # both differ only in the interpreter
            assert match, f"{mod.__name__}: launch {consts} warps={warps} stages={stages} y={y_dtype} not in COMPILE_SPECS"
            assert any((arch or 80) in s.archs for s in match), f"{mod.__name__}: {consts} not compiled for sm_{arch}"
