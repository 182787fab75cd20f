"""Readers for the evaluation source data (parsed once, cached).

Only what the benchmark builder needs: L-Eval documents with their questions,
SQuAD v2 paragraphs with answerable questions, the Paul Graham essay haystack and
the 16-shot GSM8K prompt. The data folder is the package's own copy or an override
(see :mod:`loopserve.sourcedata`). Every parsed file is cached per (data dir, file), so
building many datasets, or the same datasets twice, parses each file once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from ..sourcedata import DataDirError, open_source, resolve_data_dir
from .text import Span, content_tokens, locate_evidence, split_units

__all__ = [
    "DataDirError",
    "Doc",
    "QItem",
    "SquadParagraph",
    "essay_haystack",
    "essays_text",
    "gsm_fewshot",
    "leval_docs",
    "leval_rows",
    "resolve_data_dir",
    "squad_paragraphs",
]


@dataclass(frozen=True)
class QItem:
    """One question over a document.

    ``question`` is shown to the model; ``find_question``/``find_answer`` are what
    evidence search matches against the document (for multiple choice: the stem
    without the options, which would match everywhere, and the correct option's
    text).
    """

    question: str
    answers: tuple[str, ...]
    find_question: str
    find_answer: str
    item: int  # index in the source record's instruction list


@dataclass(eq=False)
class Doc:
    """A long document with several questions (one L-Eval record)."""

    text: str
    items: tuple[QItem, ...]
    record: int  # line index in the source file
    _evidence: dict[int, tuple[Span, float]] = field(default_factory=dict, repr=False)

    @cached_property
    def units(self) -> list[Span]:
        return split_units(self.text)

    @cached_property
    def unit_tokens(self) -> list[frozenset[str]]:
        return [content_tokens(self.text[s:e]) for s, e in self.units]

    def evidence(self, k: int) -> tuple[Span, float]:
        """Likely evidence span of question ``k`` and its confidence (cached)."""
        if k not in self._evidence:
            item = self.items[k]
            self._evidence[k] = locate_evidence(
                self.unit_tokens, self.units, item.find_question, item.find_answer, self.text
            )
        return self._evidence[k]


def _read_jsonl(data_dir: Path, rel: str) -> list[dict]:
    rows = []
    with open_source(data_dir, rel) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{data_dir / rel}:{lineno}: invalid JSON in source data: {exc}") from exc
    return rows


@lru_cache(maxsize=None)
def leval_rows(data_dir: Path, rel: str) -> tuple[dict, ...]:
    """The raw records of ``leval/<rel>`` (``input``, ``instructions``, ``outputs``, ...)."""
    return tuple(_read_jsonl(data_dir, f"leval/{rel}"))


# L-Eval's financial questions all start with this role sentence; our per-dataset
# instruction states the role once, which keeps every question short.
_FINANCIAL_PREFIX = re.compile(
    r"^You are asked to act as a member of the Financial Results Conference Call "
    r"and answer the question:\s*",
    flags=re.I,
)
_MC_GOLD = re.compile(r"^\s*\(?([A-D])\)")


def _clean_question(rel: str, question: str) -> str:
    # Drop blank lines and ragged indentation (QuALITY's " (A) ... " option lines).
    question = "\n".join(line.strip() for line in question.splitlines() if line.strip())
    if "financial_qa" in rel:
        question = _FINANCIAL_PREFIX.sub("", question)
    return question


@lru_cache(maxsize=None)
def leval_docs(data_dir: Path, rel: str) -> tuple[Doc, ...]:
    """L-Eval records of ``leval/<rel>`` as :class:`Doc` objects.

    Multiple-choice golds (QuALITY's ``"(B) option text"``) become the bare letter;
    the option text is kept to locate the evidence.
    """
    docs = []
    for r, row in enumerate(leval_rows(data_dir, rel)):
        items = []
        for k, (question, output) in enumerate(zip(row["instructions"], row["outputs"])):
            question, output = _clean_question(rel, question), output.strip()
            mc = _MC_GOLD.match(output) if row.get("evaluation") == "exam" else None
            if mc:
                stem = question.split("\n")[0]
                items.append(QItem(question, (mc.group(1),), stem, output[mc.end():], k))
            else:
                items.append(QItem(question, (output,), question, output, k))
        docs.append(Doc(text=row["input"].strip(), items=tuple(items), record=r))
    return tuple(docs)


@dataclass(frozen=True)
class SquadParagraph:
    """A SQuAD paragraph and its answerable questions ``(id, question, answers)``."""

    article: int
    paragraph: int
    text: str
    qas: tuple[tuple[str, str, tuple[str, ...]], ...]


@lru_cache(maxsize=None)
def squad_paragraphs(data_dir: Path) -> tuple[SquadParagraph, ...]:
    """SQuAD v2 dev paragraphs that have at least one answerable question."""
    with open_source(data_dir, "ruler_sources/squad.json") as fh:
        data = json.load(fh)["data"]
    paragraphs = []
    for a, article in enumerate(data):
        for p, para in enumerate(article["paragraphs"]):
            qas = []
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                # Deduplicate the annotators' answers, keeping their order.
                golds = tuple(dict.fromkeys(ans["text"].strip() for ans in qa["answers"]))
                qas.append((qa["id"], qa["question"].strip(), golds))
            if qas:
                paragraphs.append(SquadParagraph(a, p, para["context"].strip(), tuple(qas)))
    return tuple(paragraphs)


@dataclass(frozen=True)
class Haystack:
    text: str
    units: tuple[Span, ...]


@lru_cache(maxsize=None)
def essay_haystack(data_dir: Path) -> Haystack:
    """The Paul Graham essays (RULER/NIAH haystack) split into sentence units."""
    text = essays_text(data_dir)
    return Haystack(text, tuple(split_units(text)))


@lru_cache(maxsize=None)
def essays_text(data_dir: Path) -> str:
    """The Paul Graham essays (RULER's haystack) as one long English text."""
    with open_source(data_dir, "ruler_sources/PaulGrahamEssays.json") as fh:
        return json.load(fh)["text"]


@dataclass(frozen=True)
class GsmData:
    """16 worked examples (chain of thought) and 100 test problems with answers."""

    demos: tuple[str, ...]
    problems: tuple[tuple[str, str], ...]  # (problem text, numeric answer)


_GSM_Q = re.compile(r"^Question:\s*", flags=re.I)
_GSM_COT = re.compile(r"\s*Let's think step by step\s*$", flags=re.I)


@lru_cache(maxsize=None)
def gsm_fewshot(data_dir: Path) -> GsmData:
    """L-Eval ``gsm100``: the shared 16-shot prompt and the 100 problems."""
    rows = _read_jsonl(data_dir, "leval/Closed-ended-tasks/gsm100.jsonl")
    # Every record carries the same 16-shot prompt; examples are blank-line separated
    # blocks that each start with "Question:".
    prompt = rows[0]["input"].strip()
    demos = tuple(
        block.strip() for block in re.split(r"\n\s*\n(?=Question:)", prompt) if block.strip()
    )
    problems = []
    for row in rows:
        problem = _GSM_COT.sub("", _GSM_Q.sub("", row["instructions"][0].strip()))
        problems.append((problem.strip(), row["outputs"][0].strip()))
    return GsmData(demos, tuple(problems))
