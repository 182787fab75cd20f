"""Text helpers for the benchmark builder: sentence units, windows, evidence search.

Documents are cut only at *unit* boundaries (sentences, or lines for text with
line structure), so a turn's context never starts or ends mid-sentence. Units are
``(start, end)`` character spans into the original text; a window is a run of
consecutive units and its text is the original slice, whitespace included.
"""

from __future__ import annotations

import random
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from .metrics import normalize_answer

__all__ = [
    "STOPWORDS",
    "content_tokens",
    "locate_evidence",
    "nearest_boundary",
    "split_units",
    "token_span",
    "window",
]

# A sentence ends at . ! ? (plus closing quotes/brackets) before whitespace; a blank
# line ends a paragraph. A single line break does not end a unit: the essays and the
# QuALITY stories are hard-wrapped, so their line breaks fall mid-sentence.
_UNIT_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)|\n[ \t]*\n")
_MAX_UNIT_CHARS = 1200  # longer "sentences" (tables, run-ons) are cut at whitespace

Span = tuple[int, int]


def split_units(text: str, max_chars: int = _MAX_UNIT_CHARS) -> list[Span]:
    """Sentence/paragraph spans of ``text``, stripped of surrounding whitespace.

    A unit longer than ``max_chars`` is split at whitespace so that windows can
    still be sized finely on text without punctuation (e.g. NQ's HTML tables).
    """
    units: list[Span] = []

    def add(start: int, end: int) -> None:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        while end - start > max_chars:
            cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
            if cut <= start:
                cut = start + max_chars
            units.append((start, cut))
            start = cut
            while start < end and text[start].isspace():
                start += 1
        if end > start:
            units.append((start, end))

    start = 0
    for match in _UNIT_END.finditer(text):
        end = match.start() if match.group()[0] == "\n" else match.end()
        add(start, end)
        start = match.end()
    add(start, len(text))
    return units


def window(
    units: Sequence[Span],
    max_chars: int,
    rng: random.Random | None = None,
    require: Span | None = None,
    head: bool = False,
) -> Span:
    """Character span of a run of consecutive units at most ``max_chars`` long.

    - ``require=(s, e)``: the window covers that span when it fits, and the
      span's position inside the window is random (uniform slack before it), so
      evidence does not always sit in the middle of a chunk.
    - ``head=True``: the window starts at the first unit (LongBench-style
      truncation for whole-document tasks such as summarisation).
    - otherwise: a random start.

    At least one unit is always returned, even when it alone exceeds ``max_chars``.
    """
    if not units:
        raise ValueError("window(): text has no units")
    doc_start, doc_end = units[0][0], units[-1][1]
    if doc_end - doc_start <= max_chars:
        return doc_start, doc_end
    last_start = doc_end - max_chars  # latest start that can still fill the window
    if head:
        desired = doc_start
    elif require is not None:
        slack = max(0, max_chars - (require[1] - require[0]))
        desired = require[0] - (rng.random() if rng else 0.5) * slack
        desired = min(max(desired, doc_start), max(last_start, doc_start))
    else:
        desired = doc_start + (rng.random() if rng else 0.0) * (last_start - doc_start)

    # First unit starting at or after `desired`, but never past the required span.
    a = min(bisect_left(units, desired, key=lambda u: u[0]), len(units) - 1)
    if require is not None:
        while a > 0 and units[a][0] > require[0]:
            a -= 1
    b = a
    while b + 1 < len(units) and units[b + 1][1] - units[a][0] <= max_chars:
        b += 1
    # Near the end of the document there may be room left: grow backwards.
    while a > 0 and units[b][1] - units[a - 1][0] <= max_chars:
        a -= 1
    return units[a][0], units[b][1]


