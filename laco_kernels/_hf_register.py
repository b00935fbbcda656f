"""Register the ``laco-sparse`` method with transformers as soon as transformers can take it.

``import laco_kernels`` must not import transformers (several seconds), yet
``AutoModelForCausalLM.from_pretrained`` must know the method afterwards. If
``transformers.quantizers.auto`` (the registry) is already imported, the method is registered now;
otherwise a meta-path finder waits for that module to be imported and registers right after it
has executed, before any ``from_pretrained`` can run.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

_REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    hf = sys.modules.get(f"{__package__}.hf")
    if hf is not None and not hasattr(hf, "register"):
        return  # laco_kernels.hf is importing transformers right now; it registers at the end of its body
    try:
        from .hf import register

        register()
    except Exception as exc:  # an incompatible transformers must not break `import laco_kernels`
        warnings.warn(f"laco_kernels: could not register the laco-sparse checkpoint format with transformers "
                      f"({type(exc).__name__}: {exc}); from_pretrained will not load laco sparse folders",
                      RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:  # done: the registry exists from now on
            sys.meta_path.remove(self._finder)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        # stays installed until the module has executed: a bare importlib.util.find_spec must not
        # use up the hook
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None


def install() -> None:
    """Register now if the transformers registry is loaded, else when it gets imported."""
    if _REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
