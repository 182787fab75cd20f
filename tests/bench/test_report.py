"""`loopserve bench report` on hand-made records: the arithmetic, the tables, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopserve.bench.commands import main
from loopserve.bench.report import PLOTS, fidelity, headline_table, load_results, summarize, write_report
from loopserve.bench.runner import BenchError, ResultsFormatError


def rec(method, dataset, pos, turn, score, pred="answer", ttft=1.0, tpot=0.1, new=5, conv=None, **kw) -> dict:
    r = {
        "schema": 1, "method": method, "dataset": dataset, "conversation": conv or f"{dataset}-0000",
        "position": pos, "turn": turn, "turns": 4, "metric": "f1", "score": score, "prediction": pred,
        "golds": ["gold"], "ttft_s": ttft, "tpot_s": tpot, "new_tokens": new,
        "prefill_density": 1.0 if method == "dense" else 0.25, "active_kv_tokens": 100, "kv_bytes": 2**20,
        "peak_rss_mb": 500.0, "max_new_tokens": 8, "model": "tiny-llama", "dtype": "float32", "knobs": {},
        "context_tokens": 2000,
    }
    r.update(kw)
    return r


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def by(summary, position, method, dataset=None):
    rows = summary["averages"] if dataset is None else [c for c in summary["cells"] if c["dataset"] == dataset]
    return next(r for r in rows if r["position"] == position and r["method"] == method)


def test_relative_columns_are_computed_on_paired_turns():
    records = [
        rec("dense", "qasper", "back", 0, 1.0, "the cat sat", ttft=2.0, tpot=0.2),
        rec("dense", "qasper", "back", 1, 0.0, "on the mat", ttft=2.0, tpot=0.2),
        rec("fast", "qasper", "back", 0, 0.0, "the cat sat", ttft=1.0, tpot=0.1),
        rec("fast", "qasper", "back", 1, 0.0, "something else", ttft=1.0, tpot=0.1),
        # unpaired: dense has no turn 2, so it counts in the method's mean, not in the deltas
        rec("fast", "qasper", "back", 2, 1.0, "x", ttft=50.0, tpot=5.0),
    ]
    s = summarize(records)
    assert s["methods"] == ["dense", "fast"] and s["reference"] == "dense"
    row = by(s, "back", "fast", "qasper")
    assert row["turns"] == 3 and row["paired"] == 2
    assert row["score"] == pytest.approx(1 / 3)
    assert row["score_delta"] == pytest.approx(-0.5)
    assert row["ttft_speedup"] == pytest.approx(2.0)
    assert row["tpot_speedup"] == pytest.approx(2.0)
    assert row["fidelity"] == pytest.approx((1.0 + fidelity("something else", "on the mat")) / 2)
    assert row["prefill_density"] == 0.25
    ref = by(s, "back", "dense", "qasper")
    assert (ref["score_delta"], ref["fidelity"], ref["ttft_speedup"]) == (0.0, 1.0, 1.0)


def test_fidelity_is_rouge_l_with_empty_answers_agreeing():
    assert fidelity("", "  ") == 1.0
    assert fidelity("a b c", "a b c") == 1.0
    assert fidelity("", "a b") == 0.0
    assert 0.0 < fidelity("a b c d", "a b x y") < 1.0


def test_averages_weigh_each_dataset_equally_and_tpot_needs_two_tokens():
    records = [rec("dense", "qasper", "front", t, 1.0, conv="qasper-0000") for t in range(4)]
    records += [rec("dense", "nq", "front", 0, 0.0, tpot=0.0, new=1)]
    s = summarize(records)
    row = by(s, "front", "dense")
    assert row["score"] == pytest.approx(0.5)  # not 4/5
    assert row["datasets"] == 2 and row["turns"] == 5
    assert row["tpot_s"] == pytest.approx(0.1)  # the 1-token turn has no TPOT
    assert [c["dataset"] for c in s["cells"]][:1] == ["qasper"]  # registry order


def test_headline_table_is_method_by_position():
    records = []
    for i, pos in enumerate(("front", "middle", "back")):
        records.append(rec("dense", "nq", pos, 0, 1.0, ttft=2.0))
        records.append(rec("loopserve", "nq", pos, 0, 0.5 * i, ttft=1.0))
    table = headline_table(summarize(records))
    lines = table.splitlines()
    assert lines[0].startswith("| method | front | middle | back | mean | Δ vs dense [95% CI] | fidelity | agree | TTFT | TPOT |")
    assert lines[2].startswith("| **dense** | 1.000 | 1.000 | 1.000 | 1.000 | ref | ref | ref |")
    # One conversation: the interval is degenerate; it excludes zero, so the Δ is bold.
    assert lines[3].startswith("| loopserve | 0.000 | 0.500 | 1.000 | 0.500 | **-0.500 [-0.500, -0.500]** | 1.000 | 1.00 | 1000 ms (2.00×)")


def test_source_path_in_the_report_is_relative(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    results = write(tmp_path / "runs" / "r.jsonl", [rec("dense", "nq", "back", 0, 1.0)])
    monkeypatch.chdir(tmp_path)
    write_report(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["source"] == "runs/r.jsonl"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # outside the working directory: the file name only
    write_report(results, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "from `r.jsonl`" in md and str(tmp_path) not in md


def test_write_report_files(tmp_path):
    records = [rec(m, d, p, 0, 0.5) for m in ("dense", "snapkv") for d in ("nq", "passkey")
               for p in ("front", "middle", "back")]
    results = write(tmp_path / "results.jsonl", records)
    out = tmp_path / "docs" / "results"
    written = write_report(results, out)
    assert set(written) == {"report.md", "summary.json", *PLOTS}
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    assert [p.name for p in (tmp_path / "docs").iterdir()] == ["results"]  # no temp folder left
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "### nq (f1, 1 conversation(s))" in md and "### passkey" in md
    assert "| **all** | snapkv | 3 | 0.500 | +0.000 | 1.000 |" in md
    for section in ("## Quality by position, with 95% intervals", "## Turns that depend on earlier turns",
                    "## Which datasets carry signal"):
        assert section in md
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["records"] == len(records) and summary["settings"]["models"] == ["tiny-llama (float32)"]


def test_report_without_dense_has_no_relative_columns(tmp_path):
    results = write(tmp_path / "r.jsonl", [rec("snapkv", "nq", "back", 0, 1.0)])
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert s["reference"] is None and by(s, "all", "snapkv")["fidelity"] is None
    assert "No dense records" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", ":2: invalid JSON"),
        ("", ":2: blank line"),
        (json.dumps({"method": "dense"}), ":2: missing field 'dataset'"),
        (json.dumps(rec("dense", "nq", "top", 0, 1.0)), ":2: position 'top'"),
        (json.dumps(rec("dense", "nq", "back", 1, "high")), ":2: field 'score'"),
        (json.dumps(rec("dense", "nq", "back", 0, 1.0)), ":2: duplicate record"),
    ],
)
def test_malformed_results_line_names_the_line_and_writes_nothing(tmp_path, capsys, bad, message):
    good = json.dumps(rec("dense", "nq", "back", 0, 1.0))
    results = tmp_path / "r.jsonl"
    results.write_text(good + "\n" + bad + "\n" + good.replace('"turn": 0', '"turn": 2') + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ResultsFormatError, match=message):
        write_report(results, out)
    assert not out.exists()
    # An existing report is left as it was.
    out.mkdir()
    (out / "report.md").write_text("old", encoding="utf-8")
    assert main(["report", "--results", str(results), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_or_empty_results(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        load_results(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(BenchError, match="no records"):
        load_results(tmp_path / "empty.jsonl")


def test_report_methods_selects_labels(tmp_path, capsys):
    """`--methods` reports the finished configurations of files that also hold an unfinished
    one; a label not in the files is named, with the ones that are."""
    records = [rec(m, "nq", p, 0, 0.5) for m in ("dense", "snapkv", "adakv") for p in ("front", "back")]
    results = write(tmp_path / "results.jsonl", records)
    out = tmp_path / "report"
    assert main(["report", "--results", str(results), "--out", str(out), "--methods", "dense,snapkv"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["records"] == 4 and {r["method"] for r in summary["averages"]} == {"dense", "snapkv"}
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "x"), "--methods", "dense,h2o"]) == 2
    assert "--methods h2o: not in the results (they hold adakv, dense, snapkv)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_datasets_selects_rows_and_signal(tmp_path, capsys):
    """`--datasets` reports some datasets; `signal` keeps those where the reference clearly
    beats a content-free answer; an unknown name is named, with the ones present."""
    records = [rec(m, d, p, 0, score if m == "dense" else score / 2, conv=f"{d}-{c:04d}", golds=[f"{d}{c}"])
               for m in ("dense", "snapkv") for p in ("front", "back") for c in range(3)
               for d, score in (("nq", 0.9), ("qasper", 0.0))]
    results = write(tmp_path / "results.jsonl", records)
    for arg, kept in (("qasper", {"qasper"}), ("signal", {"nq"}), ("nq,qasper", {"nq", "qasper"})):
        out = tmp_path / f"report-{arg}"
        assert main(["report", "--results", str(results), "--out", str(out), "--datasets", arg]) == 0
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert set(summary["datasets"]) == kept and summary["records"] == 12 * len(kept)
        assert "Datasets selected" in (out / "report.md").read_text(encoding="utf-8")
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "x"), "--datasets", ","]) == 2
    assert "--datasets: no dataset named" in capsys.readouterr().err
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "x"), "--datasets", "nq,squad"]) == 2
    assert "--datasets squad: not in the results (they hold nq, qasper)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
