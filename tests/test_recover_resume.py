"""Crash safety: a recovery killed mid-block resumes from its checkpoint and ends bit-identical."""
import json
import os
import subprocess
import sys

import pytest
import torch
from _recover_util import dense_and_pruned, one_thread
from safetensors.torch import load_file

from laco_kernels.recover import layerwise

WORKER = os.path.join(os.path.dirname(__file__), "_recover_worker.py")
_threads = pytest.fixture(autouse=True)(one_thread)


def _run(out, ckpt=None, env=None):
    cmd = [sys.executable, WORKER, "run", str(out)] + (["--ckpt", str(ckpt)] if ckpt else [])
    return subprocess.run(cmd, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_bit_exact(tmp_path):
    ref = _run(tmp_path / "ref.safetensors")
    assert ref.returncode == 0, ref.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    # dies (os._exit, no cleanup, like a kill) at optimizer step 3 of block 2, after blocks 0-1 were saved
    crashed = _run(tmp_path / "x.safetensors", ckpt, {"_LACO_CRASH_AT": "2:3"})
    assert crashed.returncode == 86, crashed.stderr[-2000:]
    assert not (tmp_path / "x.safetensors").exists()
    with open(ckpt / "progress.json") as f:
        assert json.load(f)["finished"] == 2
    resumed = _run(tmp_path / "resumed.safetensors", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(tmp_path / "resumed.safetensors.json") as f:
        assert json.load(f)["resumed_from"] == 2
    a, b = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    with open(tmp_path / "ref.safetensors.json") as f, open(tmp_path / "resumed.safetensors.json") as g:
        strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]
        assert strip(json.load(f)["blocks"]) == strip(json.load(g)["blocks"])


def test_checkpoint_of_other_arguments_is_refused(tmp_path):
    dense, pruned = dense_and_pruned("2:4", layers=1)
    ids = torch.randint(0, 100, (2, 8))
    layerwise(dense, pruned, ids, epochs=1, checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="other arguments.*lr"):
        layerwise(dense, pruned, ids, epochs=1, lr=1e-3, checkpoint_dir=str(tmp_path), progress=False)
    done = layerwise(dense, pruned, ids, epochs=1, checkpoint_dir=str(tmp_path), progress=False)
    assert done.resumed_from == 1 and len(done.blocks) == 1  # a finished run is not redone


def test_atomic_copy_tensors_is_bit_exact(tmp_path):
    """Tensors streamed from several safetensors files into one new file read back equal (any dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from laco_kernels.recover._checkpoint import atomic_copy_tensors

    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(33, 7, generator=g), "y": torch.randn(5, generator=g).to(torch.bfloat16)}
    b = {"z": torch.randint(-9, 9, (3, 4, 5), generator=g, dtype=torch.int32), "skip": torch.zeros(2)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    src = {"x.weight": str(tmp_path / "a.safetensors"), "y": str(tmp_path / "a.safetensors"),
           "z": str(tmp_path / "b.safetensors")}
    atomic_copy_tensors(str(tmp_path / "out.safetensors"), src, chunk=64)  # tiny chunks: many pieces
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["x.weight", "y", "z"]
        for k in ("x.weight", "y"):
            assert torch.equal(f.get_tensor(k), a[k]) and f.get_tensor(k).dtype == a[k].dtype
        assert torch.equal(f.get_tensor("z"), b["z"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    with pytest.raises(KeyError, match="holds no tensor"):
        atomic_copy_tensors(str(tmp_path / "bad.safetensors"), {"nope": str(tmp_path / "a.safetensors")})
