"""laco_kernels.checkpoint: packed save/load round trip and compressed-tensors export."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from _tiny import random_ids, tiny_model, tiny_tokenizer
from laco_kernels.checkpoint import MANIFEST, export_compressed_tensors, is_sparse_checkpoint, load_sparse, save_sparse
from laco_kernels.nn import BitmapLinear, densify, sparse_modules, sparsify
from laco_kernels.prune import prune_model


def _model(pattern="2:4", family="llama", tie=False):
    model = tiny_model(family, layers=2)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    if pattern == "2:4":
        prune_model(model, "magnitude", pattern="2:4", progress=False)
    else:
        prune_model(model, "magnitude", sparsity=0.7, progress=False)
    return model


@pytest.mark.parametrize("pattern,mode,family,tie", [("2:4", "inference", "llama", True),
                                                     ("unstructured", "inference", "opt", False),
                                                     ("2:4", "train", "qwen2", False),
                                                     ("unstructured", "train", "llama", False)])
def test_save_load_round_trip_identical_logits(tmp_path, pattern, mode, family, tie):
    model = _model(pattern, family, tie)
    sparsify(model, pattern, mode=mode)
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    manifest = save_sparse(model, str(tmp_path), tokenizer=tiny_tokenizer())
    assert is_sparse_checkpoint(str(tmp_path)) and set(manifest["modules"]) == set(sparse_modules(model))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if ".tmp" not in n)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    q = ("model.decoder.layers.0.self_attn.q_proj" if family == "opt" else "model.layers.0.self_attn.q_proj")
    want = {"values", "meta"} if (pattern == "2:4") else ({"values", "bitmap", "offsets"} if mode == "inference"
                                                          else {"weight", "mask"})
    assert {k[len(q) + 1:] for k in keys if k.startswith(q + ".")} - {"bias"} == want
    loaded, tok = load_sparse(str(tmp_path))
    assert tok is not None and tok("the cat")["input_ids"] == tiny_tokenizer()("the cat")["input_ids"]
    types = {n: type(m) for n, m in sparse_modules(loaded).items()}
    assert types == {n: type(m) for n, m in sparse_modules(model).items()}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if mode == "train" and pattern == "2:4":
        assert all(m.trainable for m in sparse_modules(loaded).values())


def test_packed_file_is_smaller_and_dense_model_saves_too(tmp_path):
    model = _model("2:4")
    save_sparse(model, str(tmp_path / "dense"))  # nothing swapped: a plain checkpoint with a manifest
    loaded, tok = load_sparse(str(tmp_path / "dense"))
    assert tok is None and not sparse_modules(loaded)
    sparsify(model, "2:4")
    save_sparse(model, str(tmp_path / "sparse"))
    dense_size = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    sparse_size = os.path.getsize(tmp_path / "sparse" / "model.safetensors")
    assert sparse_size < dense_size


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sparse(str(tmp_path / "nope"))
    model = _model("2:4")
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="not a complete laco sparse checkpoint"):
        load_sparse(str(tmp_path / "plain"))
    sparsify(model, "2:4")
    save_sparse(model, str(tmp_path / "bad"))
    path = tmp_path / "bad" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["modules"].pop("model.layers.0.mlp.up_proj")
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match the model"):
        load_sparse(str(tmp_path / "bad"))


def _ct_decompress(folder):
    """Decompress with compressed-tensors itself: its config registry parses the sparsity config and
    its bitmask helper unpacks the masks (the legacy sparse-24 decompressor did exactly this scatter)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import unpack_bitmasks

    config = json.loads(open(os.path.join(folder, "config.json")).read())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    sc = dict(config["sparsity_config"])
    cfg = SparsityCompressionConfig.load_from_registry(sc.pop("format"), **sc)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    out = {}
    if cfg.format == "dense":
        return cfg, BaseCompressor.get_value_from_registry("dense").decompress(tensors, None)
    for key, t in tensors.items():
        if key.endswith(".compressed"):
            base = key[: -len(".compressed")]
            shape = tensors[base + ".shape"].tolist()
            mask = unpack_bitmasks(tensors[base + ".bitmask"], shape)
            dense = torch.zeros(shape, dtype=t.dtype)
            dense[mask] = t.flatten()
            out[base] = dense
        elif not key.endswith((".bitmask", ".shape")):
            out[key] = t
    return cfg, out


@pytest.mark.parametrize("fmt,swap", [("sparse-24-bitmask", True), ("sparse-24-bitmask", False), ("dense", True)])
def test_export_compressed_tensors_decompresses_exactly(tmp_path, fmt, swap):
    model = _model("2:4", tie=True)
    model.to(torch.bfloat16)
    if swap:
        sparsify(model, "2:4")
    sparsity = export_compressed_tensors(model, str(tmp_path), format=fmt)
    cfg, weights = _ct_decompress(str(tmp_path))
    assert cfg.format == fmt and cfg.sparsity_structure == "2:4" and cfg.ignore == ["lm_head"]
    assert 0.4 < sparsity["global_sparsity"] < 0.5
    densify(model)
    state = model.state_dict()
    state.pop("lm_head.weight")  # tied to the embedding: stored once
    assert set(weights) == set(state)
    for k, v in state.items():
        assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), k
    if fmt == "sparse-24-bitmask":
        raw = load_file(str(tmp_path / "model.safetensors"))
        w = raw["model.layers.0.mlp.up_proj.weight.compressed"]
        assert w.shape == (128, 32) and raw["model.layers.0.mlp.up_proj.weight.bitmask"].dtype == torch.uint8


def test_export_rejects_non_24_model(tmp_path):
    with pytest.raises(ValueError, match="no linear of the model is 2:4"):
        export_compressed_tensors(tiny_model(layers=1), str(tmp_path))
    with pytest.raises(ValueError, match="format must be one of"):
        export_compressed_tensors(_model("2:4"), str(tmp_path), format="marlin-24")


def test_sparse_modules_survive_state_dict_into_hf_save_pretrained(tmp_path):
    # save_pretrained on a swapped model writes the dense keys; transformers reloads it as a dense model
    from transformers import AutoModelForCausalLM

    model = _model("unstructured")
    ids = random_ids(1, 8)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sparsify(model, "unstructured")
    assert all(isinstance(m, BitmapLinear) for m in sparse_modules(model).values())
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert isinstance(again.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)

