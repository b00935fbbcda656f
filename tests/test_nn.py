"""laco_kernels.nn: sparse modules, sparsify / densify on tiny random-init models."""
import copy

import pytest
import torch
import torch.nn as nn

from _tiny import random_ids, tiny_model
from conftest import TOLERANCES
from laco_kernels.formats import Sparse24Weight
from laco_kernels.nn import BitmapLinear, MaskedLinear, SparseLinear24, densify, sparse_modules, sparsify
from laco_kernels.prune import prune_model


def _pruned(pattern="2:4", sparsity=None, layers=2, dtype=torch.float32):
    model = tiny_model(layers=layers)
    if pattern == "2:4":
        prune_model(model, "magnitude", pattern="2:4", progress=False)
    else:
        prune_model(model, "magnitude", sparsity=sparsity, progress=False)
    return model.to(dtype)


def _bits(t):
    return (t.detach() + 0.0).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_swapped_logits_equal_pruned_dense(pattern, dtype):
    model = _pruned(pattern, sparsity=0.6, dtype=dtype)
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    keys = list(model.state_dict())
    summary = sparsify(model, pattern)
    n_linears = 7 * 2
    assert summary["swapped"] == n_linears and len(summary["names"]) == n_linears
    assert "lm_head" not in summary["names"] and isinstance(model.lm_head, nn.Linear)
    want = SparseLinear24 if pattern == "2:4" else BitmapLinear
    assert all(isinstance(m, want) for m in sparse_modules(model).values())
    if pattern == "2:4":  # values at half size + 1/8 byte per element of meta
        assert summary["bytes_after"] < 0.6 * summary["bytes_before"]
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("pattern,mode", [("2:4", "inference"), ("2:4", "train"), ("unstructured", "inference"),
                                          ("unstructured", "train")])
def test_densify_round_trip_is_exact(pattern, mode):
    model = _pruned(pattern, sparsity=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify(model, pattern, mode=mode)
    out = densify(model)
    assert out["densified"] == 14 and not sparse_modules(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():  # bit-identical (a pruned -0.0 may come back as +0.0)
        assert torch.equal(_bits(after[k]), _bits(v)), k
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))


def test_state_dict_loads_into_either_form():
    dense = _pruned("2:4")
    swapped = copy.deepcopy(dense)
    sparsify(swapped, "2:4")
    # dense checkpoint -> swapped model, and the swapped model's checkpoint -> a dense model
    fresh = copy.deepcopy(swapped)
    for m in sparse_modules(fresh).values():
        m.values.zero_()
    fresh.load_state_dict(dense.state_dict())
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    other = tiny_model(seed=1, layers=2)
    other.load_state_dict(swapped.state_dict())
    for k, v in dense.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_load_rejects_non_24_weight_and_reports_keys():
    mod = SparseLinear24.from_linear(_24_linear(8, 16))
    bad = {"weight": torch.randn(8, 16)}
    with pytest.raises(RuntimeError, match="does not fit SparseLinear24"):
        mod.load_state_dict(bad)
    res = mod.load_state_dict({}, strict=False)
    assert res.missing_keys == ["weight", "bias"]
    with pytest.raises(RuntimeError, match="Unexpected key"):
        mod.load_state_dict({**mod.state_dict(), "values": torch.zeros(8, 8)})


