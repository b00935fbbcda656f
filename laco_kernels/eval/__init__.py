"""Evaluation: WikiText-2 perplexity and zero-shot accuracy (lm-eval)."""
from .perplexity import perplexity

__all__ = ["perplexity", "zeroshot"]


def __getattr__(name):  # lm-eval is heavy to import: load zeroshot on first use
    if name == "zeroshot":
        from .zeroshot import zeroshot
        return zeroshot
    raise AttributeError(name)
