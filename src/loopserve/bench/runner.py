"""Run the multi-turn benchmark: methods x datasets x conversations x question positions.

Every (method, conversation, position) is one **unit**: a fresh session plays the
conversation turn by turn, and the model's own answers go back into the history
(honest conversation state, SPEC section 4). Each finished turn becomes one JSONL
record, appended, flushed and fsynced before the next turn starts.

Resuming. A unit counts as done only when all of its turns are recorded. A rerun
skips done units; a unit with only some turns recorded (an interrupted run) is
redone from its first turn, because replaying a later turn needs the model's
earlier answers in the same session. Its partial records are dropped first by
writing the kept lines, byte for byte, to a temporary file next to the results and
renaming it over them (atomic), so an interruption at any point loses nothing that
was complete. A last line without a newline that does not parse (a write cut by
a kill) is dropped the same way.

Validation comes first. Unknown methods, knobs, datasets or positions, a missing
or malformed dataset file, a malformed results line, results produced with other
settings, or a conversation that cannot fit the model's context window all raise
:class:`BenchError` (a ValueError) before the results file is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..threads import budget as thread_budget
from .datasets import DATASETS, build_datasets, dataset_info, dataset_path
from .metrics import score as score_answer
from .schema import POSITIONS, DatasetFormatError, load_dataset

__all__ = [
    "RESULT_SCHEMA",
    "BenchError",
    "ResultsFormatError",
    "RunPlan",
    "RunSummary",
    "Unit",
    "build_data",
    "check_fits",
    "default_data_dir",
    "execute",
    "load_selection",
    "parse_names",
    "plan_run",
    "read_results",
    "resolve_knobs",
    "validate_methods",
    "validate_record",
]

#: Version of the per-turn record layout (the ``schema`` field of every record).
RESULT_SCHEMA = 1

# Fields every results record must have, with their JSON types (checked on read).
_NUM = (int, float)
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "dataset": str,
    "conversation": str,
    "position": str,
    "turn": int,
    "turns": int,
    "metric": str,
    "score": _NUM,
    "prediction": str,
    "golds": list,
    "ttft_s": _NUM,
    "tpot_s": _NUM,
    "new_tokens": int,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "prefill_density": _NUM,
    "active_kv_tokens": int,
    "kv_tokens": int,
    "kv_bytes": int,
    "peak_rss_mb": _NUM,
    "prompt_tokens": int,
    "prefill_tokens": int,
    "cached_tokens": int,
    "max_new_tokens": int,
    "model": str,
    "dtype": str,
    "knobs": dict,
    "conv_hash": str,
    "method_spec": str,
    "config": dict,
    "threads": int,
    "concurrency": int,
}


class BenchError(ValueError):
    """Bad benchmark input, reported before anything is run or written."""


class ResultsFormatError(BenchError):
    """A results JSONL line is not a valid turn record (names file and line)."""


# --------------------------------------------------------------------------- inputs


def parse_names(value: str | Sequence[str] | None, known: Iterable[str], what: str) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> names in order, duplicates removed; ``None``/``"all"``
    -> all of ``known``. Unknown names raise BenchError listing the known ones."""
    known = list(known)
    if value is None:
        return known
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [x.strip() for x in items if x and x.strip()]
    if items == ["all"]:
        return known
    if not items:
        raise BenchError(f"no {what} given; known {what}: {', '.join(known)}")
    bad = [x for x in items if x not in known]
    if bad:
        raise BenchError(f"unknown {what} {', '.join(map(repr, bad))}; known {what}: {', '.join(known)}")
    return list(dict.fromkeys(items))


