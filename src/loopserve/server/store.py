"""SQLite persistence of conversations: their messages and exact token ids.

Two tables:

- `conversations`: the latest state of every conversation the server has answered (its
  messages, the assistant answer included, and the token ids of the whole history: the
  prompt of the last turn followed by the ids the model generated).
- `answers`: one row per generated answer, keyed by (model, hash of the token ids of the
  prompt that produced it, hash of the answer text). It holds the ids the model generated.
  When a client resends that answer as an assistant message, the prompt builder splices
  these ids in instead of re-tokenising the text (re-tokenisation can drift: a different
  segmentation, or replacement characters for incomplete UTF-8), so the resent history
  matches the session's KV cache token for token, and after a restart the rebuilt history
  is exactly the one the model saw.

Every turn is committed (WAL journal) before the server sends the end of its answer, so a
client that got an answer can always continue the conversation, even after `kill -9`.
The connection is shared by threads behind a lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from .hashing import answer_key, ids_hash, text_hash
from .store_api import AnswerRecord, ConversationStore, StoreUnavailable, redact_url

__all__ = ["SQLiteConversationStore", "open_store", "ConversationStore", "AnswerRecord", "StoreUnavailable", "redact_url"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    knobs TEXT NOT NULL,
    messages TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    turns INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    prompt_len INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_content ON answers (model, content_hash, created);
"""


class SQLiteConversationStore:
    """Thread-safe SQLite store. `path=None` or ":memory:" keeps it in memory (no restarts).

    The file holds conversation text: it is created readable by its owner only (SQLite
    gives its -wal and -shm files the same mode)."""

    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path else ":memory:"
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.path = str(Path(self.path).expanduser())
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed turn survives a process crash (kill -9).
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    @property
    def persistent(self) -> bool:
        return self.path != ":memory:"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes ---------------------------------------------------------------------------
    def save_turn(
        self,
        conversation_id: str,
        *,
        model: str,
        method: str,
        knobs: dict,
        messages: list[dict],
        prompt_ids: list[int],
        answer_text: str,
        answer_ids: list[int] | None,
    ) -> None:
        """Record one completed turn (one transaction).

        `answer_ids` is None when the ids do not decode to `answer_text` (a stop string cut
        the text): then only the conversation row is written, and a resent answer is
        tokenised from its text.
        """
        now = time.time()
        history = list(prompt_ids) + list(answer_ids or [])
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                row = cur.execute("SELECT turns, created FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
                turns, created = (row[0] + 1, row[1]) if row else (1, now)
                cur.execute(
                    "INSERT OR REPLACE INTO conversations (id, model, method, knobs, messages, token_ids, n_tokens, turns, created, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, model, method, json.dumps(knobs, sort_keys=True), json.dumps(messages),
                     json.dumps(history), len(history), turns, created, now),
                )
                if answer_ids is not None:
                    ph, ch = ids_hash(prompt_ids), text_hash(answer_text)
                    cur.execute(
                        "INSERT OR REPLACE INTO answers (key, model, prompt_hash, content_hash, prompt_len, conversation_id, token_ids, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (answer_key(model, ph, ch), model, ph, ch, len(prompt_ids), conversation_id, json.dumps(list(answer_ids)), now),
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    # -- reads ----------------------------------------------------------------------------
    def find_answer(self, model: str, prompt_hash: str, content: str) -> AnswerRecord | None:
        """The ids generated for `content` after the prompt with hash `prompt_hash`; failing
        that, the most recent ids generated for exactly this text in any conversation."""
        ch = text_hash(content)
        with self._lock:
            row = self._db.execute(
                "SELECT token_ids, conversation_id, prompt_len FROM answers WHERE key = ?",
                (answer_key(model, prompt_hash, ch),),
            ).fetchone()
            exact = row is not None
            if row is None:
                row = self._db.execute(
                    "SELECT token_ids, conversation_id, prompt_len FROM answers WHERE model = ? AND content_hash = ?"
                    " ORDER BY created DESC LIMIT 1",
                    (model, ch),
                ).fetchone()
        if row is None:
            return None
        return AnswerRecord(json.loads(row[0]), row[1], row[2], exact)

    def get_conversation(self, conversation_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, model, method, knobs, messages, token_ids, turns, created, updated FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0], "model": row[1], "method": row[2], "knobs": json.loads(row[3]),
            "messages": json.loads(row[4]), "token_ids": json.loads(row[5]), "turns": row[6],
            "created": row[7], "updated": row[8],
        }

    def count(self) -> dict:
        with self._lock:
            c = self._db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
            a = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        return {"conversations": c, "answers": a}


def open_store(location: str | Path | None) -> ConversationStore:
    """The conversation store at `location`: a `redis://` / `rediss://` / `unix://` URL gives
    the shared Redis store (redis_store.py); a file path (or `sqlite:///path`) gives SQLite;
    None or ":memory:" an in-memory SQLite store (nothing survives a restart)."""
    if location is None:
        return SQLiteConversationStore(None)
    loc = str(location)
    if loc.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisConversationStore

        return RedisConversationStore(loc)
    if loc.startswith("sqlite:///"):
        loc = loc[len("sqlite:///"):]
    elif "://" in loc:
        raise ValueError(f"unknown store URL {loc!r}: use a SQLite file path, sqlite:///PATH or redis://HOST:PORT/DB")
    return SQLiteConversationStore(loc)
