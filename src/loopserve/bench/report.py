"""The benchmark report: markdown tables, ``summary.json`` and PNG plots from a results JSONL.

Every number is an average over turn records (one per method x dataset x
conversation x position x turn, see :mod:`loopserve.bench.runner`):

- **score**: the turn's metric. Per (dataset, position, method) cell it is the mean
  over the cell's turns; averaged over datasets ("macro") each dataset weighs the
  same, whatever its number of turns.
- **relative to the reference** (dense): computed on *paired* turns only, the same
  (dataset, conversation, position, turn) played by both. ``score_delta`` is the
  mean score difference; ``ttft_speedup`` is the reference's total TTFT over the
  method's, ``tpot_speedup`` the ratio of mean TPOTs (turns with at least 2 new
  tokens on both sides: TPOT is undefined below that).
- **fidelity**: ROUGE-L F between the method's answer and the reference's answer to
  the same turn (two empty answers agree fully). With a small model, agreement with
  full attention is a quality axis of its own.
- TTFT, TPOT, prefill density, active KV and KV bytes are means over turns (TPOT
  over turns with at least 2 new tokens).

A malformed results line raises :class:`~loopserve.bench.runner.ResultsFormatError`
naming the line before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .datasets import DATASETS
from .metrics import normalize_answer, rouge_l, score as score_answer
from .runner import BenchError, read_results
from .schema import POSITIONS
from .stats import DEFAULT_REPLICATES, Estimate, macro_estimate

__all__ = [
    "PLOTS",
    "fidelity",
    "load_many",
    "load_results",
    "render_markdown",
    "summarize",
    "write_report",
]

#: The PNG files the report writes.
PLOTS = ("score_by_position.png", "latency.png")
ALL = "all"


def load_results(path: str | os.PathLike) -> list[dict]:
    """The validated records of a results file (strict: any malformed line is an error)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: results file not found")
    rows, _ = read_results(path)
    if not rows:
        raise BenchError(f"{path}: no records")
    return [rec for _, _, rec in rows]


def display_path(path: str | os.PathLike) -> str:
    """``path`` as the report names it: relative to the working directory (the repository
    root when run from there), or just the file name when it lies elsewhere; never an
    absolute machine path."""
    path = Path(path)
    try:
        rel = Path(os.path.relpath(path.resolve(), Path.cwd().resolve()))
    except ValueError:  # another drive (Windows)
        return path.name
    return path.name if rel.parts and rel.parts[0] == ".." else rel.as_posix()

def fidelity(prediction: str, reference: str) -> float:
    """ROUGE-L F of an answer against the reference method's answer (1.0 if both empty)."""
    if not prediction.strip() and not reference.strip():
        return 1.0
    return rouge_l(prediction, reference)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _turn_key(r: dict) -> tuple:
    return (r["dataset"], r["conversation"], r["position"], r["turn"])


def _stats(recs: list[dict], ref_index: dict | None, is_ref: bool) -> dict:
    tpot = [r["tpot_s"] for r in recs if r["new_tokens"] >= 2]
    out = {
        "turns": len(recs),
        "conversations": len({(r["dataset"], r["conversation"]) for r in recs}),
        "score": _mean(r["score"] for r in recs),
        "ttft_s": _mean(r["ttft_s"] for r in recs),
        "tpot_s": _mean(tpot),
        "prefill_density": _mean(r.get("prefill_density") for r in recs),
        "active_kv_tokens": _mean(r.get("active_kv_tokens") for r in recs),
        "kv_mib": _mean((r["kv_bytes"] / 2**20 if r.get("kv_bytes") is not None else None) for r in recs),
        "peak_rss_mb": max((r.get("peak_rss_mb") or 0.0 for r in recs), default=None),
        "new_tokens": _mean(r["new_tokens"] for r in recs),
        "paired": 0,
        "score_delta": None,
        "ttft_speedup": None,
        "tpot_speedup": None,
        "fidelity": None,
    }
    if ref_index is None:
        return out
    pairs = [(r, ref_index[_turn_key(r)]) for r in recs if _turn_key(r) in ref_index]
    out["paired"] = len(pairs)
    if not pairs:
        return out
    if is_ref:
        out.update(score_delta=0.0, ttft_speedup=1.0, tpot_speedup=1.0, fidelity=1.0)
        return out
    out["score_delta"] = _mean(r["score"] - d["score"] for r, d in pairs)
    t_m, t_d = sum(r["ttft_s"] for r, _ in pairs), sum(d["ttft_s"] for _, d in pairs)
    out["ttft_speedup"] = t_d / t_m if t_m > 0 else None
    tp = [(r["tpot_s"], d["tpot_s"]) for r, d in pairs if r["new_tokens"] >= 2 and d["new_tokens"] >= 2]
    if tp and sum(x for x, _ in tp) > 0:
        out["tpot_speedup"] = sum(y for _, y in tp) / sum(x for x, _ in tp)
    out["fidelity"] = _mean(fidelity(r["prediction"], d["prediction"]) for r, d in pairs)
    return out


