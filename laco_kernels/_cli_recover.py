"""``laco run``'s recovery windows, resolved from the model before anything loads.

The layer-wise stage sees 16,384 C4 tokens, 1,024 a step, in windows of 512 tokens where the model
has 512 positions (32 windows at batch 2; stop 30: 61.75 -> 58.25 after the block stage and
51.99 -> 51.45 after the KL stage, against 128 windows of 128 at batch 8), else of 128 (128 windows at
batch 8, as before), in 3 passes on 512-token windows (stop 31: 58.25 -> 56.14 after the block
stage, 51.45 -> 50.00 after the KL stage, against 2 passes), else 2. LoRA and RestoreLCC keep
128-token windows and 2 passes. An option the user gives wins; the window options left out are
derived from it at the same 16,384 tokens and 1,024 tokens a step. Where the layer-wise stage trains
under bf16 autocast (``recover_autocast``), it sees 20,480 tokens (40 windows of 512) instead, and
the KL stage as many (stop 37, Zen 4 EPYC: 49.07 in 578.6 s, bench/results/laco_run_zen4_stop37_fresh_clone.json).
The KL stage takes windows of 512 (``auto_stage2_seqlen``) of its own (docs/recovery.md).

Also the recovery step itself (``run_recovery``, shared by ``laco recover`` and ``laco run``), its
learning rates and option checks.
"""
from __future__ import annotations

from ._cli_checks import need_tokenizer

