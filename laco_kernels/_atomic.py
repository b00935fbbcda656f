"""Atomic files and folders: a failed write leaves the old artefact whole and no temporary behind.

Every writer of the package goes through these two context managers:

- :func:`atomic_file` yields a temporary path in the target's directory; on a clean exit the file
  is fsynced and renamed over the target (``os.replace``, atomic on POSIX), then the directory is
  fsynced. On an exception the temporary is removed and the target is untouched.
- :func:`atomic_folder` yields a fresh sibling folder; on a clean exit every file in it is
  fsynced and the folder takes the target's place. On Linux the swap is one
  ``renameat2(RENAME_EXCHANGE)`` call, so a reader sees either the old complete folder or the new
  one; elsewhere it is two renames (old aside, new in), with a window of a few microseconds in
  which the target name is absent but never half-written. The old folder is deleted after the
  swap. On an exception the sibling is removed and the target is untouched.

Temporaries are named ``.<name>.tmp-<pid>-<random>`` so that a crash (power loss, SIGKILL),
which no Python code can clean up, leaves a name that :func:`stale_temporaries` can find.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
from typing import Iterator, List

__all__ = ["atomic_file", "atomic_folder", "stale_temporaries"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _tmp_name(target: str, kind: str) -> str:
    head, name = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data files are synced
        if not directory:
            raise
    finally:
        os.close(fd)


def _check_parent(target: str) -> str:
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{target!r}: parent folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{target!r}: parent folder {parent!r} is not writable")
    return parent


@contextlib.contextmanager
def atomic_file(target: str) -> Iterator[str]:
    """Yield a temporary path to write; it replaces ``target`` when the block exits cleanly.

    Raises ``IsADirectoryError`` before anything is written when ``target`` is a folder.
    """
    if os.path.isdir(target):
        raise IsADirectoryError(f"{target!r} is a folder; expected a file path")
    parent = _check_parent(target)
    tmp = _tmp_name(target, "tmp")
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise RuntimeError(f"atomic_file({target!r}): the writer did not create {tmp!r}")
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_path(parent, directory=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with Linux ``renameat2``; False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (fs without exchange), EOPNOTSUPP
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE): {os.strerror(err)}")


def _fsync_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath, directory=True)


@contextlib.contextmanager
def atomic_folder(target: str) -> Iterator[str]:
    """Yield an empty sibling folder to fill; it takes ``target``'s place when the block exits cleanly.

    ``target`` may be absent or an existing folder (replaced whole: files of the old folder that
    the new one does not write are gone afterwards). Raises ``NotADirectoryError`` before anything
    is written when ``target`` is an existing file.
    """
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target!r} exists and is not a folder")
    parent = _check_parent(target)
    tmp = _tmp_name(target, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.isdir(target):
            if _exchange(tmp, target):
                old = tmp  # after the exchange the temporary name holds the old folder
            else:
                old = _tmp_name(target, "old")
                os.rename(target, old)
                os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(parent, directory=True)


def stale_temporaries(target: str) -> List[str]:
    """Temporaries of ``target`` left by a process that died (crash, kill) in one of the writers."""
    head, name = os.path.split(os.path.abspath(target))
    if not os.path.isdir(head):
        return []
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    return sorted(os.path.join(head, f) for f in os.listdir(head) if f.startswith(prefixes))
