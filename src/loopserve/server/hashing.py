"""Hashes that key stored answers: token id sequences, answer texts, and the answer key.

Both stores (store.py, redis_store.py) and the prompt builder (sessions.py) use them, so a
record written by one is found by the others.
"""

from __future__ import annotations

import hashlib
import struct


class IdsHasher:
    """Incremental SHA-256 of a token id sequence (little-endian uint32 each)."""

    def __init__(self, ids: list[int] | None = None):
        self._h = hashlib.sha256()
        if ids:
            self.update(ids)

    def update(self, ids: list[int]) -> "IdsHasher":
        if ids:
            self._h.update(struct.pack(f"<{len(ids)}I", *ids))
        return self

    def copy(self) -> "IdsHasher":
        out = IdsHasher()
        out._h = self._h.copy()
        return out

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def ids_hash(ids: list[int]) -> str:
    return IdsHasher(ids).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def answer_key(model: str, prompt_hash: str, content_hash: str) -> str:
    """The key of one stored answer: (model, hash of its prompt ids, hash of its text)."""
    return hashlib.sha256(f"{model}\0{prompt_hash}\0{content_hash}".encode()).hexdigest()
