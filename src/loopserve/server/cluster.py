"""Pure pieces of the multi-replica server (no Ray import): the consistent-hash ring that
pins conversations to replicas, the conversation key, and the merge of per-replica metrics.

- `conversation_key(headers, body)`: the `X-Conversation-Id` header when the client sends
  one; otherwise a hash of the conversation's leading messages (every system message before
  the first user message, and that message). Those are the same bytes in every turn of a
  conversation, so every turn gets the same key without the ingress tokenising anything.
- `HashRing`: consistent hashing with virtual nodes. Adding or removing a replica moves only
  the keys on the arcs it gains or loses (about 1/N of them).
- `merge_metrics`: Prometheus text from every replica, relabelled `replica="<id>"`, plus
  a `replica="total"` series per sample summed over replicas.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import OrderedDict

CONVERSATION_HEADER = "x-conversation-id"
REPLICA_HEADER = "x-loopserve-replica"


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def conversation_key(headers: dict, body: bytes) -> str | None:
    """The affinity key of a chat request, or None when there is none (any replica will do:
    e.g. a malformed body, which every replica rejects the same way)."""
    explicit = headers.get(CONVERSATION_HEADER)
    if explicit:
        return "id:" + explicit
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    lead = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        lead.append([m.get("role"), m.get("content")])
        if m.get("role") == "user":
            break
    blob = json.dumps([payload.get("model"), lead], sort_keys=True, ensure_ascii=False)
    return "lead:" + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class HashRing:
    """Consistent hashing of keys onto named nodes (`vnodes` points per node)."""

    def __init__(self, nodes=(), vnodes: int = 64):
        self.vnodes = vnodes
        self.nodes: frozenset = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []
        self.set_nodes(nodes)

    def set_nodes(self, nodes) -> None:
        nodes = frozenset(nodes)
        if nodes == self.nodes and self._points:
            return
        pts = sorted((_hash64(f"{n}#{i}"), n) for n in nodes for i in range(self.vnodes))
        self._points = [p for p, _ in pts]
        self._owners = [n for _, n in pts]
        self.nodes = nodes

    def owner(self, key: str) -> str | None:
        if not self._points:
            return None
        i = bisect.bisect(self._points, _hash64(key)) % len(self._points)
        return self._owners[i]


# -- metrics -------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _labels(s: str | None) -> list[tuple[str, str]]:
    return _LABEL.findall(s or "")


def _fmt(name: str, labels: list[tuple[str, str]], value: float) -> str:
    lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
    return f"{name}{lab} {value:g}"


def merge_metrics(per_replica: dict[str, str], extra: str = "") -> str:
    """One exposition from several replicas' `/metrics` texts (see module docstring)."""
    meta: "OrderedDict[str, list[str]]" = OrderedDict()  # family -> HELP/TYPE lines
    samples: "OrderedDict[str, list[str]]" = OrderedDict()  # family -> sample lines
    totals: "OrderedDict[tuple, float]" = OrderedDict()
    family_of: dict[str, str] = {}
    for replica, text in sorted(per_replica.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    lines = meta.setdefault(family, [])
                    if line not in lines:
                        lines.append(line)
                continue
            m = _SAMPLE.match(line.strip())
            if not m:
                continue
            name, _, raw_labels, value = m.groups()
            try:
                v = float(value)
            except ValueError:
                continue
            fam = family if family and name.startswith(family) else name
            family_of[name] = fam
            labels = [(k, val) for k, val in _labels(raw_labels) if k != "replica"]
            samples.setdefault(fam, []).append(_fmt(name, [("replica", replica)] + labels, v))
            key = (fam, name, tuple(labels))
            totals[key] = totals.get(key, 0.0) + v
    for (fam, name, labels), v in totals.items():
        samples.setdefault(fam, []).append(_fmt(name, [("replica", "total")] + list(labels), v))
    out = []
    for fam in list(meta) + [f for f in samples if f not in meta]:
        out += meta.get(fam, [])
        out += samples.get(fam, [])
    text = "\n".join(out) + "\n"
    return text + extra if extra else text
