"""kill -9 mid-conversation, restart on the same SQLite file, continue: same greedy answer."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import httpx

from .conftest import TINY, LiveServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(db, log):
    port = _free_port()
    cmd = [sys.executable, "-m", "loopserve.server", "--model", TINY, "--method", "dense", "--host", "127.0.0.1",
           "--port", str(port), "--db", str(db), "--default-temperature", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a guard against a hung start-up, not a speed assumption
    with httpx.Client(trust_env=False, timeout=2) as h:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if h.get(url + "/health").status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up")


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60,
                  http_client=httpx.Client(trust_env=False, timeout=60))


def _turn(client, msgs):
    return client.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0)


def test_kill_and_restart_continues_with_the_same_answer(server: LiveServer, tmp_path):
    users = ["Restart safety, turn one.", "Turn two, then the lights go out.", "Turn three after the restart."]

    # Uninterrupted reference run (in-process server, same tiny model and method).
    ref_client, msgs, reference = server.client(), [], []
    for u in users:
        msgs.append({"role": "user", "content": u})
        r = _turn(ref_client, msgs)
        reference.append(r.choices[0].message.content)
        msgs.append({"role": "assistant", "content": reference[-1]})

    db = tmp_path / "conversations.sqlite"
    log = open(tmp_path / "server.log", "wb")
    proc, url = _spawn(db, log)
    try:
        c, msgs = _client(url), []
        for u, want in zip(users[:2], reference[:2]):
            msgs.append({"role": "user", "content": u})
            r = _turn(c, msgs)
            assert r.choices[0].message.content == want
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        conv_id = r.model_extra["loopserve"]["conversation_id"]
        history = r.usage.prompt_tokens + r.usage.completion_tokens
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # The turns are on disk.
    with sqlite3.connect(db) as con:
        turns, n_tokens = con.execute("SELECT turns, n_tokens FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        assert (turns, n_tokens) == (2, history)
        assert con.execute("SELECT COUNT(*) FROM answers WHERE conversation_id = ?", (conv_id,)).fetchone()[0] == 2

    proc, url = _spawn(db, log)
    try:
        c = _client(url)
        msgs.append({"role": "user", "content": users[2]})
        r = _turn(c, msgs)
        ext = r.model_extra["loopserve"]
        assert r.choices[0].message.content == reference[2]
        assert ext["spliced_answers"] == 2  # both answers went back in as the model's own token ids
        assert ext["session"] == "new+rebuild" and ext["rebuilt_tokens"] == history
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        assert ext["conversation_id"] == conv_id
        # And the restarted server reuses the rebuilt session for the next turn.
        msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "four"}]
        r4 = _turn(c, msgs)
        assert r4.model_extra["loopserve"]["session"] == "continue"
        assert r4.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens + r.usage.completion_tokens - 1
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