def _24_linear(n, k, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(Sparse24Weight.from_dense(lin.weight, prune=True).to_dense())
    return lin


def test_sparsify_errors():
    model = tiny_model(layers=1)  # dense: not 2:4
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*not 2:4"):
        sparsify(model, "2:4")
    assert not sparse_modules(model)  # nothing swapped on failure
    with pytest.raises(ValueError, match="pattern must be one of"):
        sparsify(model, "4:8")
    with pytest.raises(ValueError, match="mode must be one of"):
        sparsify(model, "2:4", mode="training")
    with pytest.raises(TypeError, match="pass the module that contains"):
        sparsify(nn.Linear(4, 4))


def test_filter_lm_head_and_single_block():
    model = _pruned("2:4", layers=2)
    with torch.no_grad():
        model.lm_head.weight.copy_(Sparse24Weight.from_dense(model.lm_head.weight, prune=True).to_dense())
    s = sparsify(model, "2:4", filter=lambda name, m: "mlp" in name, include_lm_head=True)
    assert s["names"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                          "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert isinstance(model.lm_head, nn.Linear)  # filtered out
    s = sparsify(model, "2:4", filter=lambda name, m: name == "lm_head", include_lm_head=True)
    assert s["names"] == ["lm_head"]
    block = model.model.layers[1]  # the recovery helper's use: one decoder block
    s = sparsify(block, "2:4", mode="train")
    assert s["names"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert all(getattr(block.self_attn, f"{p}_proj").trainable for p in "qkvo")


def test_train_modes_gradients_stay_on_the_mask():
    model = _pruned("unstructured", sparsity=0.5, layers=1)
    sparsify(model, "unstructured", mode="train")
    lin = model.model.layers[0].mlp.up_proj
    assert isinstance(lin, MaskedLinear) and set(dict(lin.named_parameters())) == {"weight"}
    zero = lin.weight.detach() == 0
    model(input_ids=random_ids(2, 8)).logits.square().mean().backward()
    assert lin.weight.grad is not None and bool((lin.weight.grad[zero] == 0).all())
    assert float(lin.weight.grad.abs().sum()) > 0

    model = _pruned("2:4", layers=1)
    sparsify(model, "2:4", mode="train")
    lin = model.model.layers[0].mlp.down_proj
    assert set(dict(lin.named_parameters())) == {"values"}
    assert lin.values.shape == (lin.out_features, lin.in_features // 2)
    model(input_ids=random_ids(2, 8)).logits.square().mean().backward()
    assert lin.values.grad is not None and float(lin.values.grad.abs().sum()) > 0
    # gradient w.r.t. the compressed values = dense gradient gathered at the kept positions
    x = torch.randn(3, lin.in_features)
    dense = lin.to_linear()
    dense.weight.grad = None
    lin.values.grad = None
    lin(x).sum().backward()
    dense(x).sum().backward()
    expect = torch.gather(dense.weight.grad.reshape(lin.out_features, -1, 4), -1, lin.weight24().indices())
    torch.testing.assert_close(lin.values.grad, expect.reshape_as(lin.values), atol=1e-5, rtol=1e-5)


def test_module_dtype_device_moves_and_repr():
    lin = _24_linear(8, 32)
    mod = SparseLinear24.from_linear(lin).to(torch.float16)
    assert mod.values.dtype == torch.float16 and mod.meta.dtype == torch.int32
    x = torch.randn(2, 32)
    torch.testing.assert_close(mod(x.half()).float(), lin(x), atol=2e-2, rtol=2e-2)
    assert "in_features=32" in repr(mod)
    with pytest.raises(TypeError, match="dtype"):
        mod(x)  # fp32 input, fp16 weight: a clear error, not a silent cast


def test_torch_compile_on_swapped_model():
    # inductor on the whole tiny model takes ~100 s on this 2-core machine; aot_eager traces the
    # same graphs (dynamo + AOTAutograd) without the C++ compile step
    model = _pruned("2:4", layers=1)
    sparsify(model, "2:4")
    ids = random_ids(1, 8)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_modules_on_the_triton_backend(triton_backend, dtype):
    """The same modules through the Triton kernels (interpreted on CPU): forward and training gradients."""
    lin = _24_linear(24, 72).to(dtype)
    x = torch.randn(3, 72, dtype=dtype)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    tol = TOLERANCES[dtype]
    for mod in (SparseLinear24.from_linear(lin), BitmapLinear.from_linear(lin), MaskedLinear.from_linear(lin)):
        torch.testing.assert_close(mod(x).float(), ref, **tol)
    mod = SparseLinear24.from_linear(lin, trainable=True)
    mod(x).float().square().sum().backward()
    dense = lin.weight.detach().float().requires_grad_(True)
    torch.nn.functional.linear(x.float(), dense, lin.bias.float()).square().sum().backward()
    expect = torch.gather(dense.grad.reshape(24, -1, 4), -1, mod.weight24().indices()).reshape(24, 36)
    torch.testing.assert_close(mod.values.grad.float(), expect, atol=tol["atol"] * 20, rtol=tol["rtol"] * 5)


def test_trainable_24_freezes_empty_slots_under_adamw():
    w = torch.zeros(4, 8)
    w[:, 0], w[:, 5], w[:, 6] = 1.0, 2.0, -1.0  # group 0 holds one non-zero: one empty value slot
    lin = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = SparseLinear24.from_linear(lin, trainable=True)
    assert mod.frozen_slots is not None and int(mod.frozen_slots.sum()) == 4
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        mod(torch.randn(3, 8)).square().sum().backward()
        opt.step()
    d = mod.dense_weight()
    assert torch.all(d[w == 0] == 0)
    assert not torch.equal(d[w != 0], w[w != 0])  # the kept weights did train


# -- issue 13: all-or-nothing load_state_dict, non-finite weights, GPT-2 Conv1D --------------------


@pytest.mark.parametrize("kind", ["sparse24", "bitmap", "masked"])
@pytest.mark.parametrize("bad", ["bias_long", "bias_short", "weight_shape", "weight_not_24", "weight_nan"])
def test_load_state_dict_is_all_or_nothing(kind, bad):
    torch.manual_seed(0)
    lin = nn.Linear(16, 6)
    lin.weight.data = Sparse24Weight.from_dense(lin.weight.data, prune=True).to_dense()
    mod = {"sparse24": SparseLinear24.from_linear, "bitmap": BitmapLinear.from_linear,
           "masked": MaskedLinear.from_linear}[kind](lin)
    before = {k: v.clone() for k, v in list(mod.state_dict().items()) + list(mod.named_buffers())}
    new = Sparse24Weight.from_dense(torch.randn(6, 16), prune=True).to_dense()
    sd = {"weight": new.clone(), "bias": torch.randn(6)}
    key = "bias" if bad.startswith("bias") else "weight"
    if bad == "bias_long":
        sd["bias"] = torch.randn(7)
    elif bad == "bias_short":
        sd["bias"] = torch.randn(5)
    elif bad == "weight_shape":
        sd["weight"] = torch.randn(6, 12)
    elif bad == "weight_not_24":
        if kind != "sparse24":
            pytest.skip("only the 2:4 module restricts the pattern")
        sd["weight"] = torch.randn(6, 16)
    else:
        if kind == "masked":
            pytest.skip("MaskedLinear holds a dense trainable weight")
        sd["weight"][2, 3] = float("nan")
    with pytest.raises(RuntimeError, match=key):
        mod.load_state_dict(sd)
    after = {k: v for k, v in list(mod.state_dict().items()) + list(mod.named_buffers())}
    for k, v in before.items():
        assert torch.equal(after[k].nan_to_num(), v.nan_to_num()), f"{k} changed by a failed load"
    mod.load_state_dict({"weight": new, "bias": sd["bias"] if key == "weight" else torch.zeros(6)})
    assert torch.equal(mod.dense_weight(), new)


@pytest.mark.parametrize("pattern,mode", [("2:4", "inference"), ("unstructured", "inference"),
                                          ("unstructured", "train")])
def test_sparsify_rejects_non_finite_and_swaps_nothing(pattern, mode):
    model = _pruned("2:4")
    name = "model.layers.1.mlp.down_proj"
    model.get_submodule(name).weight.data[3, 5] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}.*non-finite.*\(3, 5\)"):
        sparsify(model, pattern, mode=mode)
    assert sparse_modules(model) == {}


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32)).eval()


def test_sparsify_gpt2_conv1d_says_why_nothing_was_swapped():
    model = _tiny_gpt2()
    with pytest.warns(UserWarning, match="left 8 linear-like.*Conv1D.*not supported"):
        summary = sparsify(model, "unstructured")
    assert summary["swapped"] == 0 and len(summary["skipped"]) == 8
    assert all("Conv1D" in why for why in summary["skipped"].values())
    assert "transformer.h.0.attn.c_attn" in summary["skipped"]


# ---- eager CPU inference fast path of the packed modules (nn._native_fast, csrc/module_fast.cpp) ---
def _fast_case(kind, dtype, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=bias).to(dtype)
    if kind == "2:4":
        return SparseLinear24.from_linear(lin, prune=True)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(40, 64) > 0.6)
    return BitmapLinear.from_linear(lin)