def validate_methods(methods: str | Sequence[str]) -> dict[str, str]:
    """``{label: method spec}`` in order (duplicates removed), each spec checked with
    ``resolve_method``.

    An entry is a method spec (``loopserve``, ``minference+dense``) used as its own
    label, or ``LABEL=SPEC``: the same method under another name, so one run can hold
    several configurations of it (``loopserve-bounded=loopserve`` with
    ``--knob loopserve-bounded:mode=bounded``). Records carry the label as ``method``.
    """
    from ..engine import resolve_method

    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = list(dict.fromkeys(x.strip() for x in items if x and x.strip()))
    if not items:
        raise BenchError("no methods given (e.g. --methods dense,loopserve,snapkv)")
    out: dict[str, str] = {}
    for item in items:
        label, _, spec = item.partition("=") if "=" in item else (item, "", item)
        label, spec = label.strip(), spec.strip()
        if not label or not spec or ":" in label:
            raise BenchError(f"bad method entry {item!r}: expected METHOD or LABEL=METHOD (label without ':')")
        if label in out:
            raise BenchError(f"method label {label!r} is given twice")
        try:
            resolve_method(spec)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        out[label] = spec
    return out


def _specs(methods: Sequence[str] | dict[str, str]) -> dict[str, str]:
    """Labels -> specs; a plain list of method names labels each by itself."""
    return dict(methods) if isinstance(methods, dict) else {m: m for m in methods}


def resolve_knobs(methods: Sequence[str] | dict[str, str], knobs: dict[str, Any] | None = None,
                  method_knobs: dict[str, dict[str, Any]] | None = None) -> dict[str, dict]:
    """Per-method knob dicts, keyed by label (see :func:`validate_methods`).

    ``knobs`` (``--knob NAME=VALUE``) go to every method that declares ``NAME``; a knob
    that no selected method declares is an error. ``method_knobs``
    (``--knob METHOD:NAME=VALUE``) go to that method only. Each result is validated
    with ``resolve_method``.
    """
    from ..engine import resolve_method

    specs = _specs(methods)
    methods = list(specs)
    declared = {m: set(resolve_method(specs[m]).knobs()) for m in methods}
    out: dict[str, dict] = {m: {} for m in methods}
    for name, value in (knobs or {}).items():
        takers = [m for m in methods if name in declared[m]]
        if not takers:
            raise BenchError(
                f"knob {name!r} is not a knob of any selected method ({', '.join(methods)}); "
                "use METHOD:NAME=VALUE to target one method"
            )
        for m in takers:
            out[m][name] = value
    for m, extra in (method_knobs or {}).items():
        if m not in out:
            raise BenchError(f"knob for method {m!r}, which is not among --methods ({', '.join(methods)})")
        out[m].update(extra)
    for m in methods:
        try:
            resolve_method(specs[m], out[m])
        except ValueError as exc:
            raise BenchError(str(exc)) from None
    return out


def _tokenizer_label(tokenizer_name: str) -> str:
    from ..models import DEFAULT_MODEL_ALIASES

    if tokenizer_name in DEFAULT_MODEL_ALIASES:
        return ""
    return Path(str(tokenizer_name).rstrip("/")).name or str(tokenizer_name)


def default_data_dir(context: int, seed: int = 0, tokenizer: str = "smollm2", root: str | os.PathLike = "runs/bench-data") -> Path:
    """``runs/bench-data/ctx{N}-seed{S}`` for the default tokenizer, ``...-{name}`` otherwise
    (token counts, hence cuts, depend on the tokenizer)."""
    label = _tokenizer_label(tokenizer)
    return Path(root) / (f"ctx{context}-seed{seed}" + (f"-{label}" if label else ""))


