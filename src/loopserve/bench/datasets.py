"""Builder of the multi-turn long-context benchmark (SPEC section 4).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .metrics import normalize_answer
from .schema import POSITIONS, DatasetFormatError, iter_conversations, load_dataset
from .sources import (
    Doc,
    essay_haystack,
    gsm_fewshot,
    leval_docs,
    resolve_data_dir,
    squad_paragraphs,
)
from .text import nearest_boundary, window

__all__ = [
    "DATASETS",
    "POSITIONS",
    "DatasetFormatError",
    "DatasetInfo",
    "approx_token_count",
    "build_conversations",
    "build_datasets",
    "dataset_info",
    "dataset_path",
    "iter_conversations",
    "load_dataset",
]

CountTokens = Callable[[str], int]


class DatasetInfo(NamedTuple):
    """Registry entry: what a dataset is, how it is scored, where it comes from."""

    task: str  # single_doc_qa | multi_doc_qa | summarization | few_shot | synthetic_retrieval
    metric: str  # a name in loopserve.bench.metrics.METRICS
    description: str
    source: str  # path under the shared data directory
    license: str  # upstream license(s) of the source file and of its content
    max_new_tokens: int  # generation budget per answer (LongBench dataset2maxlen style)


_LEVAL = "GPL-3.0 (L-Eval repository)"

DATASETS: dict[str, DatasetInfo] = {
    "qasper": DatasetInfo(
        "single_doc_qa", "f1",
        "Questions on NLP papers (Qasper via L-Eval); one paper per turn, follow-ups on earlier papers.",
        "leval/Open-ended-tasks/scientific_qa.jsonl", f"{_LEVAL}; Qasper content: CC BY 4.0", 64),
    "nq": DatasetInfo(
        "single_doc_qa", "f1",
        "Natural Questions over Wikipedia pages (L-Eval); one page per turn, follow-ups on earlier pages.",
        "leval/Open-ended-tasks/natural_question.jsonl", f"{_LEVAL}; Natural Questions content: CC BY-SA 3.0", 32),
    "multidoc_qa": DatasetInfo(
        "multi_doc_qa", "f1",
        "Help-center questions over several government service documents (MultiDoc2Dial via L-Eval).",
        "leval/Open-ended-tasks/multidoc_qa.jsonl", f"{_LEVAL}; MultiDoc2Dial content: Apache-2.0", 64),
    "financial_qa": DatasetInfo(
        "single_doc_qa", "f1",
        "Questions on earnings-call transcripts (L-Eval financial_qa); one transcript per turn.",
        "leval/Open-ended-tasks/financial_qa.jsonl", f"{_LEVAL}; transcripts: terms of the original publishers", 128),
    "squad_multi": DatasetInfo(
        "multi_doc_qa", "substring",
        "SQuAD v2 questions among distractor paragraphs (RULER qa_1 style); the answer paragraph may be in an earlier turn.",
        "ruler_sources/squad.json", "CC BY-SA 4.0 (SQuAD 2.0)", 32),
    "qmsum": DatasetInfo(
        "summarization", "rouge_l",
        "Query-based meeting summarization (QMSum via L-Eval meeting_summ); one transcript per turn.",
        "leval/Open-ended-tasks/meeting_summ.jsonl", f"{_LEVAL}; QMSum content: MIT", 200),
    "gov_report": DatasetInfo(
        "summarization", "rouge_l",
        "Summaries of government reports (GovReport via L-Eval); a later turn may ask for an earlier report.",
        "leval/Open-ended-tasks/gov_report_summ.jsonl", f"{_LEVAL}; GovReport content: public US government reports", 200),
    "multi_news": DatasetInfo(
        "summarization", "rouge_l",
        "Multi-document news summarization (Multi-News via L-Eval news_summ).",
        "leval/Open-ended-tasks/news_summ.jsonl", f"{_LEVAL}; Multi-News content: terms of the original publishers", 200),
    "gsm_fewshot": DatasetInfo(
        "few_shot", "gsm_accuracy",
        "GSM8K problems with the 16-shot chain-of-thought prompt spread over the turns (L-Eval gsm100).",
        "leval/Closed-ended-tasks/gsm100.jsonl", f"{_LEVAL}; GSM8K content: MIT", 128),
    "quality_mc": DatasetInfo(
        "single_doc_qa", "mc_accuracy",
        "Four-option multiple-choice questions on stories (QuALITY via L-Eval); one story per turn.",
        "leval/Closed-ended-tasks/quality.jsonl", f"{_LEVAL}; QuALITY content: CC BY 4.0", 8),
    "passkey": DatasetInfo(
        "synthetic_retrieval", "substring",
        "Named 5-digit pass keys planted in Paul Graham essays, one per turn; a later turn may ask for an earlier key.",
        "ruler_sources/PaulGrahamEssays.json", "essays (c) Paul Graham, redistributed by RULER (Apache-2.0 code); test use", 16),
}


@dataclass(frozen=True)
class _Recipe:
    """How a dataset's turns are worded (the construction itself is per ``kind``)."""

    kind: str  # "leval" | "squad" | "gsm" | "passkey"
    instruction: str
    question_format: str = "Question: {question}"
    label: str = "Document"  # what an L-Eval document is called ("Article 2")
    locate: bool = True  # window L-Eval documents around the evidence; False: keep the head
    summary: str | None = None  # whole-document task: the question, with {ref}


