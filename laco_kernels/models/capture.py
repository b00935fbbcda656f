"""The one mechanism that runs calibration data through a causal LM block by block.

Pruning, sparsity allocation, layer removal and recovery all use it: none re-implements it.

- :meth:`BlockRunner.capture` embeds the calibration tokens and returns the hidden states that
  enter block 0, as a :class:`HiddenStream` ``[S, T, D]`` kept on the CPU (in RAM, or in a
  memory-mapped file when ``offload_dir`` is given), never the activations of every block.
- :meth:`BlockRunner.run_block` moves one block to the compute device, applies it to a stream
  micro-batch by micro-batch, writes the outputs to another stream and moves the block back.
  Run it on the dense model's blocks for the dense stream and on the pruned model's blocks
  for the pruned stream; forward hooks that a caller registers on the block's linears see
  every micro-batch (how Wanda / SparseGPT statistics are gathered).
The keyword arguments a block needs (rotary position embeddings, causal mask, position ids)
are recorded from the model itself, once per micro-batch size, so any family with an
adapter row works without family-specific code here.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, get_adapter, get_module


class HiddenStream:
    """Hidden states of S calibration samples, ``[S, T, D]``, held on the CPU.

    path=None keeps them in RAM; a path stores them in a memory-mapped file (for streams that
    do not fit in memory). Writing a non-finite value (fp16 overflow) raises.
    """

    def __init__(self, shape: Tuple[int, int, int], dtype: torch.dtype = torch.float16,
                 path: Optional[str] = None):
        self.shape, self.dtype, self.path = tuple(shape), dtype, path
        numel = shape[0] * shape[1] * shape[2]
        if path is None:
            self.data = torch.empty(self.shape, dtype=dtype)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.data = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.data[idx]

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        v = value.detach().to("cpu", self.dtype)
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"non-finite hidden state written to a {self.dtype} stream "
                                     "(overflow?); use stream_dtype=torch.bfloat16 or torch.float32")
        self.data[idx] = v

    def like(self, path: Optional[str] = None) -> "HiddenStream":
        """An empty stream of the same shape and dtype."""
        return HiddenStream(self.shape, self.dtype, path)

    def clone(self, path: Optional[str] = None) -> "HiddenStream":
        out = self.like(path)
        out.data.copy_(self.data)
        return out

    def delete(self) -> None:
        """Drop the data (and the backing file, if any)."""
        self.data = None
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


class _StopForward(Exception):
    pass


def _to(obj: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    """Move tensors inside nested tuples/lists/dicts; cast floating tensors to ``dtype`` if given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def block_dtype(block: nn.Module) -> torch.dtype:
    for p in block.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class BlockRunner:
    """Runs a causal LM's decoder blocks one at a time over calibration samples.

    model: a Hugging Face causal LM with an adapter row (stays where it is, usually the CPU);
    device: where one block at a time computes; batch_size: micro-batch of samples;
    stream_dtype: dtype of stored hidden states; offload_dir: memory-map streams there.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 stream_dtype: torch.dtype = torch.float16, offload_dir: Optional[str] = None,
                 progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        self.blocks: nn.ModuleList = get_module(model, self.adapter.blocks)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.stream_dtype = stream_dtype
        self.offload_dir = offload_dir
        self.progress = progress
        self._kwargs: Dict[Tuple[int, int], Dict[str, Any]] = {}

    # -- streams -------------------------------------------------------------------------
    def new_stream(self, shape: Tuple[int, int, int]) -> HiddenStream:
        path = None
        if self.offload_dir:
            path = os.path.join(self.offload_dir, f"stream-{uuid.uuid4().hex}.bin")
        return HiddenStream(shape, self.stream_dtype, path)

    def _embed_batch(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Hidden states entering block 0 and the block kwargs, for one micro-batch."""
        captured: Dict[str, Any] = {}

        def hook(_module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        dev = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids.to(dev), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "hidden" not in captured:
            raise RuntimeError("the model never reached its first decoder block")
        kw = captured["kwargs"]
        kw.pop("past_key_values", None), kw.pop("past_key_value", None)
        kw["use_cache"] = False
        return captured["hidden"], kw

    def capture(self, input_ids: torch.Tensor) -> HiddenStream:
        """Embed ``input_ids`` ``[S, T]``; return the stream entering block 0."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [samples, seqlen], got shape {tuple(input_ids.shape)}")
        s, t = input_ids.shape
        stream: Optional[HiddenStream] = None
        for start in self._batches(s, "embedding"):
            ids = input_ids[start:start + self.batch_size]
            hidden, kw = self._embed_batch(ids)
            self._kwargs.setdefault((ids.shape[0], t), kw)
            if stream is None:
                stream = self.new_stream((s, t, hidden.shape[-1]))
            stream[start:start + ids.shape[0]] = hidden
        return stream

    def block_kwargs(self, batch: int, seqlen: int) -> Dict[str, Any]:
        """The keyword arguments a block takes for a micro-batch of this size (recorded once)."""
        key = (batch, seqlen)
        if key not in self._kwargs:
            dummy = torch.zeros(batch, seqlen, dtype=torch.long)
            self._kwargs[key] = self._embed_batch(dummy)[1]
        return self._kwargs[key]

    # -- running blocks --------------------------------------------------------------------
    def forward_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Apply ``block`` (already on the compute device) to ``hidden`` ``[b, T, D]``.

        hidden is cast to the block's dtype; the output keeps that dtype. Differentiable.
        """
        dt = block_dtype(block)
        kw = _to(self.block_kwargs(hidden.shape[0], hidden.shape[1]), self.device, dt)
        out = block(hidden.to(self.device, dt), **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    def iter_batches(self, stream: HiddenStream, order: Optional[torch.Tensor] = None,
                     batch_size: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(sample indices, hidden [b, T, D] on the device)``; ``order`` permutes samples."""
        bs = batch_size or self.batch_size
        idx_all = torch.arange(len(stream)) if order is None else order
        for start in range(0, len(stream), bs):
            idx = idx_all[start:start + bs]
            yield idx, stream[idx].to(self.device)

    @torch.no_grad()
    def run_block(self, block: nn.Module, stream_in: HiddenStream, stream_out: Optional[HiddenStream] = None,
                  desc: str = "block") -> HiddenStream:
        """Apply one block to every sample of ``stream_in``; return the output stream.

        The block visits the compute device for the duration of the call only.
        ``stream_out`` may be ``stream_in`` (in-place update, micro-batch by micro-batch).
        """
        out = stream_out if stream_out is not None else stream_in.like(
            os.path.join(self.offload_dir, f"stream-{uuid.uuid4().hex}.bin") if self.offload_dir else None)
        home = next(block.parameters()).device
        block.to(self.device)
        try:
            for start in self._batches(len(stream_in), desc):
                h = stream_in[start:start + self.batch_size].to(self.device)
                out[start:start + h.shape[0]] = self.forward_block(block, h)
        finally:
            block.to(home)
        return out

    def _batches(self, n: int, desc: str):
        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=desc, leave=False) if self.progress else starts
