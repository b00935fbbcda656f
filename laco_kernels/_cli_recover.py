"""``laco run``'s recovery windows, resolved from the model before anything loads.

The layer-wise stage sees 16,384 C4 tokens, 1,024 a step, in windows of 512 tokens where the model
has 512 positions (32 windows at batch 2; stop 30: 61.75 -> 58.25 after the block stage and
51.99 -> 51.45 after the KL stage, against 128 windows of 128 at batch 8), else of 128 (128 windows at
batch 8, as before), in 3 passes on 512-token windows (stop 31: 58.25 -> 56.14 after the block
stage, 51.45 -> 50.00 after the KL stage, against 2 passes), else 2. LoRA and RestoreLCC keep
128-token windows and 2 passes. An option the user gives wins; the window options left out are
derived from it at the same 16,384 tokens and 1,024 tokens a step.
The KL stage takes windows of 512 (``auto_stage2_seqlen``) of its own (docs/recovery.md).
"""
from __future__ import annotations

TOKENS = 16384  # layer-wise stage: tokens in all
STEP_TOKENS = 1024  # tokens per optimizer step
LAYERWISE_SEQLEN = 512
SHORT_SEQLEN = 128
LAYERWISE_EPOCHS = 3  # passes of the layer-wise stage on 512-token windows (stop 31: 51.45 -> 50.00 for 2 -> 3)
EPOCHS = 2  # every other recovery (LoRA, RestoreLCC, 128-token layer-wise windows)


def _positions(path: str):
    from transformers import AutoConfig

    from ._validation import model_limits

    return model_limits(AutoConfig.from_pretrained(path))[1]


def auto_recover_windows(args, path: str) -> None:
    """Fill ``recover_seqlen`` / ``recover_nsamples`` / ``recover_batch_size`` left as None."""
    if not getattr(args, "auto_recover_windows", False):
        return
    if args.recover_seqlen is None:
        long_ok = args.recover == "layerwise" and (_positions(path) or LAYERWISE_SEQLEN) >= LAYERWISE_SEQLEN
        args.recover_seqlen = LAYERWISE_SEQLEN if long_ok else SHORT_SEQLEN
    if args.recover_nsamples is None:
        args.recover_nsamples = max(1, TOKENS // args.recover_seqlen)
    if args.recover_batch_size is None:
        args.recover_batch_size = max(1, STEP_TOKENS // args.recover_seqlen)
    if args.recover_epochs is None:
        long = args.recover == "layerwise" and args.recover_seqlen >= LAYERWISE_SEQLEN
        args.recover_epochs = LAYERWISE_EPOCHS if long else EPOCHS


def auto_stage2_seqlen(args, path: str) -> None:
    """``laco run``'s default KL window (``auto_stage2_seqlen``, 512) where --recover-stage2-seqlen is
    not given, the KL stage runs and the model has that many positions; otherwise the block stage's
    windows, as before."""
    auto = getattr(args, "auto_stage2_seqlen", None)
    if args.recover_stage2_seqlen is not None or not auto or not args.recover_stage2_epochs:
        return
    positions = _positions(path)
    if positions is None or positions >= auto:
        args.recover_stage2_seqlen = auto