_RECIPES: dict[str, _Recipe] = {
    "qasper": _Recipe(
        "leval",
        "You are given scientific articles and a question about one of them. Answer the "
        "question as concisely as you can, using a single phrase or sentence if possible. "
        'If the question cannot be answered from the article, write "unanswerable". If it '
        'is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any '
        "explanation.",
        label="Article",
    ),
    "nq": _Recipe(
        "leval",
        "You are given Wikipedia pages and a question about one of them. Answer the "
        "question based on that page. Only give me the answer and do not output any "
        "other words.",
        label="Page",
    ),
    "multidoc_qa": _Recipe(
        "leval",
        "You are given documents from government service websites and a question about "
        "one of them. Answer the question briefly, in one or two sentences, based on "
        "that document.",
        label="Document",
    ),
    "financial_qa": _Recipe(
        "leval",
        "You are given transcripts of financial results conference calls and a question "
        "about one of them. Answer as a member of that call, in a few sentences.",
        label="Transcript",
    ),
    "squad_multi": _Recipe(
        "squad",
        "Answer the question based on the passages given in this conversation. Only give "
        "me the answer and do not output any other words.",
    ),
    "qmsum": _Recipe(
        "leval",
        "You are given meeting transcripts and a query about one of them. Answer the "
        "query in one or more sentences, based on that transcript.",
        question_format="Query: {question}",
        label="Transcript",
    ),
    "gov_report": _Recipe(
        "leval",
        "You are given reports by government agencies. Write a one-page summary of the "
        "report you are asked about.",
        question_format="Task: {question}",
        label="Report",
        locate=False,
        summary="Write a one-page summary of {ref}.",
    ),
    "multi_news": _Recipe(
        "leval",
        "You are given groups of news passages. Write a one-page summary of all the "
        "news in the group you are asked about.",
        question_format="Task: {question}",
        label="News group",
        locate=False,
        summary="Write a one-page summary of all the news in {ref}.",
    ),
    "gsm_fewshot": _Recipe(
        "gsm",
        'Solve the grade-school math problem marked "Question to solve", following the '
        "worked examples. Think step by step and end with \"The answer is\" and the number.",
        question_format="Question to solve: {question}\nLet's think step by step.",
    ),
    "quality_mc": _Recipe(
        "leval",
        "You are given stories and a multiple-choice question about one of them. Answer "
        "with the letter (A, B, C or D) of the correct option only.",
        label="Story",
    ),
    "passkey": _Recipe(
        "passkey",
        "There is important information hidden inside a lot of irrelevant text. Find it "
        "and memorize it; you may be asked about it now or later. Answer with the pass "
        "key only.",
    ),
}

assert set(_RECIPES) == set(DATASETS)

