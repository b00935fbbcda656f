"""The ``laco`` command: prune, evaluate, recover and export causal LMs; ``laco run`` is the main job.

    laco run --out runs/smollm2                      # SmolLM2-135M: dense ppl, Wanda 2:4, pruned ppl, report
    laco prune smollm2-135m --method wanda --pattern 2:4 --out pruned/
    laco eval pruned/ --seqlen 1024 --max-windows 16
    laco export pruned/ --out pruned-ct/             # compressed-tensors (vLLM) checkpoint

Every MODEL argument is ``smollm2-135m`` (the cached SmolLM2-135M-Instruct), a local Hugging Face
model folder, or a folder written by ``laco prune`` (packed sparse weights). Bad arguments end with
exit code 2 and one line on stderr (``LACO_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Optional

from ._cli_checks import (PERMUTE_AUTO, add_permute_arguments, add_refit_arguments, check_permute,
                          check_refit, permute_value, refit_value)
from ._cli_checks import need_tokenizer as _need_tokenizer
from ._cli_recover import (DEFAULT_RECOVER_LR, RECOVER_METHODS, auto_recover_windows,
                           auto_stage2_seqlen as _auto_stage2_seqlen, check_recover_options as _check_recover_loss,
                           run_recovery as _recover)

_EPILOG = "Data: WikiText-2 / C4 from ../shared/data next to the repository, or $LACO_DATA_DIR."


class UsageError(Exception):
    """A problem with the command line or its inputs (exit code 2, one line, no traceback)."""


# ----------------------------------------------------------------------------------------
# argument checks (cheap, before any model is loaded)
# ----------------------------------------------------------------------------------------
def _pattern(text: Optional[str]) -> Optional[str]:
    """``"2:4"`` -> ``"2:4"``; ``None`` / ``"unstructured"`` -> None; anything else: UsageError."""
    from .prune.masks import parse_pattern

    if text is None or text.strip().lower() == "unstructured":
        return None
    try:
        n, m = parse_pattern(text)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad --pattern: {exc}") from None
    return f"{n}:{m}"


def _sparsity(pattern: Optional[str], sparsity: Optional[float]) -> float:
    from .prune.masks import check_sparsity, pattern_sparsity

    if pattern is not None:
        implied = pattern_sparsity(pattern)
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UsageError(f"--pattern {pattern} removes {implied:.0%} of the weights but --sparsity is {sparsity}; "
                             "give one of them")
        return implied
    try:
        return check_sparsity(0.5 if sparsity is None else sparsity)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"impossible --sparsity: {exc}") from None


def _model_path(name: str) -> str:
    """Resolve MODEL and check its family has an adapter row, without loading weights."""
    from .models.adapters import get_adapter
    from .models.loading import resolve_model_path

    try:
        path = resolve_model_path(name)
    except FileNotFoundError as exc:
        raise UsageError(f"model not found: {exc}") from None
    from transformers import AutoConfig

    try:
        get_adapter(AutoConfig.from_pretrained(path))
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None
    return path


def _preflight(args, models=(), out_folder: Optional[str] = None, out_file: Optional[str] = None,
               seqlens: Optional[dict] = None) -> None:
    """Checks that need no weights, before any model loads (issue 13): device, output paths, positive
    counts, windows within each model's positions, weight files readable. UsageError on failure."""
    from . import _cli_checks as c

    try:
        c.check_device(getattr(args, "device", "cpu"))
        c.check_positive(**{k: getattr(args, k) for k in ("batch_size", "nsamples", "max_windows", "recover_nsamples",
                                                          "recover_epochs", "recover_batch_size", "recover_seqlen")
                            if getattr(args, k, None) is not None})
        c.check_out_folder(out_folder)
        c.check_out_file(out_file, "--json")
        c.check_calib_data(getattr(args, "calib_data", None), getattr(args, "recover", None) or getattr(args, "method", None))
        for path in models:
            for flag, value in (seqlens or {}).items():
                c.check_seqlen(path, flag, value)
            c.check_weight_files(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _load(name: str, device: str = "cpu"):
    """(model, tokenizer) from smollm2-135m, a Hugging Face folder or a laco sparse folder."""
    import torch

    from .checkpoint import is_sparse_checkpoint, load_sparse, load_tokenizer

    path = _model_path(name)
    if is_sparse_checkpoint(path):
        return load_sparse(path, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device).eval()
    return model, load_tokenizer(path)


def _save(model, tok, out: str, pattern: Optional[str], packed: bool) -> dict:
    """Write the pruned model: packed sparse weights (default) or a plain dense HF folder."""
    from .checkpoint import save_sparse
    from .nn import sparsify

    summary = {"swapped": 0}
    if packed:
        summary = sparsify(model, "2:4" if pattern == "2:4" else "unstructured")
    save_sparse(model, out, tok)  # atomic; a model without packed modules is written as a plain HF folder
    return summary


def _write_json(path: str, obj) -> None:
    from ._atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# ----------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------
def cmd_prune(args) -> int:
    from .data import calibration_windows
    from .nn import densify
    from .prune import prune_model
    from .prune._cli_options import apply_where

    pattern = _pattern(args.pattern)
    args.sparsity = _sparsity(pattern, args.sparsity)
    path = _model_path(args.model)
    if args.nsamples < 1 or args.seqlen < 2:
        raise UsageError(f"need --nsamples >= 1 and --seqlen >= 2, got {args.nsamples} and {args.seqlen}")
    check_permute(args, pattern)
    check_refit(args)
    _preflight(args, [path], out_folder=args.out, seqlens={"--seqlen": args.seqlen})
    model, tok = _load(args.model)
    densify(model)  # a packed input prunes as a dense model
    calibration = calibration_windows(_need_tokenizer(tok, args.model), args.nsamples, args.seqlen, seed=args.seed,
                                      path=args.calib_data)
    sparsity, where = apply_where(args, model, calibration, batch_size=args.batch_size, device=args.device)
    report = {"model": args.model, "where": where}
    if sparsity is not None:
        report["prune"] = prune_model(model, args.method, sparsity=sparsity, pattern=pattern, calibration=calibration,
                                      batch_size=args.batch_size, device=args.device,
                                      permute=permute_value(args, pattern), refit=refit_value(args))
        print(f"pruned {args.method} {pattern or 'unstructured'}: overall sparsity "
              f"{report['prune']['overall_sparsity']:.4f} in {report['prune']['seconds']:.1f} s")
    if args.out:
        report["saved"] = _save(model, tok, args.out, pattern, packed=sparsity is not None and not args.dense)
        _write_json(os.path.join(args.out, "prune_report.json"), report)
        print(f"saved to {args.out}")
    return 0


def _eval(model, tok, args, name: str) -> dict:
    from .eval import perplexity

    out = {}
    if args.seqlen:
        out["wikitext2"] = perplexity(model, _need_tokenizer(tok, name), seqlen=args.seqlen,
                                      max_windows=args.max_windows, batch_size=args.batch_size, device=args.device)
        print(f"WikiText-2 perplexity (seqlen {args.seqlen}, {out['wikitext2']['windows']} windows): "
              f"{out['wikitext2']['ppl']:.3f}")
    if getattr(args, "tasks", None):
        from .eval import zeroshot

        tasks = [t for t in args.tasks.split(",") if t]
        out["zeroshot"] = zeroshot(model, tok, tasks, include_path=args.include_path, limit=args.limit,
                                   batch_size=args.batch_size)
        for task, metrics in out["zeroshot"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("stderr")))
    return out


