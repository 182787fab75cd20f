"""Phase 2 (progressive KV selection during decoding): defining properties."""

import pytest
import torch

from loopserve.cache.loopserve import probe_rows
from loopserve.engine import Engine, SamplingParams
from tests.conftest import TINY

LONG = "The river carried stories from the mountains to the sea, one stone at a time. " * 4
SMALL = dict(budget=16, n_d=4, sinks=2, recent=4)


def _layers_view(session):
    return [layer.view_idx for layer in session.cache.layers]


def _record_view_changes(session) -> list[bool]:
    """Per decode step (layer 0): did the step's observe_decode change the active selection?"""
    changes = []
    real = session.method.decode.observe_decode

    def spy(ctx, layer_idx, q, layer):
        before = None if layer.view_idx is None else layer.view_idx.clone()
        real(ctx, layer_idx, q, layer)
        if layer_idx == 0:
            after = layer.view_idx
            changes.append(after is not None and (before is None or after.shape != before.shape or not torch.equal(after, before)))

    session.method.decode.observe_decode = spy
    return changes


@pytest.mark.parametrize("name", TINY)
def test_budget_covering_history_decodes_exactly_dense(tiny_models, name):
    engine = Engine(tiny_models[name])
    dense = engine.new_session()
    ours = engine.new_session(method="loopserve", knobs={"budget": 4000, "n_d": 4})
    for text in [LONG, "And then?", "Why so?"]:
        a = dense.chat(text, SamplingParams(max_new_tokens=12))
        b = ours.chat(text, SamplingParams(max_new_tokens=12))
        assert a.token_ids == b.token_ids
        ours.messages = list(dense.messages)  # identical histories, even past a divergence


