"""`loopserve bench build | run | report` on the tiny model: the CI smoke test of issue 6.

2 datasets x 1 conversation x 3 positions x (dense + one more method), context 2000
(the builder's minimum; 2000 bytes for the tiny byte-level tokenizer), answers capped
at 3 tokens. Then resume, interruption and bad-input behaviour.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loopserve.bench import POSITIONS, build_datasets, load_dataset
from loopserve.bench.commands import main
from loopserve.bench.runner import BenchError, Unit, check_fits, read_results, resolve_knobs
from loopserve.engine import method_names, resolve_method
from loopserve.models import resolve_dtype
from loopserve.engine import session as session_mod
from loopserve.models import load_tokenizer

DATASETS = ("passkey", "nq")
CONTEXT = 2000
CAP = 3
# dense and one other method (whichever baseline is registered), so relative columns exist.
SECOND = next((m for m in ("streamingllm", "snapkv", "loopserve") if m in method_names()), None)
METHODS = ["dense"] + ([SECOND] if SECOND else [])


def _count(tok):
    return lambda text: len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("bench-data")
    build_datasets(out, context_tokens=CONTEXT, seed=0, count_tokens=_count(tokenizer),
                   conversations_per_dataset=1, datasets=DATASETS)
    return out


def run_args(data: Path, out: Path, *, methods=METHODS, datasets=DATASETS, positions=POSITIONS,
             cap: int = CAP, extra: tuple = ()) -> list[str]:
    return [
        "run", "--model", "tiny-llama", "--methods", ",".join(methods), "--datasets", ",".join(datasets),
        "--positions", ",".join(positions), "--context", str(CONTEXT), "--limit", "1", "--data", str(data),
        "--out", str(out), "--max-new-tokens", str(cap), "--no-progress", *extra,
    ]


def turns_of(data_dir: Path, dataset: str) -> int:
    return len(load_dataset(data_dir / f"{dataset}.jsonl")[0]["turns"])


@pytest.fixture(scope="module")
def smoke(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("smoke")
    results = out / "results.jsonl"
    assert main(run_args(data_dir, results)) == 0
    report = out / "report"
    assert main(["report", "--results", str(results), "--out", str(report)]) == 0
    return results, report


@pytest.fixture
def chat_calls(monkeypatch) -> list:
    """Counts Session.chat calls (the warm-up call included)."""
    calls = []
    real = session_mod.Session.chat

    def counting(self, text, sampling=None):
        calls.append(self.method.name)
        return real(self, text, sampling)

    monkeypatch.setattr(session_mod.Session, "chat", counting)
    return calls


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _turn_recall_dense(tokenizer, tmp_path: Path) -> tuple[Path, Path]:
    """One turn_recall conversation per position built under tmp_path, and dense's records of
    it: (data folder, results file), the input the turn_recall scripts read."""
    data = tmp_path / "data"
    build_datasets(data, context_tokens=CONTEXT, seed=0, count_tokens=_count(tokenizer),
                   conversations_per_dataset=1, datasets=("turn_recall",))
    results = tmp_path / "results.jsonl"
    assert main(run_args(data, results, methods=["dense"], datasets=("turn_recall",))) == 0
    return data, results


def _load_script(name: str):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[name] = script  # dataclasses look their module up while the class is built
    spec.loader.exec_module(script)
    return script



# --------------------------------------------------------------------------- smoke


def test_smoke_run_writes_one_record_per_turn(smoke, data_dir, tokenizer):
    results, _ = smoke
    recs = records(results)
    per_unit = sum(turns_of(data_dir, d) for d in DATASETS) * len(POSITIONS)
    assert len(recs) == per_unit * len(METHODS)
    keys = {(r["method"], r["dataset"], r["conversation"], r["position"], r["turn"]) for r in recs}
    assert len(keys) == len(recs)
    assert {r["method"] for r in recs} == set(METHODS)
    assert {r["dataset"] for r in recs} == set(DATASETS)
    assert {r["position"] for r in recs} == set(POSITIONS)
    for r in recs:
        assert 0.0 <= r["score"] <= 1.0
        assert 1 <= r["new_tokens"] <= CAP and r["max_new_tokens"] == CAP
        assert r["ttft_s"] > 0 and r["tpot_s"] >= 0 and r["peak_rss_mb"] > 0
        assert r["active_kv_tokens"] > 0 and r["kv_bytes"] > 0
        assert r["model"] == "tiny-llama" and r["golds"] and isinstance(r["prediction"], str)
        assert r["dtype"] == resolve_dtype("auto") and r["threads"] >= 1  # the CLI's default numerics, resolved
        if r["method"] == "dense":
            assert r["prefill_density"] == 1.0
    # Honest history: each dense turn's prompt is the conversation so far with the model's
    # OWN answers (not the golds), and everything before the new message comes from the cache.
    for dataset in DATASETS:
        conv = load_dataset(data_dir / f"{dataset}.jsonl")[0]
        for pos in POSITIONS:
            unit = sorted((r for r in recs if r["method"] == "dense" and r["dataset"] == dataset
                           and r["position"] == pos), key=lambda r: r["turn"])
            assert [r["turn"] for r in unit] == list(range(len(conv["turns"])))
            messages = []
            for r, turn in zip(unit, conv["turns"]):
                messages.append({"role": "user", "content": turn["user"][pos]})
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                assert r["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
                assert r["golds"] == turn["answers"] and r["depends_on"] == turn["depends_on"]
                if r["turn"] > 0:
                    assert r["cached_tokens"] > 0
                messages.append({"role": "assistant", "content": r["prediction"]})


def test_smoke_report(smoke):
    _, report = smoke
    for name in ("report.md", "summary.json", "score_by_position.png", "latency.png"):
        assert (report / name).is_file(), name
    for name in ("score_by_position.png", "latency.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "## Headline" in md and "fidelity" in md and "![score by question position](score_by_position.png)" in md
    for d in DATASETS:
        assert f"### {d} (" in md
    for m in METHODS:
        assert f"| {m} |" in md or f"| **{m}** |" in md
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    assert summary["methods"] == METHODS and summary["reference"] == "dense"
    assert set(summary["datasets"]) == set(DATASETS) and summary["positions"] == list(POSITIONS)
    assert len(summary["cells"]) == len(DATASETS) * (len(POSITIONS) + 1) * len(METHODS)
    rows = {(r["position"], r["method"]): r for r in summary["averages"]}
    assert set(rows) == {(p, m) for p in (*POSITIONS, "all") for m in METHODS}
    assert rows[("all", "dense")]["fidelity"] == 1.0 and rows[("all", "dense")]["score_delta"] == 0.0
    if SECOND:
        other = rows[("all", SECOND)]
        assert 0.0 <= other["fidelity"] <= 1.0 and other["ttft_speedup"] > 0
        assert other["paired"] == rows[("all", "dense")]["turns"]


# --------------------------------------------------------------------------- resume


def test_rerun_skips_finished_units_and_leaves_the_file_identical(smoke, data_dir, tmp_path, chat_calls, capsys):
    results = tmp_path / "results.jsonl"
    shutil.copy(smoke[0], results)
    before = results.read_bytes()
    capsys.readouterr()
    assert main(run_args(data_dir, results, extra=("--threads", "1"))) == 0
    assert chat_calls == []
    assert results.read_bytes() == before
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["units_run"] == 0 and summary["threads"] == 1 and summary["dtype"] == resolve_dtype("auto")


def test_rerun_redoes_only_the_unfinished_unit(smoke, data_dir, tmp_path, chat_calls):
    results = tmp_path / "results.jsonl"
    lines = smoke[0].read_text(encoding="utf-8").splitlines(keepends=True)
    last = json.loads(lines[-1])
    unit = lambda r: (r["method"], r["dataset"], r["conversation"], r["position"])  # noqa: E731
    # Cut the last unit after its first turn, and end on a write cut short by a kill.
    kept = [ln for ln in lines if unit(json.loads(ln)) != unit(last) or json.loads(ln)["turn"] == 0]
    results.write_text("".join(kept) + '{"schema": 1, "method": "de', encoding="utf-8")
    assert main(run_args(data_dir, results)) == 0
    n = last["turns"]
    assert chat_calls == [resolve_method(last["method"]).name] * (n + 1)  # + 1 warm-up
    after = results.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(after) == len(lines)
    others = [ln for ln in lines if unit(json.loads(ln)) != unit(last)]
    assert after[: len(others)] == others  # finished units kept byte for byte
    redone = [json.loads(ln) for ln in after[len(others):]]
    assert [r["turn"] for r in redone] == list(range(n)) and all(unit(r) == unit(last) for r in redone)


def test_interrupted_run_loses_nothing(data_dir, tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    args = run_args(data_dir, results, methods=["dense"], datasets=["passkey"], positions=["front"])
    real = session_mod.Session.chat
    calls = []

    def interrupted(self, text, sampling=None):
        calls.append(1)
        if len(calls) == 4:  # warm-up, turn 0, turn 1, then Ctrl-C during turn 2
            raise KeyboardInterrupt
        return real(self, text, sampling)

    monkeypatch.setattr(session_mod.Session, "chat", interrupted)
    assert main(args) == 130
    partial = records(results)
    assert [r["turn"] for r in partial] == [0, 1]
    monkeypatch.setattr(session_mod.Session, "chat", real)
    assert main(args) == 0
    done = records(results)
    assert [r["turn"] for r in done] == list(range(turns_of(data_dir, "passkey")))
    # A complete last record that lost its newline: the next unit's records start on a new line.
    results.write_bytes(results.read_bytes().rstrip(b"\n"))
    more = run_args(data_dir, results, methods=["dense"], datasets=["passkey"], positions=["front", "middle"])
    assert main(more) == 0
    assert [(r["position"], r["turn"]) for r in records(results)] == [
        (p, t) for p in ("front", "middle") for t in range(len(done))
    ]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        ({"datasets": ["passkey", "nope"]}, "unknown datasets 'nope'"),
        ({"methods": ["dense", "no-such-method"]}, "unknown method 'no-such-method'"),
        ({"positions": ["front", "top"]}, "unknown positions 'top'"),
        ({"extra": ("--knob", "no_such_knob=1")}, "no_such_knob"),
        ({"extra": ("--knob", "dense:no_such_knob=1")}, "no_such_knob"),
        ({"cap": 2}, "max_new_tokens=3, this run has max_new_tokens=2"),
    ],
)
def test_bad_input_leaves_results_untouched(smoke, data_dir, tmp_path, capsys, chat_calls, change, message):
    results = tmp_path / "results.jsonl"
    shutil.copy(smoke[0], results)
    before = results.read_bytes()
    kw = {k: v for k, v in change.items()}
    assert main(run_args(data_dir, results, **kw)) == 2
    assert message in capsys.readouterr().err
    assert results.read_bytes() == before
    assert chat_calls == []


def test_malformed_dataset_line_is_an_error_naming_the_line(smoke, data_dir, tmp_path, capsys, chat_calls):
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    path = bad / "nq.jsonl"
    line = path.read_text(encoding="utf-8")
    path.write_text(line + line.replace('"turns": [', '"turns": 7, "x": ['), encoding="utf-8")  # line 2 broken
    results = tmp_path / "results.jsonl"
    shutil.copy(smoke[0], results)
    before = results.read_bytes()
    assert main(run_args(bad, results)) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err
    assert results.read_bytes() == before
    assert chat_calls == []


def test_malformed_results_line_is_an_error_naming_the_line(smoke, data_dir, tmp_path, capsys, chat_calls):
    results = tmp_path / "results.jsonl"
    lines = smoke[0].read_text(encoding="utf-8").splitlines(keepends=True)
    results.write_text(lines[0] + "{not json\n" + "".join(lines[1:]), encoding="utf-8")
    before = results.read_bytes()
    assert main(run_args(data_dir, results)) == 2
    assert f"{results}:2: invalid JSON" in capsys.readouterr().err
    assert results.read_bytes() == before
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists()
    assert chat_calls == []


def test_missing_dataset_file(tmp_path, capsys):
    assert main(run_args(tmp_path, tmp_path / "r.jsonl", methods=["dense"])) == 2
    assert "dataset file not found" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


# --------------------------------------------------------------------------- pieces


def test_build_command_is_deterministic_and_merges_manifest(data_dir, tmp_path):
    out = tmp_path / "built"
    base = ["build", "--context", str(CONTEXT), "--seed", "0", "--out", str(out), "--conversations", "1",
            "--tokenizer", "tiny-llama"]
    assert main(base + ["--datasets", "passkey"]) == 0
    assert main(base + ["--datasets", "nq"]) == 0
    for d in DATASETS:
        assert (out / f"{d}.jsonl").read_bytes() == (data_dir / f"{d}.jsonl").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["datasets"]) == set(DATASETS)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert main(base + ["--datasets", "nope"]) == 2


def test_knobs_are_routed_to_the_methods_that_declare_them():
    owner = next((m for m in method_names() if m != "dense" and resolve_method(m).knobs()), None)
    if owner is None:
        pytest.skip("no method with knobs registered")
    name, value = next(iter(resolve_method(owner).knobs().items()))
    assert resolve_knobs(["dense", owner], {name: value}) == {"dense": {}, owner: {name: value}}
    assert resolve_knobs(["dense", owner], None, {owner: {name: value}}) == {"dense": {}, owner: {name: value}}
    with pytest.raises(BenchError, match="not among --methods"):
        resolve_knobs(["dense"], None, {owner: {name: value}})


def test_check_fits_rejects_conversations_beyond_the_context_window(data_dir):
    conv = load_dataset(data_dir / "passkey.jsonl")[0]

    class Stub:
        max_context = 1000

        def encode_messages(self, messages):
            return [0] * sum(len(m["content"]) for m in messages)

    unit = Unit("dense", "passkey", conv, "back", {}, 16, "x")
    with pytest.raises(BenchError, match="context window of 1000"):
        check_fits(Stub(), [unit])
    Stub.max_context = 10**6
    check_fits(Stub(), [unit])


def test_read_results_drops_only_a_cut_last_line(smoke, tmp_path):
    text = smoke[0].read_text(encoding="utf-8")
    path = tmp_path / "r.jsonl"
    path.write_text(text + '{"method": "den', encoding="utf-8")
    rows, dropped = read_results(path, allow_truncated_tail=True)
    assert dropped and len(rows) == len(text.splitlines())
    with pytest.raises(BenchError, match=rf":{len(rows) + 1}: invalid JSON"):
        read_results(path)


def test_labels_run_several_configurations_of_one_method(data_dir, tmp_path):
    results = tmp_path / "labels.jsonl"
    args = run_args(data_dir, results, methods=["dense", "copy=dense", "bounded=loopserve"], datasets=["passkey"],
                    positions=["back"], extra=("--knob", "bounded:mode=bounded", "--knob", "bounded:memory_budget=64"))
    assert main(args) == 0
    recs = records(results)
    by = {}
    for r in recs:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == {"dense", "copy", "bounded"}
    assert {r["method_spec"] for r in by["copy"]} == {"dense"} and {r["method_spec"] for r in by["bounded"]} == {"loopserve"}
    assert all(r["knobs"] == {"mode": "bounded", "memory_budget": 64} for r in by["bounded"])
    # The label runs its spec: the copy of dense answers exactly as dense does.
    assert [r["prediction"] for r in by["copy"]] == [r["prediction"] for r in by["dense"]]
    # Resuming with the same labels runs nothing; a label bound to another spec is refused.
    assert main(args) == 0 and records(results) == recs
    changed = run_args(data_dir, results, methods=["dense", "copy=snapkv"], datasets=["passkey"], positions=["back"])
    assert main(changed) == 2


@pytest.mark.parametrize("entry, message", [
    ("x=nope", "unknown"), ("=dense", "bad method entry"), ("a:b=dense", "bad method entry"),
])
def test_bad_method_labels_are_rejected(entry, message):
    from loopserve.bench.runner import validate_methods

    with pytest.raises(BenchError, match=message):
        validate_methods(["dense", entry])
    with pytest.raises(BenchError, match="given twice"):
        validate_methods(["a=dense", "a=snapkv"])


def test_a_changed_default_does_not_mix_into_finished_results(data_dir, tmp_path):
    from loopserve.cache.snapkv import SnapKV

    results = tmp_path / "r.jsonl"
    args = run_args(data_dir, results, methods=["snapkv"], datasets=["passkey"], positions=["back"])
    assert main(args) == 0
    recs = records(results)
    assert recs[0]["config"]["budget"] == SnapKV.budget and recs[0]["knobs"] == {}
    # Records made when the default budget was another one (no knob given either time):
    # the same command refuses to mix them in, and rewrites nothing.
    for r in recs:
        r["config"]["budget"] += 1
    results.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    before = results.read_bytes()
    assert main(args) == 2
    assert results.read_bytes() == before


def test_a_knob_added_later_does_not_invalidate_finished_results(data_dir, tmp_path):
    """Records written before a knob existed lack it in `config`: a resume accepts them (the
    new knob's default is the old behaviour); a recorded knob that differs still refuses."""
    results = tmp_path / "r.jsonl"
    args = run_args(data_dir, results, methods=["snapkv"], datasets=["passkey"], positions=["back"])
    assert main(args) == 0
    recs = records(results)
    for r in recs:
        del r["config"]["budget"]
    results.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    before = results.read_bytes()
    assert main(args) == 0
    assert results.read_bytes() == before  # nothing redone, nothing dropped


# --------------------------------------------------------------------------- concurrency


def test_concurrent_run_records_the_same_answers_as_one_at_a_time(smoke, data_dir, tmp_path):
    """`--concurrency 4` plays four units at once through the scheduler: every turn's record
    is there once, with the same greedy answer as the one-at-a-time smoke run, and a resume
    of the finished file runs nothing."""
    results = tmp_path / "results.jsonl"
    assert main(run_args(data_dir, results, extra=("--concurrency", "4"))) == 0
    key = lambda r: (r["method"], r["dataset"], r["conversation"], r["position"], r["turn"])  # noqa: E731
    alone = {key(r): r for r in records(smoke[0])}
    batched = {key(r): r for r in records(results)}
    assert batched.keys() == alone.keys()
    assert all(batched[k]["prediction"] == alone[k]["prediction"] for k in alone)
    assert {r["concurrency"] for r in batched.values()} == {4}
    before = results.read_bytes()
    assert main(run_args(data_dir, results, extra=("--concurrency", "4"))) == 0
    assert results.read_bytes() == before


def test_bad_concurrency_is_refused_before_anything_runs(data_dir, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert main(run_args(data_dir, results, extra=("--concurrency", "0"))) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err and not results.exists()


def test_phase1_divergence_script_is_zero_for_an_exact_prefill(smoke, data_dir, tmp_path, monkeypatch, capsys):
    """benchmarks/phase1_divergence.py replays dense's answers: alpha = 1 is dense attention, so
    its distributions equal dense's; a sparse selection (alpha 0.3) prefills below density 1."""
    import sys

    results, _ = smoke
    script = _load_script("phase1_divergence")
    force = "loopserve+dense:min_keys=0,min_new=0,probe=8,local=4,spike_tau=0,dense_last=0"
    out = tmp_path / "div.jsonl"
    monkeypatch.setattr(sys, "argv", ["phase1_divergence", "--results", str(results), "--data", str(data_dir),
                                      "--datasets", "passkey", "--positions", "back", "--model", "tiny-llama",
                                      "--dtype", "float32", "--out", str(out), "--gold",
                                      "--configs", f"{force},alpha=1.0", f"{force},alpha=0.3"])
    script.main()
    recs = records(out)
    exact = [r for r in recs if r["config"].endswith("alpha=1.0")]
    sparse = [r for r in recs if r["config"].endswith("alpha=0.3")]
    assert len(exact) == len(sparse) == turns_of(data_dir, "passkey")
    for r in exact:
        assert r["top1"] == 1.0 and r["first"] and abs(r["kl"]) < 1e-4
    assert all(r["density"] < 1.0 for r in sparse)
    # --gold: on turns that depend on earlier ones the reference answer is scored too, and
    # re-prefilling the same turn for it gives dense's numbers again at alpha = 1 (up to the
    # kernel's fp32 rounding: all lines, summed in another order)
    gold = [r for r in exact if "gold_lp" in r]
    assert gold and len(gold) == sum(1 for r in sparse if "gold_lp" in r)
    for r in gold:
        assert abs(r["gold_lp"] - r["ref_gold_lp"]) < 1e-3 and r["gold_top1"] == r["ref_gold_top1"]
    # the whole user message is prefilled again by the configuration, as on its first pass
    assert all(r["gold_density"] == r["density"] < 1.0 for r in sparse if "gold_lp" in r)
    printed = capsys.readouterr().out
    assert "| prefill (dense decoding) |" in printed and "gold log-prob" in printed
    # and the turns after a gold turn are measured as without --gold (the sessions continue
    # from dense's answer, not the reference's)
    plain = tmp_path / "plain.jsonl"
    argv = [a for a in sys.argv if a != "--gold"]
    monkeypatch.setattr(sys, "argv", [str(plain) if a == str(out) else a for a in argv])
    script.main()
    key = lambda r: (r["config"], r["turn"])  # noqa: E731
    without = {key(r): r for r in records(plain)}
    assert any(r["turn"] > min(g["turn"] for g in gold) for r in sparse)
    for r in recs:
        assert r["kl"] == without[key(r)]["kl"] and r["density"] == without[key(r)]["density"]


def test_phase1_coverage_script_is_complete_at_alpha_one(tokenizer, tmp_path, monkeypatch, capsys):
    """benchmarks/phase1_coverage.py measures LoopServe's selection against dense attention on a
    turn_recall conversation: at alpha = 1 (nearly) every row's mass is covered, in every row
    region and position; at alpha 0.3 the rows lose much of it."""
    import sys

    data, results = _turn_recall_dense(tokenizer, tmp_path)
    script = _load_script("phase1_coverage")
    summaries = {}
    for alpha in ("1.0", "0.3"):
        out = tmp_path / f"cov-{alpha}.json"
        monkeypatch.setattr(sys, "argv", ["phase1_coverage", "--results", str(results), "--data", str(data),
                                          "--limit", "1", "--model", "tiny-llama", "--dtype", "float32",
                                          "--knobs", f"alpha={alpha},probe=8,local=4,spike_tau=0", "--out", str(out)])
        script.main()
        summaries[alpha] = json.loads(out.read_text())
        assert out.with_suffix(".png").stat().st_size > 0
    assert "| position | rows | coverage |" in capsys.readouterr().out
    mean_cov = {}
    for alpha, s in summaries.items():
        assert set(s["by_region"]) == set(POSITIONS)
        covs = [v for regions in s["by_region"].values() for keys in regions.values() for v in keys["coverage"].values()]
        mean_cov[alpha] = sum(covs) / len(covs)
        if alpha == "1.0":
            # every line a probe row touches is kept; rows that are not probed can still need a
            # slash offset no probe row reaches, so "almost all", not "all"
            assert min(covs) > 0.99
    assert mean_cov["0.3"] < mean_cov["1.0"] - 0.05
    # the measured turn sits on the whole conversation: every earlier answer is in its history
    turns = load_dataset(data / "turn_recall.jsonl")[0]["turns"]
    for case in summaries["1.0"]["cases"]:
        assert case["answers"] == len(turns) - 1 and case["history_tokens"] > 0
    from loopserve.attention.base import PREFILL_METHODS
    PREFILL_METHODS.pop("phase1-coverage", None)  # the script's diagnostic method: not for later tests


def test_knob_speed_script_times_every_ablation_label(tmp_path, monkeypatch, capsys):
    """benchmarks/knob_speed.py times dense and each ablation label side by side, and writes
    the JSON that `bench sensitivity --speed` reads (labels as in run_4k.sh)."""
    import sys

    script = _load_script("knob_speed")
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["knob_speed", "--model", "tiny-llama", "--runs", "1",
                                      "--history", "96", "--new", "32", "--context", "160", "--tokens", "3",
                                      "--out", str(out)])
    script.main()
    data = json.loads(out.read_text())
    assert set(data["prefill"]) == set(script.PREFILL) and set(data["decode"]) == set(script.DECODE)
    assert all(r["ttft_speedup"] > 0 and r["ttft_s"] > 0 for r in data["prefill"].values())
    assert all(r["tpot_speedup"] > 0 and r["tpot_ms"] > 0 for r in data["decode"].values())
    assert data["threads"] >= 1 and "| b256 |" in capsys.readouterr().out


class _Ctx:
    """The parts of the engine's per-forward context a prefill method reads."""

    num_layers = 1

    def __init__(self):
        self.layer_state = {0: {}}
        self.stats = {}

    def record(self, key, value):
        self.stats.setdefault(key, []).append(value)


def test_question_oracle_makes_exactly_the_question_rows_dense():
    """benchmarks/question_rows.py's diagnostic method: `dense_question=1` gives the question's
    rows dense attention and leaves the others sparse; `sparse_turns` picks which turns are
    sparse (the recall turn is the one holding the question)."""
    import torch

    from loopserve.attention.base import PREFILL_METHODS
    from loopserve.attention.dense import dense_attention

    script = _load_script("question_rows")
    try:
        g = torch.Generator().manual_seed(0)
        H, Hkv, n, N, D = 4, 2, 96, 160, 16
        q, k, v = (torch.randn(1, h, m, D, generator=g) for h, m in ((H, n), (Hkv, N), (Hkv, N)))
        ref = dense_attention(q, k, v, D**-0.5)
        off, a, b = N - n, 30, 42
        knobs = dict(alpha=0.3, min_keys=0, min_new=0, probe=8, local=4, spike_tau=0.0, dense_last=0)

        def run(**extra):
            method = script.QuestionOracle(**knobs, **extra)
            return method.attend(q, k, v, layer_idx=0, scaling=D**-0.5, ctx=_Ctx())

        script.QUESTION.update(span=(off + a, off + b), detect=False)
        sparse, oracle = run(), run(dense_question=1)
        err = lambda x: (x - ref).abs().amax(-1)[0]  # noqa: E731  (H, n)
        assert float(err(sparse)[:, a:b].max()) > 1e-3  # alpha 0.3 misses part of these rows' mass
        assert float(err(oracle)[:, a:b].max()) < 1e-5
        assert torch.equal(oracle[:, :, :a], sparse[:, :, :a]) and torch.equal(oracle[:, :, b:], sparse[:, :, b:])
        assert float(err(run(sparse_turns=2)).max()) < 1e-5  # the recall turn dense
        assert torch.equal(run(sparse_turns=1), sparse)
        script.QUESTION.update(span=(N + 10, N + 20))  # a turn before the recall turn
        assert float(err(run(sparse_turns=1)).max()) < 1e-5
        assert torch.equal(run(sparse_turns=2), sparse)
    finally:
        script.QUESTION.update(span=(0, 0), detect=False)
        PREFILL_METHODS.pop("question-oracle", None)  # the script's diagnostic method: not for later tests


def test_question_rows_script_replays_the_reference(tokenizer, tmp_path, monkeypatch, capsys):
    """benchmarks/question_rows.py replays turn_recall with the reference's answers as the
    history: replaying dense itself (one conversation at a time, as the reference ran)
    gives the reference's recall answers exactly; --detect records every layer."""
    import sys

    from loopserve.attention.base import PREFILL_METHODS

    data, results = _turn_recall_dense(tokenizer, tmp_path)
    script = _load_script("question_rows")
    out = tmp_path / "replay.jsonl"
    oracle = "question-oracle+dense:min_keys=0,min_new=0,probe=8,local=4,spike_tau=0,dense_question=1"
    try:
        monkeypatch.setattr(sys, "argv", ["question_rows", "--results", str(results), "--data", str(data),
                                          "--limit", "1", "--positions", "front,back", "--model", "tiny-llama",
                                          "--dtype", "float32", "--max-new-tokens", str(CAP), "--detect",
                                          "--configs", "dense", oracle, "--out", str(out)])
        script.main()
    finally:
        PREFILL_METHODS.pop("question-oracle", None)
    reference = {(r["conversation"], r["position"]): r for r in records(results) if r["metric"] == "substring"}
    recs = records(out)
    assert len(recs) == 4
    for r in recs:
        ref = reference[(r["conversation"], r["position"])]
        assert r["reference_found"] == ref["score"] and r["question_tokens"] > 0
        if r["config"] == "dense":
            assert r["answer"] == ref["prediction"] and r["found"] == ref["score"]
        else:
            layers = {d["layer"] for d in r["detect"]}
            assert len(layers) == len(r["detect"]) > 0
            assert all(0.0 <= x <= 1.0 for d in r["detect"] for x in d["outliers"] + d["history"])
    assert "| found the key |" in capsys.readouterr().out


def test_paired_fidelity_script_filters_turns_and_skips_empty_groups(tmp_path, monkeypatch, capsys):
    """benchmarks/paired_fidelity.py: with --datasets and --metric only those turns are paired
    (here the recall turns, where a finds 3 keys of 4 and b 1: Δ score +0.5), and a group with
    no turn left (independent turns) is left out instead of failing."""
    import sys

    rows = []
    for method, found in (("dense", [1, 1, 1, 0]), ("a", [1, 1, 1, 0]), ("b", [1, 0, 0, 0])):
        for c, f in enumerate(found):
            common = {"method": method, "dataset": "turn_recall", "conversation": f"tr-{c}", "position": "middle"}
            rows.append({**common, "turn": 0, "metric": "rouge", "depends_on": [], "score": 0.5,
                         "prediction": "a summary"})
            rows.append({**common, "turn": 1, "metric": "substring", "depends_on": [0], "score": float(f),
                         "prediction": "12345" if f else "no idea"})
            rows.append({**common, "dataset": "nq", "turn": 0, "metric": "f1", "depends_on": [], "score": 0.0,
                         "prediction": "x"})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    script = _load_script("paired_fidelity")
    monkeypatch.setattr(sys, "argv", ["paired_fidelity", "--reference", f"{results}:dense", f"{results}:a",
                                      f"{results}:b", "--datasets", "turn_recall", "--metric", "substring"])
    script.main()
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| all | 4 |" in table["all"] and "+0.500 [" in table["all"]
    assert "dependent" in table and "independent" not in table
    monkeypatch.setattr(sys, "argv", ["paired_fidelity", "--reference", f"{results}:dense", f"{results}:a", f"{results}:b"])
    script.main()
    assert "| all | 12 |" in capsys.readouterr().out  # every turn of both datasets