def cmd_eval(args) -> int:
    if args.seqlen is not None and args.seqlen != 0 and args.seqlen < 2:  # 0 skips perplexity (see --help)
        raise UsageError(f"--seqlen must be 0 (skip perplexity) or >= 2, got {args.seqlen}")
    if args.seqlen == 0 and not args.tasks:
        raise UsageError("nothing to evaluate: --seqlen 0 skips perplexity and no --tasks were given")
    if args.include_path and not os.path.isdir(args.include_path):
        raise UsageError(f"--include-path {args.include_path!r} is not a directory")
    _preflight(args, [_model_path(args.model)], out_file=args.json, seqlens={"--seqlen": args.seqlen})
    model, tok = _load(args.model, args.device)
    results = _eval(model, tok, args, args.model)
    if args.json:
        _write_json(args.json, results)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_compressed_tensors

    _preflight(args, [_model_path(args.model)], out_folder=args.out)
    model, tok = _load(args.model)
    sc = export_compressed_tensors(model, args.out, format=args.format, tokenizer=tok)
    print(f"exported {args.format} to {args.out} (global sparsity {sc['global_sparsity']:.4f}, "
          f"ignored: {', '.join(sc['ignore']) or 'none'})")
    return 0


def cmd_recover(args) -> int:
    from .nn import densify
    from .prune.masks import is_nm

    _check_recover_loss(args)
    _preflight(args, [_model_path(args.model), _model_path(args.dense)], out_folder=args.out,
               seqlens={"--recover-seqlen": args.recover_seqlen, "--recover-stage2-seqlen": args.recover_stage2_seqlen})
    pruned, tok = _load(args.model)
    densify(pruned)
    dense, _ = _load(args.dense)
    from ._validation import check_models_match, describe_module

    try:  # before any calibration data is read or any weight trained
        check_models_match(describe_module(dense), describe_module(pruned), ("--dense", "MODEL"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model, info = _recover(args.method, dense, pruned, tok, args)
    blocks = [m for n, m in model.named_modules() if type(m).__name__ == "Linear" and "lm_head" not in n]
    is24 = bool(blocks) and all(m.weight.shape[1] % 4 == 0 and is_nm(m.weight != 0, 2, 4) for m in blocks)
    keep_sparse = args.method != "lora"  # a merged LoRA adapter makes the weights dense
    _save(model, tok, args.out, "2:4" if is24 else None, packed=keep_sparse)
    _write_json(os.path.join(args.out, "recover_report.json"), info)
    print(f"recovered with {args.method}; saved to {args.out}")
    return 0


def cmd_run(args) -> int:
    """The README's main job; see the subparser help."""
    from .data import calibration_windows
    from .eval import perplexity
    from .prune import prune_model

    pattern = _pattern(args.pattern)
    sparsity = _sparsity(pattern, args.sparsity)
    _check_recover_loss(args)
    check_permute(args, pattern)
    check_refit(args)
    path = _model_path(args.model)
    auto_recover_windows(args, path)
    _auto_stage2_seqlen(args, path)
    _preflight(args, [path], out_folder=args.out,
               seqlens={"--seqlen": args.seqlen, "--calib-seqlen": args.calib_seqlen,
                        "--recover-seqlen": args.recover_seqlen if args.recover != "none" else None,
                        "--recover-stage2-seqlen": args.recover_stage2_seqlen if args.recover != "none" else None})
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    times, ppl = {}, {}

    def step(name, fn):
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        value = fn()
        times[name] = round(time.perf_counter() - t, 1)
        return value

    model, tok = step("load", lambda: _load(args.model))
    tok = _need_tokenizer(tok, args.model)

    def ppl_of(m):
        return perplexity(m, tok, seqlen=args.seqlen, max_windows=args.max_windows, device=args.device)

    ppl["dense"] = step("dense perplexity", lambda: ppl_of(model))["ppl"]
    print(f"dense perplexity: {ppl['dense']:.3f}", flush=True)
    calibration = step("calibration", lambda: calibration_windows(tok, args.nsamples, args.calib_seqlen, seed=args.seed,
                                                                  path=args.calib_data))
    dense = copy.deepcopy(model) if args.recover != "none" else None
    report = step("prune", lambda: prune_model(model, args.method, sparsity=sparsity, pattern=pattern,
                                               calibration=calibration, batch_size=args.batch_size, device=args.device,
                                               permute=permute_value(args, pattern), refit=refit_value(args),
                                               # RestoreLCC compares value channels with the dense model's
                                               permute_parts=("mlp",) if args.recover == "restore-lcc"
                                               else ("mlp", "value")))
    ppl["pruned"] = step("pruned perplexity", lambda: ppl_of(model))["ppl"]
    print(f"pruned perplexity ({args.method} {pattern or f'{sparsity:.0%} unstructured'}): {ppl['pruned']:.3f}",
          flush=True)
    recovery = None
    if args.recover != "none":  # recovery slots in here: any method of laco_kernels.recover
        model, recovery = step(f"recover ({args.recover})", lambda: _recover(args.recover, dense, model, tok, args))
        del dense
        ppl["recovered"] = step("recovered perplexity", lambda: ppl_of(model))["ppl"]
        print(f"recovered perplexity ({args.recover}): {ppl['recovered']:.3f}", flush=True)
    packed = args.recover != "lora"
    saved = step("sparsify + save", lambda: _save(model, tok, os.path.join(args.out, "model"), pattern, packed))
    total = round(time.perf_counter() - t0, 1)
    result = {"model": args.model, "method": args.method, "pattern": pattern, "sparsity": sparsity,
              "calibration": [args.nsamples, args.calib_seqlen], "calibration_data": args.calib_data or "c4-sample",
              "eval": {"seqlen": args.seqlen, "max_windows": args.max_windows},
              "ppl": ppl, "prune": report, "recovery": recovery, "saved": saved, "seconds": times, "total_seconds": total}
    _write_json(os.path.join(args.out, "report.json"), result)
    from ._report import write_report

    write_report(args.out, result)
    print(f"done in {total:.0f} s: report in {os.path.join(args.out, 'report.md')}")
    return 0


# ----------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------
def _add_common(p, batch_size: int = 8):
    p.add_argument("--device", default="cpu", help="where blocks compute: cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per forward (default: {batch_size})")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")


def _add_calib_data(p):
    p.add_argument("--calib-data", default=None, metavar="FILE",
                   help="calibration text for pruning and recovery instead of the C4 sample: a .jsonl with a "
                        "'text' field per line, or a plain UTF-8 text file (e.g. an in-domain training split; "
                        "the WikiText-2 test split that perplexity reads is refused)")


def _add_prune_choice(p, method="wanda", pattern=None, permute=None):
    from .prune import METHODS

    p.add_argument("--method", choices=METHODS, default=method, help=f"pruning method (default: {method})")
    p.add_argument("--pattern", default=pattern, metavar="N:M",
                   help="N:M pattern such as 2:4 or 4:8, or 'unstructured' (default: "
                        f"{pattern or 'unstructured'})")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights removed for unstructured pruning, in [0, 1) (default: 0.5; "
                        "implied by --pattern)")
    add_permute_arguments(p, permute)
    add_refit_arguments(p)


def _add_recover_options(p, default_epochs: int, default_nsamples: int = 128, default_batch: int = 4,
                         default_inputs: str = "pruned", default_stage2: int = 0, default_stage2_lr: float = 1e-4,
                         default_stage2_seqlen: int | None = None, auto_windows: bool = False):
    g = p.add_argument_group("recovery settings")
    auto = ("; layer-wise: 16,384 tokens (20,480 where it trains under bf16 autocast, see "
            "--recover-precision) in windows of 512 at batch 2 where the model has 512 positions, "
            "else of 128 at batch 8; LoRA / RestoreLCC: 128 windows of 128 at batch 8; what you give sets "
            "the rest at the same tokens, 1,024 a step") if auto_windows else ""
    g.add_argument("--recover-nsamples", type=int, default=None if auto_windows else default_nsamples,
                   help="calibration windows (or prompts) (default: "
                        + ("auto" + auto if auto_windows else str(default_nsamples)) + ")")
    g.add_argument("--recover-seqlen", type=int, default=None if auto_windows else 128,
                   help="tokens per window (default: " + ("auto, see --recover-nsamples" if auto_windows else "128")
                        + ")")
    p.set_defaults(auto_recover_windows=auto_windows)
    g.add_argument("--recover-epochs", type=int, default=None if auto_windows else default_epochs,
                   help="passes over the data (default: " + ("auto: 3 for the layer-wise stage on 512-token windows, "
                                                              "else 2" if auto_windows else str(default_epochs)) + ")")
    g.add_argument("--recover-lr", type=float, default=None,
                   help="learning rate (default: by method: " +
                        ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RECOVER_LR.items()) + ")")
    g.add_argument("--recover-loss", default="token-nmse",
                   help="layer-wise reconstruction loss: mse, nmse, cosine, token-nmse or a weighted sum such as "
                        "'token-nmse+0.1*cosine' (default: token-nmse, which weighs every token the same)")
    g.add_argument("--recover-batch-size", type=int, default=None if auto_windows else default_batch,
                   help="batch size (default: " + ("auto, see --recover-nsamples" if auto_windows
                                                   else str(default_batch)) + ")")
    g.add_argument("--recover-inputs", choices=("pruned", "dense", "mix"), default=default_inputs,
                   help="layer-wise: what each block is trained on: the pruned model's stream, the dense model's "
                        f"stream, or both in turn (default: {default_inputs})")
    g.add_argument("--recover-stage2-epochs", type=int, default=default_stage2,
                   help="layer-wise: passes of end-to-end KL distillation to the dense logits after the "
                        f"block-by-block stage, masks kept (default: {default_stage2})")
    g.add_argument("--recover-stage2-lr", type=float, default=default_stage2_lr,
                   help=f"layer-wise: learning rate of that stage (default: {default_stage2_lr:g})")
    g.add_argument("--recover-temperature", type=float, default=1.0,
                   help="layer-wise: temperature of the KL stage (default: 1)")
    g.add_argument("--recover-stage2-noise", type=float, default=0.0,
                   help="layer-wise: fraction of the KL stage's input ids replaced by random ids, drawn afresh "
                        "every step (teacher and student read the same ids): augmentation when the stage makes "
                        "several passes over few tokens (default: 0)")
    g.add_argument("--recover-stage2-nsamples", type=int, default=None,
                   help="layer-wise: windows of that stage (default: the block stage's token count). With "
                        "--recover-stage2-seqlen they are windows of their own; without it both stages draw "
                        "from one sample: the first --recover-nsamples windows train the blocks, the first "
                        "--recover-stage2-nsamples the KL stage")
    g.add_argument("--recover-stage2-seqlen", type=int, default=None,
                   help="layer-wise: tokens per window of the KL stage, drawn as windows of their own (longer windows "
                        "teach the long-range context the evaluation uses); its batch keeps the tokens per step of "
                        "the block stage (--recover-batch-size x --recover-seqlen) and, without "
                        "--recover-stage2-nsamples, its windows hold the block stage's token count (default: "
                        + (f"{default_stage2_seqlen} where the model has that many positions, else the block "
                           "stage's windows)" if default_stage2_seqlen else "the block stage's windows)"))
    p.set_defaults(auto_stage2_seqlen=default_stage2_seqlen)
    g.add_argument("--recover-precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="layer-wise and LoRA: train under bf16 autocast (weights and optimizer stay fp32) or in "
                        "fp32; auto: bf16 on CPUs with AVX512-BF16 / AMX, fp32 elsewhere (default: auto)"),


def build_parser() -> argparse.ArgumentParser:
    from .prune._cli_options import add_where_arguments

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="laco", description=__doc__, formatter_class=fmt, epilog=_EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", formatter_class=fmt, help="the main job: prune SmolLM2 to 2:4, evaluate, save, report",
                       description="Load MODEL, measure its WikiText-2 perplexity, prune it (SparseGPT 2:4 by default) "
                                   "block by block on C4 calibration windows, measure again, optionally recover "
                                   "it, save it with packed sparse weights to OUT/model, and write OUT/report.md, "
                                   "OUT/report.json and OUT/block_error.png (per-block reconstruction error). "
                                   "About 12-13 minutes for SmolLM2-135M on 2 CPU cores with the defaults.")
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--out", default="runs/smollm2", help="output folder (default: runs/smollm2)")
    _add_prune_choice(p, "sparsegpt", "2:4", permute=PERMUTE_AUTO)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--seqlen", type=int, default=1024, help="perplexity window length (default: 1024)")
    p.add_argument("--max-windows", type=int, default=16, help="perplexity windows (default: 16)")
    p.add_argument("--recover", choices=("none",) + RECOVER_METHODS, default="layerwise",
                   help="recovery after pruning (default: layerwise, LaCo block-by-block compensation on "
                        "32 C4 windows of 512 tokens, 3 passes, batch 2, then one pass of end-to-end KL "
                        "distillation on 32 windows of 512 of its own: about 9 minutes on 2 cores; none skips it)")
    _add_common(p)
    _add_calib_data(p)
    # 128 x 128 windows at batch 8 closed 68.5% of the Wanda 2:4 gap in about 5 min of recovery on
    # 2 cores (README); 32 windows at batch 4 closed 56% in 1.5 min
    # measured: SparseGPT 2:4 + layer-wise + 1 epoch of end-to-end KL reached 61.78 in 489 s end to end,
    # against 68.63 in 489 s for Wanda 2:4 + layer-wise (bench/results/laco_run_default.json)
    # round 4 (docs/recovery.md): the KL pass at lr 3e-4 beat 1e-4 (62.24 vs 63.27 at 32 windows,
    # 16k tokens), and bf16 autocast matched fp32 (62.18 vs 62.24) in about 0.6x the time; these
    # defaults reached 60.76 in 597 s (bench/results/laco_run_default_round4.json). Round 7: the KL
    # pass on windows of 512 tokens (same 16k tokens and tokens per step) reached 54.48 in 561 s
    # against 59.31 in 671 s (bench/results/laco_run_s2len512.json)
    # stop 31: 3 layer-wise passes on the 512-token windows (auto_recover_windows) and the KL stage at
    # lr 4e-4 reached 49.82 against 51.45 (docs/recovery.md, rows stages/...)
    _add_recover_options(p, default_epochs=2, default_nsamples=128, default_batch=8, default_stage2=1,
                         default_stage2_lr=4e-4, default_stage2_seqlen=512, auto_windows=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", formatter_class=fmt, help="prune a model and save it",
                       description="Prune every linear of MODEL's decoder blocks, block by block on C4 "
                                   "calibration windows, and save it (packed sparse weights) to --out.\n"
                                   "example: laco prune smollm2-135m --method wanda --pattern 2:4 --out pruned/")
    p.add_argument("model", help="smollm2-135m or a Hugging Face model folder")
    _add_prune_choice(p)
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default: 128)")
    p.add_argument("--out", help="folder for the pruned model (omit to prune without saving)")
    p.add_argument("--dense", action="store_true", help="save plain dense weights instead of packed ones")
    _add_common(p)
    _add_calib_data(p)
    add_where_arguments(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", formatter_class=fmt, help="WikiText-2 perplexity and zero-shot accuracy",
                       description="Evaluate MODEL: WikiText-2 test perplexity (non-overlapping windows), and "
                                   "zero-shot accuracy with lm-eval when --tasks is given.\n"
                                   "example: laco eval pruned/ --seqlen 1024 --max-windows 16")
    p.add_argument("model", help="smollm2-135m, a Hugging Face folder or a folder from laco prune")
    p.add_argument("--seqlen", type=int, default=1024, help="perplexity window length; 0 skips it (default: 1024)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first windows only (default: all)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. piqa,arc_easy")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=float, default=None, help="examples per task (count, or fraction if < 1)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    _add_common(p, batch_size=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", formatter_class=fmt, help="export to compressed-tensors (vLLM)",
                       description="Write MODEL as a compressed-tensors checkpoint (2:4 sparsity config) that "
                                   "serving engines load.\nexample: laco export pruned/ --out pruned-ct/")
    p.add_argument("model", help="a folder from laco prune (2:4) or a pruned Hugging Face folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("sparse-24-bitmask", "dense"), default="sparse-24-bitmask",
                   help="compressed 2:4 values + bitmask, or dense weights (default: sparse-24-bitmask)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recover", formatter_class=fmt, help="recover a pruned model toward its dense model",
                       description="Recover the pruned MODEL: layer-wise compensation toward --dense (masks kept), "
                                   "a LoRA baseline (merged: weights become dense), or RestoreLCC.\n"
                                   "example: laco recover pruned/ --dense smollm2-135m --method layerwise --out rec/")
    p.add_argument("model", help="the pruned model (folder from laco prune)")
    p.add_argument("--dense", default="smollm2-135m", help="the dense model it came from (default: smollm2-135m)")
    p.add_argument("--method", choices=RECOVER_METHODS, default="layerwise", help="default: layerwise")
    p.add_argument("--out", required=True, help="output folder")
    _add_common(p)
    _add_calib_data(p)
    _add_recover_options(p, default_epochs=2)
    p.set_defaults(func=cmd_recover)
    return parser


def _expected_errors() -> tuple:
    """Failures a user can cause and fix (bad input, files, missing optional packages, memory):
    one line and exit 2. Anything else is a bug and keeps its traceback."""
    errors = [UsageError, OSError, ValueError, ModuleNotFoundError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    import torch

    errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _expected_errors() as exc:
        if os.environ.get("LACO_DEBUG", "0") not in ("", "0"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"laco {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("laco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
