"""Ablation and knob-sensitivity tables and plots from labelled benchmark runs.

A run holds several configurations of a method under labels (``--methods
dense,a08=loopserve,a095=loopserve --knob a08:alpha=0.8 --knob a095:alpha=0.95``);
every record carries its method spec and its resolved configuration (``config``). This
module lines the configurations up against the reference on the same turns:

- the **ablation table**: one row per configuration (score per position, Δ score and
  fidelity with 95% intervals, prefill density, active KV, TTFT and TPOT speedups);
- one **sensitivity curve per knob**: the configurations of a method spec that differ
  from its base configuration (the one run with its defaults) in that knob only, plus
  the base itself at the default value.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .report import ALL, _ci, _f, _turn_key, load_many, summarize
from .runner import BenchError

__all__ = ["apply_speed", "knob_curves", "render_sensitivity", "sensitivity_summary", "write_sensitivity"]


def _configs(records: list[dict]) -> dict[str, dict]:
    """label -> {"spec", "knobs", "config"} (a label with mixed configs is an error)."""
    out: dict[str, dict] = {}
    for r in records:
        entry = {"spec": r.get("method_spec", r["method"]), "knobs": r.get("knobs") or {}, "config": r.get("config")}
        seen = out.setdefault(r["method"], entry)
        if seen != entry:
            raise BenchError(f"method label {r['method']!r} appears with two configurations: "
                             f"{json.dumps(seen, sort_keys=True)} and {json.dumps(entry, sort_keys=True)}")
    return out


def knob_curves(configs: dict[str, dict]) -> dict[str, dict[str, list[tuple]]]:
    """``{spec: {knob: [(value, label), ...]}}``, sorted by value.

    The base of a spec is its label run without knobs; a label joins the curve of knob
    K when its configuration differs from the base's in K alone.
    """
    curves: dict[str, dict[str, list[tuple]]] = {}
    for spec in dict.fromkeys(c["spec"] for c in configs.values()):
        labels = [lab for lab, c in configs.items() if c["spec"] == spec and c["config"] is not None]
        base = next((lab for lab in labels if not configs[lab]["knobs"]), None)
        if base is None:
            continue
        bcfg = configs[base]["config"]
        for lab in labels:
            cfg = configs[lab]["config"]
            diff = [k for k in cfg if cfg.get(k) != bcfg.get(k)]
            if len(diff) == 1:
                k = diff[0]
                curve = curves.setdefault(spec, {}).setdefault(k, [(bcfg.get(k), base)])
                curve.append((cfg[k], lab))
        for k, pts in curves.get(spec, {}).items():
            pts.sort(key=lambda p: (str(type(p[0])), p[0]))
    return curves


def shared_turns(records: list[dict]) -> list[dict]:
    """The records of the turns every configuration (label) ran.

    An ablation runs its settings on a few datasets while the reference and the defaults
    ran on all of them: every row of the table is averaged over the same turns.
    """
    by_label: dict[str, set] = {}
    for r in records:
        by_label.setdefault(r["method"], set()).add(_turn_key(r))
    common = set.intersection(*by_label.values()) if by_label else set()
    return [r for r in records if _turn_key(r) in common]


def sensitivity_summary(records: list[dict], reference: str = "dense", source: str = "") -> dict:
    """The report summary over the turns every configuration ran (:func:`shared_turns`),
    plus the configurations and the knob curves."""
    configs = _configs(records)
    shared = shared_turns(records)
    if not shared:
        raise BenchError("no turn was run by every configuration: nothing to compare")
    summary = summarize(shared, reference=reference, source=source, focus=[])
    return {**summary, "configs": configs, "curves": knob_curves(configs),
            "shared_turns": len({_turn_key(r) for r in shared}), "records_read": len(records)}


def _row(summary: dict, pos: str, method: str) -> dict | None:
    return next((r for r in summary["averages"] if r["position"] == pos and r["method"] == method), None)


def _speed(row: dict, key: str) -> str:
    return _f(row.get(key), "{:.2f}×")


def _settings(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None) or "settings not recorded"


def render_sensitivity(summary: dict) -> str:
    ref = summary["reference"]
    positions = summary["positions"]
    head = ["configuration", "method", "knobs", *positions, "Δ score [95% CI]", "fidelity [95% CI]", "density",
            "active KV", "TTFT ×", "TPOT ×"]
    lines = [
        "# Ablation and sensitivity",
        "",
        f"From `{summary['source']}`: the {summary.get('shared_turns', '')} turns every configuration ran "
        f"({summary['records']} of {summary.get('records_read', summary['records'])} turn records), on "
        f"{', '.join(summary['datasets'])}; "
        f"every column relative to `{ref}` is paired on the same turns. Intervals: 95% bootstrap over "
        "conversations. " + (
            f"TTFT × and TPOT × are speed-ups over the reference measured side by side on an idle machine "
            f"(`{summary['speed_source']}`, {_settings(summary['speed_settings'])}: prefill knobs give TTFT, "
            "decode knobs TPOT; above 1 is faster)."
            if summary.get("speed_source") else
            "TTFT × and TPOT × are speedups over the reference in the same run (above 1 is faster); the "
            "machine's load during the run applies to both sides."),
        "",
        "## Configurations",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---|" + "---:|" * (len(head) - 3),
    ]
    for label, cfg in summary["configs"].items():
        allrow = _row(summary, ALL, label)
        if allrow is None:
            continue
        is_ref = label == ref
        knobs = ", ".join(f"{k}={v}" for k, v in sorted(cfg["knobs"].items())) or "defaults"
        lines.append("| " + " | ".join([
            f"**{label}**" if is_ref else label, cfg["spec"], knobs,
            *[_f((_row(summary, p, label) or {}).get("score")) for p in positions],
            "ref" if is_ref else _ci(allrow.get("score_delta_ci")),
            "ref" if is_ref else _ci(allrow.get("fidelity_ci"), "{:.3f}"),
            _f(allrow.get("prefill_density"), "{:.2f}"), _f(allrow.get("active_kv_tokens"), "{:.0f}"),
            "ref" if is_ref else _speed(allrow, "ttft_speedup"), "ref" if is_ref else _speed(allrow, "tpot_speedup"),
        ]) + " |")
    for spec, knobs in summary["curves"].items():
        for knob, pts in knobs.items():
            lines += ["", f"## `{spec}`: {knob}", "", f"![{spec} {knob}]({_plot_name(spec, knob)})", "",
                      f"| {knob} | configuration | " + " | ".join(positions) + " | all | Δ [95% CI] | fidelity | "
                      "density | TTFT × | TPOT × |", "|---:|---|" + "---:|" * (len(positions) + 6)]
            for value, label in pts:
                row = _row(summary, ALL, label) or {}
                lines.append(f"| {value} | {label} | " + " | ".join(
                    _f((_row(summary, p, label) or {}).get("score")) for p in positions) + " | " + " | ".join([
                        _f(row.get("score")), _ci(row.get("score_delta_ci")), _f(row.get("fidelity")),
                        _f(row.get("prefill_density"), "{:.2f}"), _speed(row, "ttft_speedup"), _speed(row, "tpot_speedup"),
                    ]) + " |")
    return "\n".join(lines) + "\n"


def _plot_name(spec: str, knob: str) -> str:
    safe = "".join(ch if ch.isalnum() else "-" for ch in spec)
    return f"sensitivity-{safe}-{knob}.png"


def _plots(summary: dict, out: Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = []
    for spec, knobs in summary["curves"].items():
        for knob, pts in knobs.items():
            fig = Figure(figsize=(9.5, 3.6), dpi=120)
            FigureCanvasAgg(fig)
            ax_q, ax_s = fig.subplots(1, 2)
            xs = list(range(len(pts)))
            for i, pos in enumerate(summary["positions"] + [ALL]):
                ys = [(_row(summary, pos, lab) or {}).get("score") for _, lab in pts]
                ax_q.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", color=f"C{i}",
                          linewidth=2.2 if pos == ALL else 1.2, label=f"score, {pos}")
            fid = [(_row(summary, ALL, lab) or {}).get("fidelity") for _, lab in pts]
            ax_q.plot(xs, [y if y is not None else float("nan") for y in fid], marker="s", linestyle="--",
                      color="black", label="fidelity (all)")
            ax_q.set_title(f"{spec}: quality vs {knob}")
            for key, marker, name in (("ttft_speedup", "o", "TTFT speedup"), ("tpot_speedup", "s", "TPOT speedup")):
                ys = [(_row(summary, ALL, lab) or {}).get(key) for _, lab in pts]
                ax_s.plot(xs, [y if y is not None else float("nan") for y in ys], marker=marker, label=name)
            ax_s.axhline(1.0, color="grey", linewidth=0.8)
            ax_s.set_title(f"{spec}: speed vs {knob} (× {summary['reference']})")
            for ax in (ax_q, ax_s):
                ax.set_xticks(xs, [str(v) for v, _ in pts])
                ax.set_xlabel(knob)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            names.append(_plot_name(spec, knob))
            fig.savefig(out / names[-1])
    return names


def apply_speed(summary: dict, speed: dict, source: str) -> None:
    """Replace the records' TTFT / TPOT ratios (forwards shared with other conversations in a
    benchmark run) by ratios measured side by side on an idle machine
    (`benchmarks/knob_speed.py`): its ``prefill`` entries give ``ttft_speedup``, its
    ``decode`` entries ``tpot_speedup``, by label; a label it does not measure shows none."""
    ttft = {label: r["ttft_speedup"] for label, r in speed.get("prefill", {}).items()}
    tpot = {label: r["tpot_speedup"] for label, r in speed.get("decode", {}).items()}
    if not ttft and not tpot:
        raise BenchError(f"{source}: no 'prefill' or 'decode' speed-ups (a benchmarks/knob_speed.py JSON?)")
    for row in summary["averages"]:
        if row["method"] != summary["reference"]:
            row["ttft_speedup"] = ttft.get(row["method"])
            row["tpot_speedup"] = tpot.get(row["method"])
    summary["speed_source"] = source
    summary["speed_settings"] = {k: speed.get(k) for k in ("dtype", "threads", "runs")}


def write_sensitivity(results: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                      reference: str = "dense", speed: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``sensitivity.md``, ``sensitivity.json`` and one PNG per knob curve.

    ``speed``: a `benchmarks/knob_speed.py` JSON whose side-by-side ratios replace the
    records' (see :func:`apply_speed`). All or nothing, like the report: rendered in a
    temporary folder, then moved.
    """
    records, source = load_many(results)
    summary = sensitivity_summary(records, reference=reference, source=source)
    if speed is not None:
        try:
            data = json.loads(Path(speed).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BenchError(f"--speed {speed}: {e}") from None
        apply_speed(summary, data, Path(speed).as_posix())
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sensitivity-", dir=out.parent))
    try:
        (tmp / "sensitivity.md").write_text(render_sensitivity(summary), encoding="utf-8")
        (tmp / "sensitivity.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        names = ["sensitivity.md", "sensitivity.json", *_plots(summary, tmp)]
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        for name in names:
            os.replace(tmp / name, out / name)
            written[name] = out / name
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