# Names that label the planted pass keys; one per turn, distinct in a conversation.
_PASSKEY_LABELS = (
    "the red door", "the blue gate", "the green locker", "the old safe", "the garden shed",
    "the north tower", "the wine cellar", "the server room", "the boat house", "the attic",
    "the west wing", "the silver box", "the library vault", "the back office", "the garage",
)

_TURNS = (3, 5)  # inclusive range of turns per conversation
_FIT_TOLERANCE = 0.04  # rebuild a conversation whose length is off by more than this
_FIT_ATTEMPTS = 5
_MAX_ERROR = 0.15  # the promise: total user tokens within +-15% of context_tokens
_MIN_CONTEXT_CHARS = 200
_MIN_TOKENS = 2000  # smallest context_tokens accepted: below, a turn is mostly instruction


def approx_token_count(text: str) -> int:
    """Rough token count (4 characters per token) for quick looks without a tokenizer.

    Real runs should pass the model tokenizer's count to :func:`build_datasets`.
    """
    return max(1, round(len(text) / 4))


def dataset_info(name: str) -> DatasetInfo:
    """Registry entry of ``name``; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def dataset_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Path of dataset ``name``'s JSONL file in ``out_dir`` (name validated)."""
    dataset_info(name)
    return Path(out_dir) / f"{name}.jsonl"


# --------------------------------------------------------------------------- plan


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


@dataclass
class _Turn:
    context: str
    question: str
    answers: list[str]
    depends_on: list[int]
    origin: dict = field(default_factory=dict)


class _Budget:
    """Turns a token target into a character budget for one turn's context."""

    def __init__(self, recipe: _Recipe, context_tokens: int, n_turns: int, cpt: float, scale: float):
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
        return max(_MIN_CONTEXT_CHARS, int(chars))


# ------------------------------------------------------------- L-Eval documents


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
    recipe: _Recipe, docs: Sequence[Doc], refs: list[int], budget: _Budget, rng: random.Random
) -> list[_Turn]:
    """One new document per turn; questions on the current or an earlier one.

    A turn that refers back asks a further question on the document introduced
    in the referenced turn (a follow-up), or, when that document has no unused
    question (summaries have one), on a second document introduced alongside it
    in that earlier turn and not asked about there. Each asked document is cut
    to a window that holds the evidence of its questions (or its head, for
    whole-document tasks); leftover room is filled with other documents.
    """
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
    turns: list[_Turn] = []
    used = {d for ds in turn_docs for d in ds}
    for k in range(n_turns):
        room = budget.context_chars(question_text(k, None))
        pieces: list[tuple[int, str]] = []
        introduced = turn_docs[k]  # this turn's new documents (asked now, later, or never)
        for i, doc_id in enumerate(introduced):
            doc = docs[doc_id]
            # Equal shares; a document shorter than its share leaves room to the next.
            share = max(_MIN_CONTEXT_CHARS, room // (len(introduced) - i))
            if doc_id in requests and recipe.locate:
                spans = [doc.evidence(item_of_turn[t])[0] for t in requests[doc_id]]
                require = (min(s for s, _ in spans), max(e for _, e in spans))
                s, e = window(doc.units, share, rng, require=require)
            else:
                s, e = window(doc.units, share, rng, head=not recipe.locate)
            pieces.append((doc_id, doc.text[s:e]))
            room -= e - s
        # Fill what is left with documents nobody asks about (distractors).
        while room > max(_MIN_CONTEXT_CHARS, 0.05 * budget.context_chars(mean_question)):
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
            _Turn(
                context="\n\n".join(parts),
                question=question_text(k, labels[doc_id]),
                answers=list(item.answers),
                depends_on=[j] if j < k else [],
                origin={"record": docs[doc_id].record, "item": item.item,
                        "document": labels[doc_id], "turn": j},
            )
        )
    return turns


# ---------------------------------------------------------------------- SQuAD


def _squad_turns(data_dir: Path, refs: list[int], budget: _Budget, rng: random.Random) -> list[_Turn]:
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

    turns: list[_Turn] = []
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
            _Turn(context, question, list(golds), [j] if j < k else [],
                  {"qa_id": qa_id, "article": para.article, "paragraph": para.paragraph,
                   "passage": numbers[p], "turn": j})
        )
    return turns


