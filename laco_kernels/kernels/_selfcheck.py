"""Once-per-device self-check of a GPU kernel whose correctness depends on a register layout Triton picks.

The tensor-core GEMVs (``sparse24_gemv``, ``bitmap_chunks``) map ``mma.sync`` lanes onto the layout the
Triton we test with chooses; another Triton or GPU could choose differently. Before a (device, dtype)
serves, the kernel runs a small random problem against a dense matmul; a mismatch warns and the caller
falls back to a kernel without that assumption.
"""
from __future__ import annotations

import warnings
from typing import Callable, Tuple

import torch


def self_check_once(cache: dict, device: torch.device, dtype: torch.dtype,
                    run: Callable[[], Tuple[torch.Tensor, torch.Tensor]], kernel: str, fallback: str) -> bool:
    """``run()`` -> (got, want) once per (device, dtype), cached in ``cache``; True when they agree to
    16-bit tolerance, else a RuntimeWarning naming ``kernel`` and ``fallback`` (used from then on)."""
    key = (device.index, dtype)
    if key not in cache:
        got, want = run()
        got, want = got.float(), want.float()
        ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
        if not ok:
            warnings.warn(f"laco_kernels: {kernel} failed its self-check on {torch.cuda.get_device_name(device)}"
                          f" ({dtype}, max error {(got - want).abs().max().item():.3g}); using {fallback} "
                          "on this device. Please report this with `python -m torch.utils.collect_env`.",
                          RuntimeWarning, stacklevel=4)
        cache[key] = ok
    return cache[key]
