"""The pure parts of the scale-out server: conversation keys, the hash ring, metric merging."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from loopserve.server.cluster import HashRing, conversation_key, merge_metrics


def _body(messages, model="m") -> bytes:
    return json.dumps({"model": model, "messages": messages}).encode()


def test_every_turn_of_a_conversation_has_the_same_key():
    sys_ = {"role": "system", "content": "be brief"}
    t1 = [sys_, {"role": "user", "content": "hello"}]
    t2 = t1 + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    t3 = t2 + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    keys = {conversation_key({}, _body(m)) for m in (t1, t2, t3)}
    assert len(keys) == 1 and None not in keys
    other = conversation_key({}, _body([sys_, {"role": "user", "content": "goodbye"}]))
    assert other not in keys
    assert conversation_key({}, _body(t1, model="other")) not in keys
    # an explicit header wins over the messages
    assert conversation_key({"x-conversation-id": "abc"}, _body(t1)) == conversation_key({"x-conversation-id": "abc"}, _body(t3 + t3))
    # nothing to key on: any replica (which answers the 400)
    assert conversation_key({}, b"{not json") is None
    assert conversation_key({}, b'{"messages": []}') is None


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_hash_ring_moves_only_the_keys_of_a_removed_or_added_replica(n, seed):
    keys = [f"conv-{seed}-{i}" for i in range(600)]
    nodes = [f"rank-{i}" for i in range(n)]
    ring = HashRing(nodes)
    before = {k: ring.owner(k) for k in keys}
    assert set(before.values()) <= set(nodes)
    gone = nodes[seed % n]
    ring.set_nodes([x for x in nodes if x != gone])
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == gone for k in moved)  # only the removed replica's keys move
    assert all(after[k] != gone for k in keys)
    ring.set_nodes(nodes)  # the replacement (same rank) takes back exactly those keys
    assert {k: ring.owner(k) for k in keys} == before
    ring.set_nodes(nodes + ["rank-new"])
    grown = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if grown[k] != before[k]]
    assert all(grown[k] == "rank-new" for k in moved)
    assert len(moved) < 2.5 * len(keys) / (n + 1)  # about 1/(n+1) of the keys, not a reshuffle


def test_merge_metrics_labels_each_replica_and_sums_a_total():
    a = ('# HELP req_total Requests.\n# TYPE req_total counter\nreq_total 3\nreq_total_by{kind="x"} 1\n'
         '# HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{le="1"} 2\nlat_bucket{le="+Inf"} 3\nlat_sum 1.5\nlat_count 3\n')
    b = a.replace("req_total 3", "req_total 4").replace('lat_bucket{le="1"} 2', 'lat_bucket{le="1"} 1')
    text = merge_metrics({"r1": a, "r2": b}, extra="extra_metric 1\n")
    lines = text.splitlines()
    assert 'req_total{replica="r1"} 3' in lines and 'req_total{replica="r2"} 4' in lines
    assert 'req_total{replica="total"} 7' in lines
    assert 'req_total_by{replica="total",kind="x"} 2' in lines
    assert 'lat_bucket{replica="total",le="1"} 3' in lines and 'lat_count{replica="total"} 6' in lines
    assert lines.count("# TYPE lat histogram") == 1
    assert text.endswith("extra_metric 1\n")


def test_serve_ray_refuses_a_store_replicas_cannot_share(tmp_path, capsys):
    from loopserve.server.cli import main

    assert main(["serve", "--ray", "--model", "tiny-llama", "--store", str(tmp_path / "c.sqlite")]) == 2
    assert "needs the shared redis:// store" in capsys.readouterr().err
    assert main(["serve", "--ray", "--model", "tiny-llama", "--store", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "redis://127.0.0.1:1/0 is unavailable" in err and "scripts/redis.sh start" in err
    assert main(["serve", "--ray", "--replicas", "0", "--store", "redis://127.0.0.1:1/0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
