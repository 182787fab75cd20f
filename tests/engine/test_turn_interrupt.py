"""Ctrl-C during an answer: the turn is dropped, the conversation before it stays usable."""

import pytest

from loopserve.engine import Engine, SamplingParams

GREEDY = SamplingParams(max_new_tokens=6)


def _state(session):
    return [dict(m) for m in session.messages], len(session.turns)


def _assert_kept(session, before, tokens_before):
    assert _state(session) == before  # the conversation: messages and finished turns
    # The cache may have given back the tail the new prompt did not share (it is re-prefilled
    # next turn), but it holds exactly `token_ids`, a prefix of what it held.
    assert session.token_ids == tokens_before[: len(session.token_ids)]
    assert all(layer.length == len(session.token_ids) for layer in session.cache.layers)


def _next_answer_after(engine, first_turns, text):
    """The greedy answer to `text` in a fresh session that played `first_turns` only."""
    fresh = engine.new_session()
    for t in first_turns:
        fresh.chat(t, GREEDY)
    return fresh.chat(text, GREEDY).token_ids


def test_interrupt_inside_the_model_keeps_the_earlier_turns(tiny_models, monkeypatch):
    engine = Engine(tiny_models["tiny-llama"])
    session = engine.new_session()
    session.chat("Hello there.", GREEDY)
    before, tokens_before = _state(session), list(session.token_ids)

    forward = Engine.forward
    calls = {"n": 0}

    def interrupted_forward(self, ids, cache, ctx, all_logits=False):
        calls["n"] += 1
        if calls["n"] == 3:  # the second decode step of the turn: as if Ctrl-C hit mid-answer
            raise KeyboardInterrupt
        return forward(self, ids, cache, ctx, all_logits)

    monkeypatch.setattr(Engine, "forward", interrupted_forward)
    with pytest.raises(KeyboardInterrupt):
        for _ in session.stream("Tell me more.", GREEDY):
            pass
    monkeypatch.setattr(Engine, "forward", forward)

    _assert_kept(session, before, tokens_before)
    # The cache holds exactly the first turn: the next answer is what a fresh session gives.
    assert session.chat("Something else.", GREEDY).token_ids == _next_answer_after(engine, ["Hello there."], "Something else.")


def test_interrupt_between_tokens_keeps_the_earlier_turns(tiny_models):
    engine = Engine(tiny_models["tiny-qwen2"])
    session = engine.new_session()
    session.chat("Hello there.", GREEDY)
    before, tokens_before = _state(session), list(session.token_ids)

    stream = session.stream("Tell me more.", SamplingParams(max_new_tokens=12, ignore_eos=True))
    next(stream)  # the answer has started; the reader stops it (the chat's Ctrl-C handler closes it)
    stream.close()

    _assert_kept(session, before, tokens_before)
    assert stream.result is None
    assert session.chat("Something else.", GREEDY).token_ids == _next_answer_after(engine, ["Hello there."], "Something else.")
