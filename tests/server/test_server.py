"""The OpenAI-compatible server, driven with the official `openai` client over 127.0.0.1."""

from __future__ import annotations

import concurrent.futures as cf
import json

import openai
import pytest

from .conftest import TINY, StepGate, held_stream, make_server, wait_event


def _user(text):
    return {"role": "user", "content": text}


def _assert_error_shape(body: dict, status_code: int, resp_status: int):
    assert resp_status == status_code
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# -- basics -------------------------------------------------------------------------------------
def test_models_health_metrics(server):
    c = server.client()
    models = c.models.list()
    assert [m.id for m in models.data] == [TINY]
    assert c.models.retrieve(TINY).id == TINY
    with server.http() as h:
        assert h.get("/health").json()["status"] == "ok"
        text = h.get("/metrics").text
    assert "# TYPE loopserve_requests_in_flight gauge" in text
    assert "# TYPE loopserve_ttft_seconds histogram" in text
    assert server.metric("loopserve_info", method="dense", model="tiny-llama") == 1


def test_non_streaming_and_streaming_agree(server):
    c = server.client()
    msgs = [_user("Streaming or not, the answer is the same.")]
    r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0

    stream = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert content == text
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # The same prompt again: its KV is found live (all but the last prompt token).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_three_turns_prefill_only_new_tokens(server):
    c = server.client()
    msgs = []
    prev = None
    for turn, text in enumerate(["Three turns: first question?", "A second one.", "And the third."]):
        msgs.append(_user(text))
        r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=10, temperature=0)
        u, ext = r.usage, r.model_extra["loopserve"]
        if prev is not None:
            history = prev.usage.prompt_tokens + prev.usage.completion_tokens
            # The last generated token is only in the KV cache once it has been fed back.
            in_cache = history - (1 if prev.choices[0].finish_reason == "length" else 0)
            assert u.prompt_tokens > history
            assert u.prompt_tokens_details.cached_tokens == in_cache
            assert ext["prefill_tokens"] == u.prompt_tokens - in_cache
            assert ext["session"] == "continue" and ext["rebuilt_tokens"] == 0
            assert ext["spliced_answers"] == turn  # the model's own ids replaced every resent answer
            assert ext["conversation_id"] == prev.model_extra["loopserve"]["conversation_id"]
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        prev = r


