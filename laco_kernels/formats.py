"""Packed weight containers: 2:4 (values + metadata), bitmap (unstructured), bit-packed masks.

All three are plain holders of tensors. They know nothing about kernels or modules; the
kernels read the layouts documented here, and ``reference.py`` decodes them with plain
PyTorch.

Bit layout shared by :class:`PackedMask` and :class:`BitmapWeight`
    A boolean matrix ``[N, K]`` is stored as ``int32 [N, ceil(K / 32)]``: bit ``k % 32`` of
    word ``k // 32`` of row ``n`` is element ``(n, k)``. Padding bits past ``K`` are zero.

2:4 metadata layout (:class:`Sparse24Weight`)
    ``K`` is split into ``G = K / 4`` groups of 4 consecutive columns. Each group keeps two
    positions ``i0 < i1`` in ``0..3``, encoded in one 4-bit nibble ``i0 | (i1 << 2)``.
    Eight nibbles share one ``int32`` word: group ``g`` lives at bits ``4 * (g % 8)`` of word
    ``g // 8``, so ``meta`` is ``int32 [N, ceil(G / 8)]`` (1/8 byte per dense element).
    ``values[n, 2 * g + j]`` is the weight at column ``4 * g + i_j``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ._checks import FLOAT_DTYPES, check_tensor

FORMAT_VERSION = "1"
_INT32_LIMIT = 2 ** 31 - 1


# ----------------------------------------------------------------------------------------
# bit packing helpers (plain torch; the kernels decode the same layout in registers)
# ----------------------------------------------------------------------------------------
def _to_int32_words(words64: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values below 2**32 as int32 (two's complement)."""
    return torch.where(words64 >= 2 ** 31, words64 - 2 ** 32, words64).to(torch.int32)


_CHUNK_ELEMS = 1 << 21  # int64 temporaries of one row chunk stay near 16 MB, whatever the weight


