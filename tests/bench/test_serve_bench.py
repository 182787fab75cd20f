"""`loopserve bench serve` on a tiny model: the report's fields and what they must satisfy
(timings on a tiny model mean nothing; the structure, the token counts and identity do)."""

from __future__ import annotations

import json

import pytest

from loopserve.bench.serve import run_serve
from loopserve.cli import main
from loopserve.engine import Engine
from loopserve.models import load_model


@pytest.fixture(scope="module")
def engine():
    return Engine(load_model("tiny-llama"), method="dense")


def test_serve_bench_reports_batched_and_one_at_a_time(engine):
    knobs = {"min_keys": 32, "min_new": 16, "budget": 16, "n_d": 2}
    r = run_serve(engine, sessions=3, turns=2, context=80, tokens=4, methods=("dense", "loopserve"), knobs=knobs, chunk_tokens=32)
    assert r["benchmark"] == "serve" and r["sessions"] == 3 and r["turns"] == 2 and r["dtype"] == "float32"
    assert r["identical"] is True
    for name in ("dense", "loopserve"):
        m = r["methods"][name]
        assert m["identical"] is True
        for run in ("batched", "one_at_a_time"):
            s = m[run]
            assert s["generated_tokens"] == 3 * 2 * 4
            assert s["throughput_tok_s"] == pytest.approx(s["generated_tokens"] / s["wall_s"], rel=0.01)
            assert 0 < s["ttft_p50_s"] <= s["ttft_p95_s"] and 0 < s["tpot_p50_ms"] <= s["tpot_p95_ms"]
        assert m["batched"]["max_batch"] == 3 and m["batched"]["forwards"] > 0
        ratio = m["batched"]["throughput_tok_s"] / m["one_at_a_time"]["throughput_tok_s"]
        assert m["throughput_speedup"] == pytest.approx(ratio, rel=0.01)
        # decode-only figures: one at a time every token after a turn's first is a decode step;
        # batched, only iterations without prefill count, so some tokens, never more
        assert m["one_at_a_time"]["decode_tokens"] == 3 * 2 * (4 - 1)
        assert 0 < m["batched"]["decode_tokens"] <= 3 * 2 * (4 - 1)
        assert m["batched"]["decode_tok_s"] > 0 and m["one_at_a_time"]["decode_tok_s"] > 0
        decode_ratio = m["batched"]["decode_tok_s"] / m["one_at_a_time"]["decode_tok_s"]
        assert m["decode_throughput_speedup"] == pytest.approx(decode_ratio, rel=0.01)
    assert r["throughput_tok_s"]["batched"] == r["methods"]["dense"]["batched"]["throughput_tok_s"]
    assert r["throughput_speedup"] == r["methods"]["dense"]["throughput_speedup"]
    assert r["decode_throughput_speedup"] == r["methods"]["dense"]["decode_throughput_speedup"]
    assert set(r["batched_tpot_advantage_over_dense"]) == {"loopserve"}
    for mode in ("batched", "one_at_a_time"):
        want = r["methods"]["loopserve"][mode]["decode_tok_s"] / r["methods"]["dense"][mode]["decode_tok_s"]
        assert r["decode_advantage_over_dense"]["loopserve"][mode] == pytest.approx(want, rel=0.01)


def test_serve_bench_command_prints_json(capsys):
    argv = ["bench", "serve", "--model", "tiny-llama", "--methods", "dense", "--sessions", "2", "--turns", "1",
            "--context", "40", "--tokens", "3", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["identical"] is True and r["methods"]["dense"]["batched"]["generated_tokens"] == 6
    assert set(r["throughput_tok_s"]) == {"batched", "one_at_a_time"} and r["throughput_speedup"] > 0


@pytest.mark.parametrize("extra,message", [(["--sessions", "0"], "--sessions must be >= 1"),
                                           (["--methods", "nope"], "unknown method 'nope'")])
def test_serve_bench_bad_input_is_named_before_loading(monkeypatch, capsys, extra, message):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr("loopserve.models.load_model", no_loading)
    assert main(["bench", "serve", "--model", "tiny-llama", *extra]) == 2
    assert message in capsys.readouterr().err
