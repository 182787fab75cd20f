"""Real long text for demos and benchmarks, from the evaluation data (see `loopserve.sourcedata`)."""

from __future__ import annotations

from .bench import sources
from .sourcedata import resolve_data_dir


def essays_text() -> str:
    """The Paul Graham essays (RULER's haystack), one long English text."""
    return sources.essays_text(resolve_data_dir())


def text_chunks(tokenizer, n_tokens: int, count: int = 1, start_token: int = 0) -> list[str]:
    """`count` consecutive chunks of about `n_tokens` tokens each of real essay text."""
    need = start_token + n_tokens * count
    # Tokenising all 700k tokens takes seconds; ~4 chars per token, so a prefix with slack does.
    ids = tokenizer(essays_text()[: need * 8], add_special_tokens=False)["input_ids"]
    if need > len(ids):
        raise ValueError(f"asked for {need} tokens of text; the essays hold {len(ids)}")
    return [
        tokenizer.decode(ids[start_token + i * n_tokens : start_token + (i + 1) * n_tokens])
        for i in range(count)
    ]
