"""Tiny random-weight models built in-process from configs, for tests and smoke runs.

They need no download: weights come from a seeded initialisation and the tokenizer is a
byte-level tokenizer (256 byte tokens + ChatML special tokens) built with `tokenizers`.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 320  # 256 bytes + 3 specials, padded so the embedding has spare rows

# GQA everywhere (4 query heads over 2 KV heads) so per-KV-head code paths are exercised.
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    # A wider init than the default 0.02 gives peaked next-token distributions, so greedy
    # decoding is not decided by float-rounding ties between near-equal logits.
    initializer_range=0.15,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=258,
    pad_token_id=0,
)

TINY_CONFIGS = {
    "tiny-llama": lambda: LlamaConfig(**_COMMON),
    "tiny-qwen2": lambda: Qwen2Config(**_COMMON),
    "tiny-qwen3": lambda: Qwen3Config(**_COMMON),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level ChatML tokenizer: every byte is a token, so any text round-trips."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = _COMMON["max_position_embeddings"]
    assert fast.convert_tokens_to_ids("<|im_end|>") == _COMMON["eos_token_id"]
    return fast


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build tiny model `name` with deterministic random weights."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_CONFIGS)}")
    config = TINY_CONFIGS[name]()
    # Build under a private RNG state so that building a model never perturbs the caller's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model
