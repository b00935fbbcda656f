"""Count the bytes every ``tl.load`` / ``tl.store`` moves while kernels run in the Triton interpreter.

    with count_traffic() as t:
        kernel[grid](...)          # TRITON_INTERPRET=1, CPU tensors
    t.bytes_read, t.bytes_written

The interpreter routes memory operations through ``triton.runtime.interpreter.InterpreterBuilder``.
We wrap ``create_load`` / ``create_masked_load`` / ``create_store`` / ``create_masked_store``
(descriptor and atomic loads/stores delegate to these) and ``create_atomic_rmw`` /
``create_atomic_cas`` (counted as read + write). Only lanes whose mask is set are counted,
duplicates included: a load issued twice is counted twice. A nesting guard makes a load that one
wrapped method forwards to another count once. This is internal Triton API: written against
Triton ``3.9.x`` (``PINNED_TRITON``); another version raises unless the hooks are checked to exist
and ``allow_other_version=True``.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import triton

PINNED_TRITON = "3.9."
_HOOKS = ("create_load", "create_masked_load", "create_store", "create_masked_store", "create_atomic_rmw",
          "create_atomic_cas")


@dataclass
class Traffic:
    bytes_read: int = 0
    bytes_written: int = 0
    loads: int = 0
    stores: int = 0


def _itemsize(ptr_handle) -> int:
    return ptr_handle.get_element_ty().primitive_bitwidth // 8


def _lanes(mask_handle, ptr_handle) -> int:
    if mask_handle is None:
        return int(np.asarray(ptr_handle.data).size)
    return int(np.count_nonzero(np.asarray(mask_handle.data)))


@contextlib.contextmanager
def count_traffic(allow_other_version: bool = False) -> Iterator[Traffic]:
    """Context manager yielding a :class:`Traffic` that accumulates bytes moved inside it."""
    from triton.runtime import interpreter

    if not triton.__version__.startswith(PINNED_TRITON) and not allow_other_version:
        raise RuntimeError(f"the traffic audit hooks Triton {PINNED_TRITON}x internals; found Triton "
                           f"{triton.__version__}: re-check InterpreterBuilder's memory methods and update PINNED_TRITON")
    builder = getattr(interpreter, "InterpreterBuilder", None)
    missing = [h for h in _HOOKS if builder is None or not hasattr(builder, h)]
    if missing:
        raise RuntimeError(f"triton.runtime.interpreter.InterpreterBuilder lacks {missing} (Triton {triton.__version__}); "
                           "the traffic audit must be updated")
    t = Traffic()
    depth = threading.local()
    originals = {h: getattr(builder, h) for h in _HOOKS}

    def wrap(name, account):
        orig = originals[name]

        def hooked(self, *args, **kwargs):
            outer = getattr(depth, "n", 0) == 0
            depth.n = getattr(depth, "n", 0) + 1
            try:
                if outer:
                    account(*args)
                return orig(self, *args, **kwargs)
            finally:
                depth.n -= 1
        return hooked

    def load(ptr, *rest):
        t.loads += 1
        t.bytes_read += _lanes(None, ptr) * _itemsize(ptr)

    def masked_load(ptr, mask, *rest):
        t.loads += 1
        t.bytes_read += _lanes(mask, ptr) * _itemsize(ptr)

    def store(ptr, val, *rest):
        t.stores += 1
        t.bytes_written += _lanes(None, ptr) * _itemsize(ptr)

    def masked_store(ptr, val, mask, *rest):
        t.stores += 1
        t.bytes_written += _lanes(mask, ptr) * _itemsize(ptr)

    def rmw(op, ptr, val, mask, *rest):
        n = _lanes(mask, ptr) * _itemsize(ptr)
        t.bytes_read += n
        t.bytes_written += n

    def cas(ptr, cmp, val, *rest):
        n = _lanes(None, ptr) * _itemsize(ptr)
        t.bytes_read += n
        t.bytes_written += n

    accounts = dict(create_load=load, create_masked_load=masked_load, create_store=store,
                    create_masked_store=masked_store, create_atomic_rmw=rmw, create_atomic_cas=cas)
    try:
        for h in _HOOKS:
            setattr(builder, h, wrap(h, accounts[h]))
        yield t
    finally:
        for h, f in originals.items():
            setattr(builder, h, f)
