"""Conversation affinity for Ray Serve: a custom `RequestRouter` that sends every request
with the same conversation key to the same engine replica, by consistent hashing.

Ray Serve calls `choose_replicas` in the caller's process (the ingress) for every handle
call. The key arrives as the call's `conv_key` keyword. Replicas are placed on the ring by
their *rank*: when a replica dies, Serve gives its replacement the same rank, so the
replacement takes back exactly the dead replica's conversations (rebuilt from the shared
store) and the survivors' conversations never move. While a replica is down, its ring
points are gone and its conversations go to the next replica on the ring.

A call with `target_replica=<id>` goes to that replica (the ingress' per-replica metrics
and health fan-out).
"""

from __future__ import annotations

import importlib
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .cluster import HashRing

KEY_KWARG = "conv_key"
TARGET_KWARG = "target_replica"


def slot_of(replica: RunningReplica) -> str:
    """The ring name of a replica: its rank when Serve reports one, else its unique id."""
    rank = (replica.replica_metadata or {}).get("rank")
    return f"rank-{rank}" if rank is not None else replica.replica_id.unique_id


class ConversationAffinityRouter(RequestRouter):
    def initialize_state(self, vnodes: int = 64, **kwargs):
        self.ring = HashRing(vnodes=vnodes)
        # The real registry module (this module reaches us pickled by value: see ray_registry).
        importlib.import_module("loopserve.server.ray_registry").ROUTERS[self._deployment_id.name] = self

    def live_replicas(self) -> dict[str, str]:
        """unique id -> ring slot of every replica this router currently knows."""
        return {r.replica_id.unique_id: slot_of(r) for r in self.curr_replicas.values()}

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        # Never raise here: an exception would leave the request hanging inside Serve.
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target = kwargs.get(TARGET_KWARG)
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target] or candidate_replicas]
        key = kwargs.get(KEY_KWARG)
        if key is None:
            return [candidate_replicas]
        by_slot: dict[str, RunningReplica] = {}
        for r in candidate_replicas:
            s = slot_of(r)
            by_slot[s if s not in by_slot else r.replica_id.unique_id] = r
        self.ring.set_nodes(by_slot)
        owner = self.ring.owner(str(key))
        # One rank only: a busy owner makes the request wait rather than lose its KV cache.
        return [[by_slot[owner]]] if owner in by_slot else [candidate_replicas]