TOKENS = 16384  # layer-wise stage: tokens in all
# ... when it trains under bf16 autocast (--recover-precision auto on an AVX512-BF16 / AMX CPU: about 1.3x
# faster a token there), 40 windows of 512: stop 36 on a Zen 4 EPYC, the main job from a clean clone with
# 32 windows 50.07 in 538.5 s, with 48 windows 49.13 in 701.1 s (bench/results/laco_run_zen4_stop36_*.json);
# 40 spends about half of that extra time. fp32 training keeps 16,384 (Zen 3 EPYC: 49.56 in 723 s).
TOKENS_BF16 = 20480
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
        bf16 = args.recover == "layerwise" and recover_autocast(args)
        args.recover_nsamples = max(1, (TOKENS_BF16 if bf16 else TOKENS) // args.recover_seqlen)
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


RECOVER_METHODS = ("layerwise", "lora", "restore-lcc")


# learning rates that measured best at batch 4, 2 passes over 128 x 128 C4 windows
# (bench/results/recovery.json: layerwise token-nmse 3e-3 -> 64.0, LoRA 1e-3 -> 71.8 on Wanda 2:4)
DEFAULT_RECOVER_LR = {"layerwise": 3e-3, "lora": 1e-3, "restore-lcc": 1e-3}


def recover_lr(args, method: str) -> float:
    """--recover-lr, else the method's default."""
    return args.recover_lr if args.recover_lr is not None else DEFAULT_RECOVER_LR[method]


def check_recover_options(args) -> None:
    """Reject a bad --recover-loss (the error names the bad term), --recover-stage2-nsamples,
    --recover-stage2-seqlen, --recover-temperature or --recover-stage2-noise before any model is loaded
    (ValueError)."""
    from .recover._losses import parse_loss

    parse_loss(args.recover_loss)
    n2 = getattr(args, "recover_stage2_nsamples", None)
    if n2 is not None and (n2 < 1 or not args.recover_stage2_epochs):
        raise ValueError(f"--recover-stage2-nsamples {n2}: needs a positive count and --recover-stage2-epochs >= 1")
    l2 = getattr(args, "recover_stage2_seqlen", None)
    if l2 is not None and (l2 < 1 or not args.recover_stage2_epochs):
        raise ValueError(f"--recover-stage2-seqlen {l2}: needs a positive length and --recover-stage2-epochs >= 1")
    if getattr(args, "recover_temperature", 1.0) <= 0:
        raise ValueError(f"--recover-temperature {args.recover_temperature}: must be > 0")
    noise = getattr(args, "recover_stage2_noise", 0.0)
    if not 0.0 <= noise < 1.0 or (noise and not args.recover_stage2_epochs):
        raise ValueError(f"--recover-stage2-noise {noise}: needs a fraction in [0, 1) and --recover-stage2-epochs >= 1")


def recover_autocast(args) -> bool:
    """--recover-precision: bf16 autocast for training, or fp32. auto = bf16 on a CPU with
    AVX512-BF16 / AMX (where it is about 2x faster: docs/recovery.md), fp32 elsewhere (without
    those instructions bf16 GEMMs are slower than fp32) and on CUDA."""
    if args.recover_precision != "auto":
        return args.recover_precision == "bf16"
    if args.device != "cpu":
        return False
    try:
        from . import _native
    except ImportError:  # no extension: the bf16 2:4 training path is not there either
        return False
    return _native.has_bf16_gemm()


ERROR_SAMPLES = 8  # layer-wise: windows each block's before / after error is measured on


def run_recovery(method: str, dense, pruned, tok, args):
    """The recovery hook shared by ``laco recover`` and ``laco run --recover``: returns (model, info)."""
    from . import recover
    from .data import calibration_windows

    tok = need_tokenizer(tok, "the model")
    autocast = recover_autocast(args)
    if method == "layerwise":
        n2, l2 = args.recover_stage2_nsamples, args.recover_stage2_seqlen
        bs2 = args.recover_batch_size
        if l2:  # the KL stage on windows of its own (and its own length), same tokens per step
            drawn = calibration_windows(tok, args.recover_nsamples, args.recover_seqlen, seed=args.seed + 1,
                                        path=args.calib_data)
            n2 = n2 or max(1, args.recover_nsamples * args.recover_seqlen // l2)
            ids, ids2 = drawn, calibration_windows(tok, n2, l2, seed=args.seed + 2, path=args.calib_data)
            bs2 = max(1, args.recover_batch_size * args.recover_seqlen // l2)
            calib_tokens = int(drawn.numel() + ids2.numel())
        else:
            drawn = calibration_windows(tok, max(args.recover_nsamples, n2 or 0), args.recover_seqlen,
                                        seed=args.seed + 1, path=args.calib_data)
            ids, ids2 = drawn[:args.recover_nsamples], (drawn[:n2] if n2 else None)
            calib_tokens = int(drawn.numel())
        res = recover.layerwise(dense, pruned, ids, stage2_calibration=ids2, epochs=args.recover_epochs,
                                lr=recover_lr(args, method),
                                loss=args.recover_loss, batch_size=args.recover_batch_size, device=args.device,
                                inputs=args.recover_inputs, stage2_epochs=args.recover_stage2_epochs,
                                stage2_lr=args.recover_stage2_lr, stage2_batch_size=bs2,
                                temperature=args.recover_temperature, stage2_noise=args.recover_stage2_noise,
                                # before / after errors of each block on 8 windows: the extra "before" pass over
                                # all windows cost ~7% of the block stage (stop 30)
                                error_samples=ERROR_SAMPLES, autocast=autocast)
        return pruned, {"method": method, "seconds": res.seconds, "blocks": res.blocks, "stage2": res.stage2,
                        "precision": "bf16 autocast" if autocast else "fp32", "tokens": res.tokens,
                        "stage2_tokens": res.stage2_tokens, "temperature": args.recover_temperature,
                        "stage2_noise": args.recover_stage2_noise,
                        "stage2_seqlen": int(ids2.shape[1]) if ids2 is not None else args.recover_seqlen,
                        "stage2_batch_size": bs2, "calibration_tokens": calib_tokens}
    if method == "lora":
        ids = calibration_windows(tok, args.recover_nsamples, args.recover_seqlen, seed=args.seed, path=args.calib_data)
        res = recover.lora(pruned, ids, nsamples=args.recover_nsamples, seqlen=args.recover_seqlen,
                           epochs=args.recover_epochs, lr=recover_lr(args, method), batch_size=args.recover_batch_size,
                           device=args.device, seed=args.seed, merge=True, autocast=autocast)
        return res.model, {"method": method, "seconds": res.seconds, "losses": res.losses,
                           "precision": "bf16 autocast" if autocast else "fp32",
                           "pruned_weights_made_nonzero": res.pruned_weights_made_nonzero}
    from .recover.restore_lcc import restore_lcc

    res = restore_lcc(dense, pruned, tok, n_prompts=args.recover_nsamples, epochs=args.recover_epochs,
                      lr=recover_lr(args, method), seed=args.seed, data_path=args.calib_data)
    return pruned, {"method": method, "seconds": res.seconds, "losses": res.losses}