def nearest_boundary(text: str, target: int, tolerance: float = 0.1) -> int:
    """Offset of a unit start in ``text`` near ``target`` (never 0).

    Used to insert a question in the middle of a context without splitting a
    sentence. When no sentence boundary lies within ``tolerance * len(text)`` of
    the target (long table rows, very short contexts), the position matters more
    than the sentence: the nearest boundary of a finer split (runs of at most 200
    characters, cut at whitespace) is used instead.
    """
    best = None
    for max_chars in (_MAX_UNIT_CHARS, 200):
        starts = [s for s, _ in split_units(text, max_chars)][1:]
        if starts:
            best = min(starts, key=lambda s: (abs(s - target), s))
            if abs(best - target) <= tolerance * len(text):
                return best
    if best is not None:
        return best
    space = text.rfind(" ", 0, max(target, 1))
    return space if space > 0 else max(1, min(target, len(text)))


STOPWORDS = frozenset(
    """
    i me my we our you your he him his she her it its they them their what which who
    whom this that these those am is are was were be been being have has had do does
    did doing and but if or because as until while of at by for with about against
    between into through during before after above below to from up down in out on
    off over under again further then once here there when where why how all any both
    each few more most other some such no nor not only own same so than too very s t
    can will just don should now also would could did does one two many much may
    p td tr th li ul h1 h2 h3 table dd dl dt
    """.split()
)  # the last line: NQ's HTML tag names, which match everywhere


def content_tokens(text: str) -> frozenset[str]:
    """Normalised tokens of ``text`` without stopwords (for overlap scoring)."""
    return frozenset(t for t in normalize_answer(text).split() if t not in STOPWORDS)


def locate_evidence(
    unit_tokens: Sequence[frozenset[str]],
    units: Sequence[Span],
    question: str,
    answer: str,
    text: str | None = None,
    span_units: int = 3,
) -> tuple[Span, float]:
    """Most likely evidence span for a question, and a confidence in [0, 1].

    Scores every run of ``span_units`` consecutive units by

    - the fraction of the answer's content tokens it contains (weight 2:
      extractive answers pin the evidence down),
    - whether it contains the answer verbatim (weight 1, only when ``text`` is
      given; short answers such as dates share their tokens with many places),
    - the fraction of the question's content tokens (weight 1: for yes/no and
      abstractive answers the question's topic words are all there is).

    The confidence is the best score over the maximum reachable one. Ties go to
    the earliest run.
    """
    answer_toks = content_tokens(answer)
    question_toks = content_tokens(question)
    n = len(units)
    if n == 0:
        return (0, 0), 0.0
    phrase_units: set[int] = set()
    needle = answer.strip().lower()
    if text is not None and len(needle) >= 2:
        haystack = text.lower()
        starts = [s for s, _ in units]
        pos = haystack.find(needle)
        while pos != -1:
            phrase_units.add(max(0, bisect_right(starts, pos) - 1))
            pos = haystack.find(needle, pos + 1)
    weight = 2 * bool(answer_toks) + bool(phrase_units) + bool(question_toks)
    if weight == 0:
        return (units[0][0], units[0][1]), 0.0
    best_score, best_i = -1.0, 0
    span = min(span_units, n)
    for i in range(n - span + 1):
        toks = unit_tokens[i].union(*unit_tokens[i + 1 : i + span])
        score = 0.0
        if answer_toks:
            score += 2 * len(answer_toks & toks) / len(answer_toks)
        if phrase_units and any(j in phrase_units for j in range(i, i + span)):
            score += 1
        if question_toks:
            score += len(question_toks & toks) / len(question_toks)
        if score > best_score:
            best_score, best_i = score, i
    return (units[best_i][0], units[best_i + span - 1][1]), best_score / weight


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> Span:
    """Token indices ``[a, b)`` of the tokens whose character offsets (a tokenizer's
    ``offset_mapping``) overlap the characters ``[start, end)``: where a question or a
    fact of a built turn sits in the model's prompt."""
    idx = [i for i, (s, e) in enumerate(offsets) if e > start and s < end]
    if not idx:
        raise ValueError(f"no token overlaps characters {start}-{end}")
    return idx[0], idx[-1] + 1
