"""RestoreLCC: restore a pruned LLM by compensating the lost components of its attention heads.

Method ("Restoring Pruned Large Language Models via Lost Component Compensation", NeurIPS 2025),
as implemented here for any family with an adapter row (the o projection's input is the
concatenation of the heads' outputs, ``[*, n_heads * head_dim]``):

1. *Activations*: the o projection's input at the last prompt token, dense and pruned model,
   over N prompts (``a_dense``, ``a_pruned``: ``[N, layers, n_heads * head_dim]``, fp32); read
   from the forward over prompt + response, which in a causal model is the same state.
2. *Lost basis*: per head, ``Delta_h = a_dense_h - a_pruned_h`` ``[N, head_dim]``; its top
   ``rank`` (10) right singular vectors ``V_h`` ``[rank, head_dim]``. The *lost component* of a
   head on an input is ``c_h = V_h (a_dense_h - a_pruned_h)`` ``[rank]``.
3. *Contrastive probing*: positives are prompt + its true response, negatives prompt + the most
   similar other response (cosine of all-MiniLM-L6-v2 sentence embeddings). A logistic probe per
   head on ``c_h`` at the last token (features standardised on the training split; Adam lr 0.01,
   200 full-batch epochs; 70/30 split by pair) tells how much task information the head lost;
   heads are ranked by validation accuracy (ties: lower validation loss first).
4. *Injection*: the top-K heads get ``a_h <- a_h + V_h^T v_h + b_h`` (``V_h`` frozen; ``v_h``
   ``[rank]`` and ``b_h`` ``[head_dim]`` trained from N(0, 1e-3^2)) with the completion-only
   causal-LM loss (Adam lr 1e-3, 3 epochs). The shift is input-independent, so it folds exactly
   into an o projection bias ``bias += W_o @ delta``: the weights, hence the sparsity, never change.

Saving: the result is a plain transformers model. Where the family's o projection has no bias,
the config flag that creates one is switched on (found generically, by instantiating the config
on the meta device: e.g. ``attention_bias=True`` for Llama/Qwen3, which also creates q/k/v
biases, set to exact zeros); ``model.save_pretrained`` then reloads to the same logits. Families
whose config cannot create that bias (Qwen2, Mistral) are refused before any work.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..models.adapters import get_adapter, get_module
from ..prune.permute import check_not_permuted
from .._validation import check_models_match, describe_module, model_limits
from ._checkpoint import atomic_save_json, atomic_save_tensors
from ._lcc_signals import (  # noqa: F401 (re-exported: the method's steps 1-3)
    Embedder, PromptResponsePairs, _attention_geometry, _right_padded, lost_basis, lost_components, minilm_embedder,
    most_similar_other, o_proj_inputs, probe_heads, prompt_response_pairs, rank_heads)


# ----------------------------------------------------------------------------------- injection
class _Injection(nn.Module):
    """``a_h <- a_h + V_h^T v_h + b_h`` on selected heads, as forward pre-hooks on the o projections.

    heads: ``[(layer, head)]`` (K); basis: frozen ``[K, r, head_dim]``; v ``[K, r]``, b ``[K, head_dim]``.
    """

    def __init__(self, heads: List[Tuple[int, int]], basis: torch.Tensor, n_layers: int, n_heads: int,
                 init_std: float, seed: int):
        super().__init__()
        self.heads, self.n_layers, self.n_heads = list(heads), n_layers, n_heads
        self.register_buffer("basis", basis.float().contiguous())
        g = torch.Generator().manual_seed(seed)
        self.v = nn.Parameter(torch.randn(basis.shape[0], basis.shape[1], generator=g) * init_std)
        self.b = nn.Parameter(torch.randn(basis.shape[0], basis.shape[2], generator=g) * init_std)
        self._handles: list = []

    def deltas(self) -> torch.Tensor:
        """Shift of every o projection input: fp32 ``[layers, n_heads * head_dim]`` (zero for other heads)."""
        contrib = torch.einsum("kr,krd->kd", self.v, self.basis) + self.b
        flat = torch.tensor([l * self.n_heads + h for l, h in self.heads], device=contrib.device)
        out = contrib.new_zeros(self.n_layers * self.n_heads, contrib.shape[1]).index_add(0, flat, contrib)
        return out.view(self.n_layers, -1)

    def attach(self, outs: List[nn.Linear]) -> None:
        def make_hook(layer: int):
            def hook(_mod, args):
                x = args[0]
                return (x + self.deltas()[layer].to(x.dtype),) + tuple(args[1:])
            return hook
        self._handles = [o.register_forward_pre_hook(make_hook(l)) for l, o in enumerate(outs)]

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def o_bias_route(model: nn.Module) -> Tuple[Optional[str], List[str]]:
    """How the saved config gives every o projection a bias, found without family branches.

    Returns ``(None, [])`` when the config already creates it, else ``(attribute, extra)``: the
    boolean ``*bias*`` config attribute whose switch to True creates it with the fewest other new
    parameters, and those other parameters' names (to be set to zero). ValueError if none does.
    """
    adapter = get_adapter(model)

    def o_of(m):
        return get_module(get_module(m, adapter.blocks)[0], adapter.o)

    base = _meta_model(model.config)
    if o_of(base).bias is not None:
        return None, []
    base_names = {n for n, _ in base.named_parameters()}
    best = None
    for key, value in sorted(model.config.to_dict().items()):
        if "bias" not in key or value is not False:
            continue
        cfg = copy.deepcopy(model.config)
        setattr(cfg, key, True)
        try:
            cand = _meta_model(cfg)
        except Exception:  # an attribute that the family does not accept as a bool switch
            continue
        if o_of(cand).bias is None:
            continue
        new = {n: p.numel() for n, p in cand.named_parameters() if n not in base_names}
        o_suffix = f".{adapter.o}.bias"
        extra = sorted(n for n in new if not n.endswith(o_suffix))
        cost = sum(new[n] for n in extra)
        if best is None or cost < best[0]:
            best = (cost, key, extra)
    if best is None:
        raise ValueError(f"model_type {model.config.model_type!r}: no config attribute gives its o projection "
                         f"({adapter.o}) a bias, so RestoreLCC cannot fold its compensation into a standard "
                         "checkpoint of this family")
    return best[1], best[2]


@torch.no_grad()
def _fold(model: nn.Module, injection: _Injection, route: Tuple[Optional[str], List[str]]) -> None:
    """Add ``W_o @ delta`` to every o projection's bias (created if absent); switch the config route on."""
    outs, _, _ = _attention_geometry(model)
    deltas = injection.deltas().detach()
    for o, d in zip(outs, deltas):
        shift = (o.weight.float() @ d.to(o.weight.device)).to(o.weight.dtype)
        if o.bias is None:
            o.bias = nn.Parameter(shift, requires_grad=False)
        else:
            o.bias.add_(shift)
    attr, extra = route
    for name in extra:
        owner, _, leaf = name.rpartition(".")
        if leaf != "bias":
            raise ValueError(f"config route {attr!r} creates a non-bias parameter {name!r}; refusing to fold")
        mod = get_module(model, owner)
        if getattr(mod, "bias", None) is None:
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device),
                                    requires_grad=False)
    if attr is not None:
        setattr(model.config, attr, True)


