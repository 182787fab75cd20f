"""Builder: GSM8K problems after worked examples spread over the turns (gsm_fewshot)."""

from __future__ import annotations

import random
from pathlib import Path

from ..sources import gsm_fewshot
from .common import Budget, Builder, Dataset, Turn

__all__ = ["BUILDER"]


def _gsm_turns(dataset: Dataset, data_dir: Path, refs: list[int], budget: Budget, rng: random.Random) -> list[Turn]:
    """Worked examples are spread over the turns, in order: the 16 chain-of-thought
    examples first, then other gsm100 problems with their answers. Every turn asks
    a new problem, relying on the examples given so far (in-context learning), so
    turns after the first depend on all earlier ones."""
    gsm = gsm_fewshot(data_dir)
    targets = rng.sample(range(len(gsm.problems)), len(refs))
    extra = [
        f"Question: {problem}\nThe answer is {answer}"
        for i, (problem, answer) in enumerate(gsm.problems)
        if i not in targets
    ]
    rng.shuffle(extra)
    stream = list(gsm.demos) + extra
    position = 0
    carry = 0  # room left over (or overdrawn) by earlier turns: whole examples round
    turns: list[Turn] = []
    for k, index in enumerate(targets):
        problem, answer = gsm.problems[index]
        room = budget.context_chars(problem) + carry
        demos: list[str] = []
        while True:
            at = position % len(stream)  # cycles only for very long targets
            if not demos and len(stream[at]) + 2 > room:
                # A tight budget: bring forward the first example that fits, if any.
                fits = next((i for i in range(at, len(stream)) if len(stream[i]) + 2 <= room), at)
                stream.insert(at, stream.pop(fits))
            demo = stream[at]
            # Whole examples only; take the last one if that lands closer to the budget.
            if demos and len(demo) + 2 > room + (len(demo) + 2) // 2:
                break
            demos.append(demo)
            room -= len(demo) + 2
            position += 1
        carry = room
        turns.append(
            Turn("\n\n".join(demos), problem, [answer], list(range(k)),
                 {"problem": index, "examples": len(demos)})
        )
    return turns


def _calibration_text(dataset: Dataset, data_dir: Path) -> str:
    return "\n\n".join(gsm_fewshot(data_dir).demos)


BUILDER = Builder(_gsm_turns, _calibration_text)
