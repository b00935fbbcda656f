"""Diagnostic for issue 14's Goal A: is the 65k-token shortfall the model or the calibration text's domain?

    OMP_NUM_THREADS=2 python bench/recovery_domain.py [--variants eval-windows other-test-windows]

Takes Goal A's best stage-1 model (the ``laco`` row ``tokens/sparsegpt+permute-2:4/laco/n128x512/lr0.003,bs2,
ep3,bf16`` of ``bench/recovery_tokens.py``, read from its cache under ``--scratch``; run that bench first) and runs
the package's KL stage (``recover.layerwise._stage2``: 2 passes, lr 4e-4, T = 1, batch 2, bf16 autocast, no noise;
the settings of the 65k C4 row that ended at 48.845) on WikiText-2 **test** text instead of C4:

- ``eval-windows``: the 32 evaluated windows of 1024 themselves, cut in 64 windows of 512 (32k tokens): how far
  this 2:4 model can fit the very text it is scored on;
- ``other-test-windows``: 128 windows of 512 (65k tokens) of the test file *after* the evaluated 32 x 1024 tokens:
  in-domain text the evaluation does not read.

Both train on the test split, so neither is a recovery result (the package refuses ``--calib-data`` pointing at
that file); they bound what in-domain calibration can do. Rows ``domain/...`` of ``bench/results/recovery.json``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from recovery import DEFAULT_OUT, _load, _record  # noqa: E402
from recovery_recipe import pruned_start  # noqa: E402

# the stage-1 row named above, as recovery_tokens.py keys it and names its cache file (tokens-<sha1 of the key>)
STAGE1_KEY = "tokens/sparsegpt+permute-2:4/laco/n128x512/lr0.003,bs2,ep3,bf16/w32x1024"
STAGE1_CACHE = "tokens-" + hashlib.sha1(STAGE1_KEY.encode()).hexdigest()[:16] + ".safetensors"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["eval-windows", "other-test-windows"],
                    choices=["eval-windows", "other-test-windows"])
    ap.add_argument("--scratch", default="/tmp/laco_recipe")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    from safetensors.torch import load_file

    from laco_kernels.data import wikitext_windows
    from laco_kernels.eval.perplexity import perplexity
    from laco_kernels.models.adapters import get_adapter
    from laco_kernels.models.loading import load_model
    from laco_kernels.recover.layerwise import LayerwiseConfig, _stage2

    cache = os.path.join(args.scratch, STAGE1_CACHE)
    if not os.path.exists(cache):
        raise SystemExit(f"{cache} missing: run bench/recovery_tokens.py --start sparsegpt+permute --tokens 65536 "
                         "--seqlen 512 --laco-batch 2 --laco-epochs 3 --methods laco laco+kl --autocast ... first")
    cmd = "python bench/recovery_domain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    model, tok = load_model("smollm2-135m")
    start, _ = pruned_start(model, tok, "sparsegpt+permute", args.scratch)
    stage1 = copy.deepcopy(start)
    stage1.load_state_dict(load_file(cache), strict=False)
    recorded = _load(args.out)  # the stage-1 and dense figures of the rows this one builds on
    stage1_ppl, dense_ppl = recorded[STAGE1_KEY]["ppl_after"], recorded["tokens/dense/w32x1024"]["ppl"]
    w512 = wikitext_windows(tok, 512)
    windows = {"eval-windows": w512[:64], "other-test-windows": w512[64:64 + 128]}
    for name in args.variants:
        ids = windows[name]

        def run():
            m = copy.deepcopy(stage1)
            cfg = LayerwiseConfig(loss="token-nmse", lr=3e-3, batch_size=2, epochs=3, autocast=True, progress=False,
                                  track_errors=False, stage2_epochs=2, stage2_lr=4e-4, stage2_batch_size=2,
                                  temperature=1.0)
            t0 = time.time()
            hist = _stage2(model, m, ids, cfg, get_adapter(m), 1)
            secs = round(time.time() - t0, 1)
            p = round(perplexity(m, tok, seqlen=1024, max_windows=32, progress=False)["ppl"], 3)
            return dict(variant=name, windows=len(ids), seqlen=512, tokens=int(ids.numel()), kl_per_pass=hist,
                        stage2_wall_s=secs, ppl_after=p, ppl_after_stage1=stage1_ppl, ppl_dense=dense_ppl,
                        eval="w32x1024",
                        command=cmd, note="diagnostic: the KL stage trained on WikiText-2 test text, not a recovery row")

        _record(args.out, f"domain/sparsegpt+permute-2:4/laco-65k-stage1/kl-2x-{name}/w32x1024", run)


if __name__ == "__main__":
    main()