def _order(values, preferred: Sequence[str]) -> list[str]:
    present = set(values)
    head = [v for v in preferred if v in present]
    return head + sorted(present - set(head))


def agrees(prediction: str, reference: str) -> bool:
    """Exact agreement of two answers after SQuAD-style normalisation (case, punctuation,
    articles, whitespace)."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _est(e: Estimate | None) -> dict | None:
    return e.as_dict() if e is not None else None


def _dependency(r: dict) -> str:
    return "dependent" if r.get("depends_on") else "independent"


def trivial_baseline(records: list[dict]) -> dict:
    """The best score a content-free answer gets on these turns. Three answerers, each
    the same for every turn of a conversation and blind to that conversation's golds:
    the empty answer; the most common gold answer of the *other* conversations (a
    multiple-choice letter, "yes"); the ten most common words of the other
    conversations' gold answers (the floor of word-overlap metrics: F1 and ROUGE credit
    "the of and to" too). A dataset where full attention does not clearly beat the best
    of them carries no signal on the model at hand."""
    # One entry per turn: the three question positions of a turn share its gold answers.
    turns = [r for r in {(r["dataset"], r["conversation"], r["turn"]): r for r in records}.values() if r.get("golds")]
    by_conv: dict[tuple, list[dict]] = {}
    for r in turns:
        by_conv.setdefault((r["dataset"], r["conversation"]), []).append(r)

    def answers_for(conv: tuple) -> dict[str, str]:
        others = [g for c, rs in by_conv.items() if c != conv for r in rs for g in dict.fromkeys(r["golds"])]
        words = Counter(w for g in others for w in normalize_answer(g).split())
        common = Counter(others).most_common(1)
        return {"empty": "", "most common other gold": common[0][0] if common else "",
                "common words": " ".join(w for w, _ in words.most_common(10))}

    per_conv = {c: answers_for(c) for c in by_conv}
    best = {"answerer": "empty", "score": 0.0}
    for name in ("empty", "most common other gold", "common words"):
        mean = _mean(score_answer(r["metric"], per_conv[c][name], r["golds"]) for c, rs in by_conv.items() for r in rs)
        if mean is not None and mean > best["score"]:
            best = {"answerer": name, "score": mean}
    return best


class _Pairing:
    """Per-turn values of a method against the reference on the same turn (cached: ROUGE-L
    is the slow part)."""

    def __init__(self, ref_index: dict | None):
        self.ref_index = ref_index or {}
        self._fid: dict = {}

    def ref(self, r: dict) -> dict | None:
        return self.ref_index.get(_turn_key(r))

    def delta(self, r: dict) -> float | None:
        d = self.ref(r)
        return None if d is None else r["score"] - d["score"]

    def fidelity(self, r: dict) -> float | None:
        d = self.ref(r)
        if d is None:
            return None
        key = (r["method"], _turn_key(r))
        if key not in self._fid:
            self._fid[key] = fidelity(r["prediction"], d["prediction"])
        return self._fid[key]

    def agreement(self, r: dict) -> float | None:
        d = self.ref(r)
        return None if d is None else float(agrees(r["prediction"], d["prediction"]))


def _intervals(recs: list[dict], pairing: _Pairing, is_ref: bool) -> dict:
    """Score, and (against the reference) Δ score, fidelity and exact agreement, each as a
    macro mean with its conversation-bootstrap 95% interval."""
    out = {"score_ci": _est(macro_estimate(recs, lambda r: r["score"]))}
    if pairing.ref_index and not is_ref:
        out["score_delta_ci"] = _est(macro_estimate(recs, pairing.delta))
        out["fidelity_ci"] = _est(macro_estimate(recs, pairing.fidelity))
        agreement = macro_estimate(recs, pairing.agreement)
        out["agreement"] = agreement.mean if agreement else None
        out["agreement_ci"] = _est(agreement)
    elif pairing.ref_index and is_ref:
        out["agreement"] = 1.0
    return out


def _comparisons(records: list[dict], methods: list[str], positions: list[str], focus: list[str]) -> list[dict]:
    """Each focus method against every other method on the turns both played: the paired
    score difference (focus minus other) with its 95% interval, per position and overall."""
    index = {(r["method"], _turn_key(r)): r for r in records}
    out = []
    for f in focus:
        for other in methods:
            if other == f:
                continue
            for pos in positions + [ALL]:
                recs = [r for r in records if r["method"] == f and (pos == ALL or r["position"] == pos)]
                e = macro_estimate(recs, lambda r: (r["score"] - index[(other, _turn_key(r))]["score"])
                                   if (other, _turn_key(r)) in index else None)
                if e is not None:
                    out.append({"method": f, "versus": other, "position": pos, **e.as_dict(),
                                "clear": e.excludes(0.0)})
    return out


def dataset_signal(records: list[dict], reference: str, datasets: Sequence[str]) -> dict[str, dict]:
    """Per dataset, whether ``reference``'s score clearly beats a content-free answer (the
    lower end of its 95% interval above the best trivial answerer's score)."""
    signal = {}
    for d in datasets:
        ref_recs = [r for r in records if r["dataset"] == d and r["method"] == reference]
        trivial = trivial_baseline(ref_recs)
        e = macro_estimate(ref_recs, lambda r: r["score"])
        signal[d] = {"trivial_answerer": trivial["answerer"], "trivial_score": trivial["score"],
                     "method": ref_recs[0]["method"] if ref_recs else None, "score_ci": _est(e),
                     "signal": bool(e is not None and e.lo > trivial["score"])}
    return signal


