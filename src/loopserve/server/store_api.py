"""What the server needs from a conversation store (SQLite in store.py, Redis in
redis_store.py), and the pieces both share: the answer record and the outage error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


class StoreUnavailable(RuntimeError):
    """The conversation store cannot be reached (answered with 503 + Retry-After)."""


@dataclass
class AnswerRecord:
    token_ids: list[int]
    conversation_id: str
    prompt_len: int
    exact: bool  # found by (prompt, text), not by the text alone


class ConversationStore(Protocol):
    """Conversations and the token ids of every generated answer (see store.py)."""

    persistent: bool

    def save_turn(self, conversation_id: str, *, model: str, method: str, knobs: dict, messages: list[dict],
                  prompt_ids: list[int], answer_text: str, answer_ids: list[int] | None) -> None:
        """Record one completed turn atomically; `answer_ids` None: the conversation row only."""

    def find_answer(self, model: str, prompt_hash: str, content: str) -> AnswerRecord | None:
        """The ids generated for `content` after the prompt with hash `prompt_hash`; failing
        that, the most recent ids generated for exactly this text in any conversation."""

    def get_conversation(self, conversation_id: str) -> dict | None: ...

    def count(self) -> dict: ...

    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """A store URL fit for logs and error messages: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + host).geturl()
