"""Builder: named pass keys planted in the Paul Graham essays (passkey)."""

from __future__ import annotations

import random
from pathlib import Path

from ..sources import essay_haystack
from ..text import nearest_boundary, window
from .common import MIN_CONTEXT_CHARS, Budget, Builder, Dataset, Turn

__all__ = ["BUILDER", "PASSKEY_LABELS"]

# Names that label the planted pass keys; one per turn, distinct in a conversation.
PASSKEY_LABELS = (
    "the red door", "the blue gate", "the green locker", "the old safe", "the garden shed",
    "the north tower", "the wine cellar", "the server room", "the boat house", "the attic",
    "the west wing", "the silver box", "the library vault", "the back office", "the garage",
)


def _passkey_turns(dataset: Dataset, data_dir: Path, refs: list[int], budget: Budget, rng: random.Random) -> list[Turn]:
    """Each turn: a random stretch of the essays with one named pass key planted at
    a random depth; the question asks for this turn's key or an earlier turn's."""
    hay = essay_haystack(data_dir)
    n_turns = len(refs)
    labels = rng.sample(PASSKEY_LABELS, n_turns)
    keys = [str(k) for k in rng.sample(range(10000, 100000), n_turns)]
    turns: list[Turn] = []
    for k, j in enumerate(refs):
        needle = (
            f"The pass key for {labels[k]} is {keys[k]}. Remember it. "
            f"{keys[k]} is the pass key for {labels[k]}."
        )
        question = f"What is the pass key for {labels[j]}?"
        room = budget.context_chars(question) - len(needle) - 2
        s, e = window(hay.units, max(room, MIN_CONTEXT_CHARS), rng)
        depth = rng.random()
        cut = nearest_boundary(hay.text[s:e], round(depth * (e - s))) if depth < 0.98 else e - s
        text = hay.text[s:e]
        context = f"{text[:cut].rstrip()} {needle} {text[cut:].lstrip()}".strip()
        turns.append(
            Turn(context, question, [keys[j]], [j] if j < k else [],
                 {"key_turn": j, "depth": round(cut / max(1, e - s), 3), "offset": s})
        )
    return turns


def _calibration_text(dataset: Dataset, data_dir: Path) -> str:
    return essay_haystack(data_dir).text[:12000]


BUILDER = Builder(_passkey_turns, _calibration_text)
