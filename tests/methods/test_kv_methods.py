"""The defining behaviour of each KV / decode baseline, on hand-built caches and on a tiny model."""

from __future__ import annotations

import pytest
import torch

from loopserve.cache.session_cache import SessionCache
from loopserve.engine import Engine, SamplingParams, resolve_method
from loopserve.engine.hook import TurnContext

H, H_KV, D = 4, 2, 16
SCALE = D**-0.5
BIG = 8.0  # makes a planted key dominate a query's softmax


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def _orthogonal_pair(seed):
    u, v = _unit(2, D, seed=seed)
    v = v - (v @ u) * u
    return u, v / v.norm()


def _prefill(method_name, knobs, keys, q, n_new, values=None):
    """Run one layer's prefill hook on a cache holding `keys` (1, H_KV, N, D), new rows last."""
    method = resolve_method(method_name, knobs).decode
    cache = SessionCache(1)
    n_total = keys.shape[2]
    ctx = TurnContext(cache, None, method, q_start=n_total - n_new, input_end=n_total, num_layers=1)
    ctx.scaling = SCALE
    method.begin_turn(ctx)
    layer = cache.layers[0]
    layer.update(keys, values if values is not None else torch.randn_like(keys))
    method.observe_prefill(ctx, 0, q, layer.keys)
    method.after_prefill(ctx)
    return method, ctx, layer


