"""Unit tests of the server's store, prompt builder and session pool (no HTTP)."""

from __future__ import annotations

import random

import pytest

from loopserve.engine import Engine, SamplingParams
from loopserve.server.sessions import PromptBuilder, SessionPool, common_prefix, kv_bytes
from loopserve.server.hashing import ids_hash
from loopserve.server.store import SQLiteConversationStore, StoreUnavailable, open_store


@pytest.fixture(scope="module")
def engine():
    from loopserve.models import load_model

    return Engine(load_model("tiny-llama"), method="dense")


def test_common_prefix():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 5))]
        want = 0
        while want < min(len(a), len(b)) and a[want] == b[want]:
            want += 1
        assert common_prefix(a, b) == want == common_prefix(b, a)


@pytest.fixture(params=["sqlite", "redis"])
def reopenable_store(request, tmp_path):
    """A factory that opens the same store again (a restart of the server process)."""
    if request.param == "sqlite":
        path = tmp_path / "c.sqlite"
        return lambda: open_store(path)
    srv = request.getfixturevalue("redis_server")
    from redis import Redis

    Redis.from_url(srv.url).flushdb()
    return lambda: open_store(srv.url)


def test_store_roundtrip(reopenable_store):
    st = reopenable_store()
    st.save_turn("c1", model="m", method="dense", knobs={}, messages=[{"role": "user", "content": "q"}],
                 prompt_ids=[1, 2, 3], answer_text="ans", answer_ids=[7, 8])
    st.close()
    st = reopenable_store()  # reopened: persisted
    rec = st.find_answer("m", ids_hash([1, 2, 3]), "ans")
    assert rec.token_ids == [7, 8] and rec.exact and rec.conversation_id == "c1"
    rec = st.find_answer("m", ids_hash([9]), "ans")  # other prompt: found by text only
    assert rec.token_ids == [7, 8] and not rec.exact
    assert st.find_answer("other-model", ids_hash([1, 2, 3]), "ans") is None
    conv = st.get_conversation("c1")
    assert conv["token_ids"] == [1, 2, 3, 7, 8] and conv["turns"] == 1
    assert conv["messages"] == [{"role": "user", "content": "q"}] and conv["model"] == "m"
    st.save_turn("c1", model="m", method="dense", knobs={}, messages=[], prompt_ids=[1], answer_text="x", answer_ids=None)
    assert st.get_conversation("c1")["turns"] == 2
    assert st.get_conversation("nope") is None
    assert st.count() == {"conversations": 1, "answers": 1}


def test_redis_store_survives_a_restart_and_reports_outages(make_redis):
    srv = make_redis().start()
    st = open_store(srv.url)
    st.save_turn("c1", model="m", method="dense", knobs={}, messages=[], prompt_ids=[1, 2], answer_text="a", answer_ids=[5])
    srv.stop()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        st.find_answer("m", ids_hash([1, 2]), "a")
    srv.start()  # same data dir: the append-only file brings the turn back
    assert st.find_answer("m", ids_hash([1, 2]), "a").token_ids == [5]
    srv.stop()


def test_open_store_rejects_unknown_urls():
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("postgres://x/y")


def _generate(session, prompt, n=16):
    stream = session.stream_ids(prompt, SamplingParams(max_new_tokens=n))
    for _ in stream:
        pass
    return stream.result


def test_builder_splices_generated_ids_where_retokenising_drifts(engine):
    st = SQLiteConversationStore(None)
    builder = PromptBuilder(engine.tokenizer, st, "tiny")
    # The tiny byte-level model emits invalid UTF-8: decoding gives U+FFFD, which re-encodes
    # to other bytes, so plain re-tokenisation of the answer cannot match the cache.
    for q in ["a", "Write a long story.", "Count to one thousand.", "b"]:
        msgs = [{"role": "user", "content": q}]
        built = builder.build(msgs)
        assert built.ids == engine.encode_messages(msgs) and built.spliced == 0
        s = engine.new_session()
        res = _generate(s, built.ids)
        text = engine.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        st.save_turn("conv", model="tiny", method="dense", knobs={}, messages=msgs, prompt_ids=built.ids,
                     answer_text=text, answer_ids=res.token_ids)
        nxt = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
        spliced = builder.build(nxt)
        history = built.ids + res.token_ids
        assert spliced.ids[: len(history)] == history
        assert spliced.history_end == len(history) and spliced.spliced == 1 and spliced.conversation_id == "conv"
        # The text after the answer is tokenised as the template renders it.
        tail = builder.render(nxt)[len(builder.render(msgs)) + len(text):]
        assert engine.tokenizer.decode(spliced.ids[len(history):]) == tail
        if engine.encode_messages(nxt)[: len(history)] != history:
            break
    else:
        pytest.fail("no drifting answer found to test splicing against")


