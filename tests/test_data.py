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


def test_calibration_windows_from_a_plain_text_file(corpus, tmp_path):
    """path: a plain text file is one document (CRLF as LF); every window is a slice of its tokens."""
    tok = tiny_tokenizer()
    text = tiny_text(600, seed=5)
    assert "\r\n" in text
    f = tmp_path / "train.txt"
    with open(f, "w", newline="") as fh:
        fh.write(text)
    w = data.calibration_windows(tok, 5, 16, seed=1, path=str(f))
    assert data.calibration_documents(str(f)) == [text.replace("\r\n", "\n")]
    stream = torch.tensor(tok(text.replace("\r\n", "\n"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    for row in w:
        assert any(torch.equal(stream[s:s + 16], row) for s in range(len(stream) - 16))
    assert not torch.equal(w, data.calibration_windows(tok, 5, 16, seed=1))  # not the C4 sample's windows
    # a .jsonl of any name reads as C4's format
    j = tmp_path / "mine.jsonl"
    j.write_text(json.dumps({"text": text}) + "\n")
    assert data.calibration_documents(str(j)) == [text]  # JSON keeps the text as written


def test_calibration_data_errors(corpus, tmp_path):
    tok = tiny_tokenizer()
    folder, _ = corpus
    with pytest.raises(ValueError, match="WikiText-2 test split that perplexity is measured on"):
        data.calibration_windows(tok, 2, 16, path=str(folder / data.WIKITEXT_FILE))
    copy = tmp_path / "wiki.txt"
    copy.write_bytes((folder / data.WIKITEXT_FILE).read_bytes())
    with pytest.raises(ValueError, match="WikiText-2 test split"):  # a copy of it under another name too
        data.calibration_documents(str(copy))
    copy.write_bytes((folder / data.WIKITEXT_FILE).read_bytes()[:-1] + b"!")  # other text of the same size
    assert data.calibration_documents(str(copy))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not a JSON object with a 'text' field"):
        data.calibration_documents(str(bad))
    bad.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'text' is a int"):
        data.calibration_documents(str(bad))
    short = tmp_path / "short.txt"
    short.write_text("a b")
    with pytest.raises(ValueError, match="short.txt.*fewer than seqlen"):
        data.calibration_windows(tok, 2, 64, path=str(short))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.calibration_windows(tok, 2, 16, path=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="not a file"):
        data.calibration_windows(tok, 2, 16, path=str(tmp_path))
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match=r"blob.bin: not UTF-8 text .* at byte 3"):
        data.calibration_windows(tok, 2, 16, path=str(blob))
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match="blob.jsonl: not UTF-8 text"):
        data.calibration_documents(str(blob))
