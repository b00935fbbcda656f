"""Backend selection: which implementation runs an op for given tensors.

Rules (``LACO_BACKEND`` = ``auto`` unless set):
- ``auto``: CUDA tensors -> ``triton``; CPU tensors -> ``native`` when the C++ extension
  ``laco_kernels._C`` is built and implements the op, else ``reference``.
- ``triton``: the Triton kernel on any device. On CPU tensors this needs ``TRITON_INTERPRET=1``
  set before ``triton`` is imported (how the tests run the kernels without a GPU).
- ``native`` / ``reference``: forced; an error if impossible, never a silent substitute.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

BACKENDS = ("auto", "triton", "native", "reference")
_log = logging.getLogger("laco_kernels.dispatch")
_fallback_logged: set = set()


def requested_backend() -> str:
    name = os.environ.get("LACO_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"LACO_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # dynamo calls it while tracing: a failed import is no graph break
def native_supports(op: str) -> bool:
    """True when the optional C++ extension is importable and implements ``op``."""
    try:
        from .. import _native
    except ImportError:
        return False
    return _native.supports(op)


def select_backend(op: str, tensors: Iterable[torch.Tensor | None]) -> str:
    """Return ``"triton"``, ``"native"`` or ``"reference"`` for ``op`` on these tensors."""
    devs = {t.device.type for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{op}: tensors on several device types {sorted(devs)}")
    dev = devs.pop() if devs else "cpu"
    want = requested_backend()
    if want == "triton":
        if dev == "cpu" and not interpreter_enabled():
            raise RuntimeError(f"{op}: LACO_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "set before triton is imported")
        return "triton"
    if want == "reference":
        return "reference"
    if want == "native":
        if dev != "cpu" or not native_supports(op):
            raise RuntimeError(f"{op}: LACO_BACKEND=native but the C++ extension is not built or does not "
                               f"implement this op on {dev} tensors")
        return "native"
    if dev == "cuda":
        return "triton"
    if dev == "cpu" and native_supports(op):
        return "native"
    if op not in _fallback_logged and not torch.compiler.is_compiling():  # dynamo cannot trace a logger
        _fallback_logged.add(op)
        _log.debug("%s: no native CPU kernel available, using the PyTorch reference", op)
    return "reference"


def grad_or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A backward custom op returns a fixed tuple of tensors: an empty one stands for "not needed"
    (the autograd formula maps it back to None from ``ctx.needs_input_grad``, never from its size)."""
    return like.new_empty(0) if grad is None else grad


def _plain_eager(tensors) -> bool:
    """Not compiling, no dispatch / torch-function mode or functorch transform, autocast off, and
    every tensor a plain (non-meta) ``torch.Tensor`` or ``nn.Parameter`` (not a tensor subclass:
    those need the custom op's dispatch)."""
    if torch.compiler.is_compiling():  # checked first: dynamo folds it and never traces the rest
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return False  # the custom op's autocast rule (ops/sparse_gemm.py) must see the call
    return all(t is None or (type(t) in _PLAIN and not t.is_meta) for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def call_route(*tensors: torch.Tensor | None) -> str:
    """How a public op runs this call, decided once: ``"direct"`` (its implementation function,
    :func:`call_direct`), ``"eager"`` (a gradient must be recorded but nothing else needs the custom
    op: a plain ``torch.autograd.Function`` from :func:`eager_function`) or ``"op"`` (the
    ``torch.ops.laco.*`` custom op: compiling, a mode or transform, autocast, a tensor subclass).

    The custom op's Python-level autograd and dispatch cost about 80 us a forward + backward on
    this CPU (``bench/op_overhead.py --stub``: 296 against 212 us for a 64 x 64 masked linear with
    stub kernels); on a GPU that is host time a small training step waits for. Same implementation
    functions on every route, so the same numbers."""
    if not _plain_eager(tensors):
        return "op"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "eager"
    return "direct"


def eager_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when :func:`call_route` says ``"eager"``."""
    return call_route(*tensors) == "eager"


def eager_function(name: str, impl, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` running ``impl(*inputs)`` with the custom op's own
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``. Outputs after the first
    (a guard flag, loss statistics) are marked non-differentiable, as integer / auxiliary outputs."""

    def forward(ctx, *inputs):
        out = impl(*inputs)
        setup_context(ctx, inputs, out)
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(*out[1:])
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                     "backward": staticmethod(backward)})


def call_direct(*tensors: torch.Tensor | None) -> bool:
    """True when a public op may call its custom op's implementation function directly.

    The ``torch.ops.laco.*`` custom ops are what torch.compile, autograd, fake / meta tensors and
    dispatch modes see; in plain eager inference their dispatch only adds time (about 50 us a
    call measured on this CPU, as much as a small decode GEMV). So the implementation runs
    directly (the same function, the same numbers) when nothing needs the op: not compiling, no
    tensor needs a gradient recorded, every tensor a plain (non-meta) ``torch.Tensor`` or
    ``nn.Parameter``, no dispatch mode, torch-function mode or functorch transform is active, and
    autocast is off. (All three routes: :func:`call_route`.)
    """
    return call_route(*tensors) == "direct"
