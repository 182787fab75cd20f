"""The scheduler batches many conversations per forward, and greedy output stays token-identical
to the same conversations run alone (Session.chat), for every prefill and decode method.

Three conversations of different lengths, two turns each, are submitted together: their prefill
(chunked where the method allows it) is packed into the same forwards as the others' decode
steps. Budgets are the method matrix's tiny ones, so every compression fires.
"""

from __future__ import annotations

import pytest

from loopserve.attention.base import PREFILL_METHODS
from loopserve.cache.base import DECODE_METHODS
from loopserve.engine import Engine, SamplingParams
from loopserve.engine.registry import _load_builtins
from loopserve.engine.scheduler import Scheduler
from tests.conftest import TINY
from tests.methods.test_matrix import _knobs_for

_load_builtins()

CONVERSATIONS = [
    ["Hi there.", "And what about the weather today?"],
    ["The lighthouse keeper counted ships every night and wrote each name in a ledger by the window, "
     "then slept through the grey mornings while gulls argued on the rocks below.", "Which ship came first?"],
    ["A storm came from the north; the keeper lit the lamp early.", "Why early?"],
]
PARAMS = SamplingParams(max_new_tokens=4)
CHUNK = 48  # tokens of prefill per iteration: the long first turn takes several chunks

# Every decode method once, paired in turn with every prefill method, plus chunked eviction.
_P, _D = sorted(PREFILL_METHODS), sorted(DECODE_METHODS)
CASES = sorted({(_P[i % len(_P)], d) for i, d in enumerate(_D)} | {("dense", "streamingllm")})


def _alone(engine, pairs):
    out = []
    for method, knobs in pairs:
        session = engine.new_session(method=method, knobs=knobs)
        out.append([session.chat(text, PARAMS).token_ids for text in CONVERSATIONS[len(out)]])
    return out


def _batched(engine, pairs, **scheduler_kw):
    sched = Scheduler(engine, chunk_tokens=CHUNK, **scheduler_kw)
    sessions = [engine.new_session(method=m, knobs=k) for m, k in pairs]
    out = [[] for _ in sessions]
    for turn in range(2):
        seqs = []
        for s, conv in zip(sessions, CONVERSATIONS):
            messages = s.messages + [{"role": "user", "content": conv[turn]}]
            seqs.append(sched.submit(s, engine.encode_messages(messages), PARAMS, messages=messages))
        sched.run()
        for o, seq in zip(out, seqs):
            assert seq.status == "finished", seq.error
            assert seq.text == seq.result.text  # streamed exactly once
            o.append(seq.result.token_ids)
    return out, sched


@pytest.mark.parametrize("prefill,decode", CASES, ids=[f"{p}+{d}" for p, d in CASES])
def test_batched_greedy_output_matches_alone(tiny_models, prefill, decode):
    method = f"{prefill}+{decode}"
    engine = Engine(tiny_models[TINY[CASES.index((prefill, decode)) % len(TINY)]])
    pairs = [(method, _knobs_for(prefill, decode))] * len(CONVERSATIONS)
    got, sched = _batched(engine, pairs)
    assert got == _alone(engine, pairs)
    assert sched.stats.max_batch == len(CONVERSATIONS), "all conversations shared forwards"
    assert sched.stats.mixed_iterations > 0, "prefill was packed with other conversations' decode steps"
    # a turn's first token comes from a forward with prefill: decode-only iterations hold the rest at most
    assert 0 < sched.stats.decode_only_tokens < 2 * len(CONVERSATIONS) * PARAMS.max_new_tokens
    assert sched.stats.decode_only_s > 0
    long_turn = len(engine.encode_messages([{"role": "user", "content": CONVERSATIONS[1][0]}]))
    if engine.new_session(method=method, knobs=pairs[0][1]).method.chunkable_turn(long_turn, long_turn):
        assert sched.stats.forwards > 2 * (PARAMS.max_new_tokens + 1), "the long turn was prefilled in chunks"


