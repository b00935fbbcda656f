"""laco_kernels.checkpoint: atomic save/load of sparse folders, the first format, and the
compressed-tensors export read by the consumers themselves (compressed-tensors 0.14.0.1,
transformers 4.57.6, installed into a side folder by tests/_consumers.py)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from _consumers import consumer_site, run_consumer
from _tiny import pruned_tiny, random_ids, tiny_model, tiny_tokenizer
from laco_kernels._atomic import stale_temporaries
from laco_kernels.checkpoint import (LEGACY_MANIFEST, export_compressed_tensors, is_sparse_checkpoint, load_sparse,
                                     migrate_checkpoint, save_sparse)
from laco_kernels.nn import BitmapLinear, SparseLinear24, densify, sparse_modules, sparsify

HERE = os.path.dirname(os.path.abspath(__file__))


def _model(pattern="2:4", family="llama", tie=False):
    return pruned_tiny(pattern, family, tie)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _no_temporaries(target):
    assert stale_temporaries(str(target)) == []
    if os.path.isdir(target):
        assert not [n for n in os.listdir(target) if ".tmp" in n]


@pytest.mark.parametrize("pattern,mode", [("2:4", "inference"), ("unstructured", "train")])
def test_save_load_round_trip(tmp_path, pattern, mode):
    model = _model(pattern)
    sparsify(model, pattern, mode=mode)
    ids = random_ids(2, 10)
    ref = _logits(model, ids)
    qc = save_sparse(model, str(tmp_path / "ckpt"), tokenizer=tiny_tokenizer())
    assert qc["quant_method"] == "laco-sparse" and set(qc["modules"]) == set(sparse_modules(model))
    assert is_sparse_checkpoint(str(tmp_path / "ckpt"))
    _no_temporaries(tmp_path / "ckpt")
    loaded, tok = load_sparse(str(tmp_path / "ckpt"))
    assert tok("the cat")["input_ids"] == tiny_tokenizer()("the cat")["input_ids"]
    assert torch.equal(_logits(loaded, ids), ref)


def test_dense_model_saves_plain_and_packed_is_smaller(tmp_path):
    model = _model("2:4")
    assert save_sparse(model, str(tmp_path / "dense")) == {}
    assert not is_sparse_checkpoint(str(tmp_path / "dense"))
    sparsify(model, "2:4")
    save_sparse(model, str(tmp_path / "sparse"))
    assert os.path.getsize(tmp_path / "sparse" / "model.safetensors") < os.path.getsize(
        tmp_path / "dense" / "model.safetensors")


def test_config_dtype_is_the_parameters_dtype(tmp_path):
    model = _model("2:4")
    model.to(torch.bfloat16)  # loaded in fp32, cast afterwards
    sparsify(model, "2:4")
    save_sparse(model, str(tmp_path / "a"))
    export_compressed_tensors(model, str(tmp_path / "b"))
    for sub in ("a", "b"):
        assert json.loads((tmp_path / sub / "config.json").read_text())["dtype"] == "bfloat16", sub
    loaded, _ = load_sparse(str(tmp_path / "a"))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = _model("2:4")
    sparsify(model, "2:4")
    with pytest.raises(FileExistsError, match="not a model checkpoint"):
        save_sparse(model, str(tmp_path))
    with pytest.raises(FileExistsError, match="not a model checkpoint"):
        export_compressed_tensors(model, str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_sparse(model, str(tmp_path / "file"))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sparse(str(tmp_path / "nope"))
    model = _model("2:4")
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="not a laco sparse checkpoint"):
        load_sparse(str(tmp_path / "plain"))
    sparsify(model, "2:4")
    save_sparse(model, str(tmp_path / "ckpt"))
    cfg_path = tmp_path / "ckpt" / "config.json"
    text = cfg_path.read_text()
    cfg_path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(cut short or corrupt\)"):
        load_sparse(str(tmp_path / "ckpt"))
    cfg = json.loads(text)
    cfg["dtype"] = "float17"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unknown dtype 'float17'"):
        load_sparse(str(tmp_path / "ckpt"))
    cfg_path.write_text(text)
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_sparse(str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------
# the first format: config.json + laco_sparse.json + packed tensors under the modules' own names
def _write_legacy(model, folder):
    from laco_kernels.formats import BitmapWeight, Sparse24Weight

    os.makedirs(folder)
    model.config.save_pretrained(folder)
    modules, tensors = {}, {}
    for name, mod in sparse_modules(model).items():
        entry = {"shape": [mod.out_features, mod.in_features], "bias": mod.bias is not None}
        if isinstance(mod, SparseLinear24):
            entry.update(format=Sparse24Weight.FORMAT, trainable=mod.trainable)
            tensors.update({f"{name}.values": mod.values, f"{name}.meta": mod.meta})
        else:
            entry.update(format=BitmapWeight.FORMAT, tile_k=mod.tile_k)
            tensors.update({f"{name}.values": mod.values, f"{name}.bitmap": mod.bitmap, f"{name}.offsets": mod.offsets})
        modules[name] = entry
    skip = tuple(f"{n}." for n in modules)
    tensors.update({k: v for k, v in model.state_dict().items() if not k.startswith(skip)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    manifest = {"version": 1, "dtype": "float32", "modules": modules, "aliases": {}}
    with open(os.path.join(folder, LEGACY_MANIFEST), "w") as f:
        json.dump(manifest, f)
    return manifest


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_legacy_folder_loads_with_warning_and_migrates(tmp_path, pattern):
    from transformers import AutoModelForCausalLM

    model = _model(pattern)
    sparsify(model, pattern)
    ids = random_ids(1, 8)
    ref = _logits(model, ids)
    folder = str(tmp_path / "old")
    _write_legacy(model, folder)
    assert is_sparse_checkpoint(folder)
    with pytest.warns(FutureWarning, match="migrate_checkpoint"):
        loaded, _ = load_sparse(folder)
    assert torch.equal(_logits(loaded, ids), ref)
    migrate_checkpoint(folder)
    assert not os.path.exists(os.path.join(folder, LEGACY_MANIFEST))
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert {type(m) for m in sparse_modules(again).values()} == {SparseLinear24 if pattern == "2:4" else BitmapLinear}
    assert torch.equal(_logits(again, ids), ref)
    _no_temporaries(folder)


@pytest.mark.parametrize("case,match", [
    ("cut manifest", r"laco_sparse.json: not valid JSON \(cut short or corrupt\)"),
    ("unknown dtype", r"laco_sparse.json: unknown dtype 'float17'"),
    ("missing tensor", r"model.safetensors: packed tensor 'model.layers.0.mlp.up_proj.meta' .* is missing"),
    ("not safetensors", r"model.safetensors: not a readable safetensors file"),
])
def test_legacy_corrupt_files_name_the_file(tmp_path, case, match):
    model = _model("2:4")
    sparsify(model, "2:4")
    folder = tmp_path / "old"
    manifest = _write_legacy(model, str(folder))
    if case == "cut manifest":
        text = (folder / LEGACY_MANIFEST).read_text()
        (folder / LEGACY_MANIFEST).write_text(text[: len(text) // 2])
    elif case == "unknown dtype":
        (folder / LEGACY_MANIFEST).write_text(json.dumps({**manifest, "dtype": "float17"}))
    elif case == "missing tensor":
        t = load_file(str(folder / "model.safetensors"))
        t.pop("model.layers.0.mlp.up_proj.meta")
        save_file(t, str(folder / "model.safetensors"))
    else:
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=match):
        load_sparse(str(folder))


# ----------------------------------------------------------------------------------------
# fault injection: the writer fails at several points; the target holds the old artefact or nothing
def _fail_points(monkeypatch, point):
    import safetensors.torch
    import transformers.modeling_utils

    from laco_kernels import _atomic

    def half_then_fail(real):
        def write(tensors, filename, *args, **kwargs):
            real(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(28, "No space left on device (injected)")
        return write

    def boom(*args, **kwargs):
        raise OSError(5, f"injected failure at {point}")

    if point == "config":
        from transformers.configuration_utils import PretrainedConfig
        monkeypatch.setattr(PretrainedConfig, "to_json_file", boom)
    elif point == "weights":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                            half_then_fail(transformers.modeling_utils.safe_save_file))
        monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail(safetensors.torch.save_file))
    elif point == "fsync":
        monkeypatch.setattr(_atomic, "_fsync_tree", boom)
    elif point == "swap":
        monkeypatch.setattr(_atomic, "_exchange", boom)
        monkeypatch.setattr(_atomic.os, "rename", boom)


class _FailingTokenizer:
    def save_pretrained(self, folder):
        open(os.path.join(folder, "tokenizer.json"), "w").write("{")
        raise OSError(5, "injected failure at tokenizer")


@pytest.mark.parametrize("writer", ["save_sparse", "export"])
@pytest.mark.parametrize("point", ["config", "weights", "tokenizer", "fsync", "swap"])
def test_failed_writes_keep_the_old_checkpoint_or_nothing(tmp_path, monkeypatch, writer, point):
    model = _model("2:4")
    sparsify(model, "2:4")
    ids = random_ids(1, 6)
    write = (lambda m, f, tok=None: save_sparse(m, f, tok)) if writer == "save_sparse" else (
        lambda m, f, tok=None: export_compressed_tensors(m, f, tokenizer=tok))
    old, new = tmp_path / "old", tmp_path / "new"
    write(model, str(old))
    before = sorted(os.listdir(old))
    files = {n: (old / n).read_bytes() for n in before}
    ref = _logits(load_sparse(str(old))[0], ids) if writer == "save_sparse" else None
    with monkeypatch.context() as mp:
        _fail_points(mp, point)
        tok = _FailingTokenizer() if point == "tokenizer" else None
        for target in (old, new):
            with pytest.raises(OSError, match="injected|No space"):
                write(model, str(target), tok)
    assert sorted(os.listdir(old)) == before and all((old / n).read_bytes() == b for n, b in files.items())
    assert not new.exists()
    for target in (old, new):
        _no_temporaries(target)
    if ref is not None:
        assert torch.equal(_logits(load_sparse(str(old))[0], ids), ref)


# ----------------------------------------------------------------------------------------
# compressed-tensors export
def test_export_layout_is_compressed_tensors_0_14(tmp_path):
    model = _model("2:4", tie=True)
    sparsify(model, "2:4")
    sc = export_compressed_tensors(model, str(tmp_path))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert set(qc) == {"version", "quant_method", "sparsity_config", "transform_config"}  # no top-level "format"
    assert qc["sparsity_config"] == sc and sc["format"] == "sparse-24-bitmask" and sc["ignore"] == ["lm_head"]
    raw = load_file(str(tmp_path / "model.safetensors"))
    m = "model.layers.0.mlp.up_proj"
    assert raw[f"{m}.compressed"].shape == (128, 32) and raw[f"{m}.bitmask"].dtype == torch.uint8
    assert raw[f"{m}.bitmask"].shape == (128, 8)
    assert raw[f"{m}.shape"].dtype == torch.int64 and raw[f"{m}.shape"].tolist() == [[128], [64]]
    assert f"{m}.weight" not in raw and "lm_head.weight" not in raw


def test_export_rejects_non_24_model(tmp_path):
    with pytest.raises(ValueError, match="no linear of the model is 2:4"):
        export_compressed_tensors(tiny_model(layers=1), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="format must be one of"):
        export_compressed_tensors(_model("2:4"), str(tmp_path / "b"), format="marlin-24")
    assert not os.listdir(tmp_path)


CONSUMER_CASES = {"sparse24-fp32-swapped": ("sparse-24-bitmask", torch.float32, True),
                  "sparse24-bf16-pruned": ("sparse-24-bitmask", torch.bfloat16, False),
                  "dense-fp32-swapped": ("dense", torch.float32, True)}


@pytest.fixture(scope="module")
def consumer_reads(tmp_path_factory):
    """Export every case, then let the consumers read them all in one subprocess (imports are slow)."""
    site = consumer_site()
    root = tmp_path_factory.mktemp("consumers")
    ids = random_ids(2, 10)
    save_file({"ids": ids}, str(root / "ids.safetensors"))
    models, args = {}, []
    for name, (fmt, dtype, swap) in CONSUMER_CASES.items():
        model = _model("2:4", tie=True)
        model.to(dtype)  # cast after building in fp32: config.json must say the new dtype
        if swap:
            sparsify(model, "2:4")
        export_compressed_tensors(model, str(root / name), format=fmt)
        models[name] = model
        args += [str(root / name), str(root / "ids.safetensors"), str(root / f"{name}.out.safetensors")]
    r = run_consumer(site, os.path.join(HERE, "_ct_consumer.py"), *args)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, ids, models


@pytest.mark.parametrize("case", list(CONSUMER_CASES))
def test_export_read_by_the_consumers(consumer_reads, case):
    """compressed-tensors 0.14.0.1's ModelCompressor and transformers 4.57.6's from_pretrained (side
    install, subprocess): bit-exact weights, and logits identical to ours in fp32."""
    from safetensors import safe_open

    root, ids, models = consumer_reads
    model, dtype = models[case], CONSUMER_CASES[case][1]
    out_file = str(root / f"{case}.out.safetensors")
    with safe_open(out_file, framework="pt") as f:
        meta = f.metadata()
    assert meta["compressed_tensors"] == "0.14.0.1" and meta["transformers"] == "4.57.6"
    assert meta["dtype"] == str(dtype)  # from config.json's dtype (dtype="auto")
    out = load_file(out_file)
    densify(model)
    for key, v in model.state_dict().items():
        for reader in ("mc", "tf"):
            assert out[f"{reader}.{key}"].dtype == v.dtype and torch.equal(out[f"{reader}.{key}"], v), (reader, key)
    ref = _logits(model, ids)  # the dense model under this venv's transformers
    if dtype == torch.float32:
        assert torch.equal(out["logits"], ref)
    else:  # same weights; transformers 4.57 and 5.x round some bf16 intermediates differently
        torch.testing.assert_close(out["logits"], ref, atol=0.25, rtol=0.05)
