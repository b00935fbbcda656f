"""torch.compile of sparsified models through the ``laco::*`` custom ops (ops/*.py, torch.library).

The consumer is torch itself: ``torch._dynamo.explain`` (graph breaks), ``torch.compile(fullgraph=True)``
with the default inductor backend, and ``torch.library.opcheck`` on every op. Backends: the native
C++ extension and the PyTorch reference (``LACO_BACKEND``), plus Triton (interpreted) in opcheck.
Models are one-layer tiny Llamas (inductor's C++ compile dominates the run time).
"""
import pytest
import torch

from _tiny import random_ids, tiny_model
from laco_kernels import reference
from laco_kernels.formats import BitmapWeight, PackedMask, Sparse24Weight
from laco_kernels.nn import BitmapLinear, MaskedLinear, SparseLinear24, sparse_modules, sparsify
from laco_kernels.ops import dispatch
from laco_kernels.ops.loss import reconstruction_loss
from laco_kernels.ops.masked_gemm import masked_linear
from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(params=["native", "reference"])
def backend(request, monkeypatch):
    """native: LACO_BACKEND=auto with the extension built (native kernels for the 2:4 and bitmap
    linears; masked_linear has no native kernel and runs the reference); reference: forced."""
    if request.param == "native" and not dispatch.native_supports("sparse24_linear"):
        pytest.skip("the native extension laco_kernels._C is not built")
    monkeypatch.setenv("LACO_BACKEND", "auto" if request.param == "native" else "reference")
    torch._dynamo.reset()  # the backend is read when a graph is traced
    yield request.param
    torch._dynamo.reset()


def _model(mode: str):
    """1-layer tiny Llama: attention 2:4 (SparseLinear24), MLP unstructured 60% (BitmapLinear /
    MaskedLinear in train mode), so one compiled graph holds every module type of the mode."""
    model = tiny_model(layers=1, seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is torch.nn.Linear and name != "lm_head":
                if name.endswith(ATTN):
                    mod.weight.copy_(Sparse24Weight.from_dense(mod.weight, prune=True).to_dense())
                else:
                    mod.weight.mul_(torch.rand(mod.weight.shape, generator=g) >= 0.6)
    sparsify(model, "2:4", mode=mode, filter=lambda n, m: n.endswith(ATTN))
    sparsify(model, "unstructured", mode=mode)
    types = {type(m) for m in sparse_modules(model).values()}
    assert types == ({SparseLinear24, BitmapLinear} if mode == "inference" else {SparseLinear24, MaskedLinear})
    return model.train(mode == "train")


def _laco_ops(graphs):
    return sorted(str(n.target).removesuffix(".default") for g in graphs for n in g.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("laco."))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_no_graph_breaks(backend, mode):
    model = _model(mode)
    ids = random_ids(2, 8)
    with torch.set_grad_enabled(mode == "train"):
        ex = torch._dynamo.explain(model)(ids, labels=ids)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [r.reason for r in ex.break_reasons]
    linear = "laco.bitmap_linear" if mode == "inference" else "laco.masked_linear"
    assert _laco_ops(ex.graphs) == sorted([linear] * 3 + ["laco.sparse24_linear"] * 4)


def test_inductor_inference_matches_eager(backend):
    model = _model("inference")
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for ids in (random_ids(2, 8, seed=1), random_ids(2, 8, seed=2)):
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)
    # and AOTAutograd without inductor runs exactly our kernels: the same bits as eager
    ids = random_ids(2, 8, seed=3)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits, model(ids).logits)