def test_builder_ignores_edited_answers(engine):
    st = SQLiteConversationStore(None)
    builder = PromptBuilder(engine.tokenizer, st, "tiny")
    msgs = [{"role": "user", "content": "hi"}]
    p = builder.build(msgs).ids
    st.save_turn("c", model="tiny", method="dense", knobs={}, messages=msgs, prompt_ids=p, answer_text="hello", answer_ids=[104, 101])
    edited = msgs + [{"role": "assistant", "content": "hello!"}, {"role": "user", "content": "x"}]
    out = builder.build(edited)
    assert out.spliced == 0 and out.ids == engine.encode_messages(edited)
    # A stored record whose ids do not decode to the text is never spliced.
    same = msgs + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}]
    assert builder.build(same).spliced == 0


def test_pool_continue_fork_new_and_rebuild(engine):
    pool = SessionPool(engine, budget_bytes=1 << 30)
    a = engine.encode_messages([{"role": "user", "content": "first conversation"}])
    acq = pool.acquire(a)
    assert acq.kind == "new" and acq.reused == 0
    res = _generate(acq.pooled.session, a, 8)
    pool.release(acq.pooled)
    hist = a + res.token_ids
    # Continuing: the whole live history is a prefix of the new prompt.
    b = hist + engine.tokenizer("<|im_end|>\n<|im_start|>user\nnext<|im_end|>\n", add_special_tokens=False)["input_ids"]
    acq2 = pool.acquire(b)
    assert acq2.kind == "continue" and acq2.pooled is acq.pooled
    assert acq2.reused == len(acq.pooled.session.token_ids)
    pool.release(acq2.pooled)
    # A different branch sharing only a prefix: fork (the original stays intact).
    c = a[:-3] + engine.tokenizer("zz", add_special_tokens=False)["input_ids"]
    acq3 = pool.acquire(c)
    assert acq3.kind == "fork" and acq3.pooled is not acq.pooled and acq3.reused == common_prefix(a, c)
    assert acq3.pooled.session.token_ids == c[: acq3.reused]
    assert len(acq.pooled.session.token_ids) == len(hist) - 1  # untouched
    # The fork's KV equals a fresh prefill of the same tokens.
    fresh = engine.new_session()
    _generate(fresh, c, 1)
    for l1, l2 in zip(acq3.pooled.session.cache.layers, fresh.cache.layers):
        assert (l1.keys[..., : acq3.reused, :] - l2.keys[..., : acq3.reused, :]).abs().max() < 1e-5
    pool.release(acq3.pooled)
    # Busy sessions are never shared; a lost history is rebuilt by prefill up to history_end.
    acq4 = pool.acquire(b)
    acq5 = pool.acquire(b, history_end=len(hist))
    assert acq4.kind == "continue"
    assert acq5.kind.startswith("fork") and acq5.reused == len(acq4.pooled.session.token_ids)  # forked the busy one
    assert acq5.pooled.session.token_ids == b[: acq5.reused + acq5.rebuilt]
    assert acq5.reused + acq5.rebuilt >= len(hist) - 1
    pool.release(acq4.pooled)
    pool.release(acq5.pooled)
    # With only a short live prefix, the history up to history_end is rebuilt by prefill.
    pool2 = SessionPool(engine, budget_bytes=1 << 30)
    acq6 = pool2.acquire(b, history_end=len(hist))
    assert acq6.kind == "new+rebuild" and acq6.rebuilt == len(hist)
    assert acq6.pooled.session.token_ids == b[: len(hist)]


def test_pool_lru_eviction_under_budget(engine):
    pool = SessionPool(engine, budget_bytes=0)
    prompts = [engine.encode_messages([{"role": "user", "content": f"{c} conversation " * 4}]) for c in "ABCD"]
    got = []
    for p in prompts[:3]:
        acq = pool.acquire(p)
        _generate(acq.pooled.session, p, 4)
        pool.release(acq.pooled)
        got.append(acq.pooled)
    sizes = [kv_bytes(x.session) for x in got]
    pool.budget_bytes = sizes[1] + sizes[2]  # room for two
    assert pool.enforce_budget() == 1
    assert set(pool.sessions) == {got[1].sid, got[2].sid}  # A was least recently used
    # Touch B, then add D: C is now the least recently used.
    acq = pool.acquire(got[1].session.token_ids + [10, 11])
    assert acq.kind == "continue" and acq.pooled is got[1]
    pool.release(acq.pooled)
    acq = pool.acquire(prompts[3])
    _generate(acq.pooled.session, prompts[3], 4)
    pool.release(acq.pooled)
    pool.budget_bytes = kv_bytes(got[1].session) + kv_bytes(acq.pooled.session)
    pool.enforce_budget()
    assert set(pool.sessions) == {got[1].sid, acq.pooled.sid}
    assert pool.evictions == 2


def test_store_errors_never_show_the_password():
    from loopserve.server.store import redact_url

    assert redact_url("redis://:s3cret@host:6380/0") == "redis://:***@host:6380/0"
    assert redact_url("redis://user:s3cret@host/0") == "redis://user:***@host/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    st = open_store("redis://:s3cret@127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable) as e:
        st.get_conversation("c")
    assert "s3cret" not in str(e.value) and ":***@127.0.0.1:1" in str(e.value)