def test_reselection_happens_exactly_every_n_d_tokens(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    session = engine.new_session(method="loopserve", knobs=SMALL)
    layers = engine.num_layers
    decode = session.method.decode
    views_seen = _record_view_changes(session)
    r = session.chat(LONG, SamplingParams(max_new_tokens=18, ignore_eos=True))  # random weights may pick EOS
    assert r.stats.finish_reason == "length" and r.stats.new_tokens == 18
    steps = r.stats.new_tokens - 1  # the first token comes from the prefill
    assert decode.reselections == (steps // SMALL["n_d"]) * layers
    # The selection changes exactly at steps n_d, 2 n_d, ... (1-based) and not in between.
    assert [i + 1 for i, c in enumerate(views_seen) if c] == list(range(SMALL["n_d"], steps + 1, SMALL["n_d"]))


def test_generated_sinks_and_recent_are_always_kept(tiny_models):
    engine = Engine(tiny_models["tiny-qwen2"])
    session = engine.new_session(method="loopserve", knobs=SMALL)
    r = session.chat(LONG, SamplingParams(max_new_tokens=14))
    n_in = r.stats.prompt_tokens
    for layer in session.cache.layers:
        view = layer.view_idx
        assert view is not None, "a long input must be compressed"
        for head in view:
            kept = set(head.tolist())
            assert set(range(SMALL["sinks"])) <= kept
            assert set(range(n_in - SMALL["recent"], n_in)) <= kept
            assert set(range(n_in, layer.length)) <= kept  # every generated token
            assert len([i for i in kept if i < n_in]) == SMALL["budget"] + SMALL["sinks"] + SMALL["recent"]
    assert r.stats.active_kv_tokens < r.stats.kv_tokens


def test_bounded_mode_respects_memory_budget_over_five_turns(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    budget = 96
    session = engine.new_session(method="loopserve", knobs={**SMALL, "mode": "bounded", "memory_budget": budget})
    cfg = engine.model.config
    per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 4
    for turn in range(5):
        r = session.chat(f"Turn {turn}: " + LONG[: 120], SamplingParams(max_new_tokens=10))
        assert r.stats.kv_bytes <= budget * per_token
        assert all(layer.length <= budget for layer in session.cache.layers)
        assert r.stats.new_tokens > 0
    # Positions keep counting: the logical length is the whole conversation, not the budget.
    assert session.cache.get_seq_length() == len(session.token_ids) > budget


def test_lossless_mode_can_reselect_a_token_dropped_earlier(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    session = engine.new_session(method="loopserve", knobs=SMALL)
    session.chat(LONG, SamplingParams(max_new_tokens=9))
    session.chat("Now something different: " + LONG[::-1][:150], SamplingParams(max_new_tokens=9))
    dropped = []
    for layer in session.cache.layers:
        n = layer.length
        kept = [set(h.tolist()) for h in layer.view_idx]
        dropped.append([set(range(n)) - k for k in kept])
    full = [layer.length for layer in session.cache.layers]
    session.chat("Back to the river: what did it carry?", SamplingParams(max_new_tokens=9))
    revived = 0
    for li, layer in enumerate(session.cache.layers):
        assert layer.length > full[li]  # lossless: nothing was evicted
        for h, head in enumerate(layer.view_idx):
            revived += len(dropped[li][h] & set(head.tolist()))
    assert revived > 0


def test_probe_rows_spread_over_the_input():
    rows = probe_rows(4000, seed=0)
    assert len(rows) >= 80
    quartiles = torch.bucketize(rows, torch.tensor([1000, 2000, 3000]))
    assert set(quartiles.tolist()) == {0, 1, 2, 3}
    assert torch.equal(rows, probe_rows(4000, seed=0))


@pytest.mark.parametrize("knobs,msg", [({"n_d": 0}, "n_d"), ({"mode": "lossy"}, "mode"), ({"budget": -5}, "budget")])
def test_invalid_knobs_are_rejected(tiny_models, knobs, msg):
    engine = Engine(tiny_models["tiny-llama"])
    with pytest.raises(ValueError, match=msg):
        engine.new_session(method="loopserve", knobs=knobs)


def test_first_interval_ablation_knob(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    dense = engine.new_session().chat(LONG, SamplingParams(max_new_tokens=12)).token_ids
    s = engine.new_session(method="loopserve", knobs={**SMALL, "first": "dense"})
    r = s.chat(LONG, SamplingParams(max_new_tokens=12))
    # Dense until the first re-scoring (end of decode step n_d): the first n_d + 1 tokens are dense's.
    assert r.token_ids[: SMALL["n_d"] + 1] == dense[: SMALL["n_d"] + 1]
    for first in ("probe", "window"):
        s = engine.new_session(method="loopserve", knobs={**SMALL, "first": first})
        s.chat(LONG, SamplingParams(max_new_tokens=2))  # one decode step: the prefill's selection is active
        assert all(layer.view_idx is not None for layer in s.cache.layers), first
    with pytest.raises(ValueError, match="first="):
        engine.new_session(method="loopserve", knobs={"first": "last"})


def test_first_rescoring_after_n_first_tokens_then_every_n_d(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    knobs = {**SMALL, "first": "dense", "n_first": 2}
    s = engine.new_session(method="loopserve", knobs=knobs)
    changes = _record_view_changes(s)
    s.chat(LONG, SamplingParams(max_new_tokens=12))
    assert [i + 1 for i, c in enumerate(changes) if c] == [2, 6, 10]  # n_first, then every n_d = 4


@pytest.mark.parametrize("name", TINY)
def test_views_read_by_index_give_the_same_tokens_as_copied_views(tiny_models, name):
    """The engine's caches keep a selection as store indices when its decode attention reads
    rows by index; the copied compact view must decode the same tokens."""
    engine = Engine(tiny_models[name])
    assert engine.new_cache().index_views == engine._index_views
    answers = {}
    for index_views in (True, False):
        engine._index_views = index_views
        session = engine.new_session(method="loopserve", knobs=SMALL)
        answers[index_views] = [session.chat(text, SamplingParams(max_new_tokens=12)).token_ids
                                for text in [LONG, "And then?"]]
        layer = session.cache.layers[0]
        assert layer.index_views == index_views and layer.view_idx is not None  # a selection was made
        assert (layer.view_rows is not None) == index_views
    assert answers[True] == answers[False]


def test_index_view_keeps_indices_returns_the_store_and_rejects_bad_rows():
    from loopserve.cache.session_cache import SessionLayer

    layer = SessionLayer(index_views=True)
    k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    layer.update(k, v)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        layer.set_view(torch.tensor([[0, 10], [1, 2]]))
    layer.set_view(torch.tensor([[0, 3, 7], [1, 2, 9]]))
    keys, values = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert keys.shape[2] == 11 and torch.equal(keys[..., :10, :], k)  # the store, not a copy
    rows, tail = layer.view_rows
    assert rows.tolist() == [[0, 3, 7], [1, 2, 9]] and tail == 10
    assert layer.active_tokens == 4 and layer.view_idx[:, -1].tolist() == [10, 10]
    layer.clear_view()
    assert layer.view_rows is None and layer.active_tokens == 11


@pytest.mark.parametrize("index_views", [True, False])
def test_a_view_since_a_token_keeps_every_token_from_there_on(index_views):
    from loopserve.cache.session_cache import SessionLayer

    layer = SessionLayer(index_views=index_views)
    k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    layer.update(k, v)
    with pytest.raises(IndexError, match="since=11"):
        layer.set_view(torch.tensor([[0, 1], [1, 2]]), since=11)
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        layer.set_view(torch.tensor([[0, 8], [1, 2]]), since=8)  # row 8 is in the kept tail already
    layer.set_view(torch.tensor([[0, 3, 7], [1, 2, 5]]), since=8)
    assert layer.active_tokens == 5 and layer.view_idx.tolist() == [[0, 3, 7, 8, 9], [1, 2, 5, 8, 9]]
    keys, values = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert layer.active_tokens == 6 and layer.view_idx[:, -3:].tolist() == [[8, 9, 10]] * 2
    if not index_views:  # the compact copy holds exactly those rows
        torch.testing.assert_close(keys[0, 1, :3], k[0, 1, [1, 2, 5]])
        assert keys.shape[2] == 6
