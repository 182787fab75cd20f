"""Random-weight models with the shape of real ones, for speed measurements only.

No hub is reachable on the benchmark machines, so a GPU run that needs a Llama-3.1-8B-sized
model builds one from its published shape with random weights, directly on the device
(``load_model("random-llama3-8b", device="cuda")``). Timings depend on the shapes, not on
the weights; answers are meaningless. The tokenizer is the byte-level one of the tiny models.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .tiny import SPECIAL_TOKENS

# Llama-3.1-8B: 32 layers, 32 query / 8 KV heads of 128, 14336 MLP, 128k vocabulary and window.
SHAPED_CONFIGS = {
    "random-llama3-8b": lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=256 + SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=0,
    ),
}


def shaped_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Build `name` with seeded random weights, allocated on `device` from the start."""
    if name not in SHAPED_CONFIGS:
        raise ValueError(f"unknown shaped model {name!r}; known: {sorted(SHAPED_CONFIGS)}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(SHAPED_CONFIGS[name](), dtype=dtype)
    return model.eval()