def test_bad_inputs_get_openai_errors(server):
    c = server.client()
    ok = [_user("hi")]
    with server.http() as h:
        cases = [
            (b'{"model": "tiny-llama", "messages": [', 400, "invalid_json"),
            (b"[1, 2, 3]", 400, None),
            (json.dumps({"messages": ok}).encode(), 400, "missing_required_parameter"),
            (json.dumps({"model": TINY, "messages": ok, "max_tokens": "ten"}).encode(), 400, None),
            (json.dumps({"model": TINY, "messages": [{"role": "user"}]}).encode(), 400, "missing_required_parameter"),
            (json.dumps({"model": TINY, "messages": ok, "temperature": float("nan")}).encode(), 400, None),
        ]
        for body, status, code in cases:
            resp = h.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            _assert_error_shape(resp.json(), status, resp.status_code)
            if code:
                assert resp.json()["error"]["code"] == code
        # Oversized body (the limit is 256 KiB here).
        big = json.dumps({"model": TINY, "messages": [_user("x" * 300_000)]}).encode()
        resp = h.post("/v1/chat/completions", content=big)
        _assert_error_shape(resp.json(), 413, resp.status_code)
        # Unknown route and wrong method also answer in the OpenAI error format.
        resp = h.get("/v1/nope")
        _assert_error_shape(resp.json(), 404, resp.status_code)
        resp = h.get("/v1/chat/completions")
        _assert_error_shape(resp.json(), 405, resp.status_code)

    def err(exc_type, **kw):
        kw.setdefault("model", TINY)
        kw.setdefault("messages", ok)
        with pytest.raises(exc_type) as ei:
            c.chat.completions.create(**kw)
        _assert_error_shape({"error": ei.value.body}, ei.value.status_code, ei.value.status_code)
        return ei.value

    e = err(openai.NotFoundError, model="gpt-9")
    assert e.status_code == 404 and e.code == "model_not_found"
    e = err(openai.BadRequestError, messages=[])
    assert e.status_code == 400 and e.param == "messages"
    e = err(openai.BadRequestError, messages=[{"role": "robot", "content": "beep"}])
    assert e.param == "messages[0].role"
    e = err(openai.BadRequestError, messages=[_user("hi"), {"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert e.param == "messages[1].role"
    for kw, param in [({"temperature": 5}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                      ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"), ({"stop": ["ok", ""]}, "stop[1]"),
                      ({"presence_penalty": 1.0}, "presence_penalty"), ({"seed": 1.5}, "seed"),
                      ({"extra_body": {"top_k": -5}}, "top_k")]:
        e = err(openai.BadRequestError, **kw)
        assert e.param == param, (kw, e.body)
    # Unknown method knobs (this server runs `dense`, which has none).
    e = err(openai.BadRequestError, extra_body={"loopserve": {"bogus": 1}})
    assert e.param == "loopserve.bogus"
    e = err(openai.BadRequestError, extra_body={"loopserve": [1]})
    assert e.param == "loopserve"
    # A prompt beyond the 4096-token window of the tiny model (one byte = one token).
    e = err(openai.BadRequestError, messages=[_user("a" * 5000)])
    assert e.code == "context_length_exceeded"
    # Nothing broke: the server still answers.
    r = c.chat.completions.create(model=TINY, messages=[_user("still alive?")], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert server.state.in_flight == 0


def test_engine_failure_is_a_500_not_a_crash(server, monkeypatch):
    from loopserve.engine import Engine

    def broken(self, steps):
        raise RuntimeError("simulated engine failure")

    c = server.client()
    monkeypatch.setattr(Engine, "forward_packed", broken)  # the worker's scheduler runs every forward
    with pytest.raises(openai.InternalServerError) as ei:
        c.chat.completions.create(model=TINY, messages=[_user("fail please")], max_tokens=3)
    assert ei.value.status_code == 500 and ei.value.body["type"] == "server_error"
    with pytest.raises(openai.APIError):
        list(c.chat.completions.create(model=TINY, messages=[_user("fail please")], max_tokens=3, stream=True))
    monkeypatch.undo()
    r = c.chat.completions.create(model=TINY, messages=[_user("fail please")], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert server.metric("loopserve_requests_in_flight") == 0


def test_client_disconnect_cancels_generation(server):
    before = server.metric("loopserve_requests_cancelled_total")
    gen_before = server.metric("loopserve_generated_tokens_total")
    completed_before = server.metric("loopserve_requests_completed_total")
    c = server.client()
    # The worker holds the request before its fourth text delta until the client is gone:
    # the stream is provably still running when it disconnects.
    with StepGate(server, hold=lambda job: job.deltas >= 3) as gate:
        stream = c.chat.completions.create(model=TINY, messages=[_user("x" * 50)], max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        seen, streamed = 0, ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
                streamed += chunk.choices[0].delta.content
                if seen == 3:
                    break
        stream.close()
        wait_event(gate.stepped_after_hold, "the held request to be cancelled")
    assert gate.held_job.cancelled
    assert server.metric("loopserve_requests_cancelled_total") == before + 1
    assert server.metric("loopserve_requests_completed_total") == completed_before
    generated = server.metric("loopserve_generated_tokens_total") - gen_before
    assert generated == gate.generated_when_held and 3 <= generated < 400
    assert server.metric("loopserve_requests_in_flight") == 0
    assert server.state.in_flight == 0
    # The session it used was cut back to a consistent state and serves the same prompt again.
    r = c.chat.completions.create(model=TINY, messages=[_user("x" * 50)], max_tokens=4, temperature=0)
    text = r.choices[0].message.content
    assert text.startswith(streamed) or streamed.startswith(text)


# -- servers with other options ---------------------------------------------------------------
def test_api_key(tmp_path_factory):
    s = make_server(tmp_path_factory, api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError) as ei:
            s.client(api_key="wrong").chat.completions.create(model=TINY, messages=[_user("hi")], max_tokens=2)
        assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        with s.http() as h:
            resp = h.post("/v1/chat/completions", json={"model": TINY, "messages": [_user("hi")]})
            _assert_error_shape(resp.json(), 401, resp.status_code)
            assert resp.json()["error"]["code"] == "missing_api_key"
            assert h.get("/health").status_code == 200  # health and metrics stay open
            assert h.get("/metrics").status_code == 200
        good = s.client(api_key="sekrit")
        assert good.models.list().data[0].id == TINY
        r = good.chat.completions.create(model=TINY, messages=[_user("hi")], max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        s.stop()


def test_full_queue_answers_429(tmp_path_factory):
    s = make_server(tmp_path_factory, max_queue=2, max_active=1)
    try:
        c = s.client()
        with held_stream(s, "x" * 50) as slow:
            def one(i):
                try:
                    c.chat.completions.create(model=TINY, messages=[_user(f"queued {i}")], max_tokens=3, temperature=0)
                    return 200
                except openai.RateLimitError as e:
                    assert e.body["code"] == "rate_limit_exceeded" and set(e.body) == {"message", "type", "param", "code"}
                    assert e.response.headers.get("retry-after") == "1"
                    return 429

            with cf.ThreadPoolExecutor(4) as ex:
                futs = [ex.submit(one, i) for i in range(4)]
                rejected = 0
                for f in cf.as_completed(futs):
                    if f.result() == 429:
                        rejected += 1
                    if rejected == 3:
                        slow.close()  # the held request is cancelled: the admitted one runs
                        rejected += 1
                results = sorted(f.result() for f in futs)
        assert results == [200, 429, 429, 429]
        assert s.metric("loopserve_requests_rejected_total") == 3
        assert s.metric("loopserve_requests_in_flight") == 0
        r = c.chat.completions.create(model=TINY, messages=[_user("after the storm")], max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        s.stop()


def _conversation(client, users, max_tokens=10):
    msgs, out = [], []
    for text in users:
        msgs.append(_user(text))
        r = client.chat.completions.create(model=TINY, messages=msgs, max_tokens=max_tokens, temperature=0)
        out.append(r)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    return out


def test_lru_eviction_rebuilds_by_prefill(server, tmp_path_factory):
    users = ["Evict me: one.", "Evict me: two.", "Evict me: three."]
    reference = [r.choices[0].message.content for r in _conversation(server.client(), users)]
    s = make_server(tmp_path_factory, kv_budget_bytes=1)  # every idle session is evicted at once
    try:
        got = _conversation(s.client(), users)
        assert [r.choices[0].message.content for r in got] == reference
        for prev, r in zip(got, got[1:]):
            ext = r.model_extra["loopserve"]
            assert r.usage.prompt_tokens_details.cached_tokens == 0
            assert ext["session"] == "new+rebuild"
            assert ext["rebuilt_tokens"] == prev.usage.prompt_tokens + prev.usage.completion_tokens
        assert s.metric("loopserve_session_evictions_total") >= 3
        assert s.metric("loopserve_sessions") == 0
    finally:
        s.stop()


def test_per_request_knobs(tmp_path_factory):
    from loopserve.engine import resolve_method

    s = make_server(tmp_path_factory, method="loopserve")
    try:
        c = s.client()
        valid = resolve_method("loopserve").knobs()
        knobs = {k: v for k, v in {"alpha": 0.8, "budget": 64, "n_d": 4}.items() if k in valid}
        assert {"budget", "n_d"} <= set(knobs)
        msgs = [_user("Knobs go per request. " * 12)]  # longer than the decode budget
        r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0, extra_body={"loopserve": knobs})
        sid = r.model_extra["loopserve"]["session_id"]
        assert s.state.pool.sessions[sid].knobs == knobs
        assert r.model_extra["loopserve"]["active_kv_tokens"] < r.model_extra["loopserve"]["kv_tokens"]
        for bad, param in [({"bogus": 1}, "loopserve.bogus"), ({"budget": 0}, "loopserve.budget"),
                           ({"n_d": "many"}, "loopserve.n_d")]:
            with pytest.raises(openai.BadRequestError) as ei:
                c.chat.completions.create(model=TINY, messages=msgs, max_tokens=2, extra_body={"loopserve": bad})
            assert ei.value.param == param, ei.value.body
        # Without knobs the session goes back to the server's defaults.
        msgs += [{"role": "assistant", "content": r.choices[0].message.content}, _user("again")]
        r2 = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=4, temperature=0)
        assert r2.model_extra["loopserve"]["session"] == "continue"
        assert s.state.pool.sessions[sid].knobs == {}
    finally:
        s.stop()


def test_concurrent_requests_interleave_without_mixing(server):
    """Round-robin decoding of several sessions gives each the answer it gets alone."""
    c = server.client()
    prompts = [[_user(f"Concurrent conversation number {i}, tell me something.")] for i in range(3)]
    alone = [c.chat.completions.create(model=TINY, messages=m, max_tokens=12, temperature=0).choices[0].message.content
             for m in prompts]
    # Resending them concurrently, each as a new branch (a different second user turn).
    def run(i):
        msgs = prompts[i] + [{"role": "assistant", "content": alone[i]}, _user("and again")]
        r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    with cf.ThreadPoolExecutor(3) as ex:
        together = list(ex.map(run, range(3)))
    alone2 = [run(i)[0] for i in range(3)]
    assert [t for t, _ in together] == alone2
    assert all(cached > 0 for _, cached in together)


def test_store_outage_is_a_503_with_retry_after_and_recovers(tmp_path_factory, make_redis):
    redis = make_redis().start()
    srv = make_server(tmp_path_factory, db_path=redis.url)
    try:
        body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                            {"role": "user", "content": "again"}], "max_tokens": 4}
        with srv.http() as c:
            assert c.post("/v1/chat/completions", json=body).status_code == 200
            redis.stop()
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "store_unavailable"
            redis.start()
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert srv.state.store.count()["conversations"] == 2
    finally:
        srv.stop()