def test_bf16_inference_compiles_on_the_lane_paths(backend):
    """bf16 inference at 64 tokens: on AVX512_BF16 CPUs without AMX the 2:4 attention runs the shuffle kernel and
    the bitmap MLP the lanes kernel (stop 44); the compiled graph (AOT, and inductor) gives eager's logits."""
    from laco_kernels import _native

    model = _model("inference").to(torch.bfloat16)
    ids = random_ids(4, 16, seed=5)  # 64 rows of x per linear
    if backend == "native":
        paths = {(type(m).__name__, _native.linear_path("sparse24_linear" if isinstance(m, SparseLinear24) else
                                                        "bitmap_linear", torch.bfloat16,
                                                        (m.out_features, m.in_features), 64, 0.4))
                 for m in sparse_modules(model).values()}
        if _native.isa() == "avx512bf16" and not _native.amx_available():
            assert paths == {("SparseLinear24", "shuffle"), ("BitmapLinear", "lanes")}, paths
    with torch.no_grad():
        eager = model(ids).logits
        assert eager.dtype == torch.bfloat16 and torch.isfinite(eager.float()).all()
        assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits, eager)
        got = torch.compile(model, fullgraph=True, dynamic=False)(ids).logits
    torch.testing.assert_close(got.float(), eager.float(), atol=0.1, rtol=0.05)


