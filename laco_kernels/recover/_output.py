"""The recovered model of a layer-wise run on disk: a loadable Hugging Face folder, written atomically."""
from __future__ import annotations

import os
import shutil
from typing import Dict

from .._atomic import atomic_folder
from ._checkpoint import RecoveryCheckpoint, atomic_copy_tensors, atomic_save_json, atomic_save_tensors
from ._source import DiskSource


def write_folder(psrc: DiskSource, ckpt: RecoveryCheckpoint, out: str) -> None:
    """A loadable Hugging Face folder: one safetensors shard per block plus the rest, and an index.

    Written whole into a sibling folder and swapped in (``_atomic.atomic_folder``): ``out`` holds the
    previous complete folder until the new one is complete. A checkpoint inside ``out`` (the default
    ``out/_checkpoint``) is carried over by hard links, so a failed swap cannot lose it.
    """
    ck_inside = os.path.abspath(ckpt.dir).startswith(os.path.abspath(out) + os.sep)
    with atomic_folder(out) as tmp:
        for name in os.listdir(psrc.folder):
            if not name.endswith(".safetensors") and name != "model.safetensors.index.json" \
                    and os.path.isfile(os.path.join(psrc.folder, name)):
                shutil.copyfile(os.path.join(psrc.folder, name), os.path.join(tmp, name))
        weight_map: Dict[str, str] = {}
        rest_keys = [k for k in psrc.wmap if not k.startswith(psrc.prefix)]
        # unchanged tensors are copied byte by byte: never a whole embedding or head in memory
        atomic_copy_tensors(os.path.join(tmp, "model-rest.safetensors"), {k: psrc.wmap[k] for k in rest_keys})
        weight_map.update({k: "model-rest.safetensors" for k in rest_keys})
        for l in range(psrc.n_blocks):
            name = f"model-block-{l:05d}.safetensors"
            state = {f"{psrc.prefix}{l}.{k}": v for k, v in ckpt.load_block(l).items()}
            atomic_save_tensors(os.path.join(tmp, name), state)
            weight_map.update({k: name for k in state})
            del state
        atomic_save_json(os.path.join(tmp, "model.safetensors.index.json"),
                         {"metadata": {"format": "pt"}, "weight_map": weight_map})
        if ck_inside:
            _link_tree(ckpt.dir, os.path.join(tmp, os.path.relpath(ckpt.dir, out)))


def _link_tree(src: str, dst: str) -> None:
    """Hard-link every file of ``src`` under ``dst`` (copy where links are refused)."""
    for dirpath, _dirs, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(target, exist_ok=True)
        for f in files:
            try:
                os.link(os.path.join(dirpath, f), os.path.join(target, f))
            except OSError:
                shutil.copy2(os.path.join(dirpath, f), os.path.join(target, f))
