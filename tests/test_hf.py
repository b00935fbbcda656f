"""laco_kernels.hf: transformers' own from_pretrained / save_pretrained read and write packed sparse folders."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _tiny import pruned_tiny, random_ids, tiny_model
from laco_kernels.hf import QUANT_METHOD, LacoSparseConfig
from laco_kernels.nn import BitmapLinear, MaskedLinear, SparseLinear24, densify, sparse_modules, sparsify
from laco_kernels.prune import prune_model
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND = {SparseLinear24: "sparse24", BitmapLinear: "bitmap", MaskedLinear: "masked"}


def _sparse(pattern="2:4", mode="inference", family="llama", tie=False, layers=2):
    model = pruned_tiny(pattern, family, tie, layers)
    sparsify(model, pattern, mode=mode)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("pattern,mode,family,tie", [("2:4", "inference", "llama", True),
                                                     ("unstructured", "inference", "opt", False),
                                                     ("2:4", "train", "qwen2", False),
                                                     ("unstructured", "train", "llama", False)])
def test_from_pretrained_loads_packed_modules_with_identical_logits(tmp_path, pattern, mode, family, tie):
    model = _sparse(pattern, mode, family, tie)
    ids = random_ids(2, 10)
    ref = _logits(model, ids)
    model.save_pretrained(str(tmp_path))  # transformers' own writer
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["version"] == 1
    assert {n: e["format"] for n, e in qc["modules"].items()} == {n: KIND[type(m)] for n, m in
                                                                 sparse_modules(model).items()}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        q = next(iter(qc["modules"]))
        packed = f.get_tensor(f"{q}.weight")
    assert not any(k.endswith((".values", ".meta")) for k in keys)
    n, k = qc["modules"][q]["shape"]
    assert packed.numel() < n * k  # packed on disk, not the dense weight

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert not loaded.training
    assert {n: type(m) for n, m in sparse_modules(loaded).items()} == {n: type(m) for n, m in
                                                                      sparse_modules(model).items()}
    assert not any(type(m) is torch.nn.Linear and n in qc["modules"] for n, m in loaded.named_modules())
    assert torch.equal(_logits(loaded, ids), ref)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if mode == "train" and pattern == "2:4":
        assert all(m.trainable and m.values.requires_grad for m in sparse_modules(loaded).values())
    # and it saves back in the same format, byte for byte the same tensors
    loaded.save_pretrained(str(tmp_path / "again"))
    a, b = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_loading_builds_no_dense_weight(tmp_path, monkeypatch):
    from laco_kernels.formats import BitmapWeight, Sparse24Weight

    for pattern in ("2:4", "unstructured"):
        _sparse(pattern).save_pretrained(str(tmp_path / pattern))

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense weight was built while loading")

    for cls in (Sparse24Weight, BitmapWeight, SparseLinear24, BitmapLinear):
        monkeypatch.setattr(cls, "to_dense" if "Weight" in cls.__name__ else "dense_weight", forbidden)
    for pattern in ("2:4", "unstructured"):
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / pattern))
        assert len(sparse_modules(loaded)) == 14


def test_dtype_follows_the_parameters_and_from_pretrained_dtype(tmp_path):
    model = _sparse("2:4")
    model.to(torch.bfloat16)  # cast after building in fp32
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    auto = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert all(m.values.dtype == torch.bfloat16 for m in sparse_modules(auto).values())
    half = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float16)
    assert all(m.values.dtype == torch.float16 and m.meta.dtype == torch.int32 for m in sparse_modules(half).values())
    assert half.model.embed_tokens.weight.dtype == torch.float16
    half.to(torch.float32)  # an ordinary model: casting works
    ids = random_ids(1, 6)
    assert torch.isfinite(_logits(half, ids)).all()


def test_densified_model_saves_plain_and_dequantize_densifies(tmp_path):
    model = _sparse("2:4")
    ids = random_ids(1, 8)
    densify(model)
    ref = _logits(model, ids)  # dense kernels (the sparse ones round differently)
    model.save_pretrained(str(tmp_path / "dense"))
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert not sparse_modules(again) and torch.equal(_logits(again, ids), ref)
    sparsify(again, "2:4")
    again.save_pretrained(str(tmp_path / "sparse"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sparse"))
    loaded.dequantize()  # transformers' API: back to nn.Linear
    assert not sparse_modules(loaded) and torch.equal(_logits(loaded, ids), ref)


def test_packed_tied_output_projection_is_refused_before_writing(tmp_path):
    model = tiny_model(layers=1)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    prune_model(model, "magnitude", pattern="2:4", progress=False)
    with torch.no_grad():  # a 2:4 output projection (it shares the embedding's storage)
        model.lm_head.weight[:, 2::4] = 0
        model.lm_head.weight[:, 3::4] = 0
    sparsify(model, "2:4", include_lm_head=True)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        model.save_pretrained(str(tmp_path))
    assert not (tmp_path / "model.safetensors").exists()


def test_without_laco_kernels_loading_fails_loudly(tmp_path):
    """transformers alone only warns on an unknown quant_method: the packed layout must make it raise."""
    folders = []
    for i, (pattern, mode) in enumerate([("2:4", "inference"), ("unstructured", "inference"),
                                         ("unstructured", "train")]):
        folders.append(str(tmp_path / str(i)))
        _sparse(pattern, mode, layers=1).save_pretrained(folders[-1])
    code = ("import sys, traceback\nfrom transformers import AutoModelForCausalLM\n"
            f"for folder in {folders!r}:\n"
            "    try:\n        AutoModelForCausalLM.from_pretrained(folder)\n        print('LOADED', folder)\n"
            "    except Exception as exc:\n        print('FAILED', folder, type(exc).__name__, exc)\n"
            "assert 'laco_kernels' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [line for line in r.stdout.splitlines() if line.startswith(("LOADED", "FAILED"))]
    assert len(results) == 3 and all(line.startswith("FAILED") and "ignore_mismatched_sizes" in line
                                     for line in results), r.stdout
    assert r.stderr.count(f"Unknown quantization type, got {QUANT_METHOD}") == 3
    assert r.stderr.count("size mismatch") >= 3


def test_import_laco_kernels_registers_before_transformers_is_imported(tmp_path):
    model = _sparse("2:4", layers=1)
    model.save_pretrained(str(tmp_path))
    code = ("import sys\nimport laco_kernels\nassert 'transformers.quantizers.auto' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "from laco_kernels.nn import sparse_modules\nprint(len(sparse_modules(m)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "7"


def test_config_rejects_bad_entries():
    with pytest.raises(ValueError, match="unknown format 'marlin'"):
        LacoSparseConfig(modules={"a": {"format": "marlin", "shape": [4, 8], "bias": False}})
    with pytest.raises(ValueError, match="shape must be"):
        LacoSparseConfig(modules={"a": {"format": "sparse24", "shape": [4], "bias": False}})
    with pytest.raises(ValueError, match="tile_k"):
        LacoSparseConfig(modules={"a": {"format": "bitmap", "shape": [4, 64], "bias": False, "tile_k": 48}})
    with pytest.raises(ValueError, match="format version 2"):
        LacoSparseConfig(version=2)
    with pytest.raises(ValueError, match="unknown keys"):
        LacoSparseConfig(colour="red")


def _corrupt(folder, edit_config=None, edit_tensors=None):
    if edit_config:
        cfg = json.loads((folder / "config.json").read_text())
        edit_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(str(folder / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case,match", [
    ("unknown format", r"modules\['model.layers.0.self_attn.q_proj'\]: unknown format 'sparse99'"),
    ("missing tensor", r"tensor 'model.layers.0.self_attn.q_proj.weight_meta' .* is missing from model.safetensors"),
    ("wrong dtype", r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight_meta' has dtype I64"),
    ("wrong shape", r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has shape \[64, 16\]"),
    ("no such module", r"config.json: packed module 'model.layers.9.mlp' does not exist"),
    ("corrupt meta", r"packed module 'model.layers.0.self_attn.q_proj' is corrupt: .*meta is corrupt"),
    ("bitmap count", r"packed module 'model.layers.0.self_attn.q_proj' is corrupt: .*set bits"),
    ("truncated", r"model.safetensors: (truncated|not a readable safetensors file)"),
    ("not safetensors", r"model.safetensors: not a readable safetensors file"),
])
def test_corrupt_folders_name_the_file_and_the_problem(tmp_path, case, match):
    from laco_kernels.checkpoint import load_sparse

    model = _sparse("unstructured" if case == "bitmap count" else "2:4", layers=1)
    model.save_pretrained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    if case == "unknown format":
        _corrupt(tmp_path, lambda c: c["quantization_config"]["modules"][Q].update(format="sparse99"))
    elif case == "missing tensor":
        _corrupt(tmp_path, edit_tensors=lambda t: t.pop(f"{Q}.weight_meta"))
    elif case == "wrong dtype":
        _corrupt(tmp_path, edit_tensors=lambda t: t.update({f"{Q}.weight_meta": t[f"{Q}.weight_meta"].long()}))
    elif case == "wrong shape":
        _corrupt(tmp_path, edit_tensors=lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:, :16].contiguous()}))
    elif case == "no such module":
        _corrupt(tmp_path, lambda c: c["quantization_config"]["modules"].update(
            {"model.layers.9.mlp": c["quantization_config"]["modules"][Q]}))
    elif case == "corrupt meta":
        _corrupt(tmp_path, edit_tensors=lambda t: t[f"{Q}.weight_meta"].fill_(0))
    elif case == "bitmap count":
        _corrupt(tmp_path, edit_tensors=lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][1:].contiguous()}))
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "not safetensors":
        weights.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        load_sparse(str(tmp_path))


def test_sharded_checkpoint(tmp_path):
    from laco_kernels.checkpoint import load_sparse

    model = _sparse("unstructured")
    ids = random_ids(1, 8)
    ref = _logits(model, ids)
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path)), ids), ref)
    assert torch.equal(_logits(load_sparse(str(tmp_path))[0], ids), ref)


def test_importing_laco_kernels_hf_first_registers_without_warning():
    # laco_kernels.hf imports transformers' registry, whose import hook calls back into laco_kernels.hf
    code = ("import laco_kernels.hf\nfrom transformers.quantizers import auto\n"
            f"assert {QUANT_METHOD!r} in auto.AUTO_QUANTIZER_MAPPING and {QUANT_METHOD!r} in "
            "auto.AUTO_QUANTIZATION_CONFIG_MAPPING\nprint('OK')\n")
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
