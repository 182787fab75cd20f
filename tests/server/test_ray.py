"""Scale-out on Ray Serve (issue #8): a local Ray instance on loopback, 2 engine replicas
of a tiny model, the shared Redis store, and a single-node server as the reference.

One Ray instance serves the whole module (starting Ray costs ~10 s); the tests run in
order: affinity, then failover (kills a replica), then a restart of store and app.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import httpx
import pytest

from .conftest import free_port, make_server

pytest.importorskip("ray", reason="the scale-out tests need ray[serve] (pip install -e .[dev])")

MODEL = "tiny-llama"
TURNS = ["Tell me a story about {topic}.", "Why is that?", "Summarise it in one line."]
TOPICS = ["sailing", "cheese", "volcanoes", "jazz", "origami", "comets", "tea", "owls"]


def chat(client: httpx.Client, messages: list[dict], patience_s: float = 300.0, **extra) -> tuple[httpx.Response, list[int]]:
    """POST a greedy chat turn; retry on 503 as a client honouring Retry-After would, for
    as long as a replacement replica may take to start on a loaded machine (a guard against
    a hung test, not a speed assumption). Returns the final response and the status codes
    of every attempt."""
    codes = []
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 12,
                                                       "temperature": 0, **extra})
        codes.append(r.status_code)
        if r.status_code != 503:
            return r, codes
        assert r.headers.get("retry-after"), "a 503 must say when to retry"
        time.sleep(min(float(r.headers["retry-after"]), 1.0) / 4)
    raise AssertionError(f"still 503 after {len(codes)} attempts in {patience_s:.0f} s")


def run_conversations(client: httpx.Client, prefix: str, topics: list[str], turns=TURNS, start_history=None,
                      on_turn=None) -> dict:
    """Every conversation turn by turn (turn 1 of all, then turn 2 of all, ...).
    Returns {topic: [response json per turn]} and checks every response."""
    history = {t: list((start_history or {}).get(t, [])) for t in topics}
    out = {t: [] for t in topics}
    for k, turn in enumerate(turns):
        for t in topics:
            msgs = history[t] + [{"role": "user", "content": (prefix + turn).format(topic=t)}]
            r, codes = chat(client, msgs)
            assert r.status_code == 200, r.text
            assert all(c in (200, 503) for c in codes), codes
            body = r.json()
            body["_replica"] = r.headers.get("x-loopserve-replica")
            body["_codes"] = codes
            out[t].append(body)
            history[t] = msgs + [{"role": "assistant", "content": body["choices"][0]["message"]["content"]}]
            if on_turn:
                on_turn(k, t)
    out["_history"] = history
    return out


def answers(run: dict, topics) -> dict:
    return {t: [b["choices"][0]["message"]["content"] for b in run[t]] for t in topics}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-node server the cluster's greedy answers must equal."""
    srv = make_server(tmp_path_factory, model=MODEL, method="dense")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    saved_env = dict(os.environ)  # ray_app sets Ray's environment (loopback, no proxy): undone below
    os.environ["LOOPSERVE_RAY_LOCAL"] = "1"
    from loopserve.server import ray_app
    from loopserve.server.app import ServerConfig

    import ray
    from ray import serve

    port = free_port()
    # While the pause file exists, every replica holds its admitted requests before their next
    # step: a request is provably still in flight when the failover test kills its replica.
    pause_file = tmp_path_factory.mktemp("drill") / "pause"
    config = dataclasses.asdict(ServerConfig(model=MODEL, method="dense", db_path=redis_server.url,
                                             default_temperature=0.0, max_active=2, pause_file=str(pause_file)))
    ray_app.start(config, replicas=2, port=port, replica_cpus=0.5, num_cpus=2, health_check_period_s=1)
    ray_app.wait_for_replicas(2)

    class Cluster:
        url = f"http://127.0.0.1:{port}"
        store = redis_server
        pause = pause_file

        def http(self, timeout=120.0) -> httpx.Client:
            return httpx.Client(base_url=self.url, trust_env=False, timeout=timeout)

        def redeploy(self):
            ray_app.start(config, replicas=2, port=port, replica_cpus=0.5, health_check_period_s=1)
            ray_app.wait_for_replicas(2)

    yield Cluster()
    serve.shutdown()
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved_env)


def _metric(text: str, name: str, **labels) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


