"""WikiText-2 perplexity protocol, checked against a direct computation on a tiny model."""
import math

import pytest
import torch

from _tiny import tiny_model, tiny_text, tiny_tokenizer
from laco_kernels import data
from laco_kernels.eval import perplexity
from laco_kernels.eval.perplexity import window_nll


@pytest.fixture
def wikitext(tmp_path, monkeypatch):
    with open(tmp_path / data.WIKITEXT_FILE, "w", newline="") as f:
        f.write(tiny_text(1500))
    monkeypatch.setenv("LACO_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_matches_direct_computation(wikitext, family):
    model, tok = tiny_model(family), tiny_tokenizer()
    seqlen = 48
    text = open(wikitext / data.WIKITEXT_FILE, newline="").read().replace("\r\n", "\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    losses = []
    with torch.no_grad():
        for i in range(n):
            window = torch.tensor([ids[i * seqlen:(i + 1) * seqlen]])
            losses.append(float(model(window, labels=window).loss))  # mean over seqlen-1 predictions
    want = math.exp(sum(losses) / n)
    got = perplexity(model, tok, seqlen=seqlen, progress=False)
    assert got["windows"] == n and got["tokens"] == n * (seqlen - 1)
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["nll"] == pytest.approx(sum(losses) / n, rel=1e-5)
    batched = perplexity(model, tok, seqlen=seqlen, batch_size=3, progress=False)
    assert batched["ppl"] == pytest.approx(want, rel=1e-5)


def test_max_windows_and_mode(wikitext):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.train()
    few = perplexity(model, tok, seqlen=32, max_windows=2, progress=False)
    assert few["windows"] == 2 and few["tokens"] == 62
    assert model.training  # restored
    windows = data.wikitext_windows(tok, 32, 2)
    total, count = window_nll(model.eval(), windows, progress=False)
    assert few["nll"] == pytest.approx(total / count)


def test_errors(wikitext):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        perplexity(model, tok, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, tok, seqlen=16, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="windows must be"):
        window_nll(model, torch.zeros(5, dtype=torch.long))
