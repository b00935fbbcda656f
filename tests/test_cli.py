"""The ``laco`` command: --help, one-line errors with exit code 2, and a tiny end-to-end prune / eval / export."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _tiny import tiny_model, tiny_tokenizer
from laco_kernels.checkpoint import is_sparse_checkpoint, load_sparse
from laco_kernels.cli import main
from laco_kernels.nn import SparseLinear24, sparse_modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model(layers=2).save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return str(folder)


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", [[], ["run"], ["prune"], ["eval"], ["export"], ["recover"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: laco" in text
    if cmd in ([], ["prune"], ["eval"], ["export"]):
        assert "example" in text or "laco prune" in text


def test_errors_are_one_line_exit_2(tiny_folder, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)).save_pretrained(str(gpt2))
    cases = [
        (["prune", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "model not found"),
        (["prune", tiny_folder, "--pattern", "2-4"], "bad --pattern"),
        (["prune", tiny_folder, "--pattern", "4:2"], "bad --pattern"),
        (["prune", tiny_folder, "--sparsity", "1.5"], "impossible --sparsity"),
        (["prune", tiny_folder, "--pattern", "2:4", "--sparsity", "0.7"], "removes 50% of the weights"),
        (["prune", str(gpt2)], "no adapter for model_type 'gpt2'"),
        (["eval", str(tmp_path / "missing")], "model not found"),
        (["run", "--model", tiny_folder, "--pattern", "x:y", "--out", str(tmp_path / "r")], "bad --pattern"),
    ]
    capsys.readouterr()  # drop the progress output of saving the gpt2 folder
    for argv, expect in cases:
        code, out, err = _run(argv, capsys)
        assert code == 2, argv
        err = err.strip().splitlines()[-1] if "[transformers]" in err else err
        assert err.count("\n") <= 1 and expect in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse's own checks also exit 2
        main(["prune", tiny_folder, "--method", "obs"])
    assert e.value.code == 2


def test_module_entry_point_exit_code():
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "laco_kernels.cli", "prune", "/no/such/model"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "model not found" in proc.stderr


def test_prune_eval_export_end_to_end(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    code, stdout, _ = _run(["prune", tiny_folder, "--method", "wanda", "--pattern", "2:4", "--nsamples", "4",
                            "--seqlen", "32", "--out", out], capsys)
    assert code == 0 and "overall sparsity 0.5000" in stdout
    assert is_sparse_checkpoint(out)
    report = json.load(open(os.path.join(out, "prune_report.json")))
    assert report["prune"]["method"] == "wanda" and len(report["prune"]["block_error"]) == 2
    assert report["saved"]["swapped"] == 14
    model, tok = load_sparse(out)
    assert tok is not None and all(isinstance(m, SparseLinear24) for m in sparse_modules(model).values())

    res = str(tmp_path / "eval.json")
    code, stdout, _ = _run(["eval", out, "--seqlen", "64", "--max-windows", "2", "--json", res], capsys)
    assert code == 0 and "WikiText-2 perplexity (seqlen 64, 2 windows)" in stdout
    ppl = json.load(open(res))["wikitext2"]["ppl"]
    # the same number from Python on the dense pruned model (packed and dense forward agree)
    from laco_kernels.eval import perplexity
    from laco_kernels.nn import densify

    densify(model)
    expect = perplexity(model, tok, seqlen=64, max_windows=2, progress=False)["ppl"]
    assert ppl == pytest.approx(expect, rel=1e-4)

    ct = str(tmp_path / "ct")
    code, stdout, _ = _run(["export", out, "--out", ct], capsys)
    assert code == 0 and "global sparsity" in stdout
    config = json.load(open(os.path.join(ct, "config.json")))
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"


def test_prune_with_channel_permutation(tiny_folder, tmp_path, capsys):
    """--permute reaches prune_model: the report has each block's cost before / after, the saved
    model is 2:4 and computes what the same pruning in Python gives."""
    out = str(tmp_path / "perm")
    code, stdout, _ = _run(["prune", tiny_folder, "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "4",
                            "--seqlen", "32", "--permute", "3", "--out", out], capsys)
    assert code == 0 and "overall sparsity 0.5000" in stdout
    perm = json.load(open(os.path.join(out, "prune_report.json")))["prune"]["permutation"]
    assert len(perm) == 2 and all(b["down"]["after"] <= b["down"]["before"] for b in perm)
    model, _ = load_sparse(out)
    assert all(isinstance(m, SparseLinear24) for m in sparse_modules(model).values())


@pytest.mark.parametrize("argv, permuted", [(["--no-permute"], False), (["--pattern", "unstructured"], False),
                                            (["--permute", "0"], True)])
def test_run_permute_default_and_switches(tiny_folder, tmp_path, capsys, argv, permuted):
    """`laco run` reorders channels for N:M by default; --no-permute turns it off, an unstructured
    pattern has nothing to reorder (no error), --permute 0 keeps only the sorted start."""
    out = str(tmp_path / "run")
    code, _, err = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                         "--max-windows", "1", "--recover", "none", "--out", out] + argv, capsys)
    assert code == 0, err
    report = json.load(open(os.path.join(out, "report.json")))
    assert ("permutation" in report["prune"]) == permuted


@pytest.mark.parametrize("argv, steps", [([], None), (["--refit"], 10), (["--refit", "3"], 3),
                                          (["--method", "wanda"], None)])
def test_run_refit_default_and_switches(tiny_folder, tmp_path, capsys, argv, steps):
    """`laco run` keeps SparseGPT's own weights by default; --refit refits the kept weights (10
    conjugate-gradient steps, or N), and another method is not refitted without asking."""
    out = str(tmp_path / "run")
    code, _, err = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                         "--max-windows", "1", "--recover", "none", "--out", out] + argv, capsys)
    assert code == 0, err
    prune = json.load(open(os.path.join(out, "report.json")))["prune"]
    assert (prune["refit"]["steps"] if "refit" in prune else None) == steps
    if steps:
        assert all(after <= before * (1 + 1e-5) for before, after in prune["refit"]["layers"].values())


def test_run_restore_lcc_reorders_only_the_mlp(tiny_folder, tmp_path, capsys, monkeypatch):
    """RestoreLCC compares value channels with the dense model's: `laco run --recover restore-lcc`
    reorders only the MLP channels, so the pruned model it hands over is one RestoreLCC accepts."""
    import laco_kernels.cli as cli

    seen = {}

    def fake_recover(method, dense, pruned, tok, args):
        seen["mark"] = pruned.config.laco_channels_permuted
        raise ValueError("stop here")  # a one-line error: the test needs only the handover

    monkeypatch.setattr(cli, "_recover", fake_recover)
    code, _, err = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                         "--max-windows", "1", "--recover", "restore-lcc", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "stop here" in err and seen["mark"] == ["mlp"]


def test_prune_unstructured_magnitude_dense_save(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "p")
    code, stdout, _ = _run(["prune", tiny_folder, "--method", "magnitude", "--sparsity", "0.6", "--nsamples", "2",
                            "--seqlen", "16", "--out", out, "--dense"], capsys)
    assert code == 0 and not is_sparse_checkpoint(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.up_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.6) < 0.01
    assert torch.isfinite(w).all()


def test_run_recovers_by_default_and_keeps_2_4(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, stdout, _ = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                            "--max-windows", "2", "--recover-nsamples", "4", "--recover-seqlen", "32",
                            "--recover-epochs", "1", "--out", out], capsys)
    assert code == 0 and "recovered perplexity (layerwise):" in stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["ppl"]) == {"dense", "pruned", "recovered"}
    assert report["recovery"]["method"] == "layerwise" and len(report["recovery"]["blocks"]) > 0
    assert len(report["prune"]["permutation"]) == 2  # channels reordered before 2:4 selection by default
    md = open(os.path.join(out, "report.md")).read()
    assert "of the perplexity gap" in md and "recovery_error.png" in md
    with open(os.path.join(out, "recovery_error.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model, _ = load_sparse(os.path.join(out, "model"))  # packed as 2:4 again: the pattern survived recovery
    assert len(sparse_modules(model)) == 14
    assert all(type(m).__name__ == "SparseLinear24" for m in sparse_modules(model).values())


def test_run_writes_report_and_plot(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, stdout, _ = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                            "--max-windows", "2", "--recover", "none", "--out", out], capsys)
    assert code == 0 and "dense perplexity:" in stdout and "pruned perplexity (sparsegpt 2:4):" in stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["ppl"]) == {"dense", "pruned"} and report["prune"]["overall_sparsity"] == 0.5
    md = open(os.path.join(out, "report.md")).read()
    assert f"| dense | {report['ppl']['dense']:.2f} |" in md and "block_error.png" in md
    with open(os.path.join(out, "block_error.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model, _ = load_sparse(os.path.join(out, "model"))
    assert len(sparse_modules(model)) == 14


def test_bad_recover_loss_fails_before_loading(capsys):
    code, _, err = _run(["run", "--model", "/nonexistent/model", "--recover-loss", "bogus"], capsys)
    assert code == 2 and "unknown loss kind 'bogus'" in err


def test_run_and_recover_recovery_defaults(tmp_path):
    """The main job's defaults are the measured CPU recipe in the README (SparseGPT 2:4, then the
    layer-wise stage on 16k tokens (20k under bf16 autocast): 32 windows of 512 at batch 2 where the model has 512 positions,
    else 128 x 128 at batch 8; 3 passes on 512-token windows, else 2; token-nmse; 1 epoch of end-to-end
    KL at lr 4e-4); LoRA / RestoreLCC keep 128 x 128 and 2 passes; a window option the user gives sets
    the others at the same tokens; `laco recover` keeps batch 4 and no KL stage."""
    from transformers import LlamaConfig

    from laco_kernels.cli import auto_recover_windows, build_parser

    run = build_parser().parse_args(["run"])
    assert (run.recover, run.recover_loss, run.method, run.pattern, run.recover_stage2_epochs, run.recover_stage2_lr) == (
        "layerwise", "token-nmse", "sparsegpt", "2:4", 1, 4e-4)
    assert (run.recover_nsamples, run.recover_seqlen, run.recover_batch_size, run.recover_epochs) == (
        None, None, None, None)  # resolved later
    for positions in (2048, 128):
        LlamaConfig(max_position_embeddings=positions).save_pretrained(tmp_path / f"p{positions}")
    # (windows, tokens per window, batch, passes): 3 passes for the layer-wise stage on 512-token windows;
    # fp32 training (these rows) 16,384 tokens, bf16 autocast 20,480 (the last rows)
    for extra, positions, want in (([], 2048, (32, 512, 2, 3)), ([], 128, (128, 128, 8, 2)),
                                   (["--recover", "lora"], 2048, (128, 128, 8, 2)),
                                   (["--recover", "restore-lcc"], 2048, (128, 128, 8, 2)),
                                   (["--recover-seqlen", "256"], 2048, (64, 256, 4, 2)),
                                   (["--recover-nsamples", "8"], 2048, (8, 512, 2, 3)),
                                   (["--recover-epochs", "1"], 2048, (32, 512, 2, 1)),
                                   (["--recover-batch-size", "1"], 2048, (32, 512, 1, 3)),
                                   (["--recover-precision", "bf16"], 2048, (40, 512, 2, 3)),
                                   (["--recover-precision", "bf16", "--recover-seqlen", "256"], 2048, (80, 256, 4, 2)),
                                   (["--recover-precision", "bf16", "--recover", "lora"], 2048, (128, 128, 8, 2))):
        if "--recover-precision" not in extra:
            extra = [*extra, "--recover-precision", "fp32"]
        args = build_parser().parse_args(["run", *extra])
        auto_recover_windows(args, str(tmp_path / f"p{positions}"))
        got = (args.recover_nsamples, args.recover_seqlen, args.recover_batch_size, args.recover_epochs)
        assert got == want, extra
    rec = build_parser().parse_args(["recover", "m", "--out", "o"])
    assert rec.recover_batch_size == 4 and rec.recover_nsamples == 128 and rec.recover_stage2_epochs == 0
    auto_recover_windows(rec, "unused")  # laco recover: nothing automatic
    assert (rec.recover_nsamples, rec.recover_seqlen, rec.recover_batch_size, rec.recover_epochs) == (128, 128, 4, 2)


def test_run_recovery_inputs_and_stage2_options(tiny_folder, tmp_path, capsys):
    """--recover-inputs and --recover-stage2-epochs reach layer-wise recovery; the 2:4 pattern survives."""
    out = str(tmp_path / "run")
    code, stdout, _ = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                            "--max-windows", "2", "--recover-nsamples", "4", "--recover-seqlen", "32",
                            "--recover-epochs", "1", "--recover-inputs", "dense", "--recover-stage2-epochs", "2",
                            "--recover-stage2-lr", "1e-4", "--recover-stage2-noise", "0.2", "--out", out], capsys)
    assert code == 0 and "recovered perplexity (layerwise):" in stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert len(report["recovery"]["stage2"]) == 2 and report["recovery"]["stage2_noise"] == 0.2
    model, _ = load_sparse(os.path.join(out, "model"))
    assert all(type(m).__name__ == "SparseLinear24" for m in sparse_modules(model).values())


def test_run_stage2_on_its_own_windows(tiny_folder, tmp_path, capsys):
    """--recover-stage2-nsamples: the KL stage runs on N windows of its own (here more than the block
    stage's 4), with --recover-stage2-seqlen of that length, at the block stage's tokens per step
    (batch 4 x 32 -> 2 x 64); the report says how many tokens each stage saw. A bad count or length
    is refused up front."""
    out = str(tmp_path / "run")
    code, stdout, _ = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                            "--max-windows", "2", "--recover-nsamples", "4", "--recover-seqlen", "32",
                            "--recover-batch-size", "4", "--recover-epochs", "1", "--recover-stage2-epochs", "1",
                            "--recover-stage2-nsamples", "6", "--recover-stage2-seqlen", "64", "--out", out], capsys)
    assert code == 0
    rec = json.load(open(os.path.join(out, "report.json")))["recovery"]
    assert (rec["tokens"], rec["stage2_tokens"], rec["calibration_tokens"]) == (4 * 32, 6 * 64, 4 * 32 + 6 * 64)
    assert (rec["stage2_seqlen"], rec["stage2_batch_size"]) == (64, 2)
    assert rec["temperature"] == 1.0 and rec["stage2_noise"] == 0.0  # the KL stage's defaults
    for flag, value in (("--recover-stage2-nsamples", "0"), ("--recover-temperature", "0"),
                        ("--recover-stage2-noise", "1"), ("--recover-stage2-noise", "-0.5"),
                        ("--recover-stage2-seqlen", "0"), ("--recover-stage2-seqlen", "100000")):
        proc = _laco(["run", "--model", tiny_folder, "--seqlen", "64", "--calib-seqlen", "32", "--recover-seqlen", "32",
                      flag, value, "--out", str(tmp_path / "bad")])
        assert proc.returncode == 2 and f"{flag} {value}" in proc.stderr, proc.stderr[-2000:]
        assert not os.path.exists(tmp_path / "bad")


def test_run_default_kl_window_is_512_where_the_model_has_the_positions(tmp_path):
    """laco run's KL stage defaults to 512-token windows (round 7) where the model has 512 positions;
    a shorter model keeps the block stage's windows; an explicit value or no KL stage is left alone."""
    from transformers import LlamaConfig

    from laco_kernels.cli import _auto_stage2_seqlen, build_parser

    for positions, want in ((2048, 512), (128, None)):
        folder = tmp_path / f"p{positions}"
        LlamaConfig(max_position_embeddings=positions).save_pretrained(folder)
        args = build_parser().parse_args(["run", "--model", str(folder)])
        _auto_stage2_seqlen(args, str(folder))
        assert args.recover_stage2_seqlen == want
    folder = str(tmp_path / "p2048")
    for extra, want in ((["--recover-stage2-seqlen", "256"], 256), (["--recover-stage2-epochs", "0"], None)):
        args = build_parser().parse_args(["run", "--model", folder, *extra])
        _auto_stage2_seqlen(args, folder)
        assert args.recover_stage2_seqlen == want
    args = build_parser().parse_args(["recover", "m", "--dense", "d", "--out", "o"])
    assert args.recover_stage2_seqlen is None and args.auto_stage2_seqlen is None  # laco recover: no default


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_run_recover_precision_reaches_recovery(tiny_folder, tmp_path, capsys, precision):
    """--recover-precision bf16 trains under autocast (recorded in the report), fp32 without; the
    saved model is 2:4 either way. auto resolves from the CPU (recover_autocast)."""
    from laco_kernels._cli_recover import recover_autocast
    from laco_kernels.cli import build_parser

    out = str(tmp_path / "run")
    code, stdout, _ = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                            "--max-windows", "2", "--recover-nsamples", "4", "--recover-seqlen", "32",
                            "--recover-epochs", "1", "--recover-stage2-epochs", "1", "--recover-precision", precision,
                            "--out", out], capsys)
    assert code == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["recovery"]["precision"] == ("bf16 autocast" if precision == "bf16" else "fp32")
    model, _ = load_sparse(os.path.join(out, "model"))
    assert all(type(m).__name__ == "SparseLinear24" for m in sparse_modules(model).values())
    args = build_parser().parse_args(["run"])
    assert args.recover_precision == "auto"
    args.device = "cuda"
    assert recover_autocast(args) is False


