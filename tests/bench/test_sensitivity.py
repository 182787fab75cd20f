"""`loopserve bench sensitivity` and multi-file reports on hand-made labelled records."""

from __future__ import annotations

import json

import pytest

from loopserve.bench.commands import main
from loopserve.bench.report import write_report
from loopserve.bench.runner import BenchError
from loopserve.bench.sensitivity import knob_curves, sensitivity_summary, write_sensitivity

from .test_report import rec, write

BASE = {"alpha": 0.9, "budget": 1024, "n_d": 16}


def cfg_rec(label, spec, knobs, score, conv, turn=0, pos="back", ttft=1.0):
    return rec(label, "passkey", pos, turn, score, pred=f"{score}", conv=conv, method_spec=spec, knobs=knobs,
               config={**BASE, **knobs}, ttft=ttft)


def labelled_records():
    out = []
    for c in range(3):
        conv = f"passkey-{c}"
        out.append(cfg_rec("dense", "dense", {}, 1.0, conv, ttft=2.0) | {"config": {}})
        out.append(cfg_rec("loopserve", "loopserve", {}, 1.0, conv))
        out.append(cfg_rec("a08", "loopserve", {"alpha": 0.8}, 0.0, conv, ttft=0.5))
        out.append(cfg_rec("a095", "loopserve", {"alpha": 0.95}, 1.0, conv))
        out.append(cfg_rec("b256", "loopserve", {"budget": 256}, 0.5, conv))
        out.append(cfg_rec("mixed", "loopserve", {"alpha": 0.8, "budget": 256}, 0.0, conv))  # two knobs: no curve
    return out


def test_knob_curves_hold_the_base_and_single_knob_changes():
    s = sensitivity_summary(labelled_records())
    curves = s["curves"]["loopserve"]
    assert curves["alpha"] == [(0.8, "a08"), (0.9, "loopserve"), (0.95, "a095")]
    assert curves["budget"] == [(256, "b256"), (1024, "loopserve")]
    assert set(curves) == {"alpha", "budget"}  # "mixed" changes two knobs at once
    assert knob_curves({"x": {"spec": "snapkv", "knobs": {"budget": 8}, "config": {"budget": 8}}}) == {}


def test_sensitivity_files_and_numbers(tmp_path):
    results = write(tmp_path / "r.jsonl", labelled_records())
    written = write_sensitivity([results], tmp_path / "out")
    assert set(written) == {"sensitivity.md", "sensitivity.json", "sensitivity-loopserve-alpha.png",
                            "sensitivity-loopserve-budget.png"}
    md = (tmp_path / "out" / "sensitivity.md").read_text()
    assert "| a08 | loopserve | alpha=0.8 | 0.000 | **-1.000 [-1.000, -1.000]** |" in md
    assert "| 0.8 | a08 |" in md and "4.00×" in md  # TTFT 2.0 s for dense against 0.5 s
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert data["configs"]["b256"] == {"spec": "loopserve", "knobs": {"budget": 256}, "config": {**BASE, "budget": 256}}


def test_a_label_with_two_configurations_is_an_error(tmp_path):
    recs = labelled_records()
    recs.append(cfg_rec("a08", "loopserve", {"alpha": 0.7}, 0.0, "passkey-9"))
    with pytest.raises(BenchError, match="two configurations"):
        sensitivity_summary(recs)


def test_report_over_several_files_refuses_a_turn_twice(tmp_path, capsys):
    recs = labelled_records()
    a = write(tmp_path / "a.jsonl", [r for r in recs if r["method"] in ("dense", "loopserve")])
    b = write(tmp_path / "b.jsonl", [r for r in recs if r["method"] == "a08"])
    written = write_report([a, b], tmp_path / "out")
    summary = json.loads(written["summary.json"].read_text())
    assert summary["methods"] == ["dense", "loopserve", "a08"] and summary["source"] == "a.jsonl, b.jsonl"
    assert main(["report", "--results", str(a), str(a), "--out", str(tmp_path / "twice")]) == 2
    assert "also in an earlier results file" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_speed_file_replaces_the_records_ratios(tmp_path, capsys):
    """`--speed` puts side-by-side speed-ups (benchmarks/knob_speed.py) in the TTFT / TPOT
    columns by label; labels it does not measure show none; a file without them is named."""
    results = write(tmp_path / "r.jsonl", labelled_records())
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"dtype": "float32", "threads": 2, "prefill": {"a08": {"ttft_speedup": 1.7}, "loopserve": {"ttft_speedup": 1.4}},
                                 "decode": {"b256": {"tpot_speedup": 1.6}, "loopserve": {"tpot_speedup": 1.3}}}))
    out = tmp_path / "out"
    assert main(["sensitivity", "--results", str(results), "--out", str(out), "--speed", str(speed)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    rows = {r["method"]: r for r in data["averages"] if r["position"] == "all"}
    assert rows["a08"]["ttft_speedup"] == 1.7 and rows["a08"]["tpot_speedup"] is None
    assert rows["b256"]["tpot_speedup"] == 1.6 and rows["loopserve"]["ttft_speedup"] == 1.4
    assert rows["a095"]["ttft_speedup"] is None  # not measured: no ratio rather than the records'
    md = (out / "sensitivity.md").read_text()
    assert "1.70×" in md and "4.00×" not in md and "measured side by side" in md and "dtype float32" in md
    (tmp_path / "bad.json").write_text("{}")
    assert main(["sensitivity", "--results", str(results), "--out", str(tmp_path / "x"), "--speed",
                 str(tmp_path / "bad.json")]) == 2
    assert "no 'prefill' or 'decode' speed-ups" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rows_are_averaged_over_the_turns_every_configuration_ran():
    """The reference and the defaults ran more datasets than the ablation: those turns are
    left out of every row, so the rows compare like with like."""
    recs = labelled_records()
    extra = [rec(label, "nq", "front", 0, 0.0, pred="x", conv="nq-0", method_spec=spec, knobs={},
                 config={} if label == "dense" else dict(BASE))
             for label, spec in (("dense", "dense"), ("loopserve", "loopserve"))]
    s = sensitivity_summary(recs + extra)
    assert s["datasets"] == ["passkey"] and s["shared_turns"] == 3 and s["records_read"] == len(recs) + 2
    assert s == {**sensitivity_summary(recs), "records_read": len(recs) + 2}
    with pytest.raises(BenchError, match="every configuration"):
        sensitivity_summary(extra + [cfg_rec("a08", "loopserve", {"alpha": 0.8}, 0.0, "passkey-0")])
