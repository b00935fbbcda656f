"""Swap a pruned model's linear layers for packed 2:4 modules (inference) in a few lines.

    python python/examples/swap_linears.py                   # a tiny random-init Llama
    python python/examples/swap_linears.py --model smollm2-135m

The model is pruned to 2:4 by magnitude first (any pruning method works), then
``laco_kernels.nn.sparsify`` replaces every linear of the decoder blocks by a ``SparseLinear24``
holding half the values plus 2-bit positions; the logits stay the same.
"""
import argparse

import torch

from laco_kernels.nn import densify, sparsify
from laco_kernels.prune import prune_model


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="smollm2-135m or a Hugging Face folder (default: tiny random)")
    args = parser.parse_args()
    if args.model:
        from laco_kernels.models.loading import load_model

        model, _ = load_model(args.model, with_tokenizer=False)
    else:
        model = tiny_llama()

    prune_model(model, "magnitude", pattern="2:4", progress=False)   # every block linear is now 2:4
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits

    summary = sparsify(model, pattern="2:4")                          # the swap: one call
    print(f"swapped {summary['swapped']} linears: {summary['bytes_before'] / 2**20:.2f} MiB -> "
          f"{summary['bytes_after'] / 2**20:.2f} MiB")
    print("first block's q_proj is now", model.get_submodule(summary["names"][0]))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    print(f"max |logit difference| after the swap: {(after - before).abs().max().item():.2e}")
    assert torch.allclose(after, before, atol=1e-3, rtol=1e-3)

    densify(model)                                                    # and back to nn.Linear
    print("densified again:", type(model.get_submodule(summary["names"][0])).__name__)


if __name__ == "__main__":
    main()
