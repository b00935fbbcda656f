"""Subprocess entry point of the recovery tests (resume after a kill, torchrun, peak memory).

    python tests/_recover_worker.py run OUT.safetensors [--ckpt DIR] [--batch B] [--layers L]
    torchrun --nproc_per_node 2 tests/_recover_worker.py run OUT.safetensors --batch 1
    python tests/_recover_worker.py memory DENSE_DIR PRUNED_DIR OUT_DIR STREAM_DIR  (prints JSON)
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["run", "memory"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--stream32", action="store_true", help="fp32 streams (no fp16 rounding flips)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from laco_kernels.recover import layerwise
    from _recover_util import block_state, dense_and_pruned

    if a.mode == "run":
        distributed = "WORLD_SIZE" in os.environ
        if distributed:
            torch.distributed.init_process_group("gloo")
        dense, pruned = dense_and_pruned("2:4", layers=a.layers)
        ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(5))
        res = layerwise(dense, pruned, ids, epochs=a.epochs, lr=1e-3, batch_size=a.batch, checkpoint_dir=a.ckpt,
                        loss="token-nmse", progress=False,
                        stream_dtype=torch.float32 if a.stream32 else torch.float16)
        out = a.paths[0]
        if distributed:
            out = f"{out}.rank{torch.distributed.get_rank()}"
        save_file({k: v.contiguous() for k, v in block_state(pruned).items()}, out)
        with open(out + ".json", "w") as f:
            json.dump({"resumed_from": res.resumed_from, "blocks": res.blocks}, f)
        if distributed:
            torch.distributed.destroy_process_group()
        return
    dense_dir, pruned_dir, out_dir, stream_dir = a.paths
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401  (imports belong to the baseline)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(5))
    from laco_kernels.recover._memory import PeakMemory

    mem = PeakMemory()  # baseline: after every import and the calibration tensor
    res = layerwise(dense_dir, pruned_dir, ids, epochs=1, lr=1e-4, output_dir=out_dir, offload_dir=stream_dir,
                    progress=False)
    print(json.dumps({"baseline_rss": mem.baseline, "peak_above_baseline": mem.peak_above_baseline(),
                      "blocks": len(res.blocks)}))


if __name__ == "__main__":
    main()
