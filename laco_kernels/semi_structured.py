"""Opt-in dispatch of large-M 2:4 products to torch's semi-structured sparse path on CUDA.

torch's ``to_sparse_semi_structured`` (cuSPARSELt or CUTLASS) runs the 2:4 product on the
sparse tensor cores, which no Triton kernel can reach (upstream Triton has no sparse ``tl.dot``).
Measured on an H100 (``bench/results/gpu_gemm_graph.json``, fp16, 4096 x 4096, CUDA graphs):
M = 4096: semi-structured 149 us, cuBLAS 204, our dense Triton 268, our 2:4 Triton 1187;
M = 1: semi-structured 34.8 us, our 2:4 25.4, cuBLAS 10.8. So it wins at large M and loses at
decode. :data:`SEMI_STRUCTURED_MIN_M` (256) is a PREDICTION between those two measured rows (our
2:4 kernel scales with M, the semi-structured call already costs ~35 us at M = 1), to be replaced
by the M = 256 rows of ``bench/gpu_gemm.py`` (method ``sparse24_semi_dispatch``) when a GPU runs it.

Memory: the semi-structured tensor is a second compressed copy of the weight, about the size of
ours: ``N*K/2`` values + ``N*K/8`` bytes of metadata (fp16 / bf16: 9/16 of the dense bytes,
:func:`semi_structured_bytes`); building it materializes the dense weight once, transiently.
Nothing is built by default: :meth:`nn.SparseLinear24.enable_semi_structured` opts one module
in, and then holds both copies (ours still serves M < threshold, training and CPU).
"""
from __future__ import annotations

import torch

SEMI_STRUCTURED_MIN_M = 256
_DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when torch's semi-structured 2:4 path can run on ``device`` for ``dtype``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"semi-structured 2:4 needs a CUDA device, the weight is on {device}"
    if not torch.cuda.is_available():
        return "semi-structured 2:4 needs CUDA, and torch.cuda.is_available() is False"
    if dtype not in _DTYPES:
        return f"semi-structured 2:4 is enabled for fp16 / bf16 weights only, got {dtype}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"semi-structured 2:4 needs compute capability >= 8.0, {device} has {cap}"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError as e:  # pragma: no cover - every torch >= 2.1 has it
        return f"this torch has no torch.sparse.to_sparse_semi_structured ({e})"
    return None


def semi_structured_bytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Bytes of the extra semi-structured copy of an ``(N, K)`` 2:4 weight: values + 2-bit indices."""
    if k % 4:
        raise ValueError(f"2:4 weight shape ({n}, {k}) has K not divisible by 4")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n * (k // 2) * itemsize + n * k // 8


def use_semi_structured(m: int, min_m: int = SEMI_STRUCTURED_MIN_M) -> bool:
    """Whether a product with ``m`` rows of x goes to the semi-structured path (m >= min_m)."""
    return m >= min_m


def build(dense: torch.Tensor):
    """torch semi-structured tensor of a 2:4 dense ``[N, K]`` CUDA weight; RuntimeError naming why not."""
    reason = unavailable_reason(dense.device, dense.dtype)
    if reason is not None:
        raise RuntimeError(reason)
    from torch.sparse import to_sparse_semi_structured

    try:
        return to_sparse_semi_structured(dense)
    except Exception as e:  # shape limits (e.g. CUTLASS fp16 needs N % 32 == 0, K % 64 == 0), missing backend
        raise RuntimeError(f"torch.sparse.to_sparse_semi_structured refused the {tuple(dense.shape)} "
                           f"{dense.dtype} weight: {e}") from e
