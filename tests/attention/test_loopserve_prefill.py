"""Phase 1 inside the engine: every turn's incremental prefill goes through line selection."""

import pytest

from loopserve.engine import Engine, SamplingParams
from tests.conftest import TINY

TEXT = "Sparse attention picks lines: columns for sinks, diagonals for local context. " * 3
FORCE_SPARSE = {"min_keys": 0, "min_new": 0, "probe": 16, "dense_last": 4}


@pytest.mark.parametrize("name", TINY)
def test_alpha_one_equals_dense_in_every_turn(tiny_models, name):
    engine = Engine(tiny_models[name])
    dense = engine.new_session()
    ours = engine.new_session(method="loopserve+dense", knobs={**FORCE_SPARSE, "alpha": 1.0})
    for text in [TEXT, "What picks lines?", "And diagonals?"]:
        a = dense.chat(text, SamplingParams(max_new_tokens=10))
        b = ours.chat(text, SamplingParams(max_new_tokens=10))
        assert a.token_ids == b.token_ids
        assert b.stats.extra["prefill_density"] == pytest.approx(1.0, abs=1e-3)
        ours.messages = list(dense.messages)


def test_every_turn_is_sparsified_over_the_history(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    s = engine.new_session(method="loopserve", knobs={**FORCE_SPARSE, "alpha": 0.5, "budget": 4000})
    for text in [TEXT, TEXT[::-1], "Which words repeat?"]:
        r = s.chat(text, SamplingParams(max_new_tokens=6))
        assert r.stats.cached_tokens > 0 or len(s.turns) == 1
        assert 0 < r.stats.extra["prefill_density"] < 1.0  # incremental prefill went sparse
        assert r.stats.extra["probe_mass"] >= 0.5 - 1e-6


def test_short_inputs_fall_back_to_dense(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    s = engine.new_session(method="loopserve", knobs={"min_keys": 10_000})
    r = s.chat(TEXT, SamplingParams(max_new_tokens=4))
    assert r.stats.extra["prefill_density"] == 1.0


@pytest.mark.parametrize("knobs,msg", [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"probe": -1}, "probe")])
def test_invalid_phase1_knobs(knobs, msg):
    from loopserve.engine import resolve_method

    with pytest.raises(ValueError, match=msg):
        resolve_method("loopserve", knobs)


def test_dense_layers_attend_densely(tiny_models):
    """`dense_first_layers` / `dense_last_layers` make whole layers dense: all of them is dense
    attention token for token, one of them raises the density between sparse's and 1."""
    engine = Engine(tiny_models["tiny-llama"])
    layers = engine.num_layers
    assert layers >= 2

    def run(knobs):
        s = engine.new_session(method="loopserve+dense", knobs={**FORCE_SPARSE, "alpha": 0.5, **knobs})
        return s.chat(TEXT, SamplingParams(max_new_tokens=8))

    dense = engine.new_session().chat(TEXT, SamplingParams(max_new_tokens=8))
    for knobs in ({"dense_first_layers": layers}, {"dense_last_layers": layers}):
        r = run(knobs)
        assert r.token_ids == dense.token_ids and r.stats.extra["prefill_density"] == 1.0
    ids = engine.encode_messages([{"role": "user", "content": TEXT}])
    for knobs, dense_at in (({"dense_first_layers": 1}, {0}), ({"dense_last_layers": 1}, {layers - 1})):
        s = engine.new_session(method="loopserve+dense", knobs={**FORCE_SPARSE, "alpha": 0.5, **knobs})
        per_layer = s.prefill(ids).stats["prefill_density"]
        assert len(per_layer) == layers
        assert {i for i, d in enumerate(per_layer) if d == 1.0} == dense_at
