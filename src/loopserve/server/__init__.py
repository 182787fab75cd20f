"""LoopServe's OpenAI-compatible chat server (`loopserve serve`).

`create_app(engine_or_config, ...)` builds the FastAPI app; `ServerConfig` holds its
options; the `serve` command lives in `loopserve.server.cli` (`python -m loopserve.server`).
Exports are imported lazily, so that `loopserve.server.cli` (imported when the main
command builds its parser) does not load FastAPI, torch or transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "APIError": ".protocol",
    "ChatCompletionRequest": ".protocol",
    "ServerConfig": ".app",
    "create_app": ".app",
    "PromptBuilder": ".sessions",
    "SessionPool": ".sessions",
    "Worker": ".sessions",
    "ConversationStore": ".store_api",
    "SQLiteConversationStore": ".store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
