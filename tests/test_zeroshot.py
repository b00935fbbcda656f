"""Zero-shot accuracy through lm-eval on a model object, with a local multiple-choice task (no hub)."""
import json

import pytest
import torch

from _tiny import tiny_model, tiny_tokenizer
from laco_kernels.eval.zeroshot import zeroshot

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
