"""LaCo layer-wise compensation: recover a pruned model block by block, its sparsity mask kept exactly.

Two streams run over the calibration set through :class:`~laco_kernels.models.capture.BlockRunner`:
the dense stream ``H_l = dense_block_l(H_{l-1})`` and the pruned stream ``H'_l``. For each block
``l`` the pruned block is swapped to trainable sparse layers (``laco_kernels.nn.sparsify``: 2:4 as
compressed values, unstructured as a weight plus a fixed bit mask; norms trainable too), trained to
minimise ``loss(pruned_block_l(H'_{l-1}), target)`` with ``target = H_l`` (``"dense-stream"``, the
default) or ``dense_block_l(H'_{l-1})`` (``"ebft"``), then ``H'_l = trained_block_l(H'_{l-1})``
and the block is densified back. Only the block in training is on the compute device; the rest of
both models stays on the CPU, or on disk (pass a model folder instead of a module). An optional
stage 2 distils the whole pruned model to the dense logits (KL, temperature T, loss x T^2).

Crash-safe (``checkpoint_dir``), data-parallel under ``torch.distributed`` (each rank holds a
shard of the calibration samples; gradients are averaged before every step).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from ..formats import pack_bits, unpack_bits
from ..models.adapters import block_linears
from ..models.capture import BlockRunner, HiddenStream
from .._validation import check_models_match, check_token_ids, describe_folder, describe_module
from ._checkpoint import RecoveryCheckpoint, tensor_digest
from ._losses import block_loss, distill_kl, parse_loss
from ._output import write_folder
from ._source import DiskSource, ModuleSource

TARGETS = ("dense-stream", "ebft")
INPUTS = ("pruned", "dense", "mix")
TRAINABLE = ("all", "linears")
PATTERNS = ("auto", "2:4", "unstructured")
_CRASH_ENV = "_LACO_CRASH_AT"  # test hook "block:step": os._exit after that optimizer step


@dataclass
class LayerwiseConfig:
    """Recovery settings; defaults are the published LaCo recipe (batch 1, 10 epochs, AdamW 5e-5).

    batch_size is per rank (global batch = batch_size x world size). max_steps_per_block caps
    the optimizer steps of each block (memory measurements). eval_batch_size: micro-batch of the
    no-grad passes that build the streams. inputs: what each block is trained on ("pruned":
    the pruned stream, LaCo; "dense": the dense stream; "mix": both in turn, step by step), the
    target being the dense block's output. trainable: "all" float parameters of the block (2:4
    values, biases, norms) or only the "linears". warmup: fraction of each block's steps of
    linear warmup before the cosine (docs/recovery.md). autocast: run the training forward and
    backward passes (and stage 2's dense teacher) under ``torch.autocast(device, bfloat16)``; the
    parameters, optimizer state and streams keep their dtypes. On a CPU with AVX512-BF16 / AMX
    the GEMMs then run in bf16 (the 2:4 op has a CPU autocast rule, ``ops/sparse_gemm.py``).
    """

    epochs: int = 10
    lr: float = 5e-5
    weight_decay: float = 1e-5
    lr_min: float = 1e-7
    batch_size: int = 1
    clip: float = 1.0
    loss: str = "mse"
    target: str = "dense-stream"
    pattern: str = "auto"
    device: str = "cpu"
    train_dtype: torch.dtype = torch.float32
    stream_dtype: torch.dtype = torch.float16
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    offload_dir: Optional[str] = None
    output_dir: Optional[str] = None
    max_steps_per_block: Optional[int] = None
    eval_batch_size: int = 8
    track_errors: bool = True
    error_samples: int = 0  # track_errors on the first N windows of each rank only (0: all of them)
    progress: bool = True
    stage2_epochs: int = 0
    stage2_lr: float = 1e-5
    stage2_batch_size: int = 1
    temperature: float = 1.0  # KL stage; T = 1 beat T = 2 by 1.5 ppl at 16k tokens (docs/recovery.md)
    stage2_hidden: float = 0.0  # KL stage: + this x the mean token-nmse of every block's output vs the dense one
    # KL stage: this fraction of the input ids, drawn afresh each step, replaced by uniform random ids
    # (teacher and student read the same corrupted window): new contexts on every pass over few tokens
    stage2_noise: float = 0.0
    inputs: str = "pruned"
    trainable: str = "all"
    warmup: float = 0.0
    autocast: bool = False

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (math.isfinite(self.stage2_hidden) and self.stage2_hidden >= 0):
            raise ValueError(f"stage2_hidden must be a finite weight >= 0, got {self.stage2_hidden}")
        if not (math.isfinite(self.stage2_noise) and 0.0 <= self.stage2_noise < 1.0):
            raise ValueError(f"stage2_noise is a fraction of input ids in [0, 1), got {self.stage2_noise}")
        if self.stage2_noise and not self.stage2_epochs:
            raise ValueError(f"stage2_noise={self.stage2_noise} is given but stage2_epochs is 0: the KL stage it "
                             "applies to would not run")
        if self.lr <= 0 or self.clip <= 0:
            raise ValueError(f"lr and clip must be positive, got lr={self.lr}, clip={self.clip}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.inputs != "pruned" and self.target != "dense-stream":
            raise ValueError(f"inputs={self.inputs!r} needs target='dense-stream' (the dense stream is its input)")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if isinstance(self.error_samples, bool) or not isinstance(self.error_samples, int) or self.error_samples < 0:
            raise ValueError(f"error_samples must be a number of windows >= 0 (0: all), got {self.error_samples!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of each block's steps in [0, 1), got {self.warmup}")
        parse_loss(self.loss)

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that change the result (checkpoint identity)."""
        skip = {"checkpoint_dir", "progress", "output_dir", "offload_dir", "eval_batch_size", "error_samples"}
        # options added later are left out at their default, so a checkpoint written before they existed
        # (same settings) still resumes
        later = {"stage2_noise": 0.0}
        return {k: str(v) for k, v in dataclasses.asdict(self).items()
                if k not in skip and not (k in later and v == later[k])}


@dataclass
class LayerwiseResult:
    """model: the recovered module (in-memory input) or the output folder (disk input)."""

    model: Union[nn.Module, str]
    blocks: List[Dict[str, Any]] = field(default_factory=list)
    stage2: List[float] = field(default_factory=list)
    tokens: int = 0
    stage2_tokens: int = 0  # the windows stage 2 ran on (``stage2_calibration`` or the same as ``tokens``)
    seconds: float = 0.0
    resumed_from: int = 0


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _average_grads(params: List[nn.Parameter], world: int) -> None:
    """All-reduce (mean) every gradient in one flat buffer (one collective per step)."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def _shard_indices(n: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """Global sample indices held by ``rank``: local batch b = samples b*G + rank*bs + [0, bs).

    Global batch b (G = bs * world samples) is thus the same set in a single-process run with
    batch G and in a ``world``-rank run with batch bs; shuffling permutes batch order only.
    """
    g = batch_size * world
    if world > 1 and n % g:
        raise ValueError(f"{n} calibration samples do not split into global batches of {g} "
                         f"({batch_size} per rank x {world} ranks)")
    idx = torch.arange(n)
    if world == 1:
        return idx
    return idx.view(n // g, world, batch_size)[:, rank].reshape(-1)


def _detect_pattern(block: nn.Module, adapter) -> str:
    """"2:4" when every linear of the block has at most 2 non-zeros in each group of 4 inputs."""
    for lin in block_linears(block, adapter).values():
        w = lin.weight.detach()
        if w.shape[1] % 4 or int(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) > 2).sum()):
            return "unstructured"
    return "2:4"


def _masks(block: nn.Module, adapter) -> Dict[str, torch.Tensor]:
    """Where each linear's weight is zero, bit-packed (1 bit a weight: a bool mask would be 8)."""
    return {n: pack_bits(lin.weight.detach() == 0) for n, lin in block_linears(block, adapter).items()}


def _check_masks(block: nn.Module, adapter, zeros: Dict[str, torch.Tensor], l: int) -> None:
    """Every weight that was pruned before recovery must still be exactly zero."""
    for n, lin in block_linears(block, adapter).items():
        w = lin.weight.detach()
        bad = int((w[unpack_bits(zeros[n], w.shape[1])] != 0).sum())
        if bad:
            raise RuntimeError(f"block {l} {n}: {bad} pruned weights became non-zero during recovery")


def _set_trainable(block: nn.Module, which: str = "all", adapter=None) -> List[nn.Parameter]:
    """Parameters to train: every float parameter (``"all"``: sparse values, biases, norms) or
    only those of the block's prunable linears (``"linears"``: norms stay frozen). Every other
    parameter of the block gets ``requires_grad=False``."""
    if which == "linears":
        mods = [block.get_submodule(n) for n in adapter.linear_names()]
        cand = [p for m in mods for p in m.parameters()]
    else:
        cand = list(block.parameters())
    for p in block.parameters():  # the rest frozen: no gradient is computed for what is not stepped
        p.requires_grad_(False)
    params = []
    for p in cand:
        if p.is_floating_point():
            p.requires_grad_(True)
            params.append(p)
    return params


def _schedule(opt: torch.optim.Optimizer, total: int, cfg: "LayerwiseConfig"):
    """Cosine from lr to lr_min over ``total`` steps, after a linear warmup of ``cfg.warmup * total``."""
    total = max(total, 1)
    warm = int(round(cfg.warmup * total))
    if not warm:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr_min)
    floor = cfg.lr_min / cfg.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _adamw(params: List[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device: the default multi-tensor
    (foreach) step allocates temporaries as large as the parameters it updates."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # raised at construction for a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def _autocast(cfg: "LayerwiseConfig"):
    """bf16 autocast on the compute device when ``cfg.autocast``, else a no-op context."""
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.autocast)


def _crash_point():
    spec = os.environ.get(_CRASH_ENV)
    return tuple(int(x) for x in spec.split(":")) if spec else None


@torch.no_grad()
def _stream_nmse(a: HiddenStream, b: HiddenStream, chunk: int = 16, rows: Optional[int] = None) -> torch.Tensor:
    """[sum (a-b)^2, sum b^2] over the first ``rows`` samples (all of ``a``: None), in fp64."""
    acc = torch.zeros(2, dtype=torch.float64)
    n = len(a) if rows is None else min(rows, len(a))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x, y = a[s:e].double(), b[s:e].double()
        acc += torch.stack([((x - y) ** 2).sum(), (y ** 2).sum()])
    return acc


def _global_nmse(acc: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    return float(acc[0] / acc[1].clamp_min(1e-30))


def _train_block(block: nn.Module, runner: BlockRunner, x_ins: List[HiddenStream], target: HiddenStream,
                 cfg: LayerwiseConfig, l: int, world: int, adapter=None) -> Dict[str, Any]:
    """Train ``block`` (already sparsified, on the device) on (x_in -> target); returns loss trace.

    x_ins: one input stream, or several used in turn, step by step (``inputs="mix"``).
    """
    params = _set_trainable(block, cfg.trainable, adapter)
    opt = _adamw(params, cfg.lr, cfg.weight_decay)
    n_batches = math.ceil(len(target) / cfg.batch_size)
    total = cfg.epochs * n_batches
    if cfg.max_steps_per_block is not None:
        total = min(total, cfg.max_steps_per_block)
    sched = _schedule(opt, total, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + l)  # per block: resume is bit-exact
    torch.manual_seed(cfg.seed * 1_000_003 + l)
    kinds = parse_loss(cfg.loss)
    crash = _crash_point()
    losses, step = [], 0
    block.train()
    bar = tqdm(total=total, desc=f"block {l}", leave=False, disable=not cfg.progress)
    while step < total:
        for b in torch.randperm(n_batches, generator=gen).tolist():
            if step >= total:
                break
            sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            x = x_ins[step % len(x_ins)][sl].to(runner.device)
            y = target[sl].to(runner.device, cfg.train_dtype)
            with _autocast(cfg):
                out = runner.forward_block(block, x)
            loss = block_loss(out.float(), y, kinds)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_grads(params, world)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if crash == (l, step):
                os._exit(86)
    bar.close()
    block.eval()
    for p in params:
        p.grad = None  # the last step's gradients would otherwise live on with the block
        p.requires_grad_(False)
    return {"steps": step, "loss_first": losses[0] if losses else None,
            "loss_last": float(sum(losses[-n_batches:]) / len(losses[-n_batches:])) if losses else None}


def layerwise(dense_model: Union[nn.Module, str], pruned_model: Union[nn.Module, str],
              calibration: torch.Tensor, stage2_calibration: Optional[torch.Tensor] = None,
              **config) -> LayerwiseResult:
    """Recover ``pruned_model`` block by block towards ``dense_model``; see the module docstring.

    dense_model / pruned_model: causal LMs in RAM (``nn.Module``, same family and shapes; the
    pruned one is updated in place) or Hugging Face folders with safetensors weights (read block
    by block; the recovered model is written to ``output_dir``). calibration: token ids
    ``[samples, seqlen]`` (int64), the same on every rank (each rank takes its shard).
    stage2_calibration: token ids for stage 2 (end-to-end KL) when it should see other windows than
    the layer-wise stage (more, fewer or longer); default ``calibration``.
    config: fields of :class:`LayerwiseConfig`. Returns a :class:`LayerwiseResult` whose
    ``blocks`` hold, per block, the normalised error ``||out - target||^2 / ||target||^2`` over the
    calibration set before and after training, and the training losses.
    """
    cfg = LayerwiseConfig(**config)
    cfg.validate()
    calibration = check_token_ids(calibration, None, "calibration")  # type, rank, empty: before any read
    if stage2_calibration is not None:
        if not cfg.stage2_epochs:
            raise ValueError("stage2_calibration is given but stage2_epochs is 0: stage 2 would not run")
        stage2_calibration = check_token_ids(stage2_calibration, None, "stage2_calibration")
    t0 = time.time()
    rank, world = _rank_world()
    on_disk = isinstance(pruned_model, str)
    if isinstance(dense_model, str) != on_disk:
        raise ValueError("give both models as modules or both as folders")
    if on_disk and not cfg.output_dir:
        raise ValueError("models given as folders need output_dir for the recovered weights")
    if on_disk and cfg.stage2_epochs:
        raise ValueError("stage 2 needs both whole models in memory; give modules, not folders")
    # the dense model only lends blocks: its skeleton reads no other tensor
    dsrc = DiskSource(dense_model, with_rest=False) if on_disk else ModuleSource(dense_model)
    psrc = DiskSource(pruned_model) if on_disk else ModuleSource(pruned_model)
    # same family, block count and linear shapes, and ids the pruned model can embed: checked
    # before the first block is trained (the error names the first difference)
    check_models_match(describe_folder(dense_model) if on_disk else describe_module(dense_model),
                       describe_folder(pruned_model) if on_disk else describe_module(pruned_model))
    calibration = check_token_ids(calibration, psrc.model, "calibration")
    if stage2_calibration is not None:
        stage2_calibration = check_token_ids(stage2_calibration, psrc.model, "stage2_calibration")
    adapter = psrc.adapter
    ckpt_dir = cfg.checkpoint_dir or (os.path.join(cfg.output_dir, "_checkpoint") if on_disk else None)
    ckpt = None
    if ckpt_dir:
        fp = dict(cfg.fingerprint(), calibration=tensor_digest(calibration), world=world,
                  n_blocks=psrc.n_blocks)
        ckpt = RecoveryCheckpoint(ckpt_dir, fp)
    runner = BlockRunner(psrc.model, device=cfg.device, batch_size=cfg.eval_batch_size,
                         stream_dtype=cfg.stream_dtype, offload_dir=cfg.offload_dir, progress=False)
    ids = calibration[_shard_indices(len(calibration), cfg.batch_size, rank, world)]
    embed_ids = psrc.embed_calibration(ids) if on_disk else ids  # disk: only the rows used are read

    prog = ckpt.load_progress() if ckpt else None
    start = prog["finished"] if prog else 0
    records: List[Dict[str, Any]] = list(prog["blocks"]) if prog else []
    for l in range(start):
        psrc.store(l, ckpt.load_block(l))
    dense_in = None
    if start == 0:
        pruned_in = runner.capture(embed_ids)
        if cfg.target == "dense-stream":
            dense_in = runner.new_stream(pruned_in.shape)
            dense_in.data.copy_(pruned_in.data)
    else:
        saved = ckpt.load_streams(start - 1, rank)
        pruned_in = runner.new_stream(tuple(saved["pruned"].shape))
        pruned_in[:] = saved["pruned"]
        if cfg.target == "dense-stream":
            dense_in = runner.new_stream(tuple(saved["dense"].shape))
            dense_in[:] = saved["dense"]
        del saved

    if on_disk:  # record the block kwargs of every micro-batch size, then free the embedding
        t = ids.shape[1]
        for bs in (cfg.batch_size, cfg.eval_batch_size):
            for size in {min(bs, len(ids) - s) for s in range(0, len(ids), bs)}:
                runner.block_kwargs(size, t)
        psrc.drop_embeddings()

    pattern = cfg.pattern
    for l in tqdm(range(start, psrc.n_blocks), desc="layer-wise recovery", disable=not cfg.progress or rank):
        tb = time.time()
        dblock = dsrc.load(l)
        if cfg.target == "dense-stream":
            target = runner.run_block(dblock, dense_in)
        else:
            target = runner.run_block(dblock, pruned_in)
        dsrc.release(l, dblock)
        del dblock
        block = psrc.load(l)
        if pattern == "auto":
            pattern = _detect_pattern(block, adapter)
        zeros = _masks(block, adapter)
        rec: Dict[str, Any] = {"block": l, "pattern": pattern}
        n_err = min(cfg.error_samples or len(pruned_in), len(pruned_in))
        if cfg.track_errors:  # the pruned block before training, on the first n_err windows
            head = pruned_in
            if n_err < len(pruned_in):
                head = runner.new_stream((n_err,) + tuple(pruned_in.shape[1:]))
                head[:] = pruned_in[:n_err]
            before = runner.run_block(block, head)
            rec["nmse_before"] = _global_nmse(_stream_nmse(before, target, rows=n_err), world)
            rec["error_samples"] = n_err
            before.delete()
            if head is not pruned_in:
                head.delete()
        home_dtype = next(block.parameters()).dtype
        block = _sparsify(block, pattern)
        block.to(runner.device, cfg.train_dtype)
        x_ins = {"pruned": [pruned_in], "dense": [dense_in], "mix": [pruned_in, dense_in]}[cfg.inputs]
        rec.update(_train_block(block, runner, x_ins, target, cfg, l, world, adapter))
        block = _densify(block)
        block.to("cpu", home_dtype)
        psrc.put(l, block)
        _check_masks(block, adapter, zeros, l)
        pruned_out = runner.run_block(block, pruned_in)
        if cfg.track_errors:
            rec["nmse_after"] = _global_nmse(_stream_nmse(pruned_out, target, rows=n_err), world)
        rec["seconds"] = round(time.time() - tb, 3)
        state = {k: v.detach() for k, v in block.state_dict().items()}  # saved at once: no copy
        if not isinstance(psrc, ModuleSource):
            psrc.release(l, block)
        del block
        if cfg.target == "dense-stream":
            dense_in.delete()
            dense_in = target
        else:
            target.delete()
        pruned_in.delete()
        pruned_in = pruned_out
        records.append(rec)
        if ckpt:
            if rank == 0:
                ckpt.save_block(l, state)
            streams = {"pruned": pruned_in.data}
            if dense_in is not None:
                streams["dense"] = dense_in.data
            ckpt.save_streams(l, rank, streams)
            _barrier(world)
            if rank == 0:
                ckpt.commit(l + 1, {"blocks": records, "n_blocks": psrc.n_blocks})
            _barrier(world)
            ckpt.cleanup(l + 1, rank)
        del state
    pruned_in.delete()
    if dense_in is not None:
        dense_in.delete()

    result = LayerwiseResult(model=cfg.output_dir if on_disk else pruned_model, blocks=records,
                             tokens=int(calibration.numel()), resumed_from=start)
    if cfg.stage2_epochs:
        ids2 = ids if stage2_calibration is None else stage2_calibration[
            _shard_indices(len(stage2_calibration), cfg.stage2_batch_size, rank, world)]
        result.stage2 = _stage2(dense_model, pruned_model, ids2, cfg, adapter, world)
        result.stage2_tokens = int((calibration if stage2_calibration is None else stage2_calibration).numel())
    if on_disk and rank == 0:
        write_folder(psrc, ckpt, cfg.output_dir)
    _barrier(world)
    result.seconds = round(time.time() - t0, 3)
    return result


def _sparsify(block: nn.Module, pattern: str) -> nn.Module:
    """Swap the block's linears in place for trainable sparse layers (2:4 values / masked weight)."""
    from ..nn import sparsify

    report = sparsify(block, pattern=pattern, mode="train")
    if not report["swapped"]:
        raise RuntimeError(f"no linear of the block could be made {pattern}-sparse")
    return block


def _densify(block: nn.Module) -> nn.Module:
    from ..nn import densify

    densify(block)
    return block


def _stage2(dense_model: nn.Module, pruned_model: nn.Module, ids: torch.Tensor, cfg: LayerwiseConfig,
            adapter, world: int) -> List[float]:
    """End-to-end KL distillation of the whole pruned model (masks kept) to the dense logits.

    Both whole models visit ``cfg.device`` here: memory is the model's, not one block's.
    Returns the mean loss of each epoch.
    """
    from ..models.adapters import get_module

    T = cfg.temperature
    hidden = cfg.stage2_hidden > 0
    blocks = get_module(pruned_model, adapter.blocks)
    zeros = [_masks(b, adapter) for b in blocks]
    pattern = cfg.pattern if cfg.pattern != "auto" else _detect_pattern(blocks[0], adapter)
    for i in range(len(blocks)):
        blocks[i] = _sparsify(blocks[i], pattern)
    for p in pruned_model.parameters():
        p.requires_grad_(False)
    params = [p for b in blocks for p in _set_trainable(b, cfg.trainable, adapter)]
    dense_model.to(cfg.device)
    pruned_model.to(cfg.device)
    opt = _adamw(params, cfg.stage2_lr, cfg.weight_decay)
    bs = cfg.stage2_batch_size
    n_batches = math.ceil(len(ids) / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.stage2_epochs * n_batches, eta_min=cfg.lr_min)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_983)
    vocab = pruned_model.get_input_embeddings().num_embeddings
    history = []
    pruned_model.train()
    for _ in tqdm(range(cfg.stage2_epochs), desc="stage 2 (KL)", disable=not cfg.progress):
        total = 0.0
        for b in torch.randperm(n_batches, generator=gen).tolist():
            x = ids[b * bs:(b + 1) * bs]
            if cfg.stage2_noise:
                swap = torch.rand(x.shape, generator=gen) < cfg.stage2_noise
                x = torch.where(swap, torch.randint(0, vocab, x.shape, generator=gen), x)
            x = x.to(cfg.device)
            with torch.no_grad(), _autocast(cfg):
                t_out = dense_model(input_ids=x, use_cache=False, output_hidden_states=hidden)
            with _autocast(cfg):
                s_out = pruned_model(input_ids=x, use_cache=False, output_hidden_states=hidden)
            kl = distill_kl(s_out.logits, t_out.logits, T)  # chunked: ~2.4x faster than log_softmax x 2
            if hidden:  # every block's output (embeddings excluded), each token weighing the same
                pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
                kl = kl + cfg.stage2_hidden * sum(block_loss(sh, th, [(1.0, "token-nmse")])
                                                  for sh, th in pairs) / len(pairs)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            _average_grads(params, world)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            total += float(kl.detach())
        history.append(total / n_batches)
    pruned_model.eval()
    for i in range(len(blocks)):
        blocks[i] = _densify(blocks[i])
        _check_masks(blocks[i], adapter, zeros[i], i)
    for p in pruned_model.parameters():
        p.requires_grad_(False)
    dense_model.to("cpu")
    pruned_model.to("cpu")
    return history
