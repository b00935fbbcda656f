"""LoRA baseline for recovering a pruned model (through peft), trained with the causal-LM loss.

Every linear of every decoder block (q, k, v, o, gate, up, down for Llama) gets a rank-r adapter;
the base weights are frozen, so the pruned weights stay zero *in the base*. Merging the adapter
(``merge=True``) adds a dense low-rank product to each weight and destroys the sparsity: the
result then reports how many pruned weights became non-zero. By default the adapter is kept
unmerged (the model runs base + adapter).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._validation import check_seqlen, check_token_ids
from ..models.adapters import get_adapter


@dataclass
class LoraResult:
    """model: the peft model (unmerged) or the merged plain model; losses: mean loss per epoch."""

    model: nn.Module
    losses: List[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    merged: bool = False
    pruned_weights_made_nonzero: Optional[float] = None  # fraction, when merged


def _target_modules(model: nn.Module) -> List[str]:
    """Leaf names of the block linears (peft matches module-name suffixes)."""
    return sorted({name.rsplit(".", 1)[-1] for name in get_adapter(model).linear_names()})


def lora(pruned_model: nn.Module, tokenizer_or_calibration, *, nsamples: int = 128, seqlen: int = 128,
         r: int = 8, alpha: int = 16, dropout: float = 0.05, lr: float = 3e-4, weight_decay: float = 0.0,
         epochs: int = 2, batch_size: int = 4, clip: float = 1.0, lr_min: float = 0.0, device: str = "cpu",
         seed: int = 0, merge: bool = False, max_steps: Optional[int] = None, progress: bool = True,
         autocast: bool = False) -> LoraResult:
    """Train LoRA adapters on ``pruned_model`` with the causal-LM loss over calibration windows.

    tokenizer_or_calibration: token ids ``[samples, seqlen]`` (int64), or a tokenizer, in which case
    ``nsamples`` C4 windows of ``seqlen`` tokens are drawn (``laco_kernels.data.calibration_windows``).
    AdamW with a cosine schedule to ``lr_min``, gradient clip ``clip``; ``max_steps`` stops early
    (memory measurements); ``autocast``: forward and backward under ``torch.autocast(device,
    bfloat16)`` (parameters stay in their dtype). The model is wrapped in place by peft.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(tokenizer_or_calibration, torch.Tensor):
        ids = check_token_ids(tokenizer_or_calibration, pruned_model, "calibration")
    else:
        from ..data import calibration_windows

        check_seqlen(seqlen, pruned_model, "seqlen")
        ids = calibration_windows(tokenizer_or_calibration, nsamples, seqlen, seed=seed)
    if epochs < 1 or batch_size < 1 or r < 1:
        raise ValueError("epochs, batch_size and r must be >= 1")
    t0 = time.time()
    zeros = None
    if merge:
        zeros = {n: p.detach() == 0 for n, p in pruned_model.named_parameters() if p.dim() == 2}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_target_modules(pruned_model),
                        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(pruned_model, config)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_batches = math.ceil(len(ids) / batch_size)
    total = epochs * n_batches if max_steps is None else min(max_steps, epochs * n_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), eta_min=lr_min)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, step = [], 0
    bar = tqdm(total=total, desc="LoRA", disable=not progress)
    for _ in range(epochs):
        epoch_losses = []
        for b in torch.randperm(n_batches, generator=gen).tolist():
            if step >= total:
                break
            x = ids[b * batch_size:(b + 1) * batch_size].to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            step += 1
            epoch_losses.append(float(loss.detach()))
            bar.update(1)
        if epoch_losses:
            losses.append(sum(epoch_losses) / len(epoch_losses))
    bar.close()
    model.eval()
    result = LoraResult(model=model, losses=losses, steps=step, tokens=int(ids.numel()))
    if merge:
        merged = model.merge_and_unload()
        state = dict(merged.named_parameters())
        made = sum(int((state[n].detach()[z] != 0).sum()) for n, z in zeros.items() if n in state)
        pruned = sum(int(z.sum()) for n, z in zeros.items() if n in state)
        result.model, result.merged = merged, True
        result.pruned_weights_made_nonzero = made / max(pruned, 1)
    result.seconds = round(time.time() - t0, 3)
    return result