def summarize(records: list[dict], reference: str = "dense", source: str = "",
              focus: Sequence[str] | None = None) -> dict:
    """Everything the report shows, as plain JSON-able data (written as summary.json).

    ``focus``: the methods compared head to head with every other method (default: those
    whose name contains ``loopserve``).
    """
    methods = list(dict.fromkeys(r["method"] for r in records))
    if reference in methods:
        methods = [reference] + [m for m in methods if m != reference]
    datasets = _order((r["dataset"] for r in records), list(DATASETS))
    positions = _order((r["position"] for r in records), list(POSITIONS))
    ref_index = {_turn_key(r): r for r in records if r["method"] == reference} if reference in methods else None
    pairing = _Pairing(ref_index)

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for pos in (r["position"], ALL):
            groups.setdefault((r["dataset"], pos, r["method"]), []).append(r)
            groups.setdefault((ALL, pos, r["method"]), []).append(r)

    cells = []
    for d in datasets:
        for pos in positions + [ALL]:
            for m in methods:
                recs = groups.get((d, pos, m))
                if recs:
                    metric = sorted({r["metric"] for r in recs})
                    cells.append({"dataset": d, "position": pos, "method": m, "metric": "/".join(metric),
                                  **_stats(recs, ref_index, m == reference)})

    # Over datasets: latencies pooled over turns; score, delta and fidelity averaged per dataset.
    by_cell = {(c["dataset"], c["position"], c["method"]): c for c in cells}
    averages = []
    for pos in positions + [ALL]:
        for m in methods:
            recs = groups.get((ALL, pos, m))
            if not recs:
                continue
            row = {"position": pos, "method": m, **_stats(recs, ref_index, m == reference)}
            per_ds = [by_cell[(d, pos, m)] for d in datasets if (d, pos, m) in by_cell]
            row["datasets"] = len(per_ds)
            for k in ("score", "score_delta", "fidelity"):
                row[k] = _mean(c[k] for c in per_ds)
            row.update(_intervals(recs, pairing, m == reference))
            averages.append(row)

    # Turns that need an earlier turn's context against turns that do not: what
    # compression carried across turns costs shows up in the first group only.
    by_dependency = []
    for dep in ("dependent", "independent"):
        for pos in positions + [ALL]:
            for m in methods:
                recs = [r for r in groups.get((ALL, pos, m), []) if _dependency(r) == dep]
                if recs:
                    by_dependency.append({"dependency": dep, "position": pos, "method": m, "turns": len(recs),
                                          **_intervals(recs, pairing, m == reference)})

    signal = dataset_signal(records, methods[0], datasets)

    focus = [m for m in (focus if focus is not None else [m for m in methods if "loopserve" in m]) if m in methods]

    settings = {
        "models": sorted({f"{r.get('model', '?')} ({r.get('dtype', '?')})" for r in records}),
        "max_new_tokens": sorted({r["max_new_tokens"] for r in records if r.get("max_new_tokens") is not None}),
        "context_tokens": sorted({r["context_tokens"] for r in records if r.get("context_tokens") is not None}),
        "knobs": {m: sorted({json.dumps(r.get("knobs") or {}, sort_keys=True) for r in records if r["method"] == m})
                  for m in methods},
    }
    return {
        "source": source,
        "records": len(records),
        "reference": reference if ref_index is not None else None,
        "methods": methods,
        "datasets": datasets,
        "positions": positions,
        "metrics": {d: sorted({r["metric"] for r in records if r["dataset"] == d}) for d in datasets},
        "settings": settings,
        "confidence": {"level": 0.95, "method": "conversation-level bootstrap, stratified by dataset, paired on turns",
                       "replicates": DEFAULT_REPLICATES},
        "averages": averages,
        "by_dependency": by_dependency,
        "signal": signal,
        "comparisons": _comparisons(records, methods, positions, focus),
        "cells": cells,
    }


