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
from collections.abc import Sequence
from pathlib import Path

from .datasets import DATASETS
from .metrics import rouge_l
from .runner import BenchError, read_results
from .schema import POSITIONS

__all__ = [
    "PLOTS",
    "fidelity",
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


def summarize(records: list[dict], reference: str = "dense", source: str = "") -> dict:
    """Everything the report shows, as plain JSON-able data (written as summary.json)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    if reference in methods:
        methods = [reference] + [m for m in methods if m != reference]
    datasets = _order((r["dataset"] for r in records), list(DATASETS))
    positions = _order((r["position"] for r in records), list(POSITIONS))
    ref_index = {_turn_key(r): r for r in records if r["method"] == reference} if reference in methods else None

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
            averages.append(row)

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
        "averages": averages,
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


def headline_table(summary: dict) -> str:
    """Method x question position, averaged over datasets: the table for the README."""
    ref = summary["reference"]
    positions = summary["positions"]
    avg = {(r["position"], r["method"]): r for r in summary["averages"]}
    head = ["method", *positions, "mean", "Δ vs " + (ref or "ref"), "fidelity", "TTFT", "TPOT"]
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
            _rel(allrow, "score_delta", is_ref, "{:+.3f}"),
            _rel(allrow, "fidelity", is_ref, "{:.3f}"),
            lat("ttft_s", "ttft_speedup"), lat("tpot_s", "tpot_speedup"),
        ]) + " |")
    return "\n".join(lines)


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
    knobs = [f"`{m}` {', '.join(v)}" for m, v in s["knobs"].items() if v and v != ["{}"]]
    if knobs:
        lines += ["Knobs: " + "; ".join(knobs) + ".", ""]
    lines += [
        "## Headline: score by question position (mean over datasets)",
        "",
        headline_table(summary),
        "",
        "How to read: scores are each dataset's metric (0-1), averaged per dataset then over "
        f"datasets. Δ, fidelity and speedups are relative to `{ref}` on the same turns; fidelity is "
        f"ROUGE-L of a method's answers against `{ref}`'s answers. TTFT and TPOT are mean milliseconds "
        f"per turn, with the speedup over `{ref}` in brackets (above 1 is faster)."
        if ref else
        "How to read: scores are each dataset's metric (0-1), averaged per dataset then over datasets. "
        "No dense records, so there are no relative columns.",
        "",
        "![score by question position](score_by_position.png)",
        "",
        "![TTFT and TPOT per method](latency.png)",
        "",
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
        lines += [f"### {d} ({metric}, {convs} conversation(s))", "", *_detail_table(rows, ref, "position"), ""]
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


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike = "runs/bench/report",
                 reference: str = "dense") -> dict[str, Path]:
    """Write ``report.md``, ``summary.json`` and the PNG plots to ``out_dir``.

    Everything is computed and rendered in a temporary folder first, so bad input
    (a malformed results line) or a failing plot leaves ``out_dir`` as it was.
    """
    results = Path(results)
    records = load_results(results)
    summary = summarize(records, reference=reference, source=str(results))
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
