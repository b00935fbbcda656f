"""Tiny random-init models of every adapter family and a tiny word-level tokenizer (no hub access)."""
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 100
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2, max_position_embeddings=128)


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """A random-init causal LM of ``family`` in eval mode (fp32), weights large enough to matter."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**_LLAMA_LIKE, "num_hidden_layers": layers}))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**_LLAMA_LIKE, "num_hidden_layers": layers}))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**_LLAMA_LIKE, "num_hidden_layers": layers}))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                                         vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=64,
                                         init_std=0.2, dropout=0.0, attention_dropout=0.0))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                                 num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
                                                 initializer_range=0.2))
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ("llama", "qwen2", "mistral", "opt", "gpt_neox")

WORDS = ("the a of and to in is was for on with as by at from that it his her they "
         "cat dog bird fish tree river city house road car red blue green big small old new "
         "runs sits eats sees likes swims flies reads yes no").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``WORDS`` (ids < VOCAB), whitespace split, ``<eos>`` id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_text(n_words: int = 3000, seed: int = 0) -> str:
    """Random sentences over ``WORDS``, CRLF line endings (as the WikiText file has)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[s:s + 12]) for s in range(0, n_words, 12)]
    return "\r\n".join(lines) + "\r\n"


def random_ids(samples: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def pruned_tiny(pattern: str = "2:4", family: str = "llama", tie: bool = False, layers: int = 2) -> torch.nn.Module:
    """A tiny random model magnitude-pruned to 2:4 (``pattern="2:4"``) or 70% unstructured, optionally
    with tied embeddings; the weights stay dense ``nn.Linear`` (sparsify it to pack them)."""
    from laco_kernels.prune import prune_model

    model = tiny_model(family, layers=layers)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    if pattern == "2:4":
        prune_model(model, "magnitude", pattern="2:4", progress=False)
    else:
        prune_model(model, "magnitude", sparsity=0.7, progress=False)
    return model