def build_data(out_dir: str | os.PathLike, *, context: int, seed: int, count_tokens: Callable[[str], int] | None,
               conversations: int = 10, datasets: Sequence[str] | None = None,
               source_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Build datasets into ``out_dir`` without ever leaving a half-written file there.

    Files are built in a temporary sibling folder and renamed in; ``manifest.json``
    is merged with the one already in ``out_dir`` (so building the missing datasets
    of a folder keeps the others' entries).
    """
    names = list(DATASETS) if datasets is None else list(datasets)
    for name in names:
        dataset_info(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        built = build_datasets(
            tmp, context_tokens=context, seed=seed, count_tokens=count_tokens,
            data_dir=source_dir, conversations_per_dataset=conversations, datasets=names,
        )
        manifest = json.loads((tmp / "manifest.json").read_text(encoding="utf-8"))
        old_path = out / "manifest.json"
        if old_path.exists():
            try:
                old = json.loads(old_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            same = all(old.get(k) == manifest[k] for k in ("context_tokens", "seed", "conversations_per_dataset"))
            if same and isinstance(old.get("datasets"), dict):
                manifest["datasets"] = {**old["datasets"], **manifest["datasets"]}
        paths = {}
        for name, path in built.items():
            target = out / path.name
            os.replace(path, target)
            paths[name] = target
        mtmp = tmp / "manifest.json"
        mtmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(mtmp, out / "manifest.json")
        return paths
    finally:
        for p in tmp.glob("*"):
            p.unlink()
        tmp.rmdir()


def load_selection(data_dir: str | os.PathLike, datasets: Sequence[str], limit: int | None = None,
                   context: int | None = None) -> dict[str, list[dict]]:
    """The first ``limit`` conversations of each dataset file in ``data_dir``.

    Every line of every selected file is validated (``DatasetFormatError`` names
    file:line), not only the first ``limit``. With ``context``, conversations built for
    another context length are an error.
    """
    if limit is not None and limit < 1:
        raise BenchError(f"--limit must be >= 1, got {limit}")
    data_dir = Path(data_dir)
    out: dict[str, list[dict]] = {}
    for name in datasets:
        path = dataset_path(data_dir, name)
        if not path.is_file():
            raise BenchError(
                f"{path}: dataset file not found; build it with `loopserve bench build --context N --seed S "
                f"--out {data_dir}` (or pass --data)"
            )
        try:
            convs = load_dataset(path)
        except DatasetFormatError as exc:
            raise BenchError(str(exc)) from None
        for i, conv in enumerate(convs, start=1):
            if conv["dataset"] != name:
                raise BenchError(f"{path}:{i}: conversation of dataset {conv['dataset']!r} in {name}.jsonl")
            built_for = conv.get("context_tokens")
            if context is not None and isinstance(built_for, int) and built_for != context:
                raise BenchError(
                    f"{path}:{i}: built for --context {built_for}, not {context}; "
                    "rebuild the data or pass the matching --context"
                )
        if len(set(c["id"] for c in convs)) != len(convs):
            raise BenchError(f"{path}: duplicate conversation ids")
        out[name] = convs[:limit] if limit else convs
    return out


def conv_hash(conv: dict) -> str:
    """Short fingerprint of a conversation record: results from other data are not mixed in."""
    blob = json.dumps(conv, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- results file


def validate_record(rec: Any) -> None:
    """Raise ValueError describing the first problem of a results record."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for fields, required in ((_REQUIRED, True), (_OPTIONAL, False)):
        for key, kind in fields.items():
            if key not in rec or (not required and rec[key] is None):
                if required:
                    raise ValueError(f"missing field {key!r}")
                continue
            v = rec[key]
            if not isinstance(v, kind) or (isinstance(v, bool)):
                raise ValueError(f"field {key!r} must be {getattr(kind, '__name__', 'a number')}, got {type(v).__name__}")
    if rec["position"] not in POSITIONS:
        raise ValueError(f"position {rec['position']!r} is not one of {', '.join(POSITIONS)}")
    if not 0 <= rec["turn"] < rec["turns"]:
        raise ValueError(f"turn {rec['turn']} outside 0..{rec['turns'] - 1}")
    for key in ("score", "ttft_s", "tpot_s"):
        if not math.isfinite(rec[key]) or rec[key] < 0:
            raise ValueError(f"field {key!r} must be a finite number >= 0, got {rec[key]!r}")


def unit_key(rec: dict) -> tuple[str, str, str, str]:
    return (rec["method"], rec["dataset"], rec["conversation"], rec["position"])


def read_results(path: str | os.PathLike, *, allow_truncated_tail: bool = False) -> tuple[list[tuple[int, str, dict]], bool]:
    """``([(line number, raw line, record), ...], tail_dropped)`` of a results file.

    A malformed line raises :class:`ResultsFormatError` naming ``path:line``, and so
    does a second record for the same (method, dataset, conversation, position,
    turn). With ``allow_truncated_tail``, a last line without a newline that does not
    parse (a write cut short) is left out and ``tail_dropped`` is True.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ResultsFormatError(f"{path}:{line}: not UTF-8 text") from None
    lines = text.split("\n")
    last_complete = text.endswith("\n") or not text
    if lines and lines[-1] == "":
        lines.pop()
    out: list[tuple[int, str, dict]] = []
    seen: dict[tuple, int] = {}
    tail_dropped = False
    for lineno, line in enumerate(lines, start=1):
        is_tail = lineno == len(lines) and not last_complete
        if not line.strip():
            raise ResultsFormatError(f"{path}:{lineno}: blank line (expected a JSON object)")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if is_tail and allow_truncated_tail:
                tail_dropped = True
                break
            hint = " (a write cut short? `loopserve bench run` drops it on resume)" if is_tail else ""
            raise ResultsFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg}{hint}") from None
        try:
            validate_record(rec)
        except ValueError as exc:
            raise ResultsFormatError(f"{path}:{lineno}: {exc}") from None
        key = unit_key(rec) + (rec["turn"],)
        if key in seen:
            raise ResultsFormatError(
                f"{path}:{lineno}: duplicate record for method={key[0]} dataset={key[1]} "
                f"conversation={key[2]} position={key[3]} turn={key[4]} (first at line {seen[key]})"
            )
        seen[key] = lineno
        out.append((lineno, line + ("\n" if not is_tail else ""), rec))
    return out, tail_dropped


# --------------------------------------------------------------------------- plan


@dataclass
class Unit:
    """One (method, conversation, position): a fresh session plays every turn."""

    method: str  # the label records carry
    dataset: str
    conv: dict
    position: str
    knobs: dict
    max_new_tokens: int
    conv_hash: str
    spec: str = ""  # the method spec the session runs (the label when empty)

    @property
    def method_spec(self) -> str:
        return self.spec or self.method

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.method, self.dataset, self.conv["id"], self.position)

    @property
    def n_turns(self) -> int:
        return len(self.conv["turns"])


@dataclass
class RunPlan:
    results: Path
    model: str
    dtype: str
    units: list[Unit]
    todo: list[Unit]
    drop_units: set = field(default_factory=set)  # unit keys whose partial records go
    drop_tail: bool = False
    kept_lines: list[str] = field(default_factory=list)  # what the results file keeps, if rewritten
    dropped_records: int = 0

    @property
    def turns_todo(self) -> int:
        return sum(u.n_turns for u in self.todo)

    @property
    def turns_done(self) -> int:
        return sum(u.n_turns for u in self.units) - self.turns_todo

    @property
    def rewrite(self) -> bool:
        return bool(self.drop_units) or self.drop_tail


def plan_run(results: str | os.PathLike, conversations: dict[str, list[dict]], methods: Sequence[str] | dict[str, str],
             positions: Sequence[str], knobs: dict[str, dict], *, model: str, dtype: str = "float32",
             max_new_tokens: int | None = None) -> RunPlan:
    """Every unit of the run, which are still to do, and what to drop from ``results``.

    Reads ``results`` (if it exists) and nothing else; writes nothing. Finished
    records produced with another model, dtype, knobs, answer budget or other data
    for a unit of this run raise BenchError: they would mix into the averages.
    """
    from ..engine import resolve_method

    if max_new_tokens is not None and max_new_tokens < 1:
        raise BenchError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    for p in positions:
        if p not in POSITIONS:
            raise BenchError(f"unknown position {p!r}; known positions: {', '.join(POSITIONS)}")
    results = Path(results)
    if results.exists() and not results.is_file():
        raise BenchError(f"{results}: not a regular file")
    units: list[Unit] = []
    specs = _specs(methods)
    for method in specs:
        for dataset, convs in conversations.items():
            for conv in convs:
                budget = conv["max_new_tokens"] if max_new_tokens is None else min(conv["max_new_tokens"], max_new_tokens)
                h = conv_hash(conv)
                for pos in positions:
                    units.append(Unit(method, dataset, conv, pos, dict(knobs.get(method, {})), budget, h, specs[method]))
    existing: list[tuple[int, str, dict]] = []
    tail = False
    if results.exists():
        existing, tail = read_results(results, allow_truncated_tail=True)
    by_unit: dict[tuple, dict[int, tuple[int, dict]]] = {}
    for lineno, _, rec in existing:
        by_unit.setdefault(unit_key(rec), {})[rec["turn"]] = (lineno, rec)
    plan = RunPlan(results, model, dtype, units, [], drop_tail=tail)
    for unit in units:
        recs = by_unit.get(unit.key)
        if not recs:
            plan.todo.append(unit)
            continue
        expect = {
            "model": model, "dtype": dtype, "knobs": unit.knobs, "method_spec": unit.method_spec,
            # Every knob's value, defaults included: a changed default must not mix either.
            "config": json.loads(json.dumps(resolve_method(unit.method_spec, unit.knobs).knobs())),
            "max_new_tokens": unit.max_new_tokens, "conv_hash": unit.conv_hash, "turns": unit.n_turns,
        }
        for lineno, rec in recs.values():
            # Records written before labels and configs were recorded: the label names the
            # method, and the configuration cannot be checked.
            rec = {"method_spec": rec["method"], "config": expect["config"], **rec}
            for k, v in expect.items():
                got = rec.get(k)
                if k == "config" and isinstance(got, dict):
                    # A knob added since the record was written is not a difference: it did
                    # not exist, and a new knob's default keeps the method's old behaviour.
                    v = {name: value for name, value in v.items() if name in got}
                if got != v:
                    raise BenchError(
                        f"{results}:{lineno}: recorded with {k}={rec.get(k)!r}, this run has {k}={v!r} "
                        f"(method={unit.method} conversation={unit.conv['id']} position={unit.position}); "
                        "results from different settings would mix: use another --out"
                    )
        if set(recs) == set(range(unit.n_turns)):
            continue
        plan.todo.append(unit)
        plan.drop_units.add(unit.key)
        plan.dropped_records += len(recs)
    if plan.rewrite:
        plan.kept_lines = [line for _, line, rec in existing if unit_key(rec) not in plan.drop_units]
        if plan.kept_lines and not plan.kept_lines[-1].endswith("\n"):
            plan.kept_lines[-1] += "\n"
    return plan


def check_fits(engine, units: Sequence[Unit]) -> None:
    """BenchError if a conversation could outgrow the model's context window.

    Upper bound: all user messages with empty answers, through the chat template,
    plus every turn's answer budget.
    """
    limit = engine.max_context
    seen = set()
    for u in units:
        key = (u.conv["id"], u.position, u.max_new_tokens)
        if key in seen:
            continue
        seen.add(key)
        messages = []
        for turn in u.conv["turns"]:
            messages += [{"role": "user", "content": turn["user"][u.position]}, {"role": "assistant", "content": ""}]
        need = len(engine.encode_messages(messages[:-1])) + u.n_turns * u.max_new_tokens
        if need >= limit:
            raise BenchError(
                f"conversation {u.conv['id']} ({u.position}) may need {need} tokens "
                f"({u.n_turns} turns x {u.max_new_tokens} answer tokens included), beyond the model's "
                f"context window of {limit}: lower --context or --max-new-tokens"
            )


# --------------------------------------------------------------------------- run


@dataclass
class RunSummary:
    units: int
    units_run: int
    units_skipped: int
    turns_run: int
    turns_skipped: int
    dropped_records: int
    results: Path
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _rewrite(path: Path, lines: list[str]) -> None:
    """Atomically replace ``path`` by ``lines``: temp file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _density(stats, bound) -> float | None:
    extra = stats.extra or {}
    for key in ("prefill_density", "density"):
        if key in extra:
            return float(extra[key])
    # A method with a dense prefill attends to everything; otherwise unknown.
    return 1.0 if bound.prefill.name == "dense" else None


def make_record(unit: Unit, turn: dict, result, bound, *, model: str, dtype: str, concurrency: int = 1) -> dict:
    """The JSONL record of one played turn (see docs/benchmark.md for the fields).
    ``concurrency``: units played at once (timings of shared forwards when > 1)."""
    st = result.stats
    return {
        "schema": RESULT_SCHEMA,
        "method": unit.method,
        "method_spec": unit.method_spec,
        "dataset": unit.dataset,
        "conversation": unit.conv["id"],
        "position": unit.position,
        "turn": turn["index"],
        "turns": unit.n_turns,
        "depends_on": list(turn["depends_on"]),
        "metric": turn["metric"],
        "score": float(score_answer(turn["metric"], result.text, turn["answers"])),
        "prediction": result.text,
        "golds": list(turn["answers"]),
        "ttft_s": st.ttft_s,
        "tpot_s": st.tpot_s,
        "prefill_s": st.prefill_s,
        "decode_s": st.decode_s,
        "prefill_density": _density(st, bound),
        "active_kv_tokens": st.active_kv_tokens,
        "kv_tokens": st.kv_tokens,
        "kv_bytes": st.kv_bytes,
        "peak_rss_mb": st.peak_rss_mb,
        "prompt_tokens": st.prompt_tokens,
        "cached_tokens": st.cached_tokens,
        "prefill_tokens": st.prefill_tokens,
        "new_tokens": st.new_tokens,
        "finish_reason": st.finish_reason,
        "max_new_tokens": unit.max_new_tokens,
        "model": model,
        "dtype": dtype,
        "threads": thread_budget(),  # timings depend on it
        "concurrency": concurrency,
        "knobs": unit.knobs,
        "config": bound.knobs(),
        "context_tokens": unit.conv.get("context_tokens"),
        "conv_hash": unit.conv_hash,
        "extra": dict(st.extra or {}),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def execute(plan: RunPlan, engine, *, progress: bool = True, warmup: bool = True, concurrency: int = 1) -> RunSummary:
    """Play every unit still to do, appending one record per turn to ``plan.results``.

    ``concurrency`` > 1 plays that many units at once through the engine's batching
    scheduler: one forward carries the next token of every unit that is decoding, and a
    turn's prefill runs in one piece, as it would alone. Greedy answers are then the same
    as one at a time (``bench serve`` checks this on the default model); per-turn timings
    are those of a shared forward, and each record says so in ``concurrency``.
    """
    from ..engine import SamplingParams

    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise BenchError(f"--concurrency must be an integer >= 1, got {concurrency!r}")
    start = time.perf_counter()
    check_fits(engine, plan.todo)  # still nothing written
    summary = RunSummary(
        units=len(plan.units), units_run=0, units_skipped=len(plan.units) - len(plan.todo),
        turns_run=0, turns_skipped=plan.turns_done, dropped_records=plan.dropped_records, results=plan.results,
    )
    if plan.rewrite:
        _rewrite(plan.results, plan.kept_lines)
    if not plan.todo:
        summary.seconds = time.perf_counter() - start
        return summary
    if warmup:  # first calls pay one-off costs (allocations, kernel selection): keep them off the clock
        for method in dict.fromkeys(u.method for u in plan.todo):
            first = next(u for u in plan.todo if u.method == method)
            engine.new_session(method=first.method_spec, knobs=first.knobs).chat(
                "Hello, who are you?", SamplingParams(max_new_tokens=2))
    plan.results.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.turns_todo, desc="bench", unit="turn", file=sys.stderr, dynamic_ncols=True)
    try:
        with plan.results.open("a", encoding="utf-8", newline="") as fh:
            if fh.tell() > 0:
                with plan.results.open("rb") as rb:
                    rb.seek(-1, os.SEEK_END)
                    if rb.read(1) != b"\n":  # a complete last record without its newline
                        fh.write("\n")

            def write(unit: Unit, turn: dict, result, session) -> None:
                rec = make_record(unit, turn, result, session.method, model=plan.model, dtype=plan.dtype,
                                  concurrency=concurrency)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                summary.turns_run += 1
                if bar is not None:
                    bar.update(1)

            if concurrency == 1:
                _play_one_at_a_time(plan, engine, write, summary, bar)
            else:
                _play_batched(plan, engine, write, summary, bar, concurrency)
    finally:
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def _context_error(unit: Unit, turn: dict, exc: Exception) -> BenchError:
    return BenchError(f"{unit.conv['id']} turn {turn['index']} ({unit.method}, {unit.position}): {exc}; "
                      "lower --context or --max-new-tokens")


def _play_one_at_a_time(plan: RunPlan, engine, write, summary: RunSummary, bar) -> None:
    from ..engine import SamplingParams
    from ..engine.session import ContextLengthError

    for unit in plan.todo:
        session = engine.new_session(method=unit.method_spec, knobs=unit.knobs)
        sampling = SamplingParams(max_new_tokens=unit.max_new_tokens)
        if bar is not None:
            bar.set_postfix_str(f"{unit.method} {unit.conv['id']} {unit.position}", refresh=False)
        for turn in unit.conv["turns"]:
            try:
                result = session.chat(turn["user"][unit.position], sampling)
            except ContextLengthError as exc:
                raise _context_error(unit, turn, exc) from None
            write(unit, turn, result, session)
        summary.units_run += 1


def _play_batched(plan: RunPlan, engine, write, summary: RunSummary, bar, concurrency: int) -> None:
    from ..engine import SamplingParams, Scheduler
    from ..engine.session import ContextLengthError

    # No prefill chunking: a turn's prefill is one forward, as when it runs alone.
    sched = Scheduler(engine, chunk_tokens=1 << 30, max_running=concurrency)
    todo = iter(plan.todo)
    playing: dict[object, tuple[Unit, object, int]] = {}  # Sequence -> (unit, session, turn index)

    def submit(unit: Unit, session, index: int) -> None:
        turn = unit.conv["turns"][index]
        messages = session.messages + [{"role": "user", "content": turn["user"][unit.position]}]
        try:
            seq = sched.submit(session, engine.encode_messages(messages),
                               SamplingParams(max_new_tokens=unit.max_new_tokens), messages=messages)
        except ContextLengthError as exc:
            raise _context_error(unit, turn, exc) from None
        playing[seq] = (unit, session, index)

    while True:
        while len(playing) < concurrency:
            unit = next(todo, None)
            if unit is None:
                break
            submit(unit, engine.new_session(method=unit.method_spec, knobs=unit.knobs), 0)
        if not playing:
            return
        for seq in sched.step():
            unit, session, index = playing.pop(seq)
            turn = unit.conv["turns"][index]
            if seq.status != "finished":
                raise BenchError(f"{unit.conv['id']} turn {turn['index']} ({unit.method}, {unit.position}) "
                                 f"{seq.status}: {seq.error!r}") from seq.error
            write(unit, turn, seq.result, session)
            if index + 1 < unit.n_turns:
                submit(unit, session, index + 1)
            else:
                summary.units_run += 1
