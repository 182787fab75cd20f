"""JSONL record schema of the benchmark, with a validating reader.

One line per conversation. A malformed line is an error that names the file and
the line number: a silently skipped conversation would change a benchmark score
without anyone noticing.

Conversation::

    {"id": str, "dataset": str, "source": str, "task": str, "metric": str,
     "max_new_tokens": int, "instruction": str, "turns": [turn, ...], ...}

Turn::

    {"index": int,                      # position in "turns", from 0
     "context": str,                    # this turn's new context (documents...)
     "question": str,                   # the question asked in this turn
     "answers": [str, ...],             # gold answers (score = max over them)
     "metric": str,                     # see loopserve.bench.metrics.METRICS
     "depends_on": [int, ...],          # earlier turns whose context is needed
     "user": {"front": str, "middle": str, "back": str},
     "question_span": {"front": [start, end], ...},   # optional, char offsets
     ...}

Extra keys are allowed (``origin``, ``user_tokens``, ``seed`` ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .metrics import resolve_metric

__all__ = [
    "POSITIONS",
    "DatasetFormatError",
    "iter_conversations",
    "load_dataset",
    "validate_conversation",
]

#: Where the question sits in a turn's user message.
POSITIONS = ("front", "middle", "back")

_CONVERSATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "dataset": str,
    "source": str,
    "metric": str,
    "max_new_tokens": int,
    "turns": list,
}
_TURN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "index": int,
    "context": str,
    "question": str,
    "answers": list,
    "metric": str,
    "depends_on": list,
    "user": dict,
}


class DatasetFormatError(ValueError):
    """A benchmark JSONL line is not a valid conversation record."""


def _check_fields(obj: dict, fields: dict, where: str) -> None:
    for key, kind in fields.items():
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r}")
        value = obj[key]
        # bool is an int subclass; a True index or budget is a bug, not a number.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(
                f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, "
                f"got {type(value).__name__}"
            )


def _check_metric(name: str, where: str) -> None:
    try:
        resolve_metric(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def validate_conversation(record: Any) -> None:
    """Raise ValueError describing the first problem in ``record``, if any."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    _check_fields(record, _CONVERSATION_FIELDS, "conversation")
    _check_metric(record["metric"], "conversation")
    if record["max_new_tokens"] <= 0:
        raise ValueError("conversation: max_new_tokens must be positive")
    turns = record["turns"]
    if not turns:
        raise ValueError("conversation: 'turns' is empty")
    for i, turn in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: expected an object, got {type(turn).__name__}")
        _check_fields(turn, _TURN_FIELDS, where)
        if turn["index"] != i:
            raise ValueError(f"{where}: 'index' is {turn['index']}, expected {i}")
        if not turn["question"].strip():
            raise ValueError(f"{where}: empty question")
        answers = turn["answers"]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        _check_metric(turn["metric"], where)
        deps = turn["depends_on"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < i for d in deps):
            raise ValueError(f"{where}: 'depends_on' must list earlier turn indices, got {deps}")
        if deps != sorted(set(deps)):
            raise ValueError(f"{where}: 'depends_on' must be sorted and unique, got {deps}")
        user = turn["user"]
        for pos in POSITIONS:
            if not isinstance(user.get(pos), str) or not user[pos]:
                raise ValueError(f"{where}: user[{pos!r}] must be a non-empty string")
        spans = turn.get("question_span")
        if spans is not None:
            for pos in POSITIONS:
                span = spans.get(pos) if isinstance(spans, dict) else None
                if (
                    not isinstance(span, list)
                    or len(span) != 2
                    or not all(isinstance(x, int) for x in span)
                    or not 0 <= span[0] < span[1] <= len(user[pos])
                ):
                    raise ValueError(f"{where}: question_span[{pos!r}] is invalid: {span!r}")


def iter_conversations(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the validated conversations of a benchmark JSONL file, in order.

    Raises :class:`DatasetFormatError` (a ValueError) naming ``path`` and the
    1-based line number of the first malformed line, blank lines included.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                raise DatasetFormatError(f"{path}:{lineno}: blank line (expected a JSON object)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            try:
                validate_conversation(record)
            except ValueError as exc:
                raise DatasetFormatError(f"{path}:{lineno}: {exc}") from None
            yield record


def load_dataset(path: str | os.PathLike) -> list[dict]:
    """All validated conversations of a benchmark JSONL file (see iter_conversations)."""
    return list(iter_conversations(path))
