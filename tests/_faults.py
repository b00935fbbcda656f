"""Fault injection for the writer tests: make one call of a library function raise.

``inject(monkeypatch, target, name, n)`` replaces ``target.name`` by a wrapper that raises
:class:`InjectedFault` on its ``n``-th call (1-based) and runs the real function otherwise, so a
writer can be made to fail at each of its steps in turn (first file, second file, the rename,
the fsync...). ``leftovers(folder)`` lists temporaries a failed write left behind.
"""
import os


class InjectedFault(OSError):
    """The failure a test injected (an OSError: what a full disk or a dead NFS server raises)."""


def inject(monkeypatch, target, name: str, n: int):
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise InjectedFault(f"injected failure in {name} (call {n})")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def leftovers(folder) -> list:
    """Names under ``folder`` (recursively) that look like temporaries of a writer."""
    found = []
    for dirpath, dirs, files in os.walk(folder):
        for f in dirs + files:
            if ".tmp" in f or ".old-" in f or f.startswith((".save-", ".smollm2-")):
                found.append(os.path.relpath(os.path.join(dirpath, f), folder))
    return sorted(found)


def snapshot(folder) -> dict:
    """``{relative path: bytes}`` of every file under ``folder`` (empty when it does not exist)."""
    out = {}
    if not os.path.exists(folder):
        return out
    if os.path.isfile(folder):
        with open(folder, "rb") as f:
            return {"": f.read()}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out
