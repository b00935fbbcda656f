"""Drop-in sparse linear layers and the in-place swap of a model's ``nn.Linear`` layers.

    from laco_kernels.nn import sparsify, densify
    summary = sparsify(model, pattern="2:4")       # every 2:4-pruned linear -> SparseLinear24
    densify(model)                                 # back to nn.Linear, weights bit-identical

Modules
    ``SparseLinear24``  2:4 weight as compressed values ``[N, K/2]`` + int32 meta (inference;
                        ``trainable=True`` makes the values an ``nn.Parameter``: training on the
                        compressed values, the pruned half can never come back).
    ``BitmapLinear``    unstructured sparse weight as bitmap + packed nonzeros (inference).
    ``MaskedLinear``    dense ``weight`` parameter trained under a fixed bit-packed mask.

State-dict convention (the design choice, documented once here)
    Every module here saves and loads a **dense** ``weight`` (and ``bias``), exactly the keys of
    the ``nn.Linear`` it replaces. ``_save_to_state_dict`` decompresses, ``_load_from_state_dict``
    re-packs (and rejects a weight that does not fit the module's format). A swapped model's
    ``state_dict()`` therefore has the dense model's keys, so an ordinary checkpoint loads into
    either form unchanged. The packed tensors live in non-persistent buffers (they follow
    ``.to()``); ``save_pretrained`` / ``from_pretrained`` write and read them packed on disk
    through the ``laco-sparse`` quantization method of :mod:`laco_kernels.hf` (``sparsify`` on a
    transformers model attaches it).

Forward passes go through ``laco_kernels.ops`` (CUDA -> Triton, CPU -> native extension or the
PyTorch reference; see ``ops/dispatch.py``).
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .formats import BitmapWeight, PackedMask, Sparse24Weight, check_finite
from .ops.masked_gemm import masked_linear
from .ops.sparse_gemm import bitmap_linear, sparse24_linear

PATTERNS = ("2:4", "unstructured")
MODES = ("inference", "train")

__all__ = ["BitmapLinear", "MaskedLinear", "SparseLinear24", "densify", "sparsify", "sparse_modules"]


def _new_linear(in_features: int, out_features: int, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=True)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin


class _DenseStateDict(nn.Module):
    """Mixin: state_dict holds a dense ``weight`` (+ ``bias``) instead of the packed tensors."""

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_dense(self, weight: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.dense_weight()
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # all or nothing: every key is checked (shape, then whether the weight fits the format)
        # before the first tensor of this module changes, and each error names its key
        wkey, bkey = prefix + "weight", prefix + "bias"
        errors: List[str] = []
        w = state_dict.get(wkey)
        if w is None:
            missing_keys.append(wkey)
        elif not isinstance(w, torch.Tensor) or tuple(w.shape) != (self.out_features, self.in_features):
            errors.append(f"size mismatch for {wkey}: checkpoint has {tuple(getattr(w, 'shape', ()))}, "
                          f"module expects {(self.out_features, self.in_features)}")
        b = state_dict.get(bkey) if self.bias is not None else None
        if self.bias is not None:
            if b is None:
                missing_keys.append(bkey)
            elif not isinstance(b, torch.Tensor) or tuple(b.shape) != tuple(self.bias.shape):
                errors.append(f"size mismatch for {bkey}: checkpoint has {tuple(getattr(b, 'shape', ()))}, "
                              f"module expects {tuple(self.bias.shape)}")
        elif bkey in state_dict and strict:
            unexpected_keys.append(bkey)
        if strict:
            allowed = {wkey, bkey}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in allowed
                                   and "." not in k[len(prefix):])
        if not errors and w is not None:
            try:
                with torch.no_grad():
                    self._set_dense(w)  # packs first, assigns only once the weight fits
            except (TypeError, ValueError) as exc:
                errors.append(f"{wkey} does not fit {type(self).__name__}: {exc}")
        if errors:
            error_msgs.extend(errors)
            return
        if b is not None:
            with torch.no_grad():
                self.bias.copy_(b)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (same dtype and device), bias copied."""
        lin = _new_linear(self.in_features, self.out_features, self.dense_weight().detach().clone(), self.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _bias_param(linear: nn.Linear) -> Optional[nn.Parameter]:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                         requires_grad=linear.bias.requires_grad)