def test_large_bf16_modules_compile_on_the_stop46_paths(backend):
    """Modules over a weight just past 16 MB (bf16, K >= 2 N): at M = 8 the 2:4 module runs the direct kernel on whole
    rows and the bitmap one the lanes kernel; at M = 520 (x past 8 MB) both lane kernels pass x in chunks. The
    fullgraph AOT graph gives eager's bits, and eager is within bf16 rounding of the dense product."""
    from laco_kernels import _native

    torch.manual_seed(7)
    lin = torch.nn.Linear(8196, 1025, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape) < 0.5)
    mods = {"SparseLinear24": SparseLinear24.from_linear(lin, prune=True), "BitmapLinear": BitmapLinear.from_linear(lin)}
    dense = {"SparseLinear24": Sparse24Weight.from_dense(lin.weight, prune=True).to_dense().float(),
             "BitmapLinear": lin.weight.float()}
    expect = {("SparseLinear24", 8): "direct", ("BitmapLinear", 8): "lanes",
              ("SparseLinear24", 520): "shuffle", ("BitmapLinear", 520): "lanes"}
    for m in (8, 520):
        x = torch.randn(m, 8196).to(torch.bfloat16)
        for name, mod in mods.items():
            if backend == "native" and _native.isa() == "avx512bf16" and not _native.amx_available():
                op = "sparse24_linear" if name == "SparseLinear24" else "bitmap_linear"
                assert _native.linear_path(op, torch.bfloat16, (1025, 8196), m, 0.5) == expect[(name, m)]
            with torch.no_grad():
                eager = mod(x)
                assert torch.equal(torch.compile(mod, fullgraph=True, backend="aot_eager")(x), eager)
            ref = x.float() @ dense[name].t() + lin.bias.float()
            assert ((eager.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-2 * ref.abs().max()).all(), name


def test_inductor_training_step_matches_eager(backend):
    """Forward and backward under inductor (SparseLinear24(trainable=True) + MaskedLinear)."""
    model = _model("train")
    ids = random_ids(2, 8, seed=4)
    model(ids, labels=ids).loss.backward()
    want = _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    out = compiled(ids, labels=ids)
    out.loss.backward()
    got = _grads(model)
    assert set(got) == set(want) and any(n.endswith("values") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend="aot_eager")(ids, labels=ids).loss.backward()
    for name, grad in _grads(model).items():
        assert torch.equal(grad, want[name]), name


def test_inductor_dynamic_shapes_without_the_extension(monkeypatch):
    """The issue's failure: extension missing -> reference fallback under ``auto``; a second sequence
    length makes dynamo recompile with dynamic shapes, and inductor used to fail generating C++ for
    the inlined weight unpacking (CppCompileError, VecMask<int> vs VecMask<float>: this model and
    these calls failed before the custom ops, compiled without fullgraph, which the old code could
    not satisfy). The custom op keeps the unpacking out of inductor; and the failed import of the
    extension is no graph break (dispatch.native_supports is a constant to dynamo)."""
    import sys

    import laco_kernels

    monkeypatch.setitem(sys.modules, "laco_kernels._C", None)  # as tests/test_native.py: the .so is missing
    monkeypatch.delitem(sys.modules, "laco_kernels._native", raising=False)
    monkeypatch.delattr(laco_kernels, "_native", raising=False)
    monkeypatch.delattr(laco_kernels, "_C", raising=False)
    monkeypatch.setenv("LACO_BACKEND", "auto")
    assert not dispatch.native_supports("sparse24_linear")
    torch._dynamo.reset()
    model = tiny_model(layers=1)
    with torch.no_grad():  # every linear 2:4 (with only q_proj, k_proj or down_proj it did not fail)
        for name, mod in model.named_modules():
            if type(mod) is torch.nn.Linear and name != "lm_head":
                mod.weight.copy_(Sparse24Weight.from_dense(mod.weight, prune=True).to_dense())
    sparsify(model, "2:4")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for seqlen in (5, 9):
            ids = random_ids(2, seqlen)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_reconstruction_loss_compiles_without_breaks(backend):
    """The recovery loss as recovery uses it, every kind in one graph, compiled with its backward."""
    def step(pred, target):
        return sum(reconstruction_loss(pred, target, kind) * w for kind, w in (("mse", 1), ("nmse", 2), ("cosine", 3)))

    pred, target = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    ex = torch._dynamo.explain(step)(pred, target)
    assert ex.graph_break_count == 0 and _laco_ops(ex.graphs) == ["laco.reconstruction_loss"] * 3
    got = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = pred.clone().requires_grad_()
        loss = fn(leaf, target)
        loss.backward()
        got.append((loss.detach(), leaf.grad))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


# ----------------------------------------------------------------------------------------
# the ops one by one
# ----------------------------------------------------------------------------------------
def _opcheck_cases(dtype):
    n, k, m = 12, 64, 3
    w = torch.randn(n, k, dtype=dtype)
    w24 = Sparse24Weight.from_dense(w, prune=True)
    bw = BitmapWeight.from_dense(w * (torch.rand(n, k) >= 0.5).to(dtype), tile_k=64)
    mask = PackedMask.from_bool(torch.rand(n, k) >= 0.5)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    b = torch.randn(n, dtype=dtype, requires_grad=True)
    pred, target = torch.randn(2, m, k, dtype=dtype, requires_grad=True), torch.randn(2, m, k, dtype=dtype)
    xd = x.detach()
    return {
        "sparse24_linear": [(x, w24.values.clone().requires_grad_(), w24.meta, b), (xd, w24.values, w24.meta, None)],
        "bitmap_linear": [(x, bw.values, bw.bitmap, bw.offsets, b, k, 64), (xd, bw.values, bw.bitmap, bw.offsets, None,
                                                                           k, 64)],
        "masked_linear": [(x, w.clone().requires_grad_(), mask.bits, b), (xd, w, mask.bits, None)],
        "reconstruction_loss": [(pred, target, kind) for kind in ("mse", "nmse", "cosine")],
    }


OPS = ("sparse24_linear", "bitmap_linear", "masked_linear", "reconstruction_loss")


@pytest.mark.parametrize("op,impl", [(op, impl) for op in OPS for impl in ("native", "reference", "triton")
                                     if not (op == "masked_linear" and impl == "native")]  # no native masked
                         + [(op, "triton_expand") for op in ("sparse24_linear", "masked_linear")])  # expand path
def test_opcheck(op, impl):
    """Schema, fake tensors, autograd registration and AOT dispatch (static and dynamic shapes)."""
    if impl == "native" and not dispatch.native_supports(op):
        pytest.skip("the native extension laco_kernels._C is not built")
    dtype = torch.float16 if impl.startswith("triton") else torch.float32  # the interpreter gets bf16 dot wrong
    for args in _opcheck_cases(dtype)[op]:
        torch.library.opcheck(getattr(torch.ops.laco, op).default, (*args, impl))


@pytest.mark.parametrize("op", ["sparse24_linear", "bitmap_linear", "masked_linear"])
def test_opcheck_backward_ops(op):
    dtype = torch.float32
    n, k, m = 12, 64, 3
    w = torch.randn(n, k, dtype=dtype)
    dy, x = torch.randn(m, n), torch.randn(m, k)
    if op == "sparse24_linear":
        w24 = Sparse24Weight.from_dense(w, prune=True)
        head = (dy, x, w24.values, w24.meta, "reference")
    elif op == "bitmap_linear":
        bw = BitmapWeight.from_dense(w * (torch.rand(n, k) >= 0.5), tile_k=32)
        head = (dy, x, bw.values, bw.bitmap, bw.offsets, k, 32, "reference")
    else:
        # the forward's guard flag: int32 [0] = unguarded (the reference and native backends)
        head = (dy, x, w, PackedMask.from_bool(torch.rand(n, k) >= 0.5).bits, torch.zeros(0, dtype=torch.int32),
                "reference")
    flags = [(True, True, True, torch.float32), (True, False, False, None)] if op != "bitmap_linear" else \
        [(True, True, torch.float32), (False, True, torch.float16)]
    for f in flags:
        torch.library.opcheck(getattr(torch.ops.laco, op + "_backward").default, (*head, *f))


def test_reference_backward_is_autograd_bit_for_bit(reference_backend):
    """The custom ops' reference backward gives what autograd through reference.py gave before."""
    n, k = 24, 96
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(n, k).to(dtype)
        w24 = Sparse24Weight.from_dense(w, prune=True)
        bw = BitmapWeight.from_dense(w * (torch.rand(n, k) >= 0.5).to(dtype))
        mask = PackedMask.from_bool(torch.rand(n, k) >= 0.5)
        x0 = torch.randn(5, k, 2).to(dtype)[:, :, 0]  # strided
        b0 = torch.randn(n)
        cases = [
            (lambda x, v, b: sparse24_linear(x, Sparse24Weight(v, w24.meta, w24.shape), b),
             lambda x, v, b: reference.sparse24_linear(x, w24, b, values=v), w24.values),
            (lambda x, v, b: bitmap_linear(x, bw, b), lambda x, v, b: reference.bitmap_linear(x, bw, b), None),
            (lambda x, v, b: masked_linear(x, v, mask, b), lambda x, v, b: reference.masked_linear(x, v, mask, b), w),
        ]
        for ours, ref, v in cases:
            got, want = [], []
            for fn, out in ((ours, got), (ref, want)):
                leaves = [x0.clone().requires_grad_(), b0.clone().requires_grad_()]
                vv = None if v is None else v.clone().requires_grad_()
                y = fn(leaves[0], vv, leaves[1])
                y.backward(torch.ones_like(y) * torch.linspace(-1, 1, n, dtype=dtype))
                out += [y] + [t.grad for t in leaves] + ([] if vv is None else [vv.grad])
            for a, b_ in zip(got, want):
                assert torch.equal(a, b_), dtype
    for kind in ("mse", "nmse", "cosine"):
        p, t = torch.randn(3, 4, 40, dtype=torch.float16), torch.randn(3, 4, 40, dtype=torch.float16)
        grads = []
        for fn in (reconstruction_loss, reference.reconstruction_loss):
            leaf = p.clone().requires_grad_()
            (fn(leaf, t, kind) * 3).backward()
            grads.append(leaf.grad)
        assert torch.equal(grads[0], grads[1]), kind


def test_eager_direct_call_equals_the_op_and_meta_tensors_work():
    w24 = Sparse24Weight.from_dense(torch.randn(16, 32), prune=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        direct = sparse24_linear(x, w24)
    assert not dispatch.call_direct(x.requires_grad_())  # a grad to record: through the op
    assert torch.equal(direct, sparse24_linear(x, w24).detach())
    # meta tensors (e.g. shape inference): the fake implementation answers, nothing is computed
    y = sparse24_linear(torch.empty(2, 5, 32, device="meta"), w24.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 16)
