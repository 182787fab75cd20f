"""Builder: a fact planted in the first turn and asked for in the last (turn_recall).

The first turns each bring a group of news passages (Multi-News via L-Eval) and ask for
a short summary, so the history fills with documents and the model's own long answers;
the first turn's passages also hold one named pass key at a random depth. The last turn
brings one more news group and asks for that key: retrieval of an earlier turn's fact
across every turn in between, where compression carried across turns (evicted history,
or every turn's approximated prefill) shows. Summary turns are scored with ROUGE-L
against the group's gold summary, the recall turn by whether the key is in the answer.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..sources import leval_docs
from ..text import nearest_boundary, window
from .common import MIN_CONTEXT_CHARS, Budget, Builder, Dataset, Turn
from .passkey import PASSKEY_LABELS

__all__ = ["BUILDER"]

SUMMARY_QUESTION = "Summarize the news passages of this message in two or three sentences."
RECALL_QUESTION = "What is the pass key for {label} given in my first message? Answer with the pass key only."


def _news(dataset: Dataset, data_dir: Path):
    return leval_docs(data_dir, dataset.info.source.removeprefix("leval/"))


def _turns(dataset: Dataset, data_dir: Path, refs: list[int], budget: Budget, rng: random.Random) -> list[Turn]:
    """``len(refs)`` turns: summaries, the first with the key; then the recall (the plan's
    own references are not used: the last turn always asks about the first)."""
    n_turns = len(refs)
    if n_turns < 2:
        raise ValueError("turn_recall needs at least 2 turns")
    docs = _news(dataset, data_dir)
    picks = rng.sample(range(len(docs)), min(n_turns, len(docs)))
    picks += [rng.randrange(len(docs)) for _ in range(n_turns - len(picks))]
    label = rng.choice(PASSKEY_LABELS)
    key = str(rng.randrange(10000, 100000))
    needle = f"The pass key for {label} is {key}. Remember it. {key} is the pass key for {label}."
    turns: list[Turn] = []
    for k, d in enumerate(picks):
        doc = docs[d]
        last = k == n_turns - 1
        question = RECALL_QUESTION.format(label=label) if last else SUMMARY_QUESTION
        room = budget.context_chars(question) - (len(needle) + 2 if k == 0 else 0)
        s, e = window(doc.units, max(room, MIN_CONTEXT_CHARS), rng)
        text = doc.text[s:e]
        origin = {"record": doc.record, "offset": s}
        if k == 0:
            depth = rng.random()
            cut = nearest_boundary(text, round(depth * len(text))) if depth < 0.98 else len(text)
            text = f"{text[:cut].rstrip()} {needle} {text[cut:].lstrip()}".strip()
            origin["depth"] = round(cut / max(1, e - s), 3)
        if last:
            turns.append(Turn(text, question, [key], [0], {**origin, "key_turn": 0}, metric="substring"))
        else:
            turns.append(Turn(text, question, [doc.items[0].answers[0]], [], origin, metric="rouge_l"))
    return turns


def _calibration_text(dataset: Dataset, data_dir: Path) -> str:
    return _news(dataset, data_dir)[0].text[:12000]


BUILDER = Builder(_turns, _calibration_text)
