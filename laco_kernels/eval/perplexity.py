"""WikiText-2 perplexity by the standard protocol of the pruning literature.

The test split (CRLF normalised to LF) is tokenised once, cut into non-overlapping windows of
``seqlen`` tokens (tail dropped, :func:`laco_kernels.data.wikitext_windows`), every window is
scored independently, and ``ppl = exp(mean NLL)`` over every predicted token (``seqlen - 1`` per
window; all windows have equal length, so this is also the mean of the per-window losses).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._validation import check_seqlen, check_token_ids
from ..data import wikitext_windows


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               device: Union[str, torch.device] = "cpu", progress: bool = True, desc: str = "perplexity") -> tuple:
    """Summed next-token NLL (fp64) and token count over ``windows`` int64 ``[W, T]``."""
    windows = check_token_ids(windows, model, "windows")
    if windows.shape[1] < 2:
        raise ValueError(f"windows must be [windows, seqlen >= 2] token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        # fp32 log-softmax even for half-precision models: the loss is a sum over 10^4+ tokens
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total, count


def perplexity(model: nn.Module, tokenizer, seqlen: int = 1024, max_windows: Optional[int] = None,
               batch_size: int = 1, device: Union[str, torch.device] = "cpu", progress: bool = True) -> dict:
    """WikiText-2 test perplexity of a causal LM.

    model: a Hugging Face causal LM (moved to ``device`` if it is elsewhere; eval mode during the
    call); tokenizer: its tokenizer (anything callable as ``tokenizer(text)["input_ids"]``);
    seqlen: window length; max_windows: keep the first windows only.
    Returns ``{"ppl", "nll" (mean per predicted token), "windows", "tokens" (predicted tokens)}``.
    """
    check_seqlen(seqlen, model, "seqlen")  # before the corpus is tokenised
    windows = wikitext_windows(tokenizer, seqlen, max_windows)
    device = torch.device(device)
    if next(model.parameters()).device != device:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        total, count = window_nll(model, windows, batch_size, device, progress)
    finally:
        model.train(was_training)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "windows": int(windows.shape[0]), "tokens": count}
