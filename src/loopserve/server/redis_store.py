"""Redis persistence of conversations: the shared, durable store of a multi-replica deployment.

The `ConversationStore` protocol (store_api.py) with the same records as the SQLite store (store.py), so the
prompt builder and the worker do not know which one they write to; every replica of a Ray
Serve deployment reaches the same Redis, so any replica can rebuild any conversation.

Keys (all under `prefix`, default "loopserve:"):
- `conv:{id}`: a hash with the latest state of a conversation (messages, token ids of the
  whole history, turns, ...); `convs` is the set of conversation ids.
- `ans:{key}`: one generated answer (its token ids), keyed like the SQLite `answers` table
  by (model, hash of the prompt ids, hash of the answer text); `answers` is the set of keys.
- `ans-latest:{model}:{content hash}`: the key of the latest answer with that text, for
  the lookup by text alone.

A turn is written in one MULTI/EXEC transaction. Durability is the server's: run Redis with
`appendonly yes` and `appendfsync always` (scripts/redis.sh does) so a committed turn
survives a crash of Redis too. Connection problems raise `StoreUnavailable`, which the HTTP
layer answers with 503 and Retry-After.
"""

from __future__ import annotations

import json
import time

from .hashing import answer_key, ids_hash, text_hash
from .store_api import AnswerRecord, StoreUnavailable, redact_url


class RedisConversationStore:
    def __init__(self, url: str, prefix: str = "loopserve:", timeout: float = 5.0):
        try:
            import redis
        except ImportError as e:  # pragma: no cover - redis is a dependency
            raise RuntimeError("a redis:// store needs the 'redis' package (pip install redis)") from e
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
        self.url = url
        self.prefix = prefix
        # decode_responses: every value here is text (JSON); short timeouts so a dead store
        # turns into a quick 503 instead of a hung request.
        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                                       socket_connect_timeout=timeout, health_check_interval=10)

    persistent = True

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as e:
            raise StoreUnavailable(f"conversation store {redact_url(self.url)} is unavailable: {e}") from e

    def ping(self) -> bool:
        return bool(self._call(self._r.ping))

    def close(self) -> None:
        self._r.close()

    # -- writes ---------------------------------------------------------------------------
    def save_turn(self, conversation_id: str, *, model: str, method: str, knobs: dict, messages: list[dict],
                  prompt_ids: list[int], answer_text: str, answer_ids: list[int] | None) -> None:
        now = time.time()
        history = list(prompt_ids) + list(answer_ids or [])
        ck = self._k("conv", conversation_id)

        def write():
            p = self._r.pipeline(transaction=True)
            p.hsetnx(ck, "created", repr(now))
            p.hset(ck, mapping={"id": conversation_id, "model": model, "method": method,
                                "knobs": json.dumps(knobs, sort_keys=True), "messages": json.dumps(messages),
                                "token_ids": json.dumps(history), "n_tokens": len(history), "updated": repr(now)})
            p.hincrby(ck, "turns", 1)
            p.sadd(self._k("convs"), conversation_id)
            if answer_ids is not None:
                ph, ch = ids_hash(prompt_ids), text_hash(answer_text)
                key = answer_key(model, ph, ch)
                p.set(self._k("ans", key), json.dumps({"token_ids": list(answer_ids), "conversation_id": conversation_id,
                                                       "prompt_len": len(prompt_ids), "created": now}))
                p.sadd(self._k("answers"), key)
                p.set(self._k("ans-latest", model, ch), key)
            p.execute()

        self._call(write)

    # -- reads ----------------------------------------------------------------------------
    def find_answer(self, model: str, prompt_hash: str, content: str) -> AnswerRecord | None:
        ch = text_hash(content)
        raw = self._call(self._r.get, self._k("ans", answer_key(model, prompt_hash, ch)))
        exact = raw is not None
        if raw is None:
            latest = self._call(self._r.get, self._k("ans-latest", model, ch))
            raw = self._call(self._r.get, self._k("ans", latest)) if latest else None
        if raw is None:
            return None
        rec = json.loads(raw)
        return AnswerRecord(rec["token_ids"], rec["conversation_id"], rec["prompt_len"], exact)

    def get_conversation(self, conversation_id: str) -> dict | None:
        h = self._call(self._r.hgetall, self._k("conv", conversation_id))
        if not h:
            return None
        return {"id": h["id"], "model": h["model"], "method": h["method"], "knobs": json.loads(h["knobs"]),
                "messages": json.loads(h["messages"]), "token_ids": json.loads(h["token_ids"]),
                "turns": int(h["turns"]), "created": float(h["created"]), "updated": float(h["updated"])}

    def count(self) -> dict:
        return {"conversations": int(self._call(self._r.scard, self._k("convs"))),
                "answers": int(self._call(self._r.scard, self._k("answers")))}
