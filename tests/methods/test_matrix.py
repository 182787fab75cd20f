"""Every registered prefill x decode pairing through a 3-turn conversation on the tiny models.

Budgets are tiny (16 tokens, 2 sinks, windows of 8) so that every compression actually fires
on the ~100-300 token byte-level prompts; each turn checks the KV sizes against the budgets.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from contextlib import redirect_stdout

import pytest

from loopserve.attention.base import PREFILL_METHODS
from loopserve.cache.base import DECODE_METHODS
from loopserve.cache.pyramidkv import pyramid_budgets
from loopserve.engine import Engine, SamplingParams, describe_methods, resolve_method
from loopserve.engine.registry import _load_builtins
from tests.conftest import TINY

_load_builtins()

BASELINE_PREFILL = ["ashape", "trishape", "minference"]
BASELINE_DECODE = ["streamingllm", "snapkv", "adakv", "pyramidkv", "h2o", "snapkv-rescored"]

# Small knobs, routed to whichever phase declares them.
KNOBS = dict(
    budget=16, window=8, sinks=2, recent=8, pool=3, every=2, n_d=2,  # KV methods
    local=16, dense_last=8, vertical_size=6, slash_size=20, last_q=8,  # prefill methods
    min_keys=32, min_new=16,  # LoopServe Phase 1: go sparse even on these short prompts
)
TURNS = [
    "The lighthouse keeper counted ships every night and wrote each name in a ledger by the window.",
    "A storm came from the north; the keeper lit the lamp early and waited for the fishing boats.",
    "Which boat came back first, and what did the keeper write?",
]
MAX_NEW = 6

PAIRS = sorted(itertools.product(PREFILL_METHODS, DECODE_METHODS))


def _knobs_for(prefill: str, decode: str) -> dict:
    fields = {f.name for f in dataclasses.fields(PREFILL_METHODS[prefill])}
    fields |= {f.name for f in dataclasses.fields(DECODE_METHODS[decode])}
    return {k: v for k, v in KNOBS.items() if k in fields}


def _check_budgets(decode: str, method, session, after_prefill: list[int], stats) -> None:
    k = KNOBS
    layers = session.cache.layers
    n_tok = len(session.token_ids)
    gen = stats.new_tokens
    lengths = [layer.length for layer in layers]
    active = [layer.active_tokens for layer in layers]
    assert n_tok > 4 * k["budget"], "the prompt must be long enough for compression to fire"
    if decode == "dense":
        assert lengths == [n_tok] * len(layers) and active == lengths
    elif decode == "loopserve":
        assert lengths == [n_tok] * len(layers)  # lossless store
        assert max(active) <= k["budget"] + k["sinks"] + k["recent"] + gen
    elif decode == "streamingllm":
        cap = k["sinks"] + k["window"]
        assert after_prefill == [cap] * len(layers)
        assert lengths == [cap] * len(layers)
    elif decode == "snapkv":
        assert after_prefill == [k["budget"]] * len(layers)
        assert max(lengths) <= k["budget"] + gen
    elif decode == "adakv":
        # Logical budget exact; physical = window + the largest head's count (padding).
        assert stats.extra["adakv_logical_tokens"] == pytest.approx(k["budget"])
        for i, layer_len in enumerate(after_prefill):
            counts = method.last_counts[i]
            assert int(counts.sum()) == (k["budget"] - k["window"]) * len(counts)
            assert layer_len == k["window"] + int(counts.max())
    elif decode == "pyramidkv":
        expected = pyramid_budgets(k["budget"], k["window"], len(layers), session.turns[-1].prompt_tokens, 20)
        assert after_prefill == expected
        assert sum(expected) == k["budget"] * len(layers)
        assert all(a > b for a, b in zip(expected, expected[1:])), expected
    elif decode == "h2o":
        assert after_prefill == [k["budget"]] * len(layers)
        assert lengths == [k["budget"]] * len(layers)
    elif decode == "snapkv-rescored":
        assert lengths == [n_tok] * len(layers)  # a view: the store stays lossless
        assert max(active) <= k["budget"] + gen
        if gen > k["every"]:  # enough forwarded decode steps for a re-selection this turn
            assert method.reselections > 0
    # Decode methods registered later (not known here) only have to finish.


@pytest.mark.parametrize("prefill,decode", PAIRS, ids=[f"{p}+{d}" for p, d in PAIRS])
def test_three_turn_conversation(tiny_models, prefill, decode):
    loaded = tiny_models[TINY[PAIRS.index((prefill, decode)) % len(TINY)]]
    engine = Engine(loaded, method=f"{prefill}+{decode}", knobs=_knobs_for(prefill, decode))
    session = engine.new_session()
    method = session.method.decode
    after_prefill: list[int] = []
    original = method.after_prefill

    def spy(ctx):
        after_prefill[:] = [layer.length for layer in ctx.cache.layers]
        original(ctx)

    method.after_prefill = spy
    for turn, text in enumerate(TURNS):
        result = session.chat(text, SamplingParams(max_new_tokens=MAX_NEW))
        assert result.stats.new_tokens >= 1 and result.stats.finish_reason in ("stop", "length")
        if turn > 0:
            assert result.stats.cached_tokens > 0, "later turns reuse the (possibly compressed) cache"
        _check_budgets(decode, method, session, after_prefill, result.stats)
        if prefill in BASELINE_PREFILL:
            assert 0.0 < result.stats.extra["prefill_density"] <= 1.0


def test_every_baseline_is_registered_and_described():
    rows = {(r["name"], r["phase"]): r["description"] for r in describe_methods()}
    for name in BASELINE_PREFILL:
        assert (name, "prefill") in rows
    for name in BASELINE_DECODE:
        assert (name, "decode") in rows
    for desc in rows.values():
        assert desc and "\n" not in desc
    for cls in [PREFILL_METHODS[n] for n in BASELINE_PREFILL] + [DECODE_METHODS[n] for n in BASELINE_DECODE]:
        assert cls.paper and "arXiv" in (cls.__doc__ or "") + cls.paper, cls


def test_cli_methods_json_lists_baselines():
    from loopserve.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["methods", "--json"]) == 0
    names = {r["name"] for r in json.loads(out.getvalue())}
    assert set(BASELINE_PREFILL + BASELINE_DECODE) <= names


def test_unknown_method_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'snapkvv'.*snapkv"):
        resolve_method("snapkvv")
    with pytest.raises(ValueError, match="unknown prefill method 'a-shape'"):
        resolve_method("a-shape+snapkv")
    with pytest.raises(ValueError, match="unknown decode method 'h20'"):
        resolve_method("ashape+h20")
    with pytest.raises(ValueError, match="unknown knob.*'heavy'.*valid knobs"):
        resolve_method("h2o", {"heavy": 3})


@pytest.mark.parametrize(
    "method,knobs,bad",
    [
        ("streamingllm", {"window": 0}, "window"),
        ("streamingllm", {"sinks": -1}, "sinks"),
        ("snapkv", {"budget": 0}, "budget"),
        ("snapkv", {"budget": 32, "window": 32}, "window"),
        ("snapkv", {"pool": 1.5}, "pool"),
        ("adakv", {"safeguard": 1.5}, "safeguard"),
        ("pyramidkv", {"beta": 0}, "beta"),
        ("h2o", {"budget": 8, "recent": 9}, "recent"),
        ("h2o", {"prefill_rows": -2}, "prefill_rows"),
        ("snapkv-rescored", {"every": 0}, "every"),
        ("ashape", {"local": 0}, "local"),
        ("trishape", {"dense_last": "64"}, "dense_last"),
        ("minference", {"vertical_size": 0}, "vertical_size"),
        ("minference", {"per_query_head": 1}, "per_query_head"),
        ("minference+snapkv", {"last_q": True}, "last_q"),
        ("loopserve", {"spike_history_only": 2}, "spike_history_only"),
        ("loopserve", {"spike_tau": 1.0}, "spike_tau"),
        ("loopserve", {"spike_dilate": -1}, "spike_dilate"),
        ("loopserve", {"dense_last": -1}, "dense_last"),
        ("loopserve+dense", {"dense_first": 1.5}, "dense_first"),
        ("loopserve", {"spike_row_cap": -8}, "spike_row_cap"),
        ("loopserve", {"dense_outliers": 2}, "dense_outliers"),
    ],
)
def test_invalid_knob_is_a_clear_error(method, knobs, bad):
    with pytest.raises(ValueError, match=f"invalid knob {bad}="):
        resolve_method(method, knobs)


def test_engine_fails_fast_on_invalid_knob(tiny_models):
    with pytest.raises(ValueError, match="invalid knob budget="):
        Engine(tiny_models["tiny-llama"], method="ashape+snapkv", knobs={"budget": -5})