class _FreezeSlots(torch.autograd.Function):
    """Identity on the packed values whose backward zeroes the gradient of frozen slots.

    A group of 4 with fewer than 2 non-zeros (a weight that was already 0 before pruning) still
    occupies 2 value slots; the empty slot is a pruned weight and must stay exactly zero, so it
    gets no gradient (AdamW then never moves it: zero gradient, zero moments, decay of 0 is 0).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(frozen)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (frozen,) = ctx.saved_tensors
        return grad.masked_fill(frozen, 0), None


_PLAIN = (torch.Tensor, nn.Parameter)
_FAST_C: list = []  # [laco_kernels._C] once looked up, [None] where the extension or its module entry is missing


def _fast_c():
    if not _FAST_C:
        try:
            from . import _native

            c = _native._C if hasattr(_native._C, "sparse24_linear_fast") else None
        except ImportError:
            c = None
        _FAST_C.append(c)
    return _FAST_C[0]


def _native_fast(op: str, x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor], n: int, k: int,
                 *packed: torch.Tensor, tile_k: int = 0) -> Optional[torch.Tensor]:
    """The packed module's output ``[..., n]`` for this eager CPU inference call, straight from the
    native kernel, or None when the call must take the op path.

    Why: a decode step calls each linear once with one token. The op path's per-call work (argument
    checks, backend selection, a fresh weight object) cost ~14 us of a ~31 us call; the Python checks
    that replaced it in stop 26 still cost 8-10 us, and the module 16-27 us above nn.Linear's 8 us (one
    thread, Zen 3; 210 calls a SmolLM2 token). The checks now run in C++ (csrc/module_fast.cpp, well
    under a microsecond): plain CPU tensors of one native dtype, an x with k features and a bias of n,
    no LACO_BACKEND override, no gradient to record, no dispatch / torch-function mode, functorch
    transform or autocast, i.e. exactly the calls the op would run directly. Only what C++ cannot see
    is checked here: not compiling (first: dynamo folds it) and no tensor subclass. Anything else,
    every malformed input included, gets None and the op path's checks and error messages.
    packed: meta (2:4) or bitmap, offsets (bitmap, with ``tile_k``); the module's own tensors are
    checked when they are set (from_linear / load_state_dict / _set_dense).
    """
    if torch.compiler.is_compiling():  # first: dynamo folds it and never traces the rest
        return None
    c = _FAST_C[0] if _FAST_C else _fast_c()
    if c is None or type(x) not in _PLAIN or type(values) not in _PLAIN or (
            bias is not None and type(bias) not in _PLAIN):
        return None
    for t in packed:
        if type(t) not in _PLAIN:
            return None
    if op == "sparse24_linear":
        return c.sparse24_linear_fast(x, values, packed[0], bias, n, k)
    return c.bitmap_linear_fast(x, values, packed[0], packed[1], tile_k, bias, n, k)


# ----------------------------------------------------------------------------------------
class SparseLinear24(_DenseStateDict):
    """y = x @ W^T + b with a 2:4 weight stored as values ``[N, K/2]`` + int32 meta ``[N, ceil(K/32)]``.

    trainable=False (inference): values are a non-persistent buffer. trainable=True: values are
    an ``nn.Parameter`` (meta stays a buffer), so gradients and optimizer state cover the kept
    half only; value slots that are exactly zero when the module is built (groups with fewer
    than 2 non-zeros) get no gradient, so every pruned weight stays zero. x: ``[..., K]`` in the
    values' dtype.
    """

    def __init__(self, w24: Sparse24Weight, bias: Optional[torch.Tensor] = None, trainable: bool = False):
        super().__init__()
        w24.validate()
        self.out_features, self.in_features = w24.shape
        self.trainable = trainable
        if trainable:
            self.values = nn.Parameter(w24.values.detach().clone())
        else:
            self.register_buffer("values", w24.values.detach().clone(), persistent=False)
        self.register_buffer("meta", w24.meta.detach().clone(), persistent=False)
        frozen = w24.values.detach() == 0 if trainable else None
        self.register_buffer("frozen_slots", frozen if frozen is not None and bool(frozen.any()) else None,
                             persistent=False)
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear, trainable: bool = False, prune: bool = False) -> "SparseLinear24":
        """Pack ``linear.weight``; ValueError unless it is already 2:4 (``prune=True``: keep the 2 largest)."""
        w24 = Sparse24Weight.from_dense(linear.weight.detach(), prune=prune)
        mod = cls(w24, _bias_param(linear), trainable=trainable)
        mod.train(linear.training)
        return mod

    def weight24(self) -> Sparse24Weight:
        values = self.values
        if self.frozen_slots is not None and values.requires_grad:
            values = _FreezeSlots.apply(values, self.frozen_slots)
        return Sparse24Weight(values, self.meta, (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        return self.weight24().to_dense()

    def _set_dense(self, weight: torch.Tensor) -> None:
        w24 = Sparse24Weight.from_dense(weight.to(self.values.device, self.values.dtype), prune=False)
        self.__dict__.pop("_semi", None)  # a semi-structured copy of the old weight would be stale
        self.values.copy_(w24.values)
        self.meta.copy_(w24.meta)
        if self.trainable:
            frozen = w24.values == 0
            self.frozen_slots = frozen if bool(frozen.any()) else None

    def enable_semi_structured(self, min_m: int | None = None) -> int:
        """Opt in: rows of x >= ``min_m`` (default ``semi_structured.SEMI_STRUCTURED_MIN_M``) run on
        torch's semi-structured 2:4 path (CUDA sparse tensor cores) when no gradient is needed;
        fewer rows, autograd and non-CUDA inputs keep the Triton / CPU kernels. Builds the
        semi-structured copy once and returns its size in bytes
        (``semi_structured.semi_structured_bytes``); RuntimeError naming why when it cannot run
        here (nothing is changed then)."""
        from . import semi_structured as ss

        if min_m is not None and int(min_m) < 1:
            raise ValueError(f"enable_semi_structured: min_m must be >= 1, got {min_m}")
        if self.trainable:
            raise RuntimeError("enable_semi_structured: a trainable SparseLinear24 changes its values; "
                               "the semi-structured copy would go stale")
        semi = ss.build(self.dense_weight().detach())
        self._semi, self._semi_min_m = semi, ss.SEMI_STRUCTURED_MIN_M if min_m is None else int(min_m)
        return ss.semi_structured_bytes(self.out_features, self.in_features, self.values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        y = _native_fast("sparse24_linear", x, self.values, self.bias, n, k, self.meta)
        if y is not None:  # eager CPU inference straight into the kernel (see _native_fast)
            return y
        semi = self.__dict__.get("_semi")
        bias_grad = self.bias is not None and self.bias.requires_grad
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or bias_grad)
        if semi is not None and not wants_grad and x.is_cuda and x.dtype == self.values.dtype and \
                x.numel() // max(1, self.in_features) >= self._semi_min_m:  # inference only
            return torch.nn.functional.linear(x, semi, self.bias)
        # trainable: self.values is a Parameter, and sparse24_linear differentiates w.r.t. w24.values
        return sparse24_linear(x, self.weight24(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", trainable={self.trainable}"


class BitmapLinear(_DenseStateDict):
    """y = x @ W^T + b with an unstructured sparse weight stored as a :class:`BitmapWeight` (inference)."""

    def __init__(self, bw: BitmapWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        bw.validate()
        self.out_features, self.in_features = bw.shape
        self.tile_k = bw.tile_k
        self.register_buffer("values", bw.values.detach().clone(), persistent=False)
        self.register_buffer("bitmap", bw.bitmap.detach().clone(), persistent=False)
        self.register_buffer("offsets", bw.offsets.detach().clone(), persistent=False)
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear, tile_k: int = 128) -> "BitmapLinear":
        mod = cls(BitmapWeight.from_dense(linear.weight.detach(), tile_k=tile_k), _bias_param(linear))
        mod.train(linear.training)
        return mod

    def weight_bitmap(self) -> BitmapWeight:
        return BitmapWeight(self.values, self.bitmap, self.offsets, (self.out_features, self.in_features), self.tile_k)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_bitmap().to_dense()

    def _set_dense(self, weight: torch.Tensor) -> None:
        bw = BitmapWeight.from_dense(weight.to(self.values.device, self.values.dtype), tile_k=self.tile_k)
        # the number of nonzeros may change: replace the buffers rather than copy into them
        self.values, self.bitmap, self.offsets = bw.values.clone(), bw.bitmap.clone(), bw.offsets.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        y = _native_fast("bitmap_linear", x, self.values, self.bias, n, k, self.bitmap, self.offsets,
                         tile_k=self.tile_k)
        if y is not None:  # eager CPU inference straight into the kernel (see _native_fast)
            return y
        return bitmap_linear(x, self.weight_bitmap(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.values.numel() / (self.in_features * self.out_features):.3f}"


class MaskedLinear(_DenseStateDict):
    """Training under a fixed mask: y = x @ (W ⊙ M)^T + b; dW is zero wherever M is.

    weight: ``nn.Parameter [N, K]``; the mask is a :class:`PackedMask` kept in the
    non-persistent int32 buffer ``mask_bits`` (1 bit per weight), so ``state_dict()`` keys are
    ``weight`` / ``bias`` exactly as in ``nn.Linear``.
    """

    def __init__(self, weight: torch.Tensor, mask: PackedMask, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}")
        mask.validate()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.register_buffer("mask_bits", mask.bits.detach().clone().to(weight.device), persistent=False)
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "MaskedLinear":
        """mask: bool ``[N, K]`` (True = kept); default ``linear.weight != 0``."""
        w = linear.weight.detach()
        m = (w != 0) if mask is None else mask
        mod = cls(nn.Parameter(w.clone()), PackedMask.from_bool(m.to(w.device)), _bias_param(linear))
        mod.train(linear.training)
        return mod

    @property
    def mask(self) -> PackedMask:
        return PackedMask(self.mask_bits, (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        # weight * mask: kept entries unchanged bit for bit, masked ones zero (their sign kept)
        return self.weight * self.mask.to_bool().to(self.weight.dtype)

    def _set_dense(self, weight: torch.Tensor) -> None:
        bits = PackedMask.from_bool(weight.to(self.weight.device) != 0).bits  # before any change
        self.weight.copy_(weight)
        self.mask_bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.mask, self.bias)


_SPARSE_TYPES = (SparseLinear24, BitmapLinear, MaskedLinear)


# ----------------------------------------------------------------------------------------
def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _linear_bytes(lin: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(lin.parameters(recurse=False)) +
               list(lin.buffers(recurse=False)))


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def sparse_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every SparseLinear24 / BitmapLinear / MaskedLinear in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _SPARSE_TYPES)}


def sparsify(model: nn.Module, pattern: str = "2:4", mode: str = "inference",
             filter: Optional[Callable[[str, nn.Module], bool]] = None, include_lm_head: bool = False,
             tile_k: int = 128) -> dict:
    """Swap every eligible ``nn.Linear`` of ``model`` (any module: a whole model or one block) in place.

    pattern ``"2:4"``: each weight must already be 2:4 (ValueError naming the layer otherwise);
    inference -> :class:`SparseLinear24`, train -> SparseLinear24 with trainable values.
    pattern ``"unstructured"``: inference -> :class:`BitmapLinear`, train -> :class:`MaskedLinear`
    with mask ``weight != 0``. The output projection (``lm_head`` / ``get_output_embeddings()``)
    is skipped unless ``include_lm_head``; ``filter(name, module) -> bool`` narrows the choice.
    Nothing is swapped if any chosen layer fails validation.

    Weights must be finite (ValueError naming the layer and the first NaN / inf otherwise).
    Linear-like layers left dense (transformers ``Conv1D`` of GPT-2, ``nn.Linear`` subclasses such as
    peft / quantised layers) are listed in ``"skipped"`` with the reason and a UserWarning says so.

    Returns ``{"pattern", "mode", "swapped" (count), "names", "bytes_before", "bytes_after",
    "skipped" ({name: reason})}`` (bytes of the swapped layers' tensors, weight and bias included).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(model, nn.Linear):
        raise TypeError("sparsify swaps linears inside a module in place; pass the module that contains the "
                        "linear (or use SparseLinear24.from_linear / BitmapLinear.from_linear directly)")
    head = _output_embedding(model)
    chosen: Dict[str, nn.Linear] = {}
    skipped: Dict[str, str] = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:  # exact type: subclasses (peft, quantised) have their own forward
            why = _unsupported_reason(mod)
            if why and (filter is None or filter(name, mod)):
                skipped[name] = why
            continue
        if not include_lm_head and (mod is head or name == "lm_head" or name.endswith(".lm_head")):
            continue
        if filter is not None and not filter(name, mod):
            continue
        chosen[name] = mod
    new: Dict[str, nn.Module] = {}
    for name, lin in chosen.items():
        try:
            if pattern == "2:4":
                new[name] = SparseLinear24.from_linear(lin, trainable=(mode == "train"))
            elif mode == "inference":
                new[name] = BitmapLinear.from_linear(lin, tile_k=tile_k)
            else:
                check_finite(lin.weight, "weight")
                new[name] = MaskedLinear.from_linear(lin)
        except ValueError as exc:
            raise ValueError(f"cannot sparsify layer {name!r} (weight {tuple(lin.weight.shape)}) as {pattern}: "
                             f"{exc}") from None
    before = sum(_linear_bytes(chosen[n]) for n in new)
    for name, mod in new.items():
        _set_child(model, name, mod)
    after = sum(_linear_bytes(m) for m in new.values())
    if skipped:
        kinds = sorted(set(skipped.values()))
        warnings.warn(f"sparsify swapped {len(new)} nn.Linear layer(s) and left {len(skipped)} linear-like "
                      f"layer(s) dense (e.g. {next(iter(skipped))!r}): " + "; ".join(kinds), stacklevel=2)
    if new and "transformers" in sys.modules and hasattr(model, "save_pretrained"):
        from .hf import attach  # model.save_pretrained now writes the packed laco-sparse format

        attach(model)
    return {"pattern": pattern, "mode": mode, "swapped": len(new), "names": list(new),
            "bytes_before": before, "bytes_after": after, "skipped": skipped}


def _unsupported_reason(mod: nn.Module) -> Optional[str]:
    """Why a module that computes a linear map is not swapped (None: not a linear at all)."""
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return ("transformers Conv1D (GPT-2 style, weight stored [in, out]) is not supported: its state-dict "
                "layout differs from nn.Linear, so a swapped model could not load its own checkpoint")
    if isinstance(mod, nn.Linear):
        return (f"{type(mod).__name__} subclasses nn.Linear with its own forward (adapter or quantised "
                "layer); merge or unwrap it first")
    return None


def densify(model: nn.Module) -> dict:
    """Replace every module of this file inside ``model`` by an ``nn.Linear`` with its dense weight.

    The weights are those the layers were built from, bit for bit, except that a pruned ``-0.0``
    comes back as ``+0.0`` from the packed formats (SparseLinear24 / BitmapLinear store no zeros).
    Returns ``{"densified" (count), "names"}``.
    """
    if isinstance(model, _SPARSE_TYPES):
        raise TypeError("densify replaces modules inside a parent; call module.to_linear() on a single layer")
    names: List[str] = list(sparse_modules(model))
    for name in names:
        _set_child(model, name, model.get_submodule(name).to_linear())
    return {"densified": len(names), "names": names}
