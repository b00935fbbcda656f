"""Offline text data: calibration windows (the C4 sample, or a file of your own) and the WikiText-2 test split.

No data hub is reachable, so the corpora live in ``shared/data`` beside the repository
(see its README). ``data_dir()`` finds it: ``$LACO_DATA_DIR`` first, then ``../shared/data``
next to the repository root, then ``./shared/data``.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

C4_FILE = "c4-sample.jsonl"
WIKITEXT_FILE = "wikitext2-test.raw"


def data_dir() -> str:
    """Directory holding the offline corpora; FileNotFoundError says how to point to it."""
    candidates = []
    if os.environ.get("LACO_DATA_DIR"):
        candidates.append(os.environ["LACO_DATA_DIR"])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates += [os.path.join(repo, "..", "shared", "data"), os.path.join(repo, "shared", "data"),
                   os.path.join(os.getcwd(), "shared", "data")]
    for c in candidates:
        if os.path.exists(os.path.join(c, C4_FILE)) or os.path.exists(os.path.join(c, WIKITEXT_FILE)):
            return os.path.abspath(c)
    raise FileNotFoundError(f"offline data not found (looked in {candidates}); set LACO_DATA_DIR to the "
                            f"folder holding {C4_FILE} and {WIKITEXT_FILE}")


def _path(name: str, path: Optional[str]) -> str:
    p = path or os.path.join(data_dir(), name)
    if not os.path.exists(p):
        raise FileNotFoundError(f"data file not found: {p}")
    return p


def c4_documents(path: Optional[str] = None, limit: Optional[int] = None) -> List[str]:
    """Texts of the C4 sample (JSON lines with a ``text`` field), in file order."""
    docs = []
    p = _path(C4_FILE, path)
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{p} line {number}: not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise ValueError(f"{p} line {number}: 'text' is a {type(text).__name__}, not a string")
                docs.append(text)
                if limit is not None and len(docs) >= limit:
                    break
    return docs


def calibration_documents(path: Optional[str] = None) -> List[str]:
    """The calibration corpus as documents: the C4 sample (``path`` None), a JSON-lines file with a
    ``text`` field per line (C4's format, any ``.jsonl`` name), or any other file read as one plain
    UTF-8 text (CRLF normalised to LF).

    Refuses the WikiText-2 test split (that file, or a byte-identical copy): perplexity is measured on
    it, so a model calibrated on it would be scored on its own training text. A plain text file is
    tokenised whole.
    """
    import filecmp

    if path is None:
        return c4_documents()
    p = _path(C4_FILE, path)
    try:
        test = os.path.join(data_dir(), WIKITEXT_FILE)
    except FileNotFoundError:
        test = None
    if test is not None and os.path.exists(test) and (
            os.path.samefile(p, test)
            or (os.path.getsize(p) == os.path.getsize(test) and filecmp.cmp(p, test, shallow=False))):
        raise ValueError(f"calibration data {path} is the WikiText-2 test split that perplexity is measured on; "
                         "calibrate on other text (the C4 sample, or an in-domain training split)")
    if not os.path.isfile(p):
        raise ValueError(f"calibration data {path}: not a file")
    try:
        if p.endswith(".jsonl"):
            return c4_documents(p)
        with open(p, encoding="utf-8", newline="") as f:
            return [f.read().replace("\r\n", "\n")]
    except UnicodeDecodeError as exc:
        raise ValueError(f"calibration data {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def calibration_windows(tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        path: Optional[str] = None, offset_docs: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens of calibration text, int64 ``[nsamples, seqlen]``.

    path: the C4 sample when None, else a ``.jsonl`` or plain text file (:func:`calibration_documents`).
    Documents are tokenised and concatenated (separated by EOS) into one token stream, so
    short documents never yield padded windows; window starts are drawn with ``seed``.
    ``offset_docs`` skips the first documents (to draw held-out data for comparisons).
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    docs = calibration_documents(path)[offset_docs:]
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        # enough tokens for well-spread windows: stop early on large corpora
        if len(ids) > max(4 * nsamples * seqlen, 200_000):
            break
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() <= seqlen:
        raise ValueError(f"the calibration text ({path or 'the C4 sample'}) holds only {stream.numel()} tokens, "
                         f"fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def wikitext_text(path: Optional[str] = None) -> str:
    """WikiText-2 test split with CRLF normalised to LF (the standard protocol)."""
    with open(_path(WIKITEXT_FILE, path), encoding="utf-8", newline="") as f:
        return f.read().replace("\r\n", "\n")


def wikitext_windows(tokenizer, seqlen: int, max_windows: Optional[int] = None,
                     path: Optional[str] = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of the tokenised WikiText-2 test text, tail dropped.

    Returns int64 ``[windows, seqlen]``; ``max_windows`` keeps the first ones.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    ids = torch.tensor(tokenizer(wikitext_text(path), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"WikiText-2 holds {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
