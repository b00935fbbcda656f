"""Offline corpora: C4 calibration windows and WikiText-2 windows (tiny files written by the tests)."""
import json
import os

import pytest
import torch

from _tiny import tiny_text, tiny_tokenizer
from laco_kernels import data


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A tiny C4-like JSONL and a WikiText-like raw file in a folder that LACO_DATA_DIR points to."""
    docs = [tiny_text(40 + 7 * i, seed=i).replace("\r\n", " ") for i in range(30)]
    with open(tmp_path / data.C4_FILE, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "url": "x"}) + "\n\n")  # blank lines are skipped
    with open(tmp_path / data.WIKITEXT_FILE, "w", newline="") as f:
        f.write(tiny_text(2000))
    monkeypatch.setenv("LACO_DATA_DIR", str(tmp_path))
    return tmp_path, docs


def test_data_dir_from_env(corpus):
    assert data.data_dir() == str(corpus[0])


def test_data_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LACO_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.c4_documents(path=str(tmp_path / "nope.jsonl"))


def test_c4_documents(corpus):
    _, docs = corpus
    assert data.c4_documents() == docs
    assert data.c4_documents(limit=3) == docs[:3]


def test_calibration_windows(corpus):
    _, docs = corpus
    tok = tiny_tokenizer()
    w = data.calibration_windows(tok, 6, 20, seed=3)
    assert w.shape == (6, 20) and w.dtype == torch.int64
    assert torch.equal(w, data.calibration_windows(tok, 6, 20, seed=3))  # seeded
    assert not torch.equal(w, data.calibration_windows(tok, 6, 20, seed=4))
    # every window is a slice of the documents' token stream joined by EOS
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = torch.tensor(stream)
    for row in w:
        starts = [s for s in range(len(stream) - 20) if torch.equal(stream[s:s + 20], row)]
        assert starts
    held_out = data.calibration_windows(tok, 6, 20, seed=3, offset_docs=10)
    assert not torch.equal(held_out, w)


def test_calibration_errors(corpus):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="nsamples >= 1"):
        data.calibration_windows(tok, 0, 20)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        data.calibration_windows(tok, 2, 10 ** 6)


def test_wikitext_windows(corpus):
    tok = tiny_tokenizer()
    text = data.wikitext_text()
    assert "\r" not in text and text.count("\n") > 100
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    w = data.wikitext_windows(tok, 64)
    n = len(ids) // 64
    assert w.shape == (n, 64) and torch.equal(w.flatten(), ids[:n * 64])  # non-overlapping, tail dropped
    assert torch.equal(data.wikitext_windows(tok, 64, max_windows=3), w[:3])
    with pytest.raises(ValueError, match="fewer than one window"):
        data.wikitext_windows(tok, 10 ** 6)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        data.wikitext_windows(tok, 1)


def test_real_corpora_present_and_intact():
    """The shared files the benchmarks use (skipped where the shared folder is absent)."""
    try:
        folder = data.data_dir()
    except FileNotFoundError:
        pytest.skip("shared data folder not present")
    wiki = os.path.join(folder, data.WIKITEXT_FILE)
    if not os.path.exists(wiki):
        pytest.skip("wikitext file absent")
    assert os.path.getsize(wiki) == 1_290_547
    assert data.wikitext_text().startswith(" = Robert Boulter = \n Robert Boulter is")
    assert len(data.c4_documents(limit=5)) == 5
