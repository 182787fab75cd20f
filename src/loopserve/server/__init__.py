"""LoopServe's OpenAI-compatible chat server (`loopserve serve`).

`create_app(engine_or_config, ...)` builds the FastAPI app; `ServerConfig` holds its
options; the `serve` command lives in `loopserve.server.cli` (`python -m loopserve.server`).
"""

from .app import APIError, ServerConfig, create_app
from .sessions import PromptBuilder, SessionPool, Worker
from .store import ConversationStore

__all__ = ["APIError", "ConversationStore", "PromptBuilder", "ServerConfig", "SessionPool", "Worker", "create_app"]
