"""Regression tests of the defects found by trying the server as a user would (issue 14):
each failed before its fix."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import stat
import threading

import openai
import pytest

from .conftest import TINY, StepGate, held_stream, live_server, wait_event, wait_until


def _user(text):
    return {"role": "user", "content": text}


def _post(server, body: dict, **headers):
    with server.http() as h:
        return h.post("/v1/chat/completions", json=body, headers=headers)


def test_tiny_temperature_samples_like_greedy(server):
    """1: temperature 1e-38 overflowed logits / T to NaN (HTTP 500, or an error event)."""
    c = server.client()
    msgs = [_user("A tiny temperature is greedy.")]
    greedy = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=6, temperature=0).choices[0].message.content
    for t in (1e-38, 1e-300, 5e-324):
        r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=6, temperature=t, seed=3)
        assert r.choices[0].message.content == greedy, t
    chunks = list(c.chat.completions.create(model=TINY, messages=msgs, max_tokens=6, temperature=1e-38, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == greedy


def test_seed_outside_int64_is_a_400(server):
    """2: a seed beyond the signed 64-bit range was a 500 'Overflow when unpacking long long'."""
    for seed in (2**64, 10**30, -(2**63) - 1, 2**63):
        r = _post(server, {"model": TINY, "messages": [_user("seed")], "max_tokens": 2, "seed": seed})
        assert r.status_code == 400, (seed, r.text)
        assert r.json()["error"]["param"] == "seed"
    for seed in (2**63 - 1, -(2**63)):
        r = _post(server, {"model": TINY, "messages": [_user("seed")], "max_tokens": 2, "seed": seed, "temperature": 1})
        assert r.status_code == 200, (seed, r.text)


def test_overlong_prompt_is_refused_before_tokenising(server, monkeypatch):
    """3a: a body just under the size limit was tokenised in full before the context check."""
    built = []
    original = server.state.builder.build
    monkeypatch.setattr(server.state.builder, "build", lambda messages: built.append(messages) or original(messages))
    n_chars = server.state.engine.max_context * server.state.builder.max_chars_per_token
    r = _post(server, {"model": TINY, "messages": [_user("a" * n_chars)]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert built == []
    # Below the cheap bound the exact count decides (one byte = one token here).
    r = _post(server, {"model": TINY, "messages": [_user("a" * 5000)]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(built) == 1


def test_one_slow_prompt_does_not_hold_up_the_others(server, monkeypatch):
    """3b: prompts were built on one thread, so a long tokenisation made every request wait."""
    release = threading.Event()
    entered = threading.Event()
    original = server.state.builder.build

    def build(messages):
        if messages[-1]["content"] == "slow prompt":
            entered.set()
            release.wait(StepGate.WAIT)
        return original(messages)

    monkeypatch.setattr(server.state.builder, "build", build)
    c = server.client()
    with cf.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(c.chat.completions.create, model=TINY, messages=[_user("slow prompt")], max_tokens=2, temperature=0)
        wait_event(entered, "the slow prompt to be building")
        r = c.chat.completions.create(model=TINY, messages=[_user("quick one")], max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
        assert not slow.done()  # it is still being built: the quick one did not wait for it
        release.set()
        assert slow.result().usage.completion_tokens >= 1


def test_405_keeps_the_allow_header(server):
    """4: the OpenAI-style error body replaced the 405 response, and its Allow header with it."""
    with server.http() as h:
        r = h.get("/v1/chat/completions")
        assert r.status_code == 405 and r.headers.get("allow") == "POST"
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = h.delete("/v1/models")
        assert r.status_code == 405 and r.headers.get("allow") == "GET"


def test_openapi_describes_what_the_server_does(server):
    """5: no request body schema, /metrics declared as JSON, 4xx missing, a 422 never sent."""
    with server.http() as h:
        doc = h.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages", "stream_options", "seed", "stop"} <= set(body["properties"])
    assert set(body["required"]) == {"model", "messages"}
    assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    for path in doc["paths"].values():
        for op in path.values():
            assert "422" not in op["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_bad_knob_is_named_even_after_a_good_one(tmp_path_factory):
    """6: {"alpha": 0.5, "bogus": 1} named loopserve.alpha (the first knob found in the message)."""
    with live_server(tmp_path_factory, method="loopserve") as s:
        c = s.client()
        for bad, param in [({"alpha": 0.5, "bogus": 1}, "loopserve.bogus"), ({"alpha": 0.5, "budget": 0}, "loopserve.budget"),
                           ({"budget": 64, "n_d": "many"}, "loopserve.n_d")]:
            with pytest.raises(openai.BadRequestError) as ei:
                c.chat.completions.create(model=TINY, messages=[_user("knobs")], max_tokens=2, extra_body={"loopserve": bad})
            assert ei.value.param == param, (bad, ei.value.body)


def test_queued_request_that_disconnects_frees_its_slot(tmp_path_factory):
    """7: a queued request whose client left kept its slot until the running one ended (spurious 429s)."""
    with live_server(tmp_path_factory, max_queue=2, max_active=1) as s:
        c = s.client()
        with held_stream(s, "running") as running:
            # A queued request from a raw connection, which the client then closes.
            body = json.dumps({"model": TINY, "messages": [_user("queued, then gone")], "max_tokens": 2}).encode()
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: s.state.worker.waiting == 1, "the request to be queued")
            assert s.state.in_flight == 2
            sock.close()
            wait_until(lambda: s.state.in_flight == 1, "the queued request's slot to be freed")
            # The slot is free for another client while the running request still runs.
            with cf.ThreadPoolExecutor(1) as ex:
                nxt = ex.submit(c.chat.completions.create, model=TINY, messages=[_user("next")], max_tokens=2, temperature=0)
                wait_until(lambda: s.state.worker.waiting == 2 or nxt.done(), "the next request to be queued")
                assert not nxt.done(), nxt.exception()
                running.close()
                assert nxt.result().usage.completion_tokens >= 1
        assert s.metric("loopserve_requests_rejected_total") == 0


def test_openapi_needs_the_key_and_health_metrics_do_not(tmp_path_factory):
    """8a: /openapi.json was open without the key."""
    with live_server(tmp_path_factory, api_key="sekrit") as s:
        with s.http() as h:
            r = h.get("/openapi.json")
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
            assert h.get("/openapi.json", headers={"Authorization": "Bearer sekrit"}).status_code == 200
            assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
            # Auth comes first: a bad body without the key is a 401, not a 400.
            r = h.post("/v1/chat/completions", content=b"{not json")
            assert r.status_code == 401


def test_sqlite_store_is_private_to_its_owner(tmp_path_factory, server):
    """8b: the store holds conversation text but was created world-readable."""
    db = server.state.store.path
    c = server.client()
    c.chat.completions.create(model=TINY, messages=[_user("private")], max_tokens=2, temperature=0)
    for path in (db, db + "-wal"):
        assert os.path.exists(path)
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, oct(os.stat(path).st_mode)


def test_api_key_from_the_environment(monkeypatch):
    """8c: the key belongs in $LOOPSERVE_API_KEY (a --api-key flag shows in `ps`)."""
    import argparse

    from loopserve.server.cli import add_serve_args, api_key_warning, server_config

    monkeypatch.setenv("LOOPSERVE_API_KEY", "from-env")
    args = add_serve_args(argparse.ArgumentParser()).parse_args([])
    assert server_config(args, {}, None).api_key == "from-env" and api_key_warning(args) is None
    args = add_serve_args(argparse.ArgumentParser()).parse_args(["--api-key", "on-the-command-line"])
    assert "LOOPSERVE_API_KEY" in api_key_warning(args)


def test_max_tokens_beyond_the_context_window_is_a_400(server):
    """8d: max_tokens 10**9 was accepted (OpenAI answers 400)."""
    window = server.state.engine.max_context
    for name in ("max_tokens", "max_completion_tokens"):
        for value in (10**9, window + 1):
            r = _post(server, {"model": TINY, "messages": [_user("hi")], name: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    # The whole window is still a valid request (the answer stops at the window's end).
    from loopserve.server.protocol import parse_chat_request
    from loopserve.server.routes import sampling_params

    req = parse_chat_request(json.dumps({"model": TINY, "messages": [_user("hi")], "max_tokens": window}).encode())
    assert sampling_params(req, 16, 0.0, window).max_new_tokens == window


def test_cancelled_turn_keeps_the_history_before_it(tmp_path_factory):
    """9: what a cancelled turn leaves behind is what docs/server.md says: the session cut back
    to its history before the turn; a brand-new conversation has none, so no session stays."""

    def cancel_after_first_delta(server, messages):
        with StepGate(server, hold=lambda job: job.messages == messages and job.deltas >= 1) as gate:
            stream = server.client().chat.completions.create(model=TINY, messages=messages, max_tokens=50, temperature=0,
                                                             stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            stream.close()
            wait_event(gate.stepped_after_hold, "the cancellation")
        return gate.held_job

    with live_server(tmp_path_factory) as server:  # no other sessions: the first turn starts a new one
        job = cancel_after_first_delta(server, [_user("a brand-new conversation, cancelled")])
        assert job.acquired.kind == "new" and len(server.state.pool.sessions) == 0
        # A continued conversation: the session stays, with exactly the history before the turn.
        r = server.client().chat.completions.create(model=TINY, messages=[_user("first turn, kept")], max_tokens=4,
                                                    temperature=0)
        sid = r.model_extra["loopserve"]["session_id"]
        before = list(server.state.pool.sessions[sid].session.token_ids)
        msgs = [_user("first turn, kept"), {"role": "assistant", "content": r.choices[0].message.content},
                _user("second turn, cancelled")]
        job = cancel_after_first_delta(server, msgs)
        assert job.acquired.kind == "continue" and job.acquired.pooled.sid == sid
        assert server.state.pool.sessions[sid].session.token_ids == before
