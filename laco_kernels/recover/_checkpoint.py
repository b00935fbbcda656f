"""Atomic, resumable checkpoints of a block-by-block recovery.

Layout of ``checkpoint_dir`` (every file written to a temporary name, then ``os.replace``d, so a
reader sees either the old complete file or the new complete one, never a torn write):

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
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

PROGRESS = "progress.json"


def atomic_save_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """safetensors file written to ``path + .tmp`` then renamed over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def atomic_save_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