@pytest.mark.parametrize("kind", ["2:4", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_the_op_path_and_is_taken(kind, dtype, bias, monkeypatch):
    from laco_kernels import _native, nn as lnn
    from laco_kernels.ops.sparse_gemm import bitmap_linear, sparse24_linear

    if not _native.supports("sparse24_linear"):
        pytest.skip("native extension not built")
    mod = _fast_case(kind, dtype, bias)
    x = torch.randn(2, 3, 64).to(dtype)[:, ::2]  # 3-D, non-contiguous
    answers = []
    real = lnn._native_fast
    monkeypatch.setattr(lnn, "_native_fast", lambda *a, **kw: answers.append(real(*a, **kw)) or answers[-1])
    with torch.no_grad():
        y = mod(x)
        ref = (sparse24_linear(x, mod.weight24(), mod.bias) if kind == "2:4"
               else bitmap_linear(x, mod.weight_bitmap(), mod.bias))  # the op path
    assert answers and answers[-1] is not None  # the fast path answered
    assert y.shape == (2, 2, 40) and y.dtype == dtype
    assert torch.equal(y, ref)


def test_fast_path_steps_aside_where_the_op_must_see_the_call(monkeypatch):
    from laco_kernels import _native, nn as lnn

    if not _native.supports("sparse24_linear"):
        pytest.skip("native extension not built")
    mod = _fast_case("2:4", torch.float32)
    x = torch.randn(3, 64)

    def f(x, bias=mod.bias):
        return lnn._native_fast("sparse24_linear", x, mod.values, bias, 40, 64, mod.meta)

    with torch.no_grad():
        assert f(x) is not None
        assert f(x.double()) is None  # wrong dtype: the op's error
        assert f(torch.randn(3, 60)) is None  # wrong K: the op's error
        assert f(x, mod.bias.double()) is None and f(x, torch.randn(39)) is None
        assert f(x[:0]) is None
        monkeypatch.setenv("LACO_BACKEND", "reference")
        assert f(x) is None  # a backend override is honoured
        monkeypatch.delenv("LACO_BACKEND")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert f(x) is None  # the autocast rule must see the call
    assert f(x) is None  # grad mode, and the bias Parameter requires grad: autograd records the op
    assert f(x.requires_grad_(), None) is None


def test_fast_path_checks_in_cpp_see_modes_transforms_and_the_backend(monkeypatch):
    """The C++ entry (csrc/module_fast.cpp) answers None wherever the op layer's call_direct says no."""
    from torch.func import vmap
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from laco_kernels import _native, nn as lnn
    from laco_kernels.ops.dispatch import call_direct

    if not _native.supports("sparse24_linear"):
        pytest.skip("native extension not built")
    mod = _fast_case("bitmap", torch.float32)
    x = torch.randn(3, 64)

    def f(x):
        return lnn._native_fast("bitmap_linear", x, mod.values, mod.bias, 40, 64, mod.bitmap, mod.offsets,
                                tile_k=mod.tile_k)

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        pass

    with torch.no_grad():
        assert torch.equal(f(x), mod(x))
        for value, taken in ((" AUTO ", True), ("", True), ("native", False), ("bogus", False)):
            monkeypatch.setenv("LACO_BACKEND", value)
            assert (f(x) is not None) is taken, value
        monkeypatch.delenv("LACO_BACKEND")
        with Passthrough():
            assert not call_direct(x) and f(x) is None
        with TorchFunctionMode():
            assert not call_direct(x) and f(x) is None
        seen = []
        vmap(lambda row: seen.append(f(row)) or row)(x)
        assert seen == [None]
        assert f(x.as_subclass(Subclass)) is None
        assert f(x.to_sparse()) is None  # not strided: the op path's error
        assert f(x.to("meta")) is None
    with pytest.raises(ValueError, match="features"):
        with torch.no_grad():
            mod(torch.randn(3, 60))