# ------------------------------------------------------------------ pass keys


def _passkey_turns(data_dir: Path, refs: list[int], budget: _Budget, rng: random.Random) -> list[_Turn]:
    """Each turn: a random stretch of the essays with one named pass key planted at
    a random depth; the question asks for this turn's key or an earlier turn's."""
    hay = essay_haystack(data_dir)
    n_turns = len(refs)
    labels = rng.sample(_PASSKEY_LABELS, n_turns)
    keys = [str(k) for k in rng.sample(range(10000, 100000), n_turns)]
    turns: list[_Turn] = []
    for k, j in enumerate(refs):
        needle = (
            f"The pass key for {labels[k]} is {keys[k]}. Remember it. "
            f"{keys[k]} is the pass key for {labels[k]}."
        )
        question = f"What is the pass key for {labels[j]}?"
        room = budget.context_chars(question) - len(needle) - 2
        s, e = window(hay.units, max(room, _MIN_CONTEXT_CHARS), rng)
        depth = rng.random()
        cut = nearest_boundary(hay.text[s:e], round(depth * (e - s))) if depth < 0.98 else e - s
        text = hay.text[s:e]
        context = f"{text[:cut].rstrip()} {needle} {text[cut:].lstrip()}".strip()
        turns.append(
            _Turn(context, question, [keys[j]], [j] if j < k else [],
                  {"key_turn": j, "depth": round(cut / max(1, e - s), 3), "offset": s})
        )
    return turns


# ----------------------------------------------------------------------- GSM8K


def _gsm_turns(data_dir: Path, refs: list[int], budget: _Budget, rng: random.Random) -> list[_Turn]:
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
    turns: list[_Turn] = []
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
            _Turn("\n\n".join(demos), problem, [answer], list(range(k)),
                  {"problem": index, "examples": len(demos)})
        )
    return turns


# ------------------------------------------------------------------ rendering


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


def _calibration_text(name: str, recipe: _Recipe, data_dir: Path) -> str:
    """A sample of the dataset's text, to estimate characters per token once."""
    if recipe.kind == "leval":
        docs = leval_docs(data_dir, DATASETS[name].source.removeprefix("leval/"))
        return "\n\n".join(doc.text[:4000] for doc in docs[:3])
    if recipe.kind == "squad":
        return "\n\n".join(p.text for p in squad_paragraphs(data_dir)[:12])
    if recipe.kind == "gsm":
        return "\n\n".join(gsm_fewshot(data_dir).demos)
    return essay_haystack(data_dir).text[:12000]


def _make_turns(name, recipe, data_dir, refs, budget, rng) -> list[_Turn]:
    if recipe.kind == "leval":
        docs = leval_docs(data_dir, DATASETS[name].source.removeprefix("leval/"))
        return _leval_turns(recipe, docs, refs, budget, rng)
    if recipe.kind == "squad":
        return _squad_turns(data_dir, refs, budget, rng)
    if recipe.kind == "gsm":
        return _gsm_turns(data_dir, refs, budget, rng)
    return _passkey_turns(data_dir, refs, budget, rng)


def _conversation(
    name: str, index: int, seed: int, context_tokens: int, count_tokens: CountTokens,
    data_dir: Path, cpt: float,
) -> dict:
    """Build conversation ``index`` of dataset ``name``, fitted to ``context_tokens``."""
    info, recipe = DATASETS[name], _RECIPES[name]
    scale = 1.0
    best: tuple[float, dict] | None = None
    for _ in range(_FIT_ATTEMPTS):
        # Re-seeded every attempt: a rebuild differs only where lengths differ.
        rng = random.Random(f"loopserve-bench/{seed}/{name}/{index}")
        n_turns = rng.randint(*_TURNS)
        refs = _plan_refs(rng, n_turns)
        budget = _Budget(recipe, context_tokens, n_turns, cpt, scale)
        turns = _make_turns(name, recipe, data_dir, refs, budget, rng)
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
                "metric": info.metric,
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
    sample = _calibration_text(name, _RECIPES[name], root)
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
        data_dir: the shared data folder (see ``sources.resolve_data_dir``).
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