def test_affinity_six_conversations_three_turns(cluster, reference):
    topics = TOPICS[:6]
    with cluster.http() as c:
        run = run_conversations(c, "", topics)
        metrics = c.get("/metrics").text
    with reference.http() as c:
        ref = run_conversations(c, "", topics)
    replicas = {t: {b["_replica"] for b in run[t]} for t in topics}
    assert all(len(r) == 1 for r in replicas.values()), f"a conversation moved between replicas: {replicas}"
    assert len(set().union(*replicas.values())) == 2, f"both replicas should hold conversations: {replicas}"
    for t in topics:
        cached = [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in run[t]]
        # (turn 1 may reuse the chat template's shared head from another conversation)
        # turns 2 and 3 reuse at least the whole previous prompt: their replica kept the KV
        for k in (1, 2):
            assert cached[k] >= run[t][k - 1]["usage"]["prompt_tokens"], (t, cached)
    assert answers(run, topics) == answers(ref, topics)
    # /metrics: per replica and in total
    per = {r: _metric(metrics, "loopserve_requests_completed_total", replica=r) for r in set().union(*replicas.values())}
    assert sum(per.values()) == _metric(metrics, "loopserve_requests_completed_total", replica="total") >= 18
    assert _metric(metrics, "loopserve_cluster_replicas", state="reporting") == 2


def test_replica_killed_mid_run_conversations_complete_with_single_node_answers(cluster, reference):
    from loopserve.server import ray_app

    topics = TOPICS[:6]
    prefix = "[failover] "
    with cluster.http() as c:
        first = run_conversations(c, prefix, topics, turns=TURNS[:1])
        victim = first[topics[0]][0]["_replica"]
        # A long answer (ignore_eos) on the victim's conversation is in flight when it dies.
        probe_msgs = first["_history"][topics[0]][:1]
        probe_result = {}

        def probe():
            probe_result["r"] = c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": probe_msgs, "max_tokens": 3000, "ignore_eos": True, "temperature": 0})

        th = threading.Thread(target=probe)
        cluster.pause.touch()
        try:
            th.start()
            deadline = time.monotonic() + 300  # a guard against a hang, not a speed assumption
            while _metric(c.get("/metrics").text, "loopserve_requests_running", replica=victim) < 1:
                assert time.monotonic() < deadline, "the probe never reached its replica"
                time.sleep(0.05)
            ray_app.kill_replica(victim)  # held before its first step: it cannot have finished
        finally:
            cluster.pause.unlink()
        th.join(300)
        r = probe_result["r"]
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "replica_unavailable"
        # The run goes on while Serve replaces the replica: no request gets any other 5xx.
        rest = run_conversations(c, prefix, topics, turns=TURNS[1:], start_history=first["_history"])
        ray_app.wait_for_replicas(2)
        after = run_conversations(c, prefix, topics, turns=["And then?"], start_history=rest["_history"])
    with reference.http() as c:
        ref = run_conversations(c, prefix, topics, turns=TURNS + ["And then?"])
    got = {t: answers(first, [t])[t] + answers(rest, [t])[t] + answers(after, [t])[t] for t in topics}
    assert got == answers(ref, topics)
    # Only the request in flight on the dead replica failed: every other attempt was a 200.
    codes = [code for run in (first, rest, after) for t in topics for b in run[t] for code in b["_codes"]]
    assert set(codes) == {200}, codes

    # A stream that already started cannot change its status: it ends with an error event.
    with cluster.http() as c:
        cluster.pause.touch()
        try:
            with c.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": probe_msgs, "max_tokens": 3000, "ignore_eos": True, "temperature": 0,
                    "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # the stream is running
                ray_app.kill_replica(r.headers["x-loopserve-replica"])
                cluster.pause.unlink()
                events = [line for line in lines if line.startswith("data: ")]
        finally:
            cluster.pause.unlink(missing_ok=True)
    assert events[-1] == "data: [DONE]" and '"replica_unavailable"' in events[-2]
    ray_app.wait_for_replicas(2)


def test_store_and_app_restart_conversations_continue(cluster, reference):
    from ray import serve

    from loopserve.server import ray_app

    topics = TOPICS[6:8]
    prefix = "[restart] "
    with cluster.http() as c:
        before = run_conversations(c, prefix, topics, turns=TURNS[:2])
    serve.delete(ray_app.APP_NAME)  # the application goes away, with every KV cache
    cluster.store.stop()
    cluster.store.start()  # same data directory: the append-only file brings the turns back
    cluster.redeploy()
    with cluster.http() as c:
        after = run_conversations(c, prefix, topics, turns=TURNS[2:], start_history=before["_history"])
    with reference.http() as c:
        ref = run_conversations(c, prefix, topics)
    for t in topics:
        ext = after[t][0]["loopserve"]
        # The history was rebuilt from the store, with the model's own answer ids spliced in.
        assert ext["rebuilt_tokens"] > 0 and ext["spliced_answers"] == 2, ext
    got = {t: answers(before, [t])[t] + answers(after, [t])[t] for t in topics}
    assert got == answers(ref, topics)
