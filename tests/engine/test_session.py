import pytest
import torch

from loopserve.engine import ContextLengthError, Engine, SamplingParams
from tests.conftest import TINY, generate_reference, reference_copy

USER_TURNS = ["Hello, who are you?", "Tell me a short fact about the sea.", "And one about mountains, please."]


def _assert_matches_generate(loaded, max_new_tokens, method="dense", knobs=None):
    engine = Engine(loaded, method=method, knobs=knobs)
    ref = reference_copy(loaded)
    session = engine.new_session()
    for turn, text in enumerate(USER_TURNS):
        result = session.chat(text, SamplingParams(max_new_tokens=max_new_tokens))
        # Ground truth: generate() on the full, re-tokenised history at every turn.
        ids = engine.encode_messages(session.messages[:-1])
        expected = generate_reference(ref, ids, max_new_tokens, engine.eos_ids)
        assert result.token_ids == expected, f"turn {turn + 1} diverged from model.generate()"
        if turn > 0:
            assert result.stats.cached_tokens > 0, "later turns must reuse the cached history"
    return session


@pytest.mark.parametrize("name", TINY)
def test_three_turns_match_generate_tiny(tiny_models, name):
    _assert_matches_generate(tiny_models[name], max_new_tokens=12)


def test_three_turns_match_generate_default_model(default_model):
    session = _assert_matches_generate(default_model, max_new_tokens=24)
    # On the real model the answer re-tokenises to the same ids: only new tokens are prefilled.
    t2, t3 = session.turns[1], session.turns[2]
    assert t2.cached_tokens >= session.turns[0].prompt_tokens + session.turns[0].new_tokens - 1
    assert t3.prefill_tokens < t3.prompt_tokens / 2


def _incremental_vs_full(loaded, split):
    engine = Engine(loaded)
    session = engine.new_session()
    ids = engine.encode_messages([{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}])
    full = reference_copy(loaded)(torch.tensor([ids])).logits[0]
    from loopserve.engine.hook import TurnContext

    m = session.method
    ctx = TurnContext(session.cache, m.prefill, m.decode, q_start=0, num_layers=engine.num_layers)
    first = engine.forward(ids[:split], session.cache, ctx, all_logits=True)
    ctx.q_start = split
    rest = engine.forward(ids[split:], session.cache, ctx, all_logits=True)
    inc = torch.cat([first, rest])
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_incremental_prefill_logits_match_full_tiny(tiny_models, name):
    _incremental_vs_full(tiny_models[name], split=17)


def test_incremental_prefill_logits_match_full_default(default_model):
    _incremental_vs_full(default_model, split=40)


def _state(session):
    return (list(session.token_ids), [dict(m) for m in session.messages], session.cache.resident_tokens, len(session.turns))


@pytest.mark.parametrize(
    "text,params,error",
    [
        ("", SamplingParams(), "empty message"),
        ("   \n", SamplingParams(), "empty message"),
        ("x" * 5000, SamplingParams(), "context window"),
        ("hi", SamplingParams(temperature=-1.0), "temperature"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_k=-3), "top_k"),
        ("hi", SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ("hi", SamplingParams(stop=[""]), "stop"),
    ],
)
def test_bad_input_leaves_session_unchanged_and_usable(tiny_models, text, params, error):
    engine = Engine(tiny_models["tiny-llama"])
    session = engine.new_session()
    session.chat("first turn", SamplingParams(max_new_tokens=5))
    before = _state(session)
    with pytest.raises(ValueError, match=error) as info:
        session.chat(text, params)
    if error == "context window":
        assert isinstance(info.value, ContextLengthError)
    assert _state(session) == before
    # Still usable, and it continues exactly as an untouched session would.
    after = session.chat("second turn", SamplingParams(max_new_tokens=6))
    twin = engine.new_session()
    twin.chat("first turn", SamplingParams(max_new_tokens=5))
    assert after.token_ids == twin.chat("second turn", SamplingParams(max_new_tokens=6)).token_ids


def test_failure_mid_turn_rolls_back_cache(tiny_models, monkeypatch):
    engine = Engine(tiny_models["tiny-llama"])
    session = engine.new_session()
    session.chat("first turn", SamplingParams(max_new_tokens=5))
    before = _state(session)
    real_forward = engine.forward
    calls = {"n": 0}

    def flaky(ids, cache, ctx, all_logits=False):
        calls["n"] += 1
        if calls["n"] == 3:  # fail during decoding, after the prefill
            raise RuntimeError("boom")
        return real_forward(ids, cache, ctx, all_logits)

    monkeypatch.setattr(engine, "forward", flaky)
    with pytest.raises(RuntimeError):
        session.chat("second turn", SamplingParams(max_new_tokens=8))
    monkeypatch.setattr(engine, "forward", real_forward)
    assert session.messages == before[1]
    assert len(session.token_ids) == session.cache.resident_tokens <= len(before[0])
    twin = engine.new_session()
    twin.chat("first turn", SamplingParams(max_new_tokens=5))
    assert session.chat("second turn", SamplingParams(max_new_tokens=6)).token_ids == twin.chat("second turn", SamplingParams(max_new_tokens=6)).token_ids