def test_loopserve_turns_that_attend_densely_are_prefilled_in_chunks(tiny_models):
    """Below `min_keys` keys or `min_new` new rows Phase 1 attends densely in every layer, and
    so does every chunk of such a turn: the scheduler splits it as it splits dense's (no
    long prefill stalls the others' decoding) with the same output. A turn that Phase 1
    selects lines for, or a Phase 2 that selects from the prefill's rows, is not split."""
    engine = Engine(tiny_models["tiny-llama"])
    pairs = [("loopserve", {})] * len(CONVERSATIONS)
    got, sched = _batched(engine, pairs)
    assert got == _alone(engine, pairs)
    assert sched.stats.forwards > 2 * (PARAMS.max_new_tokens + 1), "the long turn was prefilled in chunks"
    n = len(engine.encode_messages([{"role": "user", "content": CONVERSATIONS[1][0]}]))
    assert engine.new_session(method="loopserve").method.chunkable_turn(n, n)
    sparse = engine.new_session(method="loopserve", knobs={"min_keys": 32, "min_new": 16}).method
    assert not sparse.chunkable_turn(n, n)
    assert sparse.chunkable_turn(8, n), "few new rows: dense"
    assert not engine.new_session(method="loopserve", knobs={"first": "probe"}).method.chunkable_turn(n, n)


def test_different_methods_share_one_batch(tiny_models):
    engine = Engine(tiny_models["tiny-qwen2"])
    pairs = [(f"{p}+{d}", _knobs_for(p, d)) for p, d in [("loopserve", "loopserve"), ("dense", "dense"), ("minference", "adakv")]]
    got, sched = _batched(engine, pairs)
    assert got == _alone(engine, pairs)
    assert sched.stats.max_batch == len(pairs)


def test_admission_and_preemption_respect_the_kv_budget(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    pairs = [("dense", {})] * len(CONVERSATIONS)
    expected = _alone(engine, pairs)
    # Room for no turn at all: one still runs at a time (progress), never two in a forward.
    got, sched = _batched(engine, pairs, kv_budget_bytes=1)
    assert got == expected and sched.stats.max_batch == 1 and sched.stats.preemptions == 0
    # Room for every turn's reservation, but not for the capacity the caches grow to:
    # newer turns are preempted and rerun, and stream nothing twice.
    seqs_bytes = sum(len(engine.encode_messages([{"role": "user", "content": c[0]}])) + PARAMS.max_new_tokens
                     for c in CONVERSATIONS) * engine.kv_bytes_per_token
    got, sched = _batched(engine, pairs, kv_budget_bytes=seqs_bytes)
    assert got == expected and sched.stats.preemptions > 0 and sched.stats.max_batch > 1


def test_cancel_restores_the_session_and_spares_the_others(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    sched = Scheduler(engine, chunk_tokens=CHUNK)
    keep, drop = engine.new_session(), engine.new_session()
    drop.chat("first turn", PARAMS)
    before = list(drop.token_ids)
    a = sched.submit(keep, engine.encode_messages([{"role": "user", "content": CONVERSATIONS[1][0]}]), PARAMS)
    b = sched.submit(drop, before + engine.encode_messages([{"role": "user", "content": "more"}]), PARAMS)
    with pytest.raises(ValueError, match="already has a turn"):
        sched.submit(drop, before + [5], PARAMS)
    while not b.turn or b.turn.prefilling:
        sched.step()
    sched.cancel(b)
    sched.run()
    assert b.status == "cancelled" and drop.token_ids == before and drop.cache.resident_tokens == len(before)
    alone = engine.new_session().chat(CONVERSATIONS[1][0], PARAMS)
    assert a.status == "finished" and a.result.token_ids == alone.token_ids


@pytest.mark.parametrize("kw", [{"chunk_tokens": 0}, {"max_running": "2"}, {"kv_budget_bytes": -1}])
def test_bad_scheduler_settings_are_named(tiny_models, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Scheduler(Engine(tiny_models["tiny-llama"]), **kw)
