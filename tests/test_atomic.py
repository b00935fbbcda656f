"""Atomic file and folder writers: old artefact whole or new one complete, never a temporary left."""
import os

import pytest

from laco_kernels._atomic import atomic_file, atomic_folder, stale_temporaries


def _listing(d):
    return sorted(os.listdir(d))


def test_atomic_file_replaces_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with atomic_file(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert target.read_bytes() == b"new"
    assert _listing(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_file_failure_keeps_old(tmp_path, existing):
    target = tmp_path / "a.bin"
    if existing:
        target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == (["a.bin"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old"


def test_atomic_file_refuses_folder_and_missing_parent(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with atomic_file(str(tmp_path)):
            pass
    with pytest.raises(FileNotFoundError, match="parent folder"):
        with atomic_file(str(tmp_path / "no" / "x.bin")):
            pass
    with pytest.raises(RuntimeError, match="did not create"):
        with atomic_file(str(tmp_path / "x.bin")):
            pass
    assert _listing(tmp_path) == []


def _fill(folder, files):
    for name, data in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(data)


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_folder_swaps_whole(tmp_path, existing):
    target = tmp_path / "ckpt"
    if existing:
        target.mkdir()
        _fill(target, {"a": "old", "stale": "x"})
    with atomic_folder(str(target)) as tmp:
        _fill(tmp, {"a": "new", "b": "new"})
        if existing:
            assert (target / "a").read_text() == "old"
    assert _listing(target) == ["a", "b"]
    assert (target / "a").read_text() == "new"
    assert _listing(tmp_path) == ["ckpt"]
    assert stale_temporaries(str(target)) == []


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_folder_failure_keeps_old(tmp_path, existing):
    target = tmp_path / "ckpt"
    if existing:
        target.mkdir()
        _fill(target, {"a": "old"})
    with pytest.raises(OSError, match="disk full"):
        with atomic_folder(str(target)) as tmp:
            _fill(tmp, {"a": "half"})
            raise OSError("disk full")
    assert _listing(tmp_path) == (["ckpt"] if existing else [])
    if existing:
        assert _listing(target) == ["a"] and (target / "a").read_text() == "old"


def test_atomic_folder_refuses_a_file(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with atomic_folder(str(target)):
            pass
    assert _listing(tmp_path) == ["f"]


def test_atomic_folder_without_exchange(tmp_path, monkeypatch):
    import laco_kernels._atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    target.mkdir()
    _fill(target, {"a": "old"})
    with atomic_folder(str(target)) as tmp:
        _fill(tmp, {"a": "new"})
    assert (target / "a").read_text() == "new" and _listing(tmp_path) == ["ckpt"]
