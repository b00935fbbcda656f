"""ops/dispatch.py: select_backend rules for every LACO_BACKEND value."""
import pytest
import torch

from laco_kernels.ops import dispatch

CPU = [torch.zeros(2), None]


def test_auto_cpu_native_or_reference(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "auto")
    want = "native" if dispatch.native_supports("sparse24_linear") else "reference"
    assert dispatch.select_backend("sparse24_linear", CPU) == want
    assert dispatch.select_backend("no_such_op", CPU) == "reference"  # the extension does not implement it


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "reference")
    assert dispatch.select_backend("sparse24_linear", CPU) == "reference"
    monkeypatch.setenv("LACO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_backend("sparse24_linear", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.select_backend("sparse24_linear", CPU)
    monkeypatch.setenv("LACO_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native"):
        dispatch.select_backend("no_such_op", CPU)


def test_meta_device_counts_as_not_cpu(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "auto")
    assert dispatch.select_backend("sparse24_linear", [torch.empty(2, device="meta")]) == "reference"
    with pytest.raises(ValueError, match="several device types"):
        dispatch.select_backend("sparse24_linear", [torch.zeros(2), torch.empty(2, device="meta")])


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("LACO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="not a backend"):
        dispatch.select_backend("sparse24_linear", CPU)


def _train_calls():
    """(name, module holding the op, fn(params) -> scalar) for each op with a backward."""
    from laco_kernels.formats import BitmapWeight, PackedMask, Sparse24Weight
    from laco_kernels.ops import loss, masked_gemm, sparse_gemm

    torch.manual_seed(0)
    w = torch.randn(24, 64)
    pm = PackedMask.from_bool(torch.rand(24, 64) > 0.5)
    w24 = Sparse24Weight.from_dense(w, prune=True)
    bw = BitmapWeight.from_dense(w * pm.to_bool())
    x = torch.randn(5, 64)
    return [
        ("masked_linear", masked_gemm, lambda p: masked_gemm.masked_linear(p["x"], p["w"], pm, p["b"]).square().sum()),
        ("sparse24_linear", sparse_gemm,
         lambda p: sparse_gemm.sparse24_linear(p["x"], Sparse24Weight(p["v"], w24.meta, w24.shape), p["b"]).sum()),
        ("bitmap_linear", sparse_gemm, lambda p: sparse_gemm.bitmap_linear(p["x"], bw, p["b"]).square().sum()),
        ("reconstruction_loss", loss, lambda p: loss.reconstruction_loss(p["x"], x.flip(0), "mse")),
    ], dict(x=x, w=w, v=w24.values, b=torch.randn(24))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_eager_training_calls_skip_the_custom_op_with_identical_numbers(monkeypatch, backend):
    """Eager calls that record a gradient run through a plain autograd.Function (ops/dispatch.py's
    eager_function) with the custom op's own impl / setup / backward: bit-identical outputs and
    gradients to the custom-op path (forced here by patching call_route to "op"), nn.Parameter inputs
    included, and the grad_fn shows which path ran."""
    monkeypatch.setenv("LACO_BACKEND", backend)
    calls, base = _train_calls()
    for name, mod, fn in calls:
        results = {}
        for eager in (True, False):
            with monkeypatch.context() as mp:
                if not eager:
                    mp.setattr(mod, "call_route", lambda *t: "op")
                params = {k: torch.nn.Parameter(v.clone()) for k, v in base.items()}
                out = fn(params)
                node = out.grad_fn
                while node is not None and "Eager" not in type(node).__name__ and node.next_functions:
                    node = node.next_functions[0][0]
                assert ("Eager" in type(node).__name__) == eager, (name, eager, type(node).__name__)
                out.backward()
            results[eager] = [out.detach()] + [p.grad for p in params.values() if p.grad is not None]
        assert len(results[True]) == len(results[False]) > 1, name
        for a, b in zip(results[True], results[False]):
            assert torch.equal(a, b), name


def test_eager_autograd_conditions():
    p = torch.nn.Parameter(torch.zeros(2))
    assert dispatch.eager_autograd(p, None) and not dispatch.call_direct(p)
    with torch.no_grad():
        assert not dispatch.eager_autograd(p) and dispatch.call_direct(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dispatch.eager_autograd(p)  # the custom op's autocast rule must see the call
    assert not dispatch.eager_autograd(torch.empty(2, device="meta"))