def test_no_reuse_path_gives_same_tokens_and_prefills_everything(tiny_models):
    engine = Engine(tiny_models["tiny-qwen2"])
    reuse, naive = engine.new_session(), engine.new_session(reuse_kv=False)
    for text in USER_TURNS:
        a = reuse.chat(text, SamplingParams(max_new_tokens=8))
        naive.messages = list(reuse.messages[:-2])
        b = naive.chat(text, SamplingParams(max_new_tokens=8))
        assert a.token_ids == b.token_ids
        assert b.stats.cached_tokens == 0 and b.stats.prefill_tokens == b.stats.prompt_tokens


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    p = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50)
    a = engine.new_session().chat("hi", SamplingParams(seed=1, **p)).token_ids
    b = engine.new_session().chat("hi", SamplingParams(seed=1, **p)).token_ids
    c = engine.new_session().chat("hi", SamplingParams(seed=2, **p)).token_ids
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    greedy = engine.new_session().chat("hi", SamplingParams(max_new_tokens=10)).token_ids
    topk1 = engine.new_session().chat("hi", SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=3)).token_ids
    assert greedy == topk1


def test_ignore_eos_decodes_past_end_of_sequence(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    first = engine.new_session().chat("hi", SamplingParams(max_new_tokens=6)).token_ids
    engine.eos_ids = set(engine.eos_ids) | {first[0]}  # the very first token now ends the answer
    stopped = engine.new_session().chat("hi", SamplingParams(max_new_tokens=6))
    assert stopped.token_ids == [] and stopped.stats.finish_reason == "stop"
    full = engine.new_session().chat("hi", SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert full.token_ids == first and full.stats.finish_reason == "length"
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos="yes").validate()


def test_stream_deltas_concatenate_to_text_and_stop_strings_cut(default_model):
    engine = Engine(default_model)
    session = engine.new_session()
    stream = session.stream("Count from 1 to 20, separated by commas.", SamplingParams(max_new_tokens=40))
    deltas = list(stream)
    assert len(deltas) > 3
    assert "".join(deltas) == stream.result.text
    full = stream.result.text
    assert "5" in full
    stopped = engine.new_session().chat("Count from 1 to 20, separated by commas.", SamplingParams(max_new_tokens=40, stop=["5"]))
    assert stopped.stats.finish_reason == "stop"
    assert "5" not in stopped.text and full.startswith(stopped.text)


def test_stats_are_reported(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    session = engine.new_session()
    r = session.chat("hello", SamplingParams(max_new_tokens=6))
    s = r.stats
    assert s.prefill_tokens == s.prompt_tokens > 0 and s.cached_tokens == 0
    assert s.ttft_s > 0 and s.new_tokens == len(r.token_ids)
    assert s.kv_tokens == len(session.token_ids)
    cfg = engine.model.config
    assert s.kv_bytes == s.kv_tokens * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 4
    assert s.finish_reason in ("stop", "length")


def test_held_back_text_is_flushed_at_the_end(default_model):
    # A stop string that never occurs makes the stream hold back its last characters; they
    # must still arrive when the answer ends (EOS or length).
    engine = Engine(default_model)
    for max_new in (6, 64):
        stream = engine.new_session().stream("Say hello.", SamplingParams(max_new_tokens=max_new, stop=["@@@@@@@@"]))
        text = "".join(stream)
        r = stream.result
        assert text == r.text == engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_fork_and_prefill_are_public_lifecycle_operations(tiny_models):
    engine = Engine(tiny_models["tiny-llama"])
    p = SamplingParams(max_new_tokens=6)
    base = engine.new_session()
    base.chat("first turn", p)
    before = list(base.token_ids)
    child = base.fork()
    assert child.token_ids == before and child is not base
    assert child.allocated_bytes > 0 and child.cache.resident_tokens == len(before)
    # The fork continues exactly as the original would, and leaves the original untouched.
    a = child.stream_ids(before + [10, 11, 12], p)
    b = base.stream_ids(before + [10, 11, 12], p)
    for stream in (a, b):
        for _ in stream:
            pass
    assert a.result.token_ids == b.result.token_ids
    assert a.result.stats.cached_tokens == len(before)
    with pytest.raises(ValueError, match="cannot fork"):
        base.fork(len(base.token_ids) + 1)
    # prefill() appends history without generating; the next turn reuses all of it.
    fresh = engine.new_session()
    fresh.prefill(before)
    assert fresh.token_ids == before
    c = fresh.stream_ids(before + [10, 11, 12], p)
    for _ in c:
        pass
    assert c.result.token_ids == b.result.token_ids and c.result.stats.cached_tokens == len(before)


def test_prefill_returns_logits_and_the_methods_diagnostics():
    from loopserve.engine import Engine
    from loopserve.models import load_model

    engine = Engine(load_model("tiny-llama"), method="dense")
    ids = engine.encode_messages([{"role": "user", "content": "a prefill that returns its logits " * 4}])
    dense = engine.new_session(method="dense")
    last = dense.prefill(ids).logits
    every = engine.new_session(method="dense").prefill(ids, all_logits=True).logits
    assert every.shape[0] == len(ids) and torch.allclose(every[-1:], last, atol=1e-5)
    sparse = engine.new_session(method="loopserve+dense", knobs={"min_keys": 0, "min_new": 0, "probe": 8})
    stats = sparse.prefill(ids).stats
    assert len(stats["prefill_density"]) == engine.num_layers and all(0 < d <= 1 for d in stats["prefill_density"])
    assert sparse.token_ids == ids and dense.prefill([]) is None
