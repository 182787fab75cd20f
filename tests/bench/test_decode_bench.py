"""`loopserve bench decode` on a tiny model: the report's fields and what they must satisfy
(timings on a tiny model mean nothing; the structure and the selection counts do)."""

from __future__ import annotations

import pytest

from loopserve import threads
from loopserve.bench.decode import run_decode
from loopserve.engine import Engine
from loopserve.models import load_model


@pytest.fixture(scope="module")
def engine():
    return Engine(load_model("tiny-llama"), method="dense")


def test_decode_bench_reports_dense_ours_floor_and_selection(engine):
    r = run_decode(engine, 600, budget=64, tokens=21, runs=1, n_d=4, new_tokens=8)
    for key in ("context", "dense_tpot_ms", "loopserve_tpot_ms", "speedup", "active_kv_tokens", "resident_kv_bytes",
                "floor_tpot_ms", "ceiling_speedup", "transformers_dense_tpot_ms"):
        assert key in r
    assert r["dense_tpot_ms"] > 0 and r["loopserve_tpot_ms"] > 0
    assert r["threads"] == threads.budget() and r["dtype"] == "float32"
    # The report rounds every figure to 0.01: the speed-up is computed before rounding, so it may
    # differ from the ratio of the rounded times by the rounding of all three (propagated).
    d, ours = r["dense_tpot_ms"], r["loopserve_tpot_ms"]
    slack = 0.005 + (d / ours) * (0.005 / d + 0.005 / ours) * 1.01
    assert abs(r["speedup"] - d / ours) <= slack
    # 20 decode steps (the first token comes from the prefill), one re-selection per n_d = 4.
    assert r["reselections_per_layer"] == 5
    # Phase 2 attends to budget + sinks + recent input keys plus what it generated, never more.
    assert r["active_kv_tokens"] <= 64 + 4 + 32 + 21
    assert r["floor_context"] < r["context"] / 4
    # The whole store stays resident (lossless mode): prompt + generated tokens.
    cfg = engine.model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert r["resident_kv_bytes"] >= (r["context"] + 20) * per_token


def test_decode_bench_rejects_contexts_past_the_model_limit(engine):
    with pytest.raises(ValueError, match="exceeds the model"):
        run_decode(engine, engine.max_context, tokens=8, runs=1)
