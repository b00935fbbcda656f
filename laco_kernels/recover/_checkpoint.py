"""Atomic, resumable checkpoints of a block-by-block recovery.

Layout of ``checkpoint_dir`` (every file written through ``_atomic.atomic_file``: a temporary,
fsynced, then renamed, so a reader sees either the old complete file or the new complete one,
never a torn write, and a failed write leaves no temporary):

- ``block_00007.safetensors``: the recovered weights of block 7 (its state dict, densified);
- ``streams_00007_rank0.safetensors``: the streams leaving block 7 (``pruned`` and, for the
  dense-stream target, ``dense``), one file per data-parallel rank (each rank holds its shard);
- ``progress.json``: written last; ``finished`` = number of blocks whose files above are complete,
  ``fingerprint`` = the arguments the run was started with (a resume with other arguments raises).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from .._atomic import atomic_file

PROGRESS = "progress.json"


def atomic_save_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """safetensors file written to a temporary, flushed to disk, then renamed over ``path``."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(cpu, tmp, metadata={"format": "pt"})


def _header(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    head["__data_start__"] = 8 + n
    return head


def atomic_copy_tensors(path: str, sources: Dict[str, str], chunk: int = 4 << 20) -> None:
    """Write the tensors ``sources`` (name -> safetensors file holding it) into one new
    safetensors file at ``path``, copying their bytes in ``chunk``-sized pieces.

    Used for tensors a recovery never changes (embeddings, output head): ``save_file`` would need
    each of them whole in memory (262 MB for a 32k x 2048 fp32 head), this needs one chunk. The
    layout written is the safetensors format (8-byte little-endian header size, JSON header with
    ``dtype``/``shape``/``data_offsets``, padded with spaces to 8 bytes, then the data); files are
    read back with ``safetensors`` only.
    """
    heads: Dict[str, Dict[str, Any]] = {}
    entries, plan, off = {}, [], 0
    for name in sorted(sources):
        src = sources[name]
        h = heads.setdefault(src, _header(src))
        if name not in h:
            raise KeyError(f"{src!r} holds no tensor {name!r}")
        b, e = h[name]["data_offsets"]
        entries[name] = {"dtype": h[name]["dtype"], "shape": h[name]["shape"], "data_offsets": [off, off + e - b]}
        plan.append((src, h["__data_start__"] + b, e - b))
        off += e - b
    head = json.dumps(dict(entries, __metadata__={"format": "pt"}), separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    buf = memoryview(bytearray(chunk))  # one reused buffer: a fresh bytes object per read would pile up
    with atomic_file(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head)
        for src, start, size in plan:
            with open(src, "rb", buffering=0) as f:
                f.seek(start)
                while size:
                    got = f.readinto(buf[:min(chunk, size)])
                    if not got:
                        raise IOError(f"{src!r} ends before its header says")
                    out.write(buf[:got])
                    size -= got


def atomic_save_json(path: str, obj: Any) -> None:
    """JSON written to a temporary, flushed to disk, then renamed over ``path``."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (identifies the calibration set in the fingerprint)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class RecoveryCheckpoint:
    """Reads and writes one recovery run's checkpoint directory (see the module docstring)."""

    def __init__(self, directory: str, fingerprint: Dict[str, Any]):
        self.dir = directory
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        os.makedirs(directory, exist_ok=True)

    def block_path(self, l: int) -> str:
        return os.path.join(self.dir, f"block_{l:05d}.safetensors")

    def streams_path(self, l: int, rank: int) -> str:
        return os.path.join(self.dir, f"streams_{l:05d}_rank{rank}.safetensors")

    def load_progress(self) -> Optional[Dict[str, Any]]:
        """The progress record, or None for a fresh directory; ValueError if the arguments differ."""
        p = os.path.join(self.dir, PROGRESS)
        if not os.path.exists(p):
            return None
        with open(p) as f:
            prog = json.load(f)
        if prog.get("fingerprint") != self.fingerprint:
            diff = sorted(k for k in set(prog.get("fingerprint", {})) | set(self.fingerprint)
                          if prog.get("fingerprint", {}).get(k) != self.fingerprint.get(k))
            raise ValueError(f"checkpoint_dir {self.dir!r} belongs to a run with other arguments "
                             f"(differing: {diff}); use a fresh directory or the same arguments")
        return prog

    def save_block(self, l: int, state: Dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(self.block_path(l), state)

    def load_block(self, l: int) -> Dict[str, torch.Tensor]:
        return load_file(self.block_path(l))

    def save_streams(self, l: int, rank: int, streams: Dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(self.streams_path(l, rank), streams)

    def load_streams(self, l: int, rank: int) -> Dict[str, torch.Tensor]:
        return load_file(self.streams_path(l, rank))

    def commit(self, finished: int, record: Dict[str, Any]) -> None:
        """Mark blocks ``< finished`` done (the commit point: written after their files)."""
        atomic_save_json(os.path.join(self.dir, PROGRESS), dict(record, finished=finished,
                                                                fingerprint=self.fingerprint))

    def cleanup(self, finished: int, rank: int = 0) -> None:
        """After a commit: drop the streams of the block before the last finished one."""
        if finished >= 2:
            old = self.streams_path(finished - 2, rank)
            if os.path.exists(old):
                os.remove(old)