# --------------------------------------------------------------------------- markdown


def _f(x, fmt: str = "{:.3f}", none: str = "–") -> str:
    return none if x is None else fmt.format(x)


def _ms(x) -> str:
    if x is None:
        return "–"
    ms = x * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _rel(row: dict, key: str, is_ref: bool, fmt: str) -> str:
    if is_ref:
        return "ref"
    return _f(row.get(key), fmt)


def _detail_table(rows: list[dict], reference: str | None, first: str) -> list[str]:
    head = [first, "method", "turns", "score", "Δ score", "fidelity", "TTFT ms", "TTFT ×",
            "TPOT ms", "TPOT ×", "density", "active KV", "KV MiB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        ref = r["method"] == reference
        first_val = r["position"] if r["position"] != ALL else "**all**"
        out.append("| " + " | ".join([
            first_val, r["method"], str(r["turns"]), _f(r["score"]),
            _rel(r, "score_delta", ref, "{:+.3f}"), _rel(r, "fidelity", ref, "{:.3f}"),
            _ms(r["ttft_s"]), _rel(r, "ttft_speedup", ref, "{:.2f}×"),
            _ms(r["tpot_s"]), _rel(r, "tpot_speedup", ref, "{:.2f}×"),
            _f(r["prefill_density"], "{:.2f}"), _f(r["active_kv_tokens"], "{:.0f}"), _f(r["kv_mib"], "{:.1f}"),
        ]) + " |")
    return out


def _ci(e: dict | None, fmt: str = "{:+.3f}") -> str:
    """``mean [lo, hi]``, bold when the interval excludes zero (a clear difference)."""
    if not e:
        return "–"
    text = f"{fmt.format(e['mean'])} [{fmt.format(e['ci'][0])}, {fmt.format(e['ci'][1])}]"
    return f"**{text}**" if fmt.startswith("{:+") and (e["ci"][0] > 0 or e["ci"][1] < 0) else text


def headline_table(summary: dict) -> str:
    """Method x question position, averaged over datasets: the table for the README."""
    ref = summary["reference"]
    positions = summary["positions"]
    avg = {(r["position"], r["method"]): r for r in summary["averages"]}
    head = ["method", *positions, "mean", "Δ vs " + (ref or "ref") + " [95% CI]", "fidelity", "agree", "TTFT", "TPOT"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in summary["methods"]:
        allrow = avg.get((ALL, m))
        if allrow is None:
            continue
        is_ref = m == ref

        def lat(key, speed):
            v = _ms(allrow[key])
            v = v if v == "–" else v + " ms"
            return v if is_ref or allrow[speed] is None else f"{v} ({allrow[speed]:.2f}×)"

        lines.append("| " + " | ".join([
            f"**{m}**" if is_ref else m,
            *[_f(avg[(p, m)]["score"]) if (p, m) in avg else "–" for p in positions],
            _f(allrow["score"]),
            "ref" if is_ref else _ci(allrow.get("score_delta_ci")),
            _rel(allrow, "fidelity", is_ref, "{:.3f}"),
            "ref" if is_ref else _f(allrow.get("agreement"), "{:.2f}"),
            lat("ttft_s", "ttft_speedup"), lat("tpot_s", "tpot_speedup"),
        ]) + " |")
    return "\n".join(lines)


def position_table(summary: dict) -> list[str]:
    """Per position: each method's score against the reference's 95% interval, and its
    paired Δ and fidelity with intervals."""
    ref = summary["reference"]
    positions = summary["positions"] + [ALL]
    avg = {(r["position"], r["method"]): r for r in summary["averages"]}
    head = ["method", "position", "score [95% CI]", f"inside {ref}'s CI", "Δ score [95% CI]", "fidelity [95% CI]",
            "agree [95% CI]"]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for m in summary["methods"]:
        for p in positions:
            row = avg.get((p, m))
            if row is None:
                continue
            refrow = avg.get((p, ref))
            inside = "–"
            if m != ref and refrow and refrow.get("score_ci") and row["score"] is not None:
                lo, hi = refrow["score_ci"]["ci"]
                inside = "yes" if lo <= row["score"] <= hi else ("above" if row["score"] > hi else "**below**")
            out.append("| " + " | ".join([
                m, p if p != ALL else "**all**", _ci(row.get("score_ci"), "{:.3f}"), inside,
                "ref" if m == ref else _ci(row.get("score_delta_ci")),
                "ref" if m == ref else _ci(row.get("fidelity_ci"), "{:.3f}"),
                "ref" if m == ref else _ci(row.get("agreement_ci"), "{:.2f}"),
            ]) + " |")
    return out


def dependency_table(summary: dict) -> list[str]:
    """Turns that need an earlier turn's context against those that do not (all positions)."""
    ref = summary["reference"]
    rows = {(r["dependency"], r["method"]): r for r in summary["by_dependency"] if r["position"] == ALL}
    head = ["method", "dependent turns", "score", "Δ [95% CI]", "fidelity", "independent turns", "score",
            "Δ [95% CI]", "fidelity"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in summary["methods"]:
        cols = [m]
        for dep in ("dependent", "independent"):
            r = rows.get((dep, m))
            if r is None:
                cols += ["0", "–", "–", "–"]
                continue
            cols += [str(r["turns"]), _f(r["score_ci"]["mean"] if r.get("score_ci") else None),
                     "ref" if m == ref else _ci(r.get("score_delta_ci")),
                     "ref" if m == ref else _f((r.get("fidelity_ci") or {}).get("mean"))]
        out.append("| " + " | ".join(cols) + " |")
    return out


def comparison_tables(summary: dict) -> list[str]:
    """Each focus method against every other method: paired score difference per position."""
    positions = summary["positions"] + [ALL]
    out: list[str] = []
    by = {}
    for c in summary["comparisons"]:
        by.setdefault(c["method"], {}).setdefault(c["versus"], {})[c["position"]] = c
    for f, others in by.items():
        out += [f"### `{f}` minus each other method (paired score difference, 95% CI)", "",
                "| versus | " + " | ".join(p if p != ALL else "all" for p in positions) + " |",
                "|---|" + "---:|" * len(positions)]
        for other, cells in others.items():
            out.append(f"| {other} | " + " | ".join(_ci(cells.get(p)) for p in positions) + " |")
        out.append("")
    return out


def signal_table(summary: dict) -> list[str]:
    """Which datasets carry signal: the reference clearly above a content-free answer."""
    out = ["| dataset | metric | reference score [95% CI] | best trivial answerer | trivial score | signal |",
           "|---|---|---:|---|---:|---|"]
    for d in summary["datasets"]:
        s = summary["signal"].get(d)
        if not s:
            continue
        out.append(f"| {d} | {'/'.join(summary['metrics'].get(d, []))} | {_ci(s['score_ci'], '{:.3f}')} | "
                   f"{s['trivial_answerer']} | {s['trivial_score']:.3f} | {'yes' if s['signal'] else '**no**'} |")
    return out


def render_markdown(summary: dict) -> str:
    ref = summary["reference"]
    s = summary["settings"]
    n_ds = len(summary["datasets"])
    lines = [
        "# Multi-turn long-context benchmark: report",
        "",
        f"Generated by `loopserve bench report` from `{summary['source']}`: {summary['records']} turn records, "
        f"model {', '.join(s['models'])}; methods {', '.join(summary['methods'])}; "
        f"{n_ds} dataset(s); positions {', '.join(summary['positions'])}; "
        f"context {', '.join(map(str, s['context_tokens'])) or '?'} tokens; "
        f"answer budget {', '.join(map(str, s['max_new_tokens'])) or '?'} tokens.",
        "",
    ]
    if summary.get("dataset_selection"):
        sel = summary["dataset_selection"]
        why = (" (`--datasets signal`: those where the reference clearly beats a content-free answer)"
               if sel == "signal" else "")
        lines += [f"Datasets selected{why}: {', '.join(summary['datasets'])}.", ""]
    knobs = [f"`{m}` {', '.join(v)}" for m, v in s["knobs"].items() if v and v != ["{}"]]
    if knobs:
        lines += ["Knobs: " + "; ".join(knobs) + ".", ""]
    lines += [
        "## Headline: score by question position (mean over datasets)",
        "",
        headline_table(summary),
        "",
        "How to read: scores are each dataset's metric (0-1), averaged per dataset then over "
        f"datasets. Δ, fidelity, agreement and speedups are relative to `{ref}` on the same turns; "
        f"fidelity is ROUGE-L of a method's answers against `{ref}`'s answers, agree the share of "
        "answers equal to its answer after normalisation. Intervals are 95% bootstrap intervals over "
        "conversations (stratified by dataset, paired on turns); a Δ in bold excludes zero. TTFT and "
        f"TPOT are mean milliseconds per turn, with the speedup over `{ref}` in brackets (above 1 is faster)."
        if ref else
        "How to read: scores are each dataset's metric (0-1), averaged per dataset then over datasets. "
        "No dense records, so there are no relative columns.",
        "",
        "![score by question position](score_by_position.png)",
        "",
        "![TTFT and TPOT per method](latency.png)",
        "",
    ]
    if ref:
        lines += [
            "## Quality by position, with 95% intervals", "",
            f"`inside {ref}'s CI`: whether the method's mean score lies inside the 95% interval of "
            f"`{ref}`'s mean score at that position.", "",
            *position_table(summary), "",
            "## Turns that depend on earlier turns", "",
            "A dependent turn asks about the context of an earlier turn (`depends_on`): it is where "
            "compression carried across turns (evicted or approximated history) shows. Position: all.", "",
            *dependency_table(summary), "",
        ]
    if summary["comparisons"]:
        lines += ["## Head to head", "", *comparison_tables(summary)]
    lines += [
        "## Which datasets carry signal", "",
        "The trivial score is the best of three content-free answerers on the same turns: the "
        "empty answer, the most common gold answer of the other conversations, and the ten most common "
        "words of the other conversations' gold answers. Rows marked **no** are ones where the reference does not "
        "clearly beat it on this model: differences between methods there are noise.", "",
        *signal_table(summary), "",
        "## Averages over datasets, per position",
        "",
        *_detail_table([r for r in summary["averages"]], ref, "position"),
        "",
        "## Per dataset",
        "",
        "Columns: turns played; mean score; Δ score, fidelity and speedups (×) against "
        f"`{ref}` on paired turns; mean TTFT and TPOT; mean prefill density (share of attention "
        "computed, 1 = dense); mean active KV tokens per head at the last decode step; mean resident KV.",
        "",
    ]
    for d in summary["datasets"]:
        rows = [c for c in summary["cells"] if c["dataset"] == d]
        metric = "/".join(summary["metrics"].get(d, []))
        convs = max((c["conversations"] for c in rows), default=0)
        mark = "" if d not in summary["signal"] else ("" if summary["signal"][d]["signal"] else ", no clear signal")
        lines += [f"### {d} ({metric}, {convs} conversation(s){mark})", "", *_detail_table(rows, ref, "position"), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _plots(summary: dict, out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    avg = {(r["position"], r["method"]): r for r in summary["averages"]}
    positions, methods = summary["positions"], summary["methods"]
    paths = []

    has_ref = summary["reference"] is not None
    fig = Figure(figsize=(10.5, 4.0) if has_ref else (6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_ref else 1, squeeze=False)[0]
    panels = [("score", f"score (mean over {len(summary['datasets'])} datasets)", "Score by question position")]
    if has_ref:
        panels.append(("fidelity", f"ROUGE-L vs {summary['reference']} answers", f"Fidelity to {summary['reference']}"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        top = 0.0
        for i, m in enumerate(methods):
            xs = [j for j, p in enumerate(positions) if (p, m) in avg and avg[(p, m)][key] is not None]
            ys = [avg[(positions[j], m)][key] for j in xs]
            top = max([top, *ys])
            ax.plot(xs, ys, marker="o", color=f"C{i}", linewidth=2.2 if m == summary["reference"] else 1.5, label=m)
        ax.set_xticks(range(len(positions)), positions)
        ax.set_ylim(0.0, max(0.1, min(1.05, top * 1.15)) if top <= 1.0 else top * 1.05)
        ax.set_xlabel("question position in the turn")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / PLOTS[0])
    fig.savefig(paths[-1])

    fig = Figure(figsize=(9, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "ttft_s", "TTFT (ms, mean per turn)"), (axes[1], "tpot_s", "TPOT (ms, mean per token)")):
        vals = [(avg[(ALL, m)][key] or 0.0) * 1000 if (ALL, m) in avg else 0.0 for m in methods]
        bars = ax.bar(range(len(methods)), vals, color=[f"C{i}" for i in range(len(methods))])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / PLOTS[1])
    fig.savefig(paths[-1])
    return paths


def load_many(results: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[dict], str]:
    """The records of one or more results files, and how the report names them. The same
    turn of the same method in two files is an error: it would count twice."""
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    if not paths:
        raise BenchError("no results files given")
    records: list[dict] = []
    seen: set[tuple] = set()
    for path in paths:
        for r in load_results(path):
            key = (r["method"], *_turn_key(r))
            if key in seen:
                raise BenchError(f"{path}: the record for method={r['method']} dataset={r['dataset']} "
                                 f"conversation={r['conversation']} position={r['position']} turn={r['turn']} "
                                 "is also in an earlier results file")
            seen.add(key)
            records.append(r)
    return records, ", ".join(display_path(p) for p in paths)


def write_report(results: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike = "runs/bench/report",
                 reference: str = "dense", methods: Sequence[str] | None = None,
                 datasets: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``summary.json`` and the PNG plots to ``out_dir``.

    ``results`` is one results file or several (each configuration may run in its own
    process and file). ``methods``: report only these labels (e.g. the finished
    configurations of a file that also holds an unfinished one). ``datasets``: only these
    datasets; ``["signal"]`` keeps those where the reference clearly beats a content-free
    answer (the report's signal column), so the comparisons rest on rows that can tell
    methods apart. Everything is computed and
    rendered in a temporary folder first, so bad input (a malformed results line) or a
    failing plot leaves ``out_dir`` as it was.
    """
    records, source = load_many(results)
    if methods is not None:
        present = sorted({r["method"] for r in records})
        unknown = [m for m in methods if m not in present]
        if unknown:
            raise BenchError(f"--methods {', '.join(unknown)}: not in the results (they hold {', '.join(present)})")
        wanted = set(methods)
        records = [r for r in records if r["method"] in wanted]
    selection = None if datasets is None else ("signal" if list(datasets) == ["signal"] else list(datasets))
    if datasets is not None:
        if not datasets:
            raise BenchError("--datasets: no dataset named")
        present = sorted({r["dataset"] for r in records})
        if selection == "signal":
            methods_present = list(dict.fromkeys(r["method"] for r in records))
            ref = reference if reference in methods_present else methods_present[0]  # as summarize does
            signal = dataset_signal(records, ref, present)
            datasets = [d for d in present if signal[d]["signal"]]
            if not datasets:
                raise BenchError("--datasets signal: no dataset has the reference clearly above a trivial answer")
        unknown = [d for d in datasets if d not in present]
        if unknown:
            raise BenchError(f"--datasets {', '.join(unknown)}: not in the results (they hold {', '.join(present)})")
        records = [r for r in records if r["dataset"] in set(datasets)]
    summary = summarize(records, reference=reference, source=source)
    if selection is not None:
        summary["dataset_selection"] = selection
    markdown = render_markdown(summary)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out.parent))
    try:
        (tmp / "report.md").write_text(markdown + "\n", encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _plots(summary, tmp)
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        for name in ("report.md", "summary.json", *PLOTS):
            os.replace(tmp / name, out / name)
            written[name] = out / name
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
