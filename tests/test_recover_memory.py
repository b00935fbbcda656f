"""Memory that does not grow with the model: recover a Llama from disk whose fp32 weights are more
than twice the peak memory the recovery process uses.

What is measured: in a fresh subprocess, the kernel's high-water mark of the resident set
(``VmHWM``, reset to the current resident set right after the imports and the calibration tensor
via /proc/self/clear_refs) minus that baseline: every byte the recovery held at once (weights,
gradients, AdamW state, streams, file pages it mapped), exactly. (``ru_maxrss`` would not do: a
child inherits its parent's high-water mark across fork + exec, and pytest is large.) glibc is asked
not to keep freed large buffers in its heap (MALLOC_MMAP_THRESHOLD_), so freed blocks are
returned to the system as they would be under memory pressure.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from _recover_util import one_thread, prune_blocks, tiny_llama
from safetensors import safe_open

WORKER = os.path.join(os.path.dirname(__file__), "_recover_worker.py")
_threads = pytest.fixture(autouse=True)(one_thread)


def _recover_in_subprocess(tmp_path):
    """Recover tmp_path/pruned toward tmp_path/dense from disk in a fresh process; its JSON stats."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, WORKER, "memory", str(tmp_path / "dense"), str(tmp_path / "pruned"),
                          str(tmp_path / "out"), str(tmp_path / "streams")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_model_larger_than_twice_peak_memory(tmp_path):
    model = tiny_llama(layers=40, hidden=256, inter=1024, vocab=1000)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(tmp_path / "dense")
    prune_blocks(model, "2:4")
    model.save_pretrained(tmp_path / "pruned")
    del model
    stats = _recover_in_subprocess(tmp_path)
    print(f"fp32 weights {weight_bytes / 2**20:.1f} MiB, peak above baseline "
          f"{stats['peak_above_baseline'] / 2**20:.1f} MiB")
    assert stats["blocks"] == 40
    assert weight_bytes > 2 * stats["peak_above_baseline"], stats
    # the recovered folder is complete and kept the 2:4 mask
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))["weight_map"]
    key = "model.layers.39.mlp.down_proj.weight"
    with safe_open(tmp_path / "out" / index[key], "pt") as f:
        w = f.get_tensor(key)
    assert int(((w.view(w.shape[0], -1, 4) != 0).sum(-1) > 2).sum()) == 0
    assert len(index) == sum(1 for _ in tiny_llama(layers=40, hidden=256, inter=1024, vocab=1000).state_dict())


def test_embedding_and_head_are_never_held_whole(tmp_path):
    """A model whose embedding and output head dwarf its blocks: the recovery reads only the
    embedding rows the calibration tokens use and copies the unchanged head and embedding into
    the output folder without holding either in memory; the copies are bit-exact."""
    model = tiny_llama(layers=2, hidden=256, inter=512, vocab=128000)
    embed_bytes = model.model.embed_tokens.weight.numel() * 4
    model.save_pretrained(tmp_path / "dense")
    prune_blocks(model, "2:4")
    model.save_pretrained(tmp_path / "pruned")
    embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    del model
    stats = _recover_in_subprocess(tmp_path)
    print(f"embedding {embed_bytes / 2**20:.1f} MiB, peak above baseline {stats['peak_above_baseline'] / 2**20:.1f} MiB")
    assert stats["peak_above_baseline"] < embed_bytes / 2, stats
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))["weight_map"]
    for key, ref in (("model.embed_tokens.weight", embed), ("lm_head.weight", head)):
        with safe_open(tmp_path / "out" / index[key], "pt") as f:
            assert torch.equal(f.get_tensor(key), ref), key