# -- issue 13: expected failures exit 2 with one line, checked before any model loads -------------
def _laco(argv, debug=False, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO, "LACO_DEBUG": "1" if debug else "0"}
    return subprocess.run([sys.executable, "-m", "laco_kernels.cli"] + argv, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _error_line(proc):
    lines = [l for l in proc.stderr.strip().splitlines() if "[transformers]" not in l]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def truncated_folder(tiny_folder, tmp_path_factory):
    import shutil

    folder = str(tmp_path_factory.mktemp("truncated") / "m")
    shutil.copytree(tiny_folder, folder)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return folder


def test_cli_expected_failures_one_line_exit_2(tiny_folder, truncated_folder, tmp_path):
    """The issue's cases as a user types them (`laco` as a subprocess): exit 2, one line naming the
    problem, nothing run before the check."""
    import torch

    existing_file = tmp_path / "taken"
    existing_file.write_text("keep me")
    cases = [
        (["eval", truncated_folder, "--seqlen", "16"], "model.safetensors' is not a complete safetensors file"),
        (["prune", tiny_folder, "--method", "magnitude", "--out", str(existing_file)], "exists and is not a folder"),
        (["prune", tiny_folder, "--seqlen", "4096"], "--seqlen 4096 exceeds the 128 positions"),
        (["run", "--model", tiny_folder, "--out", str(tmp_path / "r"), "--calib-data", str(tmp_path / "no.txt")],
         "no such file"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", tiny_folder, "--device", "cuda"], "CUDA is not available"))
    for argv, expect in cases:
        proc = _laco(argv)
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        line = _error_line(proc)
        assert line.startswith(f"laco {argv[0]}: error:") and expect in line, (argv, line)
        assert "pruned" not in proc.stdout and "saved" not in proc.stdout, (argv, proc.stdout)  # nothing ran
    assert existing_file.read_text() == "keep me"


def _expect_one_line_errors(cases, capsys):
    """Each (argv, text): `laco` in-process exits 2 with a last stderr line `laco CMD: error: ...text...`."""
    capsys.readouterr()
    for argv, expect in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2, (argv, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"laco {argv[0]}: error:") and expect in line, (argv, line)


def test_cli_more_expected_failures(tiny_folder, tmp_path, capsys):
    """Further cases through main() in-process (same code path as the subprocess, faster)."""
    existing_file = tmp_path / "taken"
    existing_file.write_text("keep me")
    other = tmp_path / "other"
    tiny_model("opt", layers=2).save_pretrained(str(other))
    tiny_tokenizer().save_pretrained(str(other))
    cases = [
        (["eval", tiny_folder, "--seqlen", "1024"], "--seqlen 1024 exceeds the 128 positions"),
        (["eval", tiny_folder, "--json", str(tmp_path)], "is a folder; give a file path"),
        (["eval", tiny_folder, "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["eval", tiny_folder, "--device", "tpu:x"], "bad --device"),
        (["eval", tiny_folder, "--batch-size", "0"], "--batch-size must be >= 1"),
        (["export", tiny_folder, "--out", str(existing_file)], "exists and is not a folder"),
        (["run", "--model", tiny_folder, "--out", str(existing_file)], "exists and is not a folder"),
        (["run", "--model", tiny_folder, "--out", str(tmp_path / "r"), "--seqlen", "64", "--calib-seqlen", "512"],
         "--calib-seqlen 512 exceeds the 128 positions"),
        (["recover", tiny_folder, "--dense", tiny_folder, "--out", str(tmp_path / "r"), "--recover-loss", "nan*mse"],
         "finite and > 0"),
        (["recover", tiny_folder, "--dense", str(other), "--out", str(tmp_path / "r")], "--dense is opt"),
        (["prune", tiny_folder, "--method", "wanda", "--permute", "--out", str(tmp_path / "r")],
         "--permute reorders channels for an N:M pattern"),
        (["run", "--model", tiny_folder, "--out", str(tmp_path / "r"), "--permute", "-1"], "swap rounds >= 0"),
        (["prune", tiny_folder, "--method", "wanda", "--pattern", "2:4", "--refit", "--out", str(tmp_path / "r")],
         "--refit refits SparseGPT's kept weights"),
        (["run", "--model", tiny_folder, "--out", str(tmp_path / "r"), "--refit", "-1"], "steps >= 0"),
    ]
    _expect_one_line_errors(cases, capsys)
    assert existing_file.read_text() == "keep me" and not (tmp_path / "r").exists()


def test_cli_debug_keeps_the_traceback(truncated_folder):
    proc = _laco(["eval", truncated_folder, "--seqlen", "16"], debug=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "not a complete safetensors file" in proc.stderr


@pytest.mark.parametrize("fault", ["weights", "swap"])
def test_cli_dense_out_and_json_are_atomic(tiny_folder, tmp_path, monkeypatch, fault):
    """`--dense --out` and the JSON reports go through _atomic: a failure leaves the old output whole."""
    from _faults import InjectedFault, inject, leftovers, snapshot

    from laco_kernels import _atomic, cli

    model, tok = tiny_model(layers=2), tiny_tokenizer()
    out = str(tmp_path / "o")
    cli._save(model, tok, out, None, packed=False)
    cli._write_json(os.path.join(out, "prune_report.json"), {"a": 1})
    before = snapshot(out)
    with monkeypatch.context() as m:
        if fault == "weights":
            m.setattr(type(model), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(InjectedFault("x")))
        else:
            inject(m, _atomic, "_fsync_tree", 1)
        with pytest.raises(InjectedFault):
            cli._save(model, tok, out, None, packed=False)
    with monkeypatch.context() as m:
        inject(m, json, "dump", 1)
        with pytest.raises(InjectedFault):
            cli._write_json(os.path.join(out, "prune_report.json"), {"a": 2})
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_refit_flag_through_the_cli_process(tiny_folder, tmp_path):
    """`laco prune --refit` in a real process: refits SparseGPT (report, 2:4 saved model); with another
    method it exits 2 with one line before anything is written."""
    out = str(tmp_path / "fit")
    proc = _laco(["prune", tiny_folder, "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "4", "--seqlen", "32",
                  "--refit", "3", "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.load(open(os.path.join(out, "prune_report.json")))["prune"]["refit"]
    assert rep["steps"] == 3 and all(a <= b * (1 + 1e-5) for b, a in rep["layers"].values())
    bad = _laco(["prune", tiny_folder, "--method", "wanda", "--pattern", "2:4", "--refit", "--out", str(tmp_path / "no")])
    assert bad.returncode == 2 and "--refit refits SparseGPT's kept weights" in _error_line(bad)
    assert not (tmp_path / "no").exists()


def test_calib_data_feeds_pruning_and_both_recovery_stages(tiny_folder, tmp_path, capsys, monkeypatch):
    """--calib-data FILE: every calibration draw of `laco run` (pruning, the layer-wise stage, the KL
    stage's own windows) reads that file, and the report names it."""
    import laco_kernels.data as data
    from _tiny import tiny_text

    text = tmp_path / "train.txt"
    text.write_text(tiny_text(3000, seed=9))
    real, seen = data.calibration_windows, []
    monkeypatch.setattr(data, "calibration_windows", lambda *a, **kw: seen.append(kw.get("path")) or real(*a, **kw))
    out = str(tmp_path / "run")
    code, _, err = _run(["run", "--model", tiny_folder, "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64",
                         "--max-windows", "1", "--recover-nsamples", "2", "--recover-seqlen", "32",
                         "--recover-epochs", "1", "--recover-stage2-seqlen", "64", "--calib-data", str(text),
                         "--out", out], capsys)
    assert code == 0, err
    assert seen == [str(text)] * 3
    assert json.load(open(os.path.join(out, "report.json")))["calibration_data"] == str(text)


def test_calib_data_bad_input_fails_before_loading(tiny_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "wikitext2-test.raw").write_text("the evaluation text " * 50)
    monkeypatch.setenv("LACO_DATA_DIR", str(folder))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00abc")
    out = str(tmp_path / "r")
    cases = [
        (["run", "--model", tiny_folder, "--out", out, "--calib-data", str(tmp_path / "nope.txt")], "no such file"),
        (["prune", tiny_folder, "--out", out, "--calib-data", str(folder / "wikitext2-test.raw")],
         "is the WikiText-2 test split that perplexity is measured on"),
        (["run", "--model", tiny_folder, "--out", out, "--calib-data", str(binary)], "not UTF-8 text"),
        (["recover", tiny_folder, "--dense", tiny_folder, "--method", "restore-lcc", "--out", out,
          "--calib-data", str(binary)], "RestoreLCC builds prompt / response pairs from JSON records"),
    ]
    _expect_one_line_errors(cases, capsys)
    assert not (tmp_path / "r").exists()
