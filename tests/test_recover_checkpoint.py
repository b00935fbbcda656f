"""recover/_checkpoint.py: the atomic writers of recovery checkpoints and outputs under injected faults.

Each writer is made to fail at each of its steps (the safetensors writer, the JSON writer, a
source cut short mid-copy, the fsync, the rename): the target must hold the old complete file
or nothing, and no temporary may be left.
"""
import json
import os

import pytest
import safetensors.torch
import torch
from _faults import InjectedFault, inject, leftovers, snapshot

from laco_kernels.recover import _checkpoint
from laco_kernels.recover._checkpoint import atomic_copy_tensors, atomic_save_json, atomic_save_tensors

FAULTS = [("fsync", 1), ("replace", 1)]


def _fault(monkeypatch, name, n):
    inject(monkeypatch, os, name, n)


def _arm(monkeypatch, fault, module, own_name):
    """Inject ``fault``: the writer's own call (``module.own_name``) or one of the shared FAULTS."""
    if fault[0] == own_name:
        inject(monkeypatch, module, own_name, fault[1])
    else:
        _fault(monkeypatch, *fault)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fault", FAULTS + [("save_file", 1)])
def test_atomic_save_tensors_fault(tmp_path, monkeypatch, existing, fault):
    path = str(tmp_path / "block.safetensors")
    if existing:
        atomic_save_tensors(path, {"w": torch.ones(3)})
    before = snapshot(path)
    _arm(monkeypatch, fault, _checkpoint, "save_file")
    with pytest.raises(InjectedFault):
        atomic_save_tensors(path, {"w": torch.zeros(3), "v": torch.randn(2, 2)})
    monkeypatch.undo()
    assert snapshot(path) == before and leftovers(tmp_path) == []
    if existing:
        assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(3))


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fault", FAULTS + [("dump", 1)])
def test_atomic_save_json_fault(tmp_path, monkeypatch, existing, fault):
    path = str(tmp_path / "progress.json")
    if existing:
        atomic_save_json(path, {"finished": 1})
    before = snapshot(path)
    _arm(monkeypatch, fault, json, "dump")
    with pytest.raises(InjectedFault):
        atomic_save_json(path, {"finished": 2})
    monkeypatch.undo()
    assert snapshot(path) == before and leftovers(tmp_path) == []
    if existing:
        assert json.load(open(path)) == {"finished": 1}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fault", FAULTS + [("truncated", 0)])
def test_atomic_copy_tensors_fault(tmp_path, monkeypatch, existing, fault):
    src = str(tmp_path / "src.safetensors")
    safetensors.torch.save_file({"a": torch.randn(64, 64), "b": torch.arange(10.0)}, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = str(out_dir / "rest.safetensors")
    if existing:
        atomic_copy_tensors(path, {"b": src})
    before = snapshot(path)
    if fault[0] == "truncated":  # the source ends before its header says: fails mid-file
        with open(src, "r+b") as f:
            f.truncate(os.path.getsize(src) - 100)
        with pytest.raises(IOError, match="ends before its header says"):
            atomic_copy_tensors(path, {"a": src, "b": src}, chunk=1024)
    else:
        _fault(monkeypatch, *fault)
        with pytest.raises(InjectedFault):
            atomic_copy_tensors(path, {"a": src, "b": src}, chunk=1024)
    monkeypatch.undo()
    assert snapshot(path) == before and leftovers(out_dir) == []
    if existing:
        assert torch.equal(safetensors.torch.load_file(path)["b"], torch.arange(10.0))


def test_atomic_copy_round_trip(tmp_path):
    src = str(tmp_path / "src.safetensors")
    t = {"a": torch.randn(33, 7), "b": torch.arange(5, dtype=torch.int32)}
    safetensors.torch.save_file(t, src)
    atomic_copy_tensors(str(tmp_path / "c.safetensors"), {"a": src, "b": src}, chunk=64)
    back = safetensors.torch.load_file(str(tmp_path / "c.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in t.items())
