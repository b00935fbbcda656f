"""Evaluation: WikiText-2 perplexity and zero-shot accuracy (lm-eval).

Both names are the functions, bound eagerly: ``zeroshot.py`` imports lm-eval only inside the
function, so importing it here is cheap. (A lazy module ``__getattr__`` here used to return the
function once, after which Python's import of the submodule ``zeroshot`` rebound the package
attribute to the module: ``from laco_kernels.eval import zeroshot`` then gave a module.)
"""
from .perplexity import perplexity
from .zeroshot import zeroshot

__all__ = ["perplexity", "zeroshot"]
