"""Input validation shared by every public entry point.

Every check raises an error whose message names the argument and the problem
(shape, dtype, device, layout), never returns a silently wrong result.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(t, name: str, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | Iterable[int] | None = None, min_ndim: int | None = None) -> None:
    """Raise TypeError / ValueError if ``t`` is not a tensor of an allowed dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if ndim is not None:
        allowed_nd = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed_nd:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed_nd))} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError if the given (non-None) tensors live on different devices; return the device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    return next(iter(devices.values()))


def check_linear_inputs(x: torch.Tensor, in_features: int, out_features: int, weight_dtype: torch.dtype,
                        weight_device: torch.device, bias: torch.Tensor | None, op: str) -> None:
    """Validate the (x, bias) pair of a linear op against its weight's logical shape, dtype and device."""
    check_tensor(x, f"{op}: x", dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features in its last dimension (shape {tuple(x.shape)}), "
                         f"but the weight expects in_features={in_features}")
    if x.dtype != weight_dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype} but the weight has dtype {weight_dtype}; cast one of them")
    if x.device != weight_device:
        raise ValueError(f"{op}: x is on {x.device} but the weight is on {weight_device}")
    if bias is not None:
        check_tensor(bias, f"{op}: bias", dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")
