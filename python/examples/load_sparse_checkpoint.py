"""Save a sparsified model with packed weights, load it with transformers' from_pretrained, export it.

    python python/examples/load_sparse_checkpoint.py --out /tmp/sparse-demo
    python python/examples/load_sparse_checkpoint.py --load runs/smollm2/model    # a folder laco wrote

``model.save_pretrained`` of a sparsified model writes the packed tensors with a ``laco-sparse``
quantization_config; after ``import laco_kernels``, ``AutoModelForCausalLM.from_pretrained``
builds SparseLinear24 / BitmapLinear modules and loads them directly (identical logits).
``export_compressed_tensors`` writes the 2:4 compressed-tensors layout that compressed-tensors
<= 0.14 and transformers 4.x read (docs/checkpoints.md).
"""
import argparse
import os
import tempfile

import torch

import laco_kernels  # noqa: F401  (registers the laco-sparse format with transformers)
from laco_kernels.checkpoint import export_compressed_tensors, save_sparse
from laco_kernels.nn import sparse_modules, sparsify
from laco_kernels.prune import prune_model


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def main():
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default=None, help="an existing sparse folder to load (skips the save step)")
    parser.add_argument("--out", default=None, help="where to save the demo checkpoint (default: a temp folder)")
    args = parser.parse_args()

    folder = args.load
    if folder is None:
        model = tiny_llama()
        prune_model(model, "magnitude", pattern="2:4", progress=False)
        sparsify(model, "2:4")
        folder = args.out or os.path.join(tempfile.mkdtemp(prefix="laco-sparse-"), "model")
        save_sparse(model, folder)  # = model.save_pretrained(folder), written atomically
        print(f"saved to {folder}: {sorted(os.listdir(folder))}")

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    print(f"loaded {type(loaded).__name__} with {len(sparse_modules(loaded))} packed linears")
    ids = torch.randint(0, loaded.config.vocab_size, (1, 12))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    if args.load is None:
        with torch.no_grad():
            assert torch.equal(logits, model(input_ids=ids).logits)
        print("logits identical to the saved model's")

    ct = folder.rstrip("/") + "-compressed-tensors"
    sc = export_compressed_tensors(loaded, ct)
    print(f"compressed-tensors export in {ct}: format {sc['format']}, global sparsity {sc['global_sparsity']:.3f}")


if __name__ == "__main__":
    main()