def _row_chunks(n: int, elems_per_row: int, chunk_elems: int | None = None):
    """Row slices of ``[0, n)`` holding about ``chunk_elems`` (default ``_CHUNK_ELEMS``) elements.

    The packing helpers below widen to int64 for exact bit arithmetic; done on a whole
    ``[N, K]`` weight that is 8 bytes per weight (92 MB for one 4096 x 11008 matrix), which
    would dominate the peak memory of block-by-block recovery. Chunking bounds it (the CPU
    backward of ``ops.sparse24_linear`` uses the same slicing for its row blocks).
    """
    step = max(1, (chunk_elems or _CHUNK_ELEMS) // max(1, elems_per_row))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[N, K]`` -> int32 ``[N, ceil(K / 32)]`` (bit ``k % 32`` of word ``k // 32``)."""
    check_tensor(mask, "mask", dtypes=(torch.bool,), ndim=2)
    n, k = mask.shape
    words = (k + 31) // 32
    out = torch.empty(n, words, dtype=torch.int32, device=mask.device)
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    for rows in _row_chunks(n, words * 32):
        part = mask[rows]
        padded = torch.zeros(part.shape[0], words * 32, dtype=torch.int64, device=mask.device)
        padded[:, :k] = part
        out[rows] = _to_int32_words((padded.view(-1, words, 32) << shifts).sum(-1))
    return out


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[N, W]`` -> bool ``[N, k]``; inverse of :func:`pack_bits`."""
    check_tensor(words, "words", dtypes=(torch.int32,), ndim=2)
    if words.shape[1] * 32 < k:
        raise ValueError(f"{words.shape[1]} words per row hold {words.shape[1] * 32} bits, fewer than k={k}")
    n = words.shape[0]
    # int32 shifts (arithmetic: the sign bits they bring in are masked off by & 1), no int64 copy;
    # one chunk (most weights) without the extra output copy: 1.4-3x faster than via int64
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    chunks = list(_row_chunks(n, words.shape[1] * 32))
    if len(chunks) == 1:
        return ((words.unsqueeze(-1) >> shifts) & 1).reshape(n, -1)[:, :k].bool()
    out = torch.empty(n, k, dtype=torch.bool, device=words.device)
    for rows in chunks:
        bits = (words[rows].unsqueeze(-1) >> shifts) & 1
        out[rows] = bits.reshape(bits.shape[0], -1)[:, :k]
    return out


def _check_weight_2d(w: torch.Tensor, name: str) -> None:
    check_tensor(w, name, dtypes=FLOAT_DTYPES, ndim=2)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(w.shape)}")
    check_finite(w, name)


def check_finite(w: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` and the first (row-major) NaN / inf entry of ``w``.

    The package's contract: packed formats never hold non-finite weights. A NaN has no magnitude to
    rank (2:4 selection would keep or drop it depending on its position in the group) and a packed
    NaN poisons every output row it touches, so it is refused wherever a weight gets packed.
    """
    finite = torch.isfinite(w.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise ValueError(f"{name} holds {count} non-finite value(s) (first: {w[tuple(bad)].item()} at index "
                         f"{tuple(bad)}); packed weights must be finite: fix or re-prune the weight")


def _save(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a safetensors file atomically (``_atomic.atomic_file``: temporary, fsync, rename)."""
    from safetensors.torch import save_file

    from ._atomic import atomic_file

    path = os.fspath(path)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}  # before the temporary exists
    with atomic_file(path) as tmp:
        save_file(cpu, tmp, metadata=metadata)


def _load(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Every tensor and the metadata of a safetensors file; errors name the file and the problem."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; expected a safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file ({exc})") from None
    return tensors, meta


class _Packed:
    """Shared save/load plumbing; subclasses define ``FORMAT``, ``to_tensors``, ``_from_tensors``."""

    FORMAT = ""
    _TENSORS: Tuple[str, ...] = ()
    shape: Tuple[int, int]

    def metadata(self) -> Dict[str, str]:
        return {"format": self.FORMAT, "version": FORMAT_VERSION, "shape": json.dumps(list(self.shape)),
                **self._extra_metadata()}

    def _extra_metadata(self) -> Dict[str, str]:
        return {}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]):
        """Rebuild from :meth:`to_tensors` / :meth:`metadata` output, validating the layout."""
        if metadata.get("format") != cls.FORMAT:
            raise ValueError(f"expected format {cls.FORMAT!r}, found {metadata.get('format')!r}")
        try:
            shape = tuple(int(s) for s in json.loads(metadata["shape"]))
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"not two positive sizes: {shape}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{cls.__name__}: metadata 'shape' is missing or bad "
                             f"({metadata.get('shape')!r}: {exc})") from None
        missing = sorted(set(cls._TENSORS) - set(tensors))
        if missing:
            raise ValueError(f"{cls.__name__}: tensor(s) {missing} missing (found {sorted(tensors)})")
        obj = cls._from_tensors(tensors, shape, metadata)
        obj.validate()
        return obj

    def save(self, path: str) -> None:
        """Save to one safetensors file (written atomically)."""
        _save(path, self.to_tensors(), self.metadata())

    @classmethod
    def load(cls, path: str):
        """Read a file written by :meth:`save`. Any problem (not a file, not safetensors, another
        format, a missing tensor, a wrong dtype or shape) raises an error naming ``path``."""
        tensors, meta = _load(path)
        try:
            return cls.from_tensors(tensors, meta)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{os.fspath(path)!r}: {exc}") from None

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor together."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.to_tensors().values())).device


# ----------------------------------------------------------------------------------------
@dataclass
class PackedMask(_Packed):
    """A fixed sparsity mask stored with 1 bit per weight.

    bits: int32 ``[N, ceil(K / 32)]`` (layout in the module docstring); shape: ``(N, K)``.
    """

    bits: torch.Tensor
    shape: Tuple[int, int]
    FORMAT = "laco.packed_mask"
    _TENSORS = ("bits",)

    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> "PackedMask":
        """bool ``[N, K]`` (True = weight kept) -> PackedMask."""
        check_tensor(mask, "mask", dtypes=(torch.bool,), ndim=2)
        return cls(pack_bits(mask), tuple(mask.shape))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "PackedMask":
        """Mask of the nonzero entries of a pruned weight ``[N, K]``."""
        _check_weight_2d(weight, "weight")
        return cls.from_bool(weight != 0)

    def to_bool(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape[1])

    def density(self) -> float:
        return self.to_bool().float().mean().item()

    def to(self, device) -> "PackedMask":
        return PackedMask(self.bits.to(device), self.shape)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {"bits": self.bits}

    @classmethod
    def _from_tensors(cls, t, shape, meta):
        return cls(t["bits"], shape)

    def validate(self) -> None:
        n, k = self.shape
        check_tensor(self.bits, "PackedMask.bits", dtypes=(torch.int32,), ndim=2)
        if tuple(self.bits.shape) != (n, (k + 31) // 32):
            raise ValueError(f"PackedMask.bits has shape {tuple(self.bits.shape)}, expected {(n, (k + 31) // 32)}")


# ----------------------------------------------------------------------------------------
@dataclass
class Sparse24Weight(_Packed):
    """A 2:4 semi-structured weight: two kept values in every group of 4 along K.

    values: ``[N, K / 2]`` in the weight's dtype; meta: int32 ``[N, ceil(K / 32)]``
    (layout in the module docstring); shape: ``(N, K)`` with ``K % 4 == 0``.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: Tuple[int, int]
    FORMAT = "laco.sparse24"
    _TENSORS = ("values", "meta")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, prune: bool = False) -> "Sparse24Weight":
        """Pack a dense ``[N, K]`` weight.

        prune=False: every group of 4 along K must hold at most 2 nonzeros (else ValueError
        naming the first offending row and columns). prune=True: keep the 2 largest
        magnitudes of each group (ties go to the lower column).
        """
        _check_weight_2d(weight, "weight")
        n, k = weight.shape
        if k % 4:
            raise ValueError(f"2:4 needs in_features divisible by 4, got weight of shape {(n, k)}")
        groups = weight.detach().reshape(n, k // 4, 4)
        values = torch.empty(n, k // 2, dtype=weight.dtype, device=weight.device)
        meta = torch.empty(n, (k // 4 + 7) // 8, dtype=torch.int32, device=weight.device)
        for rows in _row_chunks(n, 2 * k):  # sort indices are int64: bound them (see _row_chunks)
            part = groups[rows]
            nonzero = part != 0
            if not prune:
                bad = nonzero.sum(-1) > 2
                if bad.any():
                    r, g = (int(i) for i in bad.nonzero()[0])
                    cnt = int(nonzero[r, g].sum())
                    raise ValueError(f"weight is not 2:4 sparse: row {rows.start + r}, columns {4 * g}..{4 * g + 3} "
                                     f"hold {cnt} nonzeros (at most 2 allowed); pass prune=True to keep the 2 largest")
                score = nonzero.to(torch.float32)
            else:
                score = part.abs().to(torch.float32)
            keep = _top2_of_4(score)
            # kept positions in row-major order are the values' order (i0 < i1)
            values[rows] = part.masked_select(keep).reshape(-1, k // 2)
            # int32: torch's int64 amin / amax over a trailing dimension of 4 are 5-25x slower
            pos = torch.arange(4, device=weight.device, dtype=torch.int32)
            i0 = torch.where(keep, pos, 4).amin(-1)
            i1 = torch.where(keep, pos, -1).amax(-1)
            meta[rows] = _encode_meta(torch.stack([i0, i1], -1))
        return cls(values, meta, (n, k))

    def indices(self) -> torch.Tensor:
        """int64 ``[N, K / 4, 2]``: the kept column offsets ``(i0, i1)`` inside each group."""
        return _decode_meta(self.meta, self.shape[1] // 4)

    def row_block(self, rows: slice, values: torch.Tensor | None = None) -> "Sparse24Weight":
        """Rows ``rows`` of this weight (views, no copy); ``values`` overrides ``self.values``."""
        v = self.values if values is None else values
        return Sparse24Weight(v[rows], self.meta[rows], (len(range(self.shape[0])[rows]), self.shape[1]))

    def mask(self) -> torch.Tensor:
        """bool ``[N, K]``: True at the kept positions (exactly two per group of 4)."""
        n, k = self.shape
        out = torch.empty(n, k // 4, 4, dtype=torch.bool, device=self.meta.device)
        cols = torch.arange(4, device=self.meta.device, dtype=torch.int64)
        for rows in _row_chunks(n, k):
            idx = _decode_meta(self.meta[rows], k // 4)
            out[rows] = (idx[..., :1] == cols) | (idx[..., 1:] == cols)
        return out.reshape(n, k)

    def to_dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ``[N, K]`` weight; differentiable with respect to ``values`` (default ``self.values``).

        ``values`` in row-major order are the kept positions in row-major order (``i0 < i1``), so a
        masked scatter places them; unlike an index scatter it needs no int64 ``[N, K/2]`` index.
        """
        v = self.values if values is None else values
        dense = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        return dense.masked_scatter(self.mask(), v.reshape(-1))

    def to(self, device=None, dtype=None) -> "Sparse24Weight":
        return Sparse24Weight(self.values.to(device=device, dtype=dtype), self.meta.to(device), self.shape)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.meta}

    @classmethod
    def _from_tensors(cls, t, shape, meta):
        return cls(t["values"], t["meta"], shape)

    def validate(self) -> None:
        n, k = self.shape
        if k % 4:
            raise ValueError(f"Sparse24Weight shape {self.shape}: K must be divisible by 4")
        check_tensor(self.values, "Sparse24Weight.values", dtypes=FLOAT_DTYPES, ndim=2)
        check_tensor(self.meta, "Sparse24Weight.meta", dtypes=(torch.int32,), ndim=2)
        if tuple(self.values.shape) != (n, k // 2):
            raise ValueError(f"Sparse24Weight.values has shape {tuple(self.values.shape)}, expected {(n, k // 2)}")
        if tuple(self.meta.shape) != (n, (k // 4 + 7) // 8):
            raise ValueError(f"Sparse24Weight.meta has shape {tuple(self.meta.shape)}, expected {(n, (k // 4 + 7) // 8)}")
        for rows in _row_chunks(n, k):
            idx = _decode_meta(self.meta[rows], k // 4)
            if not bool((idx[..., 0] < idx[..., 1]).all()):
                raise ValueError("Sparse24Weight.meta is corrupt: some group does not encode two distinct "
                                 "sorted positions")


def _top2_of_4(score: torch.Tensor) -> torch.Tensor:
    """bool ``[..., 4]``: the two largest of each group of 4, ties to the lower position.

    Element j is kept when fewer than two others beat it (``s_i > s_j``, or ``s_i == s_j`` with
    ``i < j``): the choice of a stable descending sort, from the 6 pairwise comparisons (a sort
    over a trailing dimension of 4 is slow on the CPU).
    """
    s0, s1, s2, s3 = score.unbind(-1)
    c01, c02, c03 = s0 >= s1, s0 >= s2, s0 >= s3  # True: the lower position wins
    c12, c13, c23 = s1 >= s2, s1 >= s3, s2 >= s3
    u8 = torch.uint8
    losses = torch.stack([(~c01).to(u8) + (~c02).to(u8) + (~c03).to(u8),
                          c01.to(u8) + (~c12).to(u8) + (~c13).to(u8),
                          c02.to(u8) + c12.to(u8) + (~c23).to(u8),
                          c03.to(u8) + c13.to(u8) + c23.to(u8)], -1)
    return losses < 2


def _encode_meta(idx: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, G, 2]`` positions -> int32 ``[N, ceil(G / 8)]`` nibble words."""
    n, g, _ = idx.shape
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int64)
    words = (g + 7) // 8
    padded = torch.zeros(n, words * 8, dtype=torch.int64, device=idx.device)
    padded[:, :g] = nib
    shifts = 4 * torch.arange(8, device=idx.device, dtype=torch.int64)
    return _to_int32_words((padded.view(n, words, 8) << shifts).sum(-1))


def _decode_meta(meta: torch.Tensor, groups: int) -> torch.Tensor:
    shifts = 4 * torch.arange(8, device=meta.device, dtype=torch.int64)
    nib = ((meta.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(meta.shape[0], -1)[:, :groups]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)


# ----------------------------------------------------------------------------------------
@dataclass
class BitmapWeight(_Packed):
    """An unstructured sparse weight: occupancy bitmap, packed nonzeros, per-tile offsets.

    A tile is ``tile_k`` consecutive columns of one row (``tile_k`` a multiple of 32).
    values: ``[nnz]`` in the weight's dtype, the nonzeros in row-major order;
    bitmap: int32 ``[N, ceil(K / 32)]`` (layout in the module docstring);
    offsets: int32 ``[N, ceil(K / tile_k)]``, index in ``values`` of each tile's first nonzero;
    shape: ``(N, K)``. A kernel that owns a tile finds an element's value at
    ``offsets[n, t] + popcount(bits of the tile before it)``.
    """

    values: torch.Tensor
    bitmap: torch.Tensor
    offsets: torch.Tensor
    shape: Tuple[int, int]
    tile_k: int = 128
    FORMAT = "laco.bitmap"
    _TENSORS = ("values", "bitmap", "offsets")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, tile_k: int = 128) -> "BitmapWeight":
        """Pack the nonzeros of a dense ``[N, K]`` weight (any sparsity)."""
        _check_weight_2d(weight, "weight")
        if tile_k <= 0 or tile_k % 32:
            raise ValueError(f"tile_k must be a positive multiple of 32, got {tile_k}")
        n, k = weight.shape
        w = weight.detach()
        mask = w != 0
        nnz = int(mask.sum())
        if nnz > _INT32_LIMIT:
            raise ValueError(f"{nnz} nonzeros exceed the int32 offsets of BitmapWeight")
        tiles = (k + tile_k - 1) // tile_k
        padded = torch.zeros(n, tiles * tile_k, dtype=torch.int64, device=w.device)
        padded[:, :k] = mask.to(torch.int64)
        counts = padded.view(n, tiles, tile_k).sum(-1).flatten()
        offsets = (torch.cumsum(counts, 0) - counts).view(n, tiles).to(torch.int32)
        return cls(w[mask].contiguous(), pack_bits(mask), offsets, (n, k), tile_k)

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmap, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.masked_scatter(self.mask(), self.values)

    def density(self) -> float:
        return self.values.numel() / (self.shape[0] * self.shape[1])

    def to(self, device=None, dtype=None) -> "BitmapWeight":
        return BitmapWeight(self.values.to(device=device, dtype=dtype), self.bitmap.to(device),
                            self.offsets.to(device), self.shape, self.tile_k)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {"values": self.values, "bitmap": self.bitmap, "offsets": self.offsets}

    def _extra_metadata(self) -> Dict[str, str]:
        return {"tile_k": str(self.tile_k)}

    @classmethod
    def _from_tensors(cls, t, shape, meta):
        return cls(t["values"], t["bitmap"], t["offsets"], shape, int(meta.get("tile_k", 128)))

    def validate(self) -> None:
        n, k = self.shape
        check_tensor(self.values, "BitmapWeight.values", dtypes=FLOAT_DTYPES, ndim=1)
        check_tensor(self.bitmap, "BitmapWeight.bitmap", dtypes=(torch.int32,), ndim=2)
        check_tensor(self.offsets, "BitmapWeight.offsets", dtypes=(torch.int32,), ndim=2)
        if self.tile_k <= 0 or self.tile_k % 32:
            raise ValueError(f"BitmapWeight.tile_k must be a positive multiple of 32, got {self.tile_k}")
        tiles = (k + self.tile_k - 1) // self.tile_k
        if tuple(self.bitmap.shape) != (n, (k + 31) // 32):
            raise ValueError(f"BitmapWeight.bitmap has shape {tuple(self.bitmap.shape)}, expected {(n, (k + 31) // 32)}")
        if tuple(self.offsets.shape) != (n, tiles):
            raise ValueError(f"BitmapWeight.offsets has shape {tuple(self.offsets.shape)}, expected {(n, tiles)}")
        mask = self.mask()
        if int(mask.sum()) != self.values.numel():
            raise ValueError(f"BitmapWeight: bitmap has {int(mask.sum())} set bits but values holds {self.values.numel()}")
        padded = torch.zeros(n, tiles * self.tile_k, dtype=torch.int64, device=mask.device)
        padded[:, :k] = mask.to(torch.int64)
        counts = padded.view(n, tiles, self.tile_k).sum(-1).flatten()
        expect = (torch.cumsum(counts, 0) - counts).view(n, tiles)
        if not torch.equal(expect, self.offsets.to(torch.int64)):
            raise ValueError("BitmapWeight.offsets do not match the bitmap")
