"""Checks of ``laco`` arguments that need no model weights, run before any model is loaded.

Each raises ``ValueError`` with one line naming the flag and the problem; ``laco``'s ``main``
turns it into exit code 2. They read at most a ``config.json`` and safetensors headers.
"""
from __future__ import annotations

import os
from typing import Optional


def check_device(device: str, flag: str = "--device") -> None:
    """``cpu``, or ``cuda`` / ``cuda:N`` on a machine whose torch sees that GPU."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"bad {flag} {device!r}: {exc}") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise ValueError(f"{flag} {device!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def check_out_folder(path: Optional[str], flag: str = "--out") -> None:
    """An output folder: absent (its nearest existing parent writable) or an existing writable folder."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} exists and is not a folder; give a folder path")
    anchor = _nearest_existing(path)
    if not os.path.isdir(anchor):
        raise ValueError(f"{flag} {path!r}: {anchor!r} is a file, so the folder cannot be created")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: {anchor!r} is not writable")


def check_calib_data(path: Optional[str], recover: Optional[str] = None) -> None:
    """--calib-data: a readable file that is not the evaluation text (read here, before any model loads);
    RestoreLCC reads records, so it needs a .json / .jsonl file."""
    if path is None:
        return
    if not os.path.isfile(path):
        raise ValueError(f"--calib-data {path!r}: no such file")
    if recover == "restore-lcc" and not path.endswith((".json", ".jsonl")):
        raise ValueError(f"--calib-data {path!r}: RestoreLCC builds prompt / response pairs from JSON records; "
                         "give a .json or .jsonl file (a 'text' field per record)")
    from .data import calibration_documents

    try:
        docs = calibration_documents(path)  # ValueError for text that is not UTF-8, bad JSON lines, the test split
    except ValueError as exc:
        raise ValueError(f"--calib-data: {exc}") from None
    if not any(d.strip() for d in docs):
        raise ValueError(f"--calib-data {path!r}: holds no text")


def check_out_file(path: Optional[str], flag: str) -> None:
    """An output file: not a folder, in an existing writable folder."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: folder {parent!r} is not writable")


def check_positive(**values) -> None:
    """Every given integer option (``name=value``, None skipped) is >= 1."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def check_seqlen(folder: str, flag: str, seqlen: Optional[int]) -> None:
    """``seqlen`` within the model's positions (from config.json; no weights read)."""
    if not seqlen:
        return
    from transformers import AutoConfig

    from ._validation import model_limits

    _, positions = model_limits(AutoConfig.from_pretrained(folder))
    if positions is not None and seqlen > positions:
        raise ValueError(f"{flag} {seqlen} exceeds the {positions} positions of {folder!r} "
                         "(max_position_embeddings); use a shorter window")


def check_weight_files(folder: str) -> None:
    """Every ``*.safetensors`` file of a model folder has a complete header covering the file
    (a truncated or foreign file fails here, naming it, before transformers reads anything)."""
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError)
            raise ValueError(f"{path!r} is not a complete safetensors file ({' '.join(str(exc).split())}); "
                             "the checkpoint is damaged: write it again") from None


# ---- --permute / --no-permute (channel reordering before N:M selection, ``prune.permute``) ----
AUTO_ROUNDS = 16  # `laco run` with an N:M pattern: recovered 53.56 vs 54.60 without (docs/recovery.md)


class _PermuteAuto:
    """``laco run``'s --permute default: on for N:M patterns only. Not a string: argparse would run
    a string default through ``type=int``."""

    def __repr__(self) -> str:
        return f"{AUTO_ROUNDS} rounds with an N:M pattern"


PERMUTE_AUTO = _PermuteAuto()


def add_permute_arguments(parser, default=None) -> None:
    """``--permute [ROUNDS]`` and ``--no-permute``; ``default`` None (off) or :data:`PERMUTE_AUTO`."""
    parser.add_argument("--permute", type=int, nargs="?", const=AUTO_ROUNDS, default=default, metavar="ROUNDS",
                        help="N:M only: before pruning each block, reorder its MLP hidden channels and value channels "
                             "(the function is unchanged) so that the down and o projections' inputs group well "
                             f"under N:M; ROUNDS swap rounds ({AUTO_ROUNDS} when omitted; 0: sorting only) (default: "
                             + ("off" if default is None else repr(default)) + ")")
    parser.add_argument("--no-permute", dest="permute", action="store_const", const=None,
                        help="do not reorder channels before N:M selection")


def permute_value(args, pattern: Optional[str]):
    """``prune_model``'s ``permute`` from the parsed flags: False when off, else swap rounds."""
    if args.permute is PERMUTE_AUTO:
        return AUTO_ROUNDS if pattern is not None else False
    return False if args.permute is None else args.permute


def check_permute(args, pattern: Optional[str]) -> None:
    """An explicit ``--permute`` needs an N:M pattern and rounds >= 0 (ValueError naming both)."""
    if args.permute not in (None, PERMUTE_AUTO) and (pattern is None or args.permute < 0):
        raise ValueError(f"--permute reorders channels for an N:M pattern and takes a number of swap rounds >= 0; "
                         f"got --permute {args.permute} with --pattern {args.pattern or 'unstructured'}")


# ---- --refit (least-squares refit of SparseGPT's kept weights, ``prune_model(refit=)``) ----
DEFAULT_REFIT_STEPS = 10  # `--refit` without a number: 18% lower layer objective, SmolLM2 start 87.87 -> 84.97


def add_refit_arguments(parser) -> None:
    """``--refit [STEPS]`` (off by default: after layer-wise recovery it did not change the end
    result, 51.93 vs 51.45, docs/recovery.md stop 30)."""
    parser.add_argument("--refit", type=int, nargs="?", const=DEFAULT_REFIT_STEPS, default=None, metavar="STEPS",
                        help="SparseGPT only: after each linear is pruned, refit its kept weights towards the "
                             "layer's least-squares optimum on the fixed mask with STEPS conjugate-gradient steps "
                             f"({DEFAULT_REFIT_STEPS} when omitted; SparseGPT itself never revisits a decided "
                             "column) (default: off)")


def refit_value(args) -> int:
    """``prune_model``'s ``refit`` from the parsed flags: 0 when off, else conjugate-gradient steps."""
    return 0 if args.refit is None else args.refit


def check_refit(args) -> None:
    """An explicit ``--refit`` needs SparseGPT and steps >= 0 (ValueError naming both)."""
    if args.refit is not None and (args.method != "sparsegpt" or args.refit < 0):
        raise ValueError(f"--refit refits SparseGPT's kept weights and takes a number of steps >= 0; "
                         f"got --refit {args.refit} with --method {args.method}")


def need_tokenizer(tok, name: str):
    """``tok``, or ValueError when the model came without tokenizer files."""
    if tok is None:
        raise ValueError(f"{name} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                         "calibration and perplexity need one")
    return tok
