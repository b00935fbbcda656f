"""Prune a causal LM with Wanda 2:4 and measure WikiText-2 perplexity before and after, from Python.

    python python/examples/prune_and_eval.py                            # tiny random model, seconds
    python python/examples/prune_and_eval.py --model smollm2-135m --windows 16 --seqlen 1024

The default model is a tiny random-init Llama with a word-level tokenizer trained here on the
C4 sample (no download); its perplexities only show that the pipeline runs. With SmolLM2-135M
expect about 22.6 dense and 170-180 after Wanda 2:4 (seqlen 1024, 16 windows; bench/results/pruning.json
records 24.0 and 179.9 over 32 windows).
"""
import argparse

import torch

from laco_kernels.data import c4_documents, calibration_windows
from laco_kernels.eval import perplexity
from laco_kernels.prune import prune_model


def tiny_model_and_tokenizer(vocab_size=2000):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(c4_documents(limit=200), trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval(), tok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="smollm2-135m or a Hugging Face folder (default: tiny random)")
    parser.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default: 2:4)")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows (default: 8)")
    parser.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration window (default: 128)")
    parser.add_argument("--seqlen", type=int, default=128, help="perplexity window (default: 128)")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows (default: 4)")
    args = parser.parse_args()

    if args.model:
        from laco_kernels.models.loading import load_model

        model, tok = load_model(args.model)
    else:
        model, tok = tiny_model_and_tokenizer()

    dense = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.windows)["ppl"]
    calibration = calibration_windows(tok, args.nsamples, args.calib_seqlen, seed=0)   # [nsamples, seqlen] ids
    report = prune_model(model, args.method, pattern=args.pattern, calibration=calibration)
    pruned = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.windows)["ppl"]

    print(f"dense perplexity:  {dense:.2f}")
    print(f"pruned perplexity: {pruned:.2f} ({args.method} {args.pattern}, sparsity {report['overall_sparsity']:.3f})")
    print("per-block reconstruction error:", ", ".join(f"{e:.3g}" for e in report["block_error"]))


if __name__ == "__main__":
    main()