def _decode_step(method, ctx, layer, q, key=None, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    k = key.view(1, 1, 1, D).expand(1, H_KV, 1, D) if key is not None else torch.randn(1, H_KV, 1, D, generator=g)
    ctx.q_start = layer.next_position
    layer.update(k.contiguous(), torch.randn(1, H_KV, 1, D, generator=g))
    method.observe_decode(ctx, 0, q.view(1, 1, 1, D).expand(1, H, 1, D).contiguous(), layer)


def _positions(layer):
    return [set(row.tolist()) for row in layer.positions]


def _active_positions(layer):
    idx = layer.view_idx if layer.view_idx is not None else torch.arange(layer.length).expand(H_KV, -1)
    return [set(layer.positions[h, idx[h]].tolist()) for h in range(H_KV)]


# -- StreamingLLM ---------------------------------------------------------------------------


def test_streamingllm_keeps_exactly_sinks_plus_recent_window(tiny_models):
    engine = Engine(tiny_models["tiny-qwen2"], method="streamingllm", knobs={"sinks": 3, "window": 10})
    session = engine.new_session()
    for text in ["A long first message about tides and harbours and the boats in them.", "And a second one, also long enough."]:
        session.chat(text, SamplingParams(max_new_tokens=6))
        n = len(session.token_ids)
        expected = list(range(3)) + list(range(n - 10, n))
        for layer in session.cache.layers:
            assert layer.length == 13
            for h in range(layer.positions.shape[0]):
                assert layer.positions[h].tolist() == expected


# -- SnapKV ---------------------------------------------------------------------------------


def _snapkv_setup(seed=0):
    """64 keys, 40 new rows; window queries point at key 5, the other new rows at key 20."""
    n_total, n_new, window = 64, 40, 8
    u, v = _orthogonal_pair(seed)
    keys = torch.randn(1, H_KV, n_total, D, generator=torch.Generator().manual_seed(seed)) * 0.3
    keys[0, :, 5] = BIG * u
    keys[0, :, 20] = BIG * (v - u)  # huge for queries along v, tiny for queries along u
    q = torch.randn(1, H, n_new, D, generator=torch.Generator().manual_seed(seed + 1)) * 0.3
    q[0, :, : n_new - window] += BIG * v  # outside the observation window: all attend key 20
    q[0, :, n_new - window :] += BIG * u  # the observation window attends key 5
    return keys, q, n_new, dict(budget=16, window=window, pool=1)


def test_snapkv_selection_depends_only_on_the_observation_window():
    keys, q, n_new, knobs = _snapkv_setup()
    _, _, layer = _prefill("snapkv", knobs, keys, q, n_new)
    kept = _positions(layer)
    assert layer.length == 16  # evicted to the budget
    for h in range(H_KV):
        assert 5 in kept[h]  # what the window attends to
        assert 20 not in kept[h]  # ignored although every earlier new row attends to it
        assert set(range(56, 64)) <= kept[h]  # the window itself

    # Replacing every query outside the window changes nothing.
    q2 = q.clone()
    q2[0, :, : n_new - 8] = torch.randn(H, n_new - 8, D, generator=torch.Generator().manual_seed(7)) * 3
    _, _, layer2 = _prefill("snapkv", knobs, keys, q2, n_new)
    assert torch.equal(layer2.positions, layer.positions)

    # Pointing the window's queries elsewhere does change it (the test is not vacuous).
    q3 = q.clone()
    q3[0, :, n_new - 8 :] = q[0, :, : 8]  # window now looks like the earlier rows (at key 20)
    _, _, layer3 = _prefill("snapkv", knobs, keys, q3, n_new)
    assert all(20 in s for s in _positions(layer3))


# -- AdaKV ----------------------------------------------------------------------------------


def test_adakv_per_head_counts_differ_and_sum_to_the_layer_budget():
    n_total, n_new, window, budget = 80, 40, 8, 24
    u, _ = _orthogonal_pair(3)
    keys = torch.randn(1, H_KV, n_total, D, generator=torch.Generator().manual_seed(3)) * 0.3
    keys[0, 0, [4, 9]] = BIG * u  # KV head 0: two keys take all the attention
    q = torch.zeros(1, H, n_new, D)
    q[0, :2] = u  # query heads 0-1 (KV head 0): peaked on keys 4 and 9
    q[0, :2] *= BIG
    # Query heads 2-3 (KV head 1) stay zero: flat attention, every key scores the same.
    method, ctx, layer = _prefill("adakv", dict(budget=budget, window=window, pool=1), keys, q, n_new)
    counts = method.last_counts[0]
    assert int(counts.sum()) == (budget - window) * H_KV  # the layer's budget, shared
    assert counts[0] < counts[1]  # the peaked head needs fewer tokens than the flat one
    assert int(counts.min()) >= int(0.2 * (budget - window))  # safeguard
    # Storage: every head padded to the largest count, reported as the physical size.
    assert layer.length == window + int(counts.max())
    assert ctx.stats["adakv_logical_tokens"] == [pytest.approx(budget)]
    assert ctx.stats["adakv_physical_tokens"] == [window + int(counts.max())]
    assert {4, 9} <= _positions(layer)[0]


# -- PyramidKV ------------------------------------------------------------------------------


def test_pyramidkv_budgets_shrink_with_depth():
    method = resolve_method("pyramidkv").decode
    budgets = method.layer_budgets(30, 8000)
    assert all(a > b for a, b in zip(budgets, budgets[1:]))
    assert sum(budgets) == 1024 * 30  # mean = budget
    assert budgets[-1] == 32 + round(992 / 20)  # top layer: (budget - window) / beta + window
    # A short input: the bottom layer keeps it all, the mean stays the budget.
    short = method.layer_budgets(30, 1500)
    assert short[0] == 1500 and sum(short) == 1024 * 30
    assert all(a >= b for a, b in zip(short, short[1:]))


def test_pyramidkv_layers_keep_less_with_depth(tiny_models):
    engine = Engine(tiny_models["tiny-qwen3"], method="pyramidkv", knobs={"budget": 20, "window": 4})
    session = engine.new_session()
    result = session.chat("Depth matters: lower layers keep more of this long message than upper ones. " * 2,
                          SamplingParams(max_new_tokens=4))
    forwarded = len(session.token_ids) - result.stats.prompt_tokens
    lengths = [layer.length - forwarded for layer in session.cache.layers]
    assert lengths[0] > lengths[1] > lengths[2]
    assert sum(lengths) == 20 * len(lengths)


# -- H2O ------------------------------------------------------------------------------------


def _h2o_setup(seed=4):
    n = 64
    u, v = _orthogonal_pair(seed)
    keys = torch.randn(1, H_KV, n, D, generator=torch.Generator().manual_seed(seed)) * 0.3
    keys[0, :, 5] = BIG * u  # the heavy hitter
    keys[0, :, 30] = -BIG * u  # never attended
    q = torch.randn(1, H, n, D, generator=torch.Generator().manual_seed(seed + 1)) * 0.3 + BIG * u
    return keys, q, n, u


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    keys, q, n, u = _h2o_setup()
    method, ctx, layer = _prefill("h2o", dict(budget=16, recent=6), keys, q, n)
    assert layer.length == 16
    for kept in _positions(layer):
        assert 5 in kept and 30 not in kept
        assert set(range(n - 6, n)) <= kept
    # The accumulators are the exact column sums of the prefill attention.
    logits = torch.einsum("hqd,hkd->hqk", q[0], keys[0].repeat_interleave(H // H_KV, 0)) * SCALE
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    col = torch.softmax(logits, -1).sum(1).view(H_KV, H // H_KV, n).sum(1)
    torch.testing.assert_close(method.accumulated(0), col.gather(1, layer.positions), rtol=1e-4, atol=1e-4)

    # Decoding: one eviction per step keeps the budget, the heavy hitter and the newest tokens.
    for step in range(8):
        _decode_step(method, ctx, layer, BIG * u, seed=step)
        assert layer.length == 16
        last = layer.next_position
        for kept in _positions(layer):
            assert 5 in kept and set(range(last - 6, last)) <= kept


def test_h2o_prefill_row_sampling_is_an_approximation_that_keeps_the_heavy_hitter():
    keys, q, n, _ = _h2o_setup(seed=9)
    _, _, layer = _prefill("h2o", dict(budget=16, recent=6, prefill_rows=8), keys, q, n)
    assert layer.length == 16 and all(5 in kept for kept in _positions(layer))


# -- SnapKV re-scored ------------------------------------------------------------------------


def test_snapkv_rescored_reselects_every_n_steps_from_generated_queries():
    keys, q, n_new, _ = _snapkv_setup(seed=11)
    u, v = _orthogonal_pair(11)
    knobs = dict(budget=12, window=8, pool=1, every=4)
    method, ctx, layer = _prefill("snapkv-rescored", knobs, keys, q, n_new)
    assert layer.length == 64  # a view: nothing evicted
    first = _active_positions(layer)
    assert all(5 in s and 20 not in s for s in first)  # SnapKV's window choice

    # Generated tokens that attend key 20: no change until the 4th step, then 20 is selected.
    for step in range(3):
        _decode_step(method, ctx, layer, BIG * v, seed=step)
        assert all(20 not in s for s in _active_positions(layer))
    assert method.reselections == 0
    _decode_step(method, ctx, layer, BIG * v, seed=3)
    assert method.reselections == 1
    active = _active_positions(layer)
    assert all(20 in s for s in active)
    assert layer.active_tokens == 12 + 4  # budget input tokens + this turn's generated ones
    assert all(set(range(64, 68)) <= s for s in active)

    # Four more steps attending key 5 bring it back: the full store is still there.
    for step in range(4, 8):
        _decode_step(method, ctx, layer, BIG * u, seed=step)
    assert method.reselections == 2
    assert all(5 in s for s in _active_positions(layer))
    assert layer.length == 72
