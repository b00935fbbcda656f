"""ops/train_dispatch.py: the fused / expand / torch training path (decision, overrides, equal results)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import TOLERANCES
from laco_kernels.formats import PackedMask, Sparse24Weight
from laco_kernels.ops import _train_dispatch_table as table
from laco_kernels.ops import train_dispatch as td
from laco_kernels.ops.masked_gemm import masked_linear
from laco_kernels.ops.sparse_gemm import sparse24_linear
from test_masked_gemm import make_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def auto_env(monkeypatch):
    monkeypatch.delenv("LACO_BACKEND", raising=False)
    monkeypatch.delenv("LACO_TRAIN_PATH", raising=False)


def test_table_covers_the_grid():
    want = {(op, dt, m, n, k) for op in td.TRAIN_OPS for dt in ("fp32", "bf16", "fp16")
            for m in table.TOKENS for n, k in table.SHAPES}
    assert set(table.RATIO) == want and set(table.RATIO_EXPAND) == want
    assert all(v > 0 for v in list(table.RATIO.values()) + list(table.RATIO_EXPAND.values()))


def _best(fused, expand):
    return "torch" if max(fused, expand) < 1.0 else "triton" if fused >= expand else "expand"


def test_cuda_auto_follows_the_predicted_ratio(auto_env):
    for (op, dt, m, n, k), ratio in table.RATIO.items():
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        got = td.choose_train_path(op, m, n, k, dtype, "cuda")
        assert got == _best(ratio, table.RATIO_EXPAND[(op, dt, m, n, k)]), (op, dt, m, n, k, ratio)


def test_recorded_recovery_shapes_follow_the_prediction(auto_env):
    """At the recorded recovery shapes (issue 17) each op goes where the audit predicts it fastest:
    fp32 to torch (an H100 measured cuBLAS's fp32 GEMM far faster than the model's yardstick, our
    FMA GEMM: CALIBRATION scales both Triton paths down); 16-bit 7B linears at 1,024 tokens to the
    fused kernels; the 16-bit 2:4 SmolLM2 linears at 1,024 tokens (fused predicted 0.91x: too few
    row tiles to amortise the per-tile decompression) to the expand path."""
    seen = set()
    for op in td.TRAIN_OPS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for m in (1024, 8192):
                for n, k in ((1536, 576), (576, 1536), (11008, 4096), (4096, 11008)):
                    path = td.choose_train_path(op, m, n, k, dtype, "cuda")
                    assert path == _best(td.predicted_ratio(op, m, n, k, dtype),
                                         td.predicted_ratio(op, m, n, k, dtype, "expand"))
                    if dtype == torch.float32:
                        assert path == "torch", (op, m, n, k)
                    seen.add(path)
        for dtype in (torch.float16, torch.bfloat16):
            for n, k in ((11008, 4096), (4096, 11008)):
                assert td.choose_train_path(op, 1024, n, k, dtype, "cuda") == "triton", (op, dtype, n, k)
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((1536, 576), (576, 1536)):
            assert td.choose_train_path("sparse24_linear", 1024, n, k, dtype, "cuda") == "expand"
    assert seen == {"triton", "expand", "torch"}


def test_fp32_calibration_comes_from_the_h100_check():
    """The fp32 factor is the measured-over-predicted ratio of the audit's training_check rows (< 1),
    and every fp32 point goes to torch on both Triton paths; 16-bit points are scaled by at most a
    few percent (their check rows measured the older kernels, which the model now predicts faster)."""
    assert table.CALIBRATION["fp32"] < 0.5
    assert all(0.9 < table.CALIBRATION[dt] <= 1.0 for dt in ("bf16", "fp16"))
    assert all(v < 1.0 for (op, dt, *_), v in table.RATIO.items() if dt == "fp32")
    assert all(v < 1.0 for (op, dt, *_), v in table.RATIO_EXPAND.items() if dt == "fp32")


def test_off_grid_shapes_use_the_nearest_point():
    r = table.RATIO
    assert td.predicted_ratio("masked_linear", 1000, 1500, 600, torch.float32) == r[
        ("masked_linear", "fp32", 1024, 1536, 576)]
    assert td.predicted_ratio("sparse24_linear", 70, 4000, 11000, torch.float16) == r[
        ("sparse24_linear", "fp16", 64, 4096, 11008)]
    assert td.predicted_ratio("masked_linear", 10 ** 6, 11008, 4096, torch.bfloat16) == r[
        ("masked_linear", "bf16", 8192, 11008, 4096)]


def test_overrides_and_non_auto_contexts(auto_env, monkeypatch):
    slow = ("masked_linear", 8192, 11008, 4096, torch.float32)  # predicted torch (fp32 FMA kernels)
    assert td.choose_train_path(*slow, "cuda") == "torch"
    assert td.choose_train_path(*slow, "cuda", path="triton") == "triton"
    assert td.choose_train_path(*slow, "cpu") == "triton"  # the interpreter: no prediction for CPU
    assert td.choose_train_path(*slow, "cuda", path="expand") == "expand"
    monkeypatch.setenv("LACO_TRAIN_PATH", "expand")
    assert td.choose_train_path(*slow, "cpu") == "expand"
    monkeypatch.setenv("LACO_TRAIN_PATH", "triton")
    assert td.choose_train_path(*slow, "cuda") == "triton"
    assert td.choose_train_path(*slow, "cuda", path="auto") == "torch"  # the argument wins
    monkeypatch.setenv("LACO_TRAIN_PATH", "torch")
    assert td.choose_train_path(*slow, "cpu") == "torch"
    monkeypatch.delenv("LACO_TRAIN_PATH")
    monkeypatch.setenv("LACO_BACKEND", "triton")  # a forced backend runs the kernels
    assert td.choose_train_path(*slow, "cuda") == "triton"


def test_bad_requests_raise_clearly(auto_env, monkeypatch):
    with pytest.raises(ValueError, match="path='fast'"):
        td.requested_train_path("fast")
    monkeypatch.setenv("LACO_TRAIN_PATH", "gpu")
    with pytest.raises(ValueError, match="LACO_TRAIN_PATH='gpu'"):
        td.requested_train_path()
    with pytest.raises(ValueError, match="LACO_TRAIN_PATH"):  # every backend, before any work
        masked_linear(torch.randn(2, 8), torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool))
    monkeypatch.delenv("LACO_TRAIN_PATH")
    with pytest.raises(ValueError, match="unknown op"):
        td.predicted_ratio("bitmap_linear", 1, 2, 3, torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        td.predicted_ratio("masked_linear", 1, 2, 3, torch.float64)
    with pytest.raises(ValueError, match="empty"):
        td.predicted_ratio("masked_linear", 0, 2, 3, torch.float16)
    with pytest.raises(ValueError, match="path must be"):
        td.predicted_ratio("masked_linear", 1, 2, 3, torch.float16, "torch")


def _masked_grads(path, x, w, b, pm, dy):
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = masked_linear(xs, ws, pm, bs, path=path)
    y.backward(dy)
    return y, xs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,k", [((1,), 24, 40), ((3, 7), 33, 100)])
def test_masked_paths_agree(triton_backend, dtype, lead, n, k):
    x, dy = torch.randn(*lead, k, dtype=dtype), torch.randn(*lead, n, dtype=dtype)
    w, b = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    pm = PackedMask.from_bool(mask)
    tor = _masked_grads("torch", x, w, b, pm, dy)
    for path in ("triton", "expand"):
        got = _masked_grads(path, x, w, b, pm, dy)
        for a, c in zip(got, tor):
            assert a.dtype == c.dtype and a.shape == c.shape
            torch.testing.assert_close(a.float(), c.float(), **TOLERANCES[dtype])
        assert bool((got[2][~mask] == 0).all())  # dW is exactly zero at pruned positions on every path
    assert bool((tor[2][~mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 20, 40), (9, 33, 104)])
def test_sparse24_paths_agree(triton_backend, dtype, m, n, k):
    base = Sparse24Weight.from_dense(torch.randn(n, k, dtype=dtype), prune=True)
    x, dy, b = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype), torch.randn(n, dtype=dtype)
    out = {}
    for path in ("triton", "expand", "torch"):
        v = base.values.clone().requires_grad_()
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = sparse24_linear(xs, Sparse24Weight(v, base.meta, base.shape), bs, path=path)
        y.backward(dy)
        out[path] = (y, xs.grad, v.grad, bs.grad)
    for path in ("triton", "expand"):
        for a, c in zip(out[path], out["torch"]):
            assert a.dtype == c.dtype and a.shape == c.shape
            torch.testing.assert_close(a.float(), c.float(), **TOLERANCES[dtype])
    assert out["torch"][2].shape == (n, k // 2)  # dV stays [N, K/2]: optimizer state for the kept half


def test_committed_table_matches_the_audit(tmp_path):
    """The table in the package is what bench/train_dispatch_table.py makes of sass_audit.json."""
    out = tmp_path / "table.py"
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_dispatch_table.py"), "--out", str(out)],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    with open(os.path.join(ROOT, "laco_kernels", "ops", "_train_dispatch_table.py")) as f:
        assert out.read_text() == f.read()
