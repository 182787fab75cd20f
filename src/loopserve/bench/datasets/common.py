"""What every dataset builder shares: the registry's record types, a turn, its budget.

A *builder* (one module per construction: ``leval``, ``squad``, ``gsm``, ``passkey``)
turns source data into the turns of one conversation; a registry entry
(:mod:`.registry`) names a dataset and pairs its :class:`DatasetInfo` with a
:class:`Recipe` that picks the builder and words the turns.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = ["MIN_CONTEXT_CHARS", "Budget", "Builder", "Dataset", "DatasetInfo", "Recipe", "Turn"]

MIN_CONTEXT_CHARS = 200


class DatasetInfo(NamedTuple):
    """Registry entry: what a dataset is, how it is scored, where it comes from."""

    task: str  # single_doc_qa | multi_doc_qa | summarization | few_shot | synthetic_retrieval
    metric: str  # a name in loopserve.bench.metrics.METRICS
    description: str
    source: str  # path under the source data folder (loopserve.sourcedata)
    license: str  # upstream license(s) of the source file and of its content
    max_new_tokens: int  # generation budget per answer (LongBench dataset2maxlen style)


@dataclass
class Turn:
    context: str
    question: str
    answers: list[str]
    depends_on: list[int]
    origin: dict = field(default_factory=dict)
    metric: str | None = None  # this turn's metric when it differs from the dataset's


@dataclass(frozen=True)
class Builder:
    """One construction of turns from source data.

    ``make_turns(dataset, data_dir, refs, budget, rng)``: the turns of one conversation;
    ``refs[k]`` is the turn whose context turn ``k``'s question needs (``k`` if local).
    ``calibration_text(dataset, data_dir)``: a sample of the text the turns are cut from,
    to estimate characters per token once.
    """

    make_turns: Callable[["Dataset", Path, list[int], "Budget", random.Random], list[Turn]]
    calibration_text: Callable[["Dataset", Path], str]


@dataclass(frozen=True)
class Recipe:
    """How a dataset's turns are built (``builder``) and worded (the rest)."""

    builder: Builder
    instruction: str
    question_format: str = "Question: {question}"
    label: str = "Document"  # what an L-Eval document is called ("Article 2")
    locate: bool = True  # window L-Eval documents around the evidence; False: keep the head
    summary: str | None = None  # whole-document task: the question, with {ref}


class Dataset(NamedTuple):
    """A registry entry: what the dataset is (``info``) and how it is built (``recipe``)."""

    info: DatasetInfo
    recipe: Recipe


class Budget:
    """Turns a token target into a character budget for one turn's context."""

    def __init__(self, recipe: Recipe, context_tokens: int, n_turns: int, cpt: float, scale: float):
        self.recipe = recipe
        self.per_turn = context_tokens / n_turns
        self.cpt = cpt
        self.scale = scale

    def block(self, question: str) -> str:
        return self.recipe.question_format.format(question=question)

    def context_chars(self, question: str) -> int:
        """Characters of context that bring the turn to ~context_tokens / turns."""
        overhead = len(self.recipe.instruction) + len(self.block(question)) + 4  # separators
        chars = (self.per_turn * self.cpt - overhead) * self.scale
        return max(MIN_CONTEXT_CHARS, int(chars))
