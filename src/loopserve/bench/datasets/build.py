"""Building the multi-turn long-context benchmark (SPEC section 4).

Eleven datasets, each a JSONL file of conversations. A conversation has 3-5
turns; each turn brings a new context chunk and asks one question, and the user
message of every turn is stored three times, with the question at the **front**,
in the **middle** or at the **back**. At least a third of the turns of every
conversation ask about context given in an *earlier* turn (``depends_on``), so a
method that drops history it has not been asked about yet loses those turns.

Lengths: the user messages of a conversation add up to about ``context_tokens``
tokens as measured by the ``count_tokens`` callable (each turn about
``context_tokens / turns``). Contexts are cut at sentence or line boundaries,
estimated in characters from a per-dataset chars-per-token ratio, then checked
with ``count_tokens`` and rebuilt with a corrected ratio when off by more than 4%.

Everything is deterministic in ``seed``: each conversation draws from its own
``random.Random`` seeded with a string, so the same seed gives byte-identical
files, whatever the Python hash seed and whichever datasets are built together.

See ``docs/benchmark.md`` for the per-dataset constructions and the schema.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from ...sourcedata import resolve_data_dir
from ..text import nearest_boundary
from .common import Budget
from .registry import DATASETS, REGISTRY, dataset_info, dataset_path

__all__ = ["CountTokens", "approx_token_count", "build_conversations", "build_datasets"]

CountTokens = Callable[[str], int]

_TURNS = (3, 5)  # inclusive range of turns per conversation
_FIT_TOLERANCE = 0.04  # rebuild a conversation whose length is off by more than this
_FIT_ATTEMPTS = 5
_MAX_ERROR = 0.15  # the promise: total user tokens within +-15% of context_tokens
_MIN_TOKENS = 2000  # smallest context_tokens accepted: below, a turn is mostly instruction


def approx_token_count(text: str) -> int:
    """Rough token count (4 characters per token) for quick looks without a tokenizer.

    Real runs should pass the model tokenizer's count to :func:`build_datasets`.
    """
    return max(1, round(len(text) / 4))


def _plan_refs(rng: random.Random, n_turns: int) -> list[int]:
    """For each turn, the turn whose context its question needs (itself if local).

    At least ceil(T/3) turns (and at most T-1: turn 0 has no history) refer back,
    each to a uniformly chosen earlier turn, so every conversation on its own
    meets the "a third of the turns depend on history" target.
    """
    need = math.ceil(n_turns / 3)
    n_dep = rng.randint(need, n_turns - 1)
    refs = list(range(n_turns))
    for k in sorted(rng.sample(range(1, n_turns), n_dep)):
        refs[k] = rng.randrange(k)
    return refs


def _render(instruction: str, context: str, block: str) -> tuple[dict[str, str], dict[str, list[int]]]:
    """The user message with the question block at the front, middle and back.

    front:  block, instruction, context
    middle: instruction, first half of context, block, second half of context
    back:   instruction, context, block
    The middle cut is the sentence boundary that puts the block's centre nearest
    the centre of the message. Returns the texts and the block's char spans.
    """
    back = f"{instruction}\n\n{context}\n\n{block}"
    front = f"{block}\n\n{instruction}\n\n{context}"
    head = f"{instruction}\n\n"
    target = len(back) // 2 - len(head) - len(block) // 2 - 2
    cut = nearest_boundary(context, max(1, target))
    first, second = context[:cut].rstrip(), context[cut:].lstrip()
    middle = f"{head}{first}\n\n{block}\n\n{second}"
    start = len(head) + len(first) + 2
    users = {"front": front, "middle": middle, "back": back}
    spans = {
        "front": [0, len(block)],
        "middle": [start, start + len(block)],
        "back": [len(back) - len(block), len(back)],
    }
    return users, spans


def _conversation(
    name: str, index: int, seed: int, context_tokens: int, count_tokens: CountTokens,
    data_dir: Path, cpt: float,
) -> dict:
    """Build conversation ``index`` of dataset ``name``, fitted to ``context_tokens``."""
    entry = REGISTRY[name]
    info, recipe = entry.info, entry.recipe
    scale = 1.0
    best: tuple[float, dict] | None = None
    for _ in range(_FIT_ATTEMPTS):
        # Re-seeded every attempt: a rebuild differs only where lengths differ.
        rng = random.Random(f"loopserve-bench/{seed}/{name}/{index}")
        n_turns = rng.randint(*_TURNS)
        refs = _plan_refs(rng, n_turns)
        budget = Budget(recipe, context_tokens, n_turns, cpt, scale)
        turns = recipe.builder.make_turns(entry, data_dir, refs, budget, rng)
        records, total, overhead = [], 0, 0
        for k, turn in enumerate(turns):
            block = budget.block(turn.question)
            users, spans = _render(recipe.instruction, turn.context, block)
            n_tok = int(count_tokens(users["back"]))
            total += n_tok
            overhead += len(recipe.instruction) + len(block)
            records.append({
                "index": k,
                "context": turn.context,
                "question": turn.question,
                "answers": turn.answers,
                "metric": turn.metric or info.metric,
                "depends_on": turn.depends_on,
                "user": users,
                "question_span": spans,
                "user_tokens": n_tok,
                "origin": turn.origin,
            })
        error = abs(total / context_tokens - 1)
        conv = {
            "id": f"{name}-{index:04d}",
            "dataset": name,
            "source": info.source,
            "task": info.task,
            "metric": info.metric,
            "max_new_tokens": info.max_new_tokens,
            "instruction": recipe.instruction,
            "seed": seed,
            "context_tokens": context_tokens,
            "user_tokens": total,
            "turns": records,
        }
        if best is None or error < best[0]:
            best = (error, conv)
        if error <= _FIT_TOLERANCE:
            break
        # Only the contexts scale; instruction and question tokens are fixed.
        fixed = overhead / cpt
        scale *= max(0.05, (context_tokens - fixed)) / max(1.0, total - fixed)
    error, conv = best
    if error > _MAX_ERROR:
        raise RuntimeError(
            f"{name} conversation {index}: {conv['user_tokens']} user tokens for a target of "
            f"{context_tokens} (off by {error:.0%}); the source cannot fill this length"
        )
    return conv


def build_conversations(
    name: str,
    *,
    context_tokens: int,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    data_dir: str | os.PathLike | None = None,
    conversations: int = 10,
) -> list[dict]:
    """The conversations of one dataset as records (see ``schema``), not written."""
    dataset_info(name)
    if context_tokens < _MIN_TOKENS:
        # Below this a turn holds little more than its instruction and question.
        raise ValueError(f"context_tokens={context_tokens} is too small (minimum {_MIN_TOKENS})")
    count = count_tokens or approx_token_count
    root = resolve_data_dir(data_dir)
    entry = REGISTRY[name]
    sample = entry.recipe.builder.calibration_text(entry, root)
    cpt = len(sample) / max(1, int(count(sample)))
    return [
        _conversation(name, i, seed, context_tokens, count, root, cpt)
        for i in range(conversations)
    ]


def build_datasets(
    out_dir: str | os.PathLike,
    *,
    context_tokens: int = 6000,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    data_dir: str | os.PathLike | None = None,
    conversations_per_dataset: int = 10,
    datasets: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Write ``out_dir/<dataset>.jsonl`` for each dataset and ``out_dir/manifest.json``.

    Args:
        out_dir: output folder (created).
        context_tokens: target total of the user messages of a conversation, in
            ``count_tokens`` tokens (model answers come on top of it).
        seed: same seed, same bytes.
        count_tokens: ``text -> int``, normally the model tokenizer's length
            function; defaults to :func:`approx_token_count` (4 chars per token).
        data_dir: the source data folder (see ``loopserve.sourcedata.resolve_data_dir``;
            default: ``$LOOPSERVE_DATA``, else the data shipped in the package).
        conversations_per_dataset: conversations per file.
        datasets: names to build (default: all of ``DATASETS``).

    Returns:
        ``{dataset name: path of its JSONL file}``.
    """
    names = list(DATASETS) if datasets is None else list(datasets)
    for name in names:
        dataset_info(name)  # fail before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    manifest = {
        "context_tokens": context_tokens,
        "seed": seed,
        "conversations_per_dataset": conversations_per_dataset,
        "datasets": {},
    }
    for name in names:
        convs = build_conversations(
            name, context_tokens=context_tokens, seed=seed, count_tokens=count_tokens,
            data_dir=data_dir, conversations=conversations_per_dataset,
        )
        path = dataset_path(out, name)
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            for conv in convs:
                fh.write(json.dumps(conv, ensure_ascii=False) + "\n")
        paths[name] = path
        turns = [t for c in convs for t in c["turns"]]
        info = DATASETS[name]
        manifest["datasets"][name] = {
            "file": path.name,
            "task": info.task,
            "metric": info.metric,
            "max_new_tokens": info.max_new_tokens,
            "source": info.source,
            "license": info.license,
            "conversations": len(convs),
            "turns": len(turns),
            "dependent_turns": sum(bool(t["depends_on"]) for t in turns),
            "mean_user_tokens": round(sum(c["user_tokens"] for c in convs) / max(1, len(convs)), 1),
        }
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return paths
