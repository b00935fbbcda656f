"""Run every example of python/examples on its tiny default model (subprocesses, as a user would)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "python", "examples")


def _run(name, *args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_example_is_tested():
    assert sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py")) == [
        "load_sparse_checkpoint.py", "prune_and_eval.py", "swap_linears.py"]


def test_swap_linears():
    out = _run("swap_linears.py")
    assert "swapped 14 linears" in out and "SparseLinear24" in out and "densified again: Linear" in out


def test_prune_and_eval():
    out = _run("prune_and_eval.py", "--windows", "2", "--nsamples", "4")
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert float(lines["dense perplexity"]) > 1
    assert "sparsity 0.500" in lines["pruned perplexity"]


def test_load_sparse_checkpoint(tmp_path):
    folder = str(tmp_path / "ckpt")
    out = _run("load_sparse_checkpoint.py", "--out", folder)
    assert "logits identical" in out and "sparse-24-bitmask" in out
    out = _run("load_sparse_checkpoint.py", "--load", folder)
    assert "14 packed linears" in out and "sparse-24-bitmask" in out