def _completion_batch(pairs: PromptResponsePairs, rows: Sequence[int], device):
    """(ids, mask, labels) of prompt + response, labels -100 on the prompt and the padding."""
    seqs = [pairs.prompts[i] + pairs.responses[i] for i in rows]
    ids, mask, _ = _right_padded(seqs, device)
    labels = torch.full_like(ids, -100)
    for j, i in enumerate(rows):
        p, r = len(pairs.prompts[i]), len(pairs.responses[i])
        labels[j, p:p + r] = ids[j, p:p + r]
    return ids, mask, labels


def completion_loss(model: nn.Module, pairs: PromptResponsePairs, batch_size: int = 8) -> float:
    """Mean next-token loss over the response tokens of every pair (no gradient)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            ids, mask, labels = _completion_batch(pairs, range(s, min(s + batch_size, len(pairs))), device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------- driver
@dataclass
class RestoreLCCResult:
    """model: the pruned model, restored in place (o biases folded, config updated, no hooks).

    heads: the K compensated ``(layer, head)``, best first; probe_accuracy / probe_loss: per head
    ``[layers, n_heads]`` on the validation split; losses: mean completion loss per epoch;
    config_route: the config attribute switched on so the o bias is saved (None if it existed).
    """

    model: nn.Module
    heads: List[Tuple[int, int]]
    probe_accuracy: torch.Tensor
    probe_loss: torch.Tensor
    losses: List[float] = field(default_factory=list)
    trainable_params: int = 0
    n_pairs: int = 0
    rank: int = 0
    config_route: Optional[str] = None
    zero_biases_added: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)


def _weights_digest(modules: List[nn.Linear]) -> str:
    """sha256 of the o projection weights (identifies the models a checkpoint belongs to)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(m.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _adam_state(opt: torch.optim.Optimizer, params: List[nn.Parameter]) -> Dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                out[f"adam{i}.{k}"] = st[k]
        if "step" in st:
            out[f"adam{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def _load_adam_state(opt: torch.optim.Optimizer, params: List[nn.Parameter], saved: Dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(params):
        if f"adam{i}.step" in saved:
            opt.state[p] = {"step": saved[f"adam{i}.step"].reshape(()).clone(),
                            "exp_avg": saved[f"adam{i}.exp_avg"].clone(),
                            "exp_avg_sq": saved[f"adam{i}.exp_avg_sq"].clone()}


def _check_pairs(pairs: PromptResponsePairs, model: nn.Module) -> None:
    """Every prompt and response non-empty, ids inside the vocabulary, prompt + response within
    the model's positions (ValueError naming the first bad pair), before any forward pass."""
    vocab, positions = model_limits(model)
    if len(pairs) == 0:
        raise ValueError("pairs is empty: give at least one prompt/response pair")
    for i, (p, r) in enumerate(zip(pairs.prompts, pairs.responses)):
        if not p or not r:
            raise ValueError(f"pairs[{i}] has an empty {'prompt' if not p else 'response'}")
        ids = list(p) + list(r)
        if min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
            raise ValueError(f"pairs[{i}] holds token id {min(ids) if min(ids) < 0 else max(ids)}, outside the "
                             f"model's vocabulary [0, {vocab})")
        if positions is not None and len(ids) > positions:
            raise ValueError(f"pairs[{i}] has {len(ids)} tokens (prompt + response) but the model takes at most "
                             f"{positions} positions")


def restore_lcc(dense_model: nn.Module, pruned_model: nn.Module, tokenizer=None,
                pairs: Optional[PromptResponsePairs] = None, *, n_prompts: int = 1000, max_prompt_tokens: int = 512,
                max_response_tokens: int = 128, data_path: Optional[str] = None, top_k: Optional[int] = None,
                rank: int = 10, probe_epochs: int = 200, probe_lr: float = 0.01, val_fraction: float = 0.3,
                lr: float = 1e-3, epochs: int = 3, init_std: float = 1e-3, batch_size: int = 8,
                embedder: Optional[Embedder] = None, checkpoint_dir: Optional[str] = None, seed: int = 0,
                progress: bool = True) -> RestoreLCCResult:
    """Restore ``pruned_model`` (in place) from ``dense_model`` by lost-component compensation.

    Both models: the same architecture and device (any adapter family whose config can give the
    o projection a bias). pairs: prompt/response token ids, or None to build ``n_prompts`` of them
    with ``tokenizer`` from ``data_path`` (default the C4 sample; see :func:`prompt_response_pairs`).
    top_k: heads compensated (default a quarter of all heads); rank: singular directions per head;
    probe_*: the logistic probes; lr / epochs / init_std / batch_size: the injection training
    (Adam, completion-only loss); embedder: ``texts -> [N, E]`` (default all-MiniLM-L6-v2);
    checkpoint_dir: stage results and per-epoch training state are saved there and a rerun with
    the same arguments resumes (other arguments raise).
    """
    t_start = time.perf_counter()
    seconds: Dict[str, float] = {}
    check_models_match(describe_module(dense_model), describe_module(pruned_model))
    check_not_permuted(pruned_model, ["value"], "RestoreLCC (the o projection's inputs, dense vs pruned)")
    outs_d, heads_d, hd_d = _attention_geometry(dense_model)
    outs, n_heads, hd = _attention_geometry(pruned_model)
    if (len(outs_d), heads_d, hd_d) != (len(outs), n_heads, hd):
        raise ValueError(f"dense and pruned models differ: {len(outs_d)} vs {len(outs)} layers, {heads_d}x{hd_d} vs "
                         f"{n_heads}x{hd} heads")
    if next(dense_model.parameters()).device != next(pruned_model.parameters()).device:
        raise ValueError("dense and pruned models must be on the same device")
    n_layers, total_heads = len(outs), len(outs) * n_heads
    k = total_heads // 4 if top_k is None else int(top_k)
    if not 1 <= k <= total_heads:
        raise ValueError(f"top_k must be in [1, {total_heads}] (all heads), got {top_k}")
    if epochs < 1 or batch_size < 1 or rank < 1:
        raise ValueError("epochs, batch_size and rank must be >= 1")
    route = o_bias_route(pruned_model)  # refuse a family we cannot save before any work
    if pairs is None:
        if tokenizer is None:
            raise ValueError("give pairs or a tokenizer to build them")
        pairs = prompt_response_pairs(tokenizer, n_prompts, max_prompt_tokens, max_response_tokens, data_path)
    _check_pairs(pairs, pruned_model)
    n = len(pairs)
    ckpt = _Checkpoint(checkpoint_dir, dict(
        pairs=pairs.digest(), n=n, top_k=k, rank=rank, probe_epochs=probe_epochs, probe_lr=probe_lr,
        val_fraction=val_fraction, lr=lr, epochs=epochs, init_std=init_std, batch_size=batch_size, seed=seed,
        layers=n_layers, heads=n_heads, head_dim=hd, custom_embedder=embedder is not None,
        dense=_weights_digest(outs_d), pruned=_weights_digest(outs)))

    # 1-2. activations at the last prompt token -> per-head lost basis. A causal model's state at
    # the prompt's last token is the same inside prompt + response, so one forward over the
    # positives serves both the basis (prompt end) and the positive probe features (response end).
    t = time.perf_counter()
    pos_seqs = [p + r for p, r in zip(pairs.prompts, pairs.responses)]
    ends = [[len(p) - 1, len(p) + len(r) - 1] for p, r in zip(pairs.prompts, pairs.responses)]
    saved, pos_feats = ckpt.load("basis"), None
    if saved is None:
        a_d = o_proj_inputs(dense_model, pos_seqs, batch_size, progress, "dense positives", ends)
        a_p = o_proj_inputs(pruned_model, pos_seqs, batch_size, progress, "pruned positives", ends)
        basis, sv = lost_basis(a_d[:, 0], a_p[:, 0], n_heads, rank)
        pos_feats = lost_components(a_d[:, 1], a_p[:, 1], basis)
        del a_d, a_p
        ckpt.save("basis", {"basis": basis, "singular_values": sv})
    else:
        basis = saved["basis"]
    seconds["activations_svd"] = time.perf_counter() - t

    # 3. contrastive probing on the lost components at the end of prompt + response
    t = time.perf_counter()
    saved = ckpt.load("probe")
    if saved is None:
        embed = embedder or minilm_embedder()
        neg = most_similar_other(embed(pairs.response_texts), pairs.response_texts).tolist()
        neg_seqs = [p + pairs.responses[j] for p, j in zip(pairs.prompts, neg)]
        feats = []
        for name, seqs in (("positives", pos_seqs), ("negatives", neg_seqs)):
            if name == "positives" and pos_feats is not None:
                feats.append(pos_feats)
                continue
            a_d = o_proj_inputs(dense_model, seqs, batch_size, progress, f"dense {name}")
            a_p = o_proj_inputs(pruned_model, seqs, batch_size, progress, f"pruned {name}")
            feats.append(lost_components(a_d, a_p, basis))
        labels = torch.cat([torch.ones(n), torch.zeros(n)])
        groups = torch.arange(n).repeat(2)
        acc, vloss = probe_heads(torch.cat(feats), labels, groups, val_fraction, probe_epochs, probe_lr, seed)
        ckpt.save("probe", {"accuracy": acc, "loss": vloss, "negatives": torch.tensor(neg)})
    else:
        acc, vloss = saved["accuracy"], saved["loss"]
    heads = rank_heads(acc, vloss)[:k]
    seconds["probing"] = time.perf_counter() - t

    # 4. injection into the top-K heads, trained with the completion-only loss, then folded
    t = time.perf_counter()
    device = next(pruned_model.parameters()).device
    sel = torch.stack([basis[l, h] for l, h in heads])
    inj = _Injection(heads, sel, n_layers, n_heads, init_std, seed).to(device)
    params = [inj.v, inj.b]
    opt = torch.optim.Adam(params, lr=lr)
    losses: List[float] = []
    done = ckpt.progress().get("epochs_done", 0)
    if done:
        state = ckpt.load("train")
        with torch.no_grad():
            inj.v.copy_(state["v"]), inj.b.copy_(state["b"])
        _load_adam_state(opt, params, state)
        losses = list(ckpt.progress()["losses"])
    flags = {p: p.requires_grad for p in pruned_model.parameters()}
    was_training = pruned_model.training
    pruned_model.requires_grad_(False)
    pruned_model.eval()  # frozen weights: no dropout, deterministic
    inj.attach(outs)
    try:
        n_batches = math.ceil(n / batch_size)
        bar = tqdm(total=(epochs - done) * n_batches, desc="RestoreLCC training", disable=not progress)
        for epoch in range(done, epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1 + epoch)).tolist()
            epoch_loss = []
            for s in range(0, n, batch_size):
                ids, mask, labels = _completion_batch(pairs, order[s:s + batch_size], device)
                loss = pruned_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_loss.append(float(loss.detach()))
                bar.update(1)
            losses.append(sum(epoch_loss) / len(epoch_loss))
            ckpt.save("train", {"v": inj.v.detach(), "b": inj.b.detach(), **_adam_state(opt, params)})
            ckpt.commit(epochs_done=epoch + 1, losses=losses)
        bar.close()
    finally:
        inj.detach_hooks()
        for p, f in flags.items():
            p.requires_grad_(f)
        pruned_model.train(was_training)
    _fold(pruned_model, inj, route)
    seconds["training_fold"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    return RestoreLCCResult(model=pruned_model, heads=heads, probe_accuracy=acc, probe_loss=vloss, losses=losses,
                            trainable_params=inj.v.numel() + inj.b.numel(), n_pairs=n, rank=int(basis.shape[2]),
                            config_route=route[0], zero_biases_added=route[1], seconds=seconds)


class _Checkpoint:
    """Stage files of one run (``<stage>.safetensors``) and ``progress.json``, written atomically."""

    def __init__(self, directory: Optional[str], fingerprint: dict):
        self.dir = directory
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        prog = self.progress()
        if prog and prog.get("fingerprint") != self.fingerprint:
            diff = sorted(k for k in set(prog["fingerprint"]) | set(self.fingerprint)
                          if prog["fingerprint"].get(k) != self.fingerprint.get(k))
            raise ValueError(f"checkpoint_dir {directory!r} belongs to a RestoreLCC run with other arguments "
                             f"(differing: {diff}); use a fresh directory or the same arguments")
        if not prog:
            self.commit()

    def progress(self) -> dict:
        if self.dir is None or not os.path.exists(os.path.join(self.dir, "progress.json")):
            return {}
        with open(os.path.join(self.dir, "progress.json")) as f:
            return json.load(f)

    def commit(self, **record) -> None:
        if self.dir is not None:
            atomic_save_json(os.path.join(self.dir, "progress.json"), dict(record, fingerprint=self.fingerprint))

    def save(self, stage: str, tensors: Dict[str, torch.Tensor]) -> None:
        if self.dir is not None:
            atomic_save_tensors(os.path.join(self.dir, f"{stage}.safetensors"), tensors)

    def load(self, stage: str) -> Optional[Dict[str, torch.Tensor]]:
        p = None if self.dir is None else os.path.join(self.dir, f"{stage}.safetensors")
        return load_file(p) if p and os.path.exists(p) else None
