"""Builder: SQuAD v2 paragraphs among distractors, RULER qa_1 style (squad_multi)."""

from __future__ import annotations

import random
from pathlib import Path

from ..sources import squad_paragraphs
from .common import Budget, Builder, Dataset, Turn

__all__ = ["BUILDER"]


def _squad_turns(dataset: Dataset, data_dir: Path, refs: list[int], budget: Budget, rng: random.Random) -> list[Turn]:
    """Random SQuAD paragraphs fill each turn; the question's paragraph is one of
    this turn's (local) or one of the referenced earlier turn's (dependent)."""
    paragraphs = squad_paragraphs(data_dir)
    pool = iter(rng.sample(range(len(paragraphs)), len(paragraphs)))
    sep = len("\n\nPassage 99:\n")
    room_est = budget.context_chars("x" * 60)
    turn_paras: list[list[int]] = []
    carry = 0  # room left over (or overdrawn) by earlier turns: paragraphs are whole
    for _ in refs:
        chosen: list[int] = []
        room = room_est + carry
        skipped: list[int] = []
        # Whole paragraphs only; skip a few that do not fit to fill the turn closely.
        for p in pool:
            size = len(paragraphs[p].text) + sep
            if size <= room:
                chosen.append(p)
                room -= size
            else:
                skipped.append(p)
            if room < 150 or len(skipped) >= 20:
                break
        if not chosen:  # tiny budget: the shortest paragraph seen
            p = min(skipped, key=lambda q: len(paragraphs[q].text))
            chosen.append(p)
            room -= len(paragraphs[p].text) + sep
        carry = room
        turn_paras.append(chosen)

    turns: list[Turn] = []
    numbers: dict[int, int] = {}
    asked: set[int] = set()
    for k, j in enumerate(refs):
        for p in turn_paras[k]:
            numbers[p] = len(numbers) + 1
        candidates = [p for p in turn_paras[j] if p not in asked] or turn_paras[j]
        p = rng.choice(candidates)
        asked.add(p)
        para = paragraphs[p]
        qa_id, question, golds = rng.choice(para.qas)
        context = "\n\n".join(f"Passage {numbers[q]}:\n{paragraphs[q].text}" for q in turn_paras[k])
        turns.append(
            Turn(context, question, list(golds), [j] if j < k else [],
                 {"qa_id": qa_id, "article": para.article, "paragraph": para.paragraph,
                  "passage": numbers[p], "turn": j})
        )
    return turns


def _calibration_text(dataset: Dataset, data_dir: Path) -> str:
    return "\n\n".join(p.text for p in squad_paragraphs(data_dir)[:12])


BUILDER = Builder(_squad_turns, _calibration_text)
