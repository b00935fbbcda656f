"""Zero-shot accuracy through lm-eval on a model object, with a local multiple-choice task (no hub);
the public import ``from laco_kernels.eval import zeroshot`` and ``laco eval --tasks`` as a subprocess."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _tiny import tiny_model, tiny_tokenizer
from laco_kernels.eval import zeroshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [{"question": "the cat", "choices": ["runs", "sits", "eats"], "label": 0},
        {"question": "a dog", "choices": ["swims", "flies"], "label": 1},
        {"question": "the red car", "choices": ["is big", "is small", "yes"], "label": 2},
        {"question": "the old bird", "choices": ["sees the fish", "no"], "label": 0},
        {"question": "his house is", "choices": ["green", "blue", "red", "new"], "label": 3},
        {"question": "they like", "choices": ["the river", "the road"], "label": 1}]


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    (tmp_path / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "tiny_mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return str(tmp_path / "tasks")


def _direct_scores(model, tok):
    """lm-eval's multiple-choice protocol by hand: sum log p(' ' + choice | question)."""
    acc, acc_norm = [], []
    for d in DOCS:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in d["choices"]:
            whole = tok(d["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            cont = torch.arange(len(ctx), len(whole))
            lls.append(float(logp[cont - 1, ids[0, cont]].sum()))
        lls = torch.tensor(lls)
        acc.append(int(lls.argmax()) == d["label"])
        norm = lls / torch.tensor([float(len(c)) for c in d["choices"]])
        acc_norm.append(int(norm.argmax()) == d["label"])
    return sum(acc) / len(DOCS), sum(acc_norm) / len(DOCS)


def test_zeroshot_matches_direct_computation(task_dir):
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    want_acc, want_norm = _direct_scores(model, tok)
    got = zeroshot(model, tok, ["tiny_mc"], include_path=task_dir, include_defaults=False)
    assert got["tiny_mc"]["samples"] == len(DOCS)
    assert got["tiny_mc"]["acc"] == pytest.approx(want_acc)
    assert got["tiny_mc"]["acc_norm"] == pytest.approx(want_norm)
    limited = zeroshot(model, tok, "tiny_mc", include_path=task_dir, limit=2, include_defaults=False)
    assert limited["tiny_mc"]["samples"] == 2


def test_errors(task_dir, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(FileNotFoundError, match="include_path"):
        zeroshot(model, tok, ["tiny_mc"], include_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        zeroshot(model, tok, ["no_such_task_xyz"], include_path=task_dir, include_defaults=False)
    with pytest.raises(ValueError, match="needs an include_path"):
        zeroshot(model, tok, ["tiny_mc"], include_defaults=False)
    with pytest.raises(ValueError, match="at least one task"):
        zeroshot(model, tok, [])


def test_public_import_is_the_function_every_time():
    # a fresh process: the old lazy __getattr__ returned the function once, then the submodule
    code = ("import sys\n"
            "from laco_kernels.eval import zeroshot as a\n"
            "from laco_kernels.eval import zeroshot as b\n"
            "import importlib; importlib.import_module('laco_kernels.eval.zeroshot')\n"
            "from laco_kernels.eval import zeroshot as c\n"
            "import laco_kernels.eval as ev\n"
            "assert callable(a) and a is b is c is ev.zeroshot, (a, b, c, ev.zeroshot)\n"
            "assert 'lm_eval' not in sys.modules  # lm-eval is still imported only when zeroshot runs\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    from laco_kernels.eval import zeroshot as again  # and in this process, after the module-level import

    assert again is zeroshot and callable(again)


def test_cli_eval_tasks_end_to_end(task_dir, tmp_path):
    """``laco eval FOLDER --seqlen 0 --tasks tiny_mc --include-path DIR`` in a subprocess: the zero-shot
    scores of the saved model, and no perplexity (no WikiText file is even needed)."""
    folder = tmp_path / "model"
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    want_acc, want_norm = _direct_scores(model, tok)
    out_json = tmp_path / "res.json"
    env = {**os.environ, "PYTHONPATH": REPO, "LACO_DATA_DIR": str(tmp_path / "no_data")}
    proc = subprocess.run([sys.executable, "-m", "laco_kernels.cli", "eval", str(folder), "--seqlen", "0",
                           "--tasks", "tiny_mc", "--include-path", task_dir, "--json", str(out_json)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WikiText-2" not in proc.stdout and "tiny_mc: " in proc.stdout and "acc_norm" in proc.stdout, proc.stdout
    res = json.loads(out_json.read_text())
    assert set(res) == {"zeroshot"}
    assert res["zeroshot"]["tiny_mc"]["samples"] == len(DOCS)
    assert res["zeroshot"]["tiny_mc"]["acc"] == pytest.approx(want_acc)
    assert res["zeroshot"]["tiny_mc"]["acc_norm"] == pytest.approx(want_norm)


def test_cli_eval_seqlen_checks(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    folder = tmp_path / "model"
    tiny_model("llama", layers=1).save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    for argv, expect in ((["--seqlen", "0"], "nothing to evaluate"), (["--seqlen", "1"], "--seqlen must be 0")):
        proc = subprocess.run([sys.executable, "-m", "laco_kernels.cli", "eval", str(folder), *argv],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2 and expect in proc.stderr, (argv, proc.stderr)
