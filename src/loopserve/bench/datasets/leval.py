"""Builder: L-Eval documents, several questions each (qasper, nq, qmsum, quality_mc, ...)."""

from __future__ import annotations

import random
from pathlib import Path

from ..metrics import normalize_answer
from ..sources import Doc, leval_docs
from ..text import window
from .common import MIN_CONTEXT_CHARS, Budget, Builder, Dataset, Turn

__all__ = ["BUILDER"]


def _docs(dataset: Dataset, data_dir: Path) -> tuple[Doc, ...]:
    return leval_docs(data_dir, dataset.info.source.removeprefix("leval/"))


def _pick_items(doc: Doc, count: int, max_span: float, rng: random.Random, locate: bool) -> list[int]:
    """``count`` distinct questions of ``doc`` whose evidence fits one window.

    Well-located questions (confidence >= 0.5) come first, in random order. The
    first is the anchor; others are taken only if the evidence of all chosen
    questions spans at most ``max_span`` characters and they are not a rewording
    of a chosen one (Qasper has several annotators' versions of a question),
    then any question fills up.
    """
    order = list(range(len(doc.items)))
    rng.shuffle(order)
    if not locate:
        return order[:count]
    order.sort(key=lambda k: doc.evidence(k)[1] < 0.5)  # stable: keeps the shuffle

    def key(k: int) -> str:
        answer = normalize_answer(doc.items[k].answers[0])
        # Short answers ("yes", "2") repeat legitimately across different questions.
        return answer if len(answer.split()) >= 3 else f"#{k}"

    chosen = [order[0]]
    seen = {key(order[0])}
    lo, hi = doc.evidence(order[0])[0]
    for k in order[1:]:
        if len(chosen) == count:
            break
        s, e = doc.evidence(k)[0]
        if max(hi, e) - min(lo, s) <= max_span and key(k) not in seen:
            chosen.append(k)
            seen.add(key(k))
            lo, hi = min(lo, s), max(hi, e)
    for k in order:
        if len(chosen) == count:
            break
        if k not in chosen and key(k) not in seen:
            chosen.append(k)
            seen.add(key(k))
    for k in order:  # only reached when rewordings are all that is left
        if len(chosen) == count:
            break
        if k not in chosen:
            chosen.append(k)
    return chosen


def _leval_turns(
    dataset: Dataset, data_dir: Path, refs: list[int], budget: Budget, rng: random.Random
) -> list[Turn]:
    """One new document per turn; questions on the current or an earlier one.

    A turn that refers back asks a further question on the document introduced
    in the referenced turn (a follow-up), or, when that document has no unused
    question (summaries have one), on a second document introduced alongside it
    in that earlier turn and not asked about there. Each asked document is cut
    to a window that holds the evidence of its questions (or its head, for
    whole-document tasks); leftover room is filled with other documents.
    """
    recipe, docs = dataset.recipe, _docs(dataset, data_dir)
    n_turns = len(refs)
    if len(docs) < n_turns:
        raise ValueError(f"source has {len(docs)} documents, fewer than {n_turns} turns")
    pool = iter(rng.sample(range(len(docs)), len(docs)))
    turn_docs = [[next(pool)] for _ in range(n_turns)]
    requests: dict[int, list[int]] = {}  # doc -> turns asking about it, in turn order
    target: list[tuple[int, int]] = []  # per turn: (turn holding the doc, doc)
    for k, j in enumerate(refs):
        doc_id = turn_docs[j][0]
        if len(requests.get(doc_id, ())) >= len(docs[doc_id].items):
            doc_id = next(pool, None)
            if doc_id is None:
                raise ValueError("source has too few documents for this conversation")
            turn_docs[j].append(doc_id)
        requests.setdefault(doc_id, []).append(k)
        target.append((j, doc_id))

    # Questions per asked document, chosen so their evidence fits the expected window.
    mean_question = "x" * 80
    item_of_turn: dict[int, int] = {}
    for doc_id, askers in requests.items():
        holder = next(j for j, ds in enumerate(turn_docs) if doc_id in ds)
        share = budget.context_chars(mean_question) / len(turn_docs[holder])
        items = _pick_items(docs[doc_id], len(askers), 0.8 * share, rng, recipe.locate)
        for k, item in zip(askers, items):
            item_of_turn[k] = item

    def question_text(k: int, number: int | None) -> str:
        ref = f"{recipe.label} {number if number is not None else 99}"
        if recipe.summary:
            return recipe.summary.format(ref=ref)
        return f"Regarding {ref}: {docs[target[k][1]].items[item_of_turn[k]].question}"

    labels: dict[int, int] = {}  # doc -> its number in the conversation
    next_label = 1
    turns: list[Turn] = []
    used = {d for ds in turn_docs for d in ds}
    for k in range(n_turns):
        room = budget.context_chars(question_text(k, None))
        pieces: list[tuple[int, str]] = []
        introduced = turn_docs[k]  # this turn's new documents (asked now, later, or never)
        for i, doc_id in enumerate(introduced):
            doc = docs[doc_id]
            # Equal shares; a document shorter than its share leaves room to the next.
            share = max(MIN_CONTEXT_CHARS, room // (len(introduced) - i))
            if doc_id in requests and recipe.locate:
                spans = [doc.evidence(item_of_turn[t])[0] for t in requests[doc_id]]
                require = (min(s for s, _ in spans), max(e for _, e in spans))
                s, e = window(doc.units, share, rng, require=require)
            else:
                s, e = window(doc.units, share, rng, head=not recipe.locate)
            pieces.append((doc_id, doc.text[s:e]))
            room -= e - s
        # Fill what is left with documents nobody asks about (distractors).
        while room > max(MIN_CONTEXT_CHARS, 0.05 * budget.context_chars(mean_question)):
            doc_id = next((d for d in pool if d not in used), None)
            if doc_id is None:
                break
            used.add(doc_id)
            doc = docs[doc_id]
            s, e = window(doc.units, room, rng, head=not recipe.locate)
            pieces.append((doc_id, doc.text[s:e]))
            room -= e - s
        rng.shuffle(pieces)  # the asked document is not always first
        parts = []
        for doc_id, text in pieces:
            labels[doc_id] = next_label
            next_label += 1
            parts.append(f"{recipe.label} {labels[doc_id]}:\n{text}")
        j, doc_id = target[k]
        item = docs[doc_id].items[item_of_turn[k]]
        turns.append(
            Turn(
                context="\n\n".join(parts),
                question=question_text(k, labels[doc_id]),
                answers=list(item.answers),
                depends_on=[j] if j < k else [],
                origin={"record": docs[doc_id].record, "item": item.item,
                        "document": labels[doc_id], "turn": j},
            )
        )
    return turns


def _calibration_text(dataset: Dataset, data_dir: Path) -> str:
    return "\n\n".join(doc.text[:4000] for doc in _docs(dataset, data_dir)[:3])


BUILDER = Builder(_leval_turns, _calibration_text)
