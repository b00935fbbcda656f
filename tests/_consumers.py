"""The consumers of our exports, installed once into a side folder (never into the test venv).

compressed-tensors 0.14.0.1 is the last release with the sparse-24-bitmask compressor and it needs
transformers < 5, so both go into ``~/.cache/laco_kernels/consumers/<pins>`` with
``pip install --no-deps --target`` (torch, numpy, pydantic, safetensors... come from the running
venv: no CUDA torch is ever pulled). A consumer then runs in a subprocess with that folder first
on PYTHONPATH. A fresh machine (CI) does exactly this on its first run (about 15 s on the dev box);
later runs reuse the folder. Skipped, with the reason, only when PyPI cannot be reached.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

PINS = ("compressed-tensors==0.14.0.1", "transformers==4.57.6", "huggingface-hub==0.36.0", "tokenizers==0.22.1",
        "loguru==0.7.3")
_OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable",
            "Max retries exceeded", "Connection refused", "ConnectTimeout", "ReadTimeout", "No route to host")


def consumer_site() -> str:
    """The side folder holding the pinned consumers (installed on first use, atomically)."""
    root = os.environ.get("LACO_CONSUMER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "laco_kernels",
                                                              "consumers"))
    tag = "-".join(p.replace("==", "") for p in PINS[:2]) + f"-py{sys.version_info[0]}{sys.version_info[1]}"
    target = os.path.join(root, tag)
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{tag}.tmp-")
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--no-deps", "--no-compile", "--target", tmp, *PINS],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            if any(s in r.stderr for s in _OFFLINE):
                pytest.skip(f"PyPI unreachable, cannot install the consumers {PINS}: {r.stderr.strip()[-300:]}")
            raise RuntimeError(f"pip install --target of {PINS} failed:\n{r.stderr[-3000:]}")
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not os.path.isfile(os.path.join(target, ".complete")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_consumer(site: str, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = site
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), timeout=900)
