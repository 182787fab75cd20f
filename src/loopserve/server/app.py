"""The OpenAI-compatible HTTP API (FastAPI): chat completions, models, health, metrics.

`create_app(engine_or_config, ...)` returns an ASGI app. One `Engine` serves every request;
a single worker thread (sessions.Worker) owns the model, so generation never blocks the
event loop and model calls never overlap. Requests beyond `max_queue` (waiting + running)
get 429; a client that disconnects cancels its generation; every error is an OpenAI-style
JSON body `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

This module holds the configuration, the server's state, the middleware (API key, response
counting), the error handlers and the OpenAPI document; the endpoints are in routes.py,
the wire models in protocol.py, the metrics in metrics.py.
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.session import Engine
from ..models import DEFAULT_MODEL_ALIASES
from .metrics import Metrics, StateSnapshot, StatusCounter
from .protocol import APIError, ChatCompletionChunk, ChatCompletionRequest, bad_request
from .routes import router
from .sessions import PromptBuilder, SessionPool, Worker, kv_bytes
from .store import StoreUnavailable, open_store

log = logging.getLogger("loopserve.server")

PREP_THREADS = 4  # prompts built (templated, tokenised) at once, each with its own tokenizer


# -- configuration ----------------------------------------------------------------------------
@dataclass
class ServerConfig:
    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    method: str = "loopserve"
    knobs: dict = field(default_factory=dict)
    api_key: str | None = None
    # Conversation store: a SQLite file, or a redis:// URL (the shared store of a Ray Serve
    # deployment, see ray_app.py); None keeps conversations in memory only.
    db_path: str | None = None
    kv_budget_bytes: int = 1 << 30  # KV bytes of all live sessions before LRU eviction
    max_queue: int = 16  # requests waiting + running; more get 429
    max_active: int = 4  # requests batched into each forward at once (the rest wait in order)
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 256
    default_temperature: float = 1.0  # OpenAI's default; send temperature=0 for greedy answers
    served_model_name: str | None = None
    # While this file exists the worker pauses before each decode step (failure drills).
    pause_file: str | None = None


# -- the server's state ---------------------------------------------------------------------------
class ServerState:
    def __init__(self, engine: Engine, cfg: ServerConfig):
        self.engine = engine
        self.cfg = cfg
        self.method = engine.method
        self.knobs = dict(engine.knobs)
        self.model_id = cfg.served_model_name or getattr(engine.loaded, "name", None) or cfg.model
        aliases = {self.model_id, cfg.model}
        if cfg.model in DEFAULT_MODEL_ALIASES:
            aliases |= DEFAULT_MODEL_ALIASES
        self.model_aliases = {a for a in aliases if a}
        self.created = int(time.time())
        self.metrics = Metrics(self.snapshot, model=self.model_id, method=self.method)
        self.store = open_store(cfg.db_path)
        self.builder = PromptBuilder(engine.tokenizer, self.store, self.model_id)
        self.pool = SessionPool(engine, cfg.kv_budget_bytes, method=self.method, knobs=self.knobs)
        self.worker = Worker(self.pool, self.store, self.model_id, metrics=self.metrics, max_active=cfg.max_active,
                             pause_file=cfg.pause_file)
        self.prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="loopserve-prep")
        self.in_flight = 0

    def snapshot(self) -> StateSnapshot:
        pool = self.pool
        try:
            sessions = list(pool.sessions.values())
            kv = sum(kv_bytes(p.session) for p in sessions)
        except RuntimeError:  # the worker changed the dict meanwhile: report what we can
            sessions, kv = [], 0
        return StateSnapshot(in_flight=self.in_flight, running=len(self.worker.active), queue_limit=self.cfg.max_queue,
                             sessions=len(sessions), kv_bytes=kv, kv_budget_bytes=self.cfg.kv_budget_bytes,
                             evictions=pool.evictions)

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "loopserve",
                "loopserve": {"method": self.method, "knobs": self.knobs, "max_context": self.engine.max_context}}

    def close(self) -> None:
        self.worker.stop()
        self.prep.shutdown(wait=False)
        self.store.close()


def _build_engine(cfg: ServerConfig) -> Engine:
    from ..models.loader import load_model

    return Engine(load_model(cfg.model, dtype=cfg.dtype, device=cfg.device), method=cfg.method, knobs=cfg.knobs)


def create_app(engine_or_config: Engine | ServerConfig | str, config: ServerConfig | None = None, **overrides) -> FastAPI:
    """The server app. Pass a ready `Engine` (and optionally a `ServerConfig` or keyword
    overrides such as api_key=, db_path=, kv_budget_bytes=, max_queue=), a `ServerConfig`
    (the model is loaded now), or a model name."""
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown server option(s) {unknown}; known: {sorted(known)}")
    if isinstance(engine_or_config, Engine):
        engine = engine_or_config
        cfg = config or ServerConfig(model=getattr(engine.loaded, "name", "model"), method=engine.method, knobs=dict(engine.knobs))
        cfg = replace(cfg, **overrides)
    else:
        if isinstance(engine_or_config, str):
            cfg = replace(config or ServerConfig(), model=engine_or_config)
        elif isinstance(engine_or_config, ServerConfig):
            cfg = engine_or_config
        else:
            raise TypeError("create_app expects an Engine, a ServerConfig or a model name")
        cfg = replace(cfg, **overrides)
        engine = _build_engine(cfg)
    if cfg.max_queue < 1 or cfg.max_active < 1 or cfg.max_body_bytes < 1 or cfg.kv_budget_bytes < 0:
        raise ValueError("max_queue, max_active and max_body_bytes must be >= 1 and kv_budget_bytes >= 0")
    state = ServerState(engine, cfg)

    @asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="LoopServe", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat completions with session KV reuse (docs/server.md).")
    app.state.loopserve = state
    app.include_router(router)
    app.add_middleware(RequireAPIKey, api_key=cfg.api_key)
    app.add_middleware(StatusCounter, metrics=state.metrics)  # outermost: counts the 401s too
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):  # no route declares a validated input
        return bad_request(str(exc), None).response()

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable):
        log.warning("%s", exc)
        return APIError(503, f"The conversation store is unavailable; retry shortly. ({exc})", type="server_error",
                        code="store_unavailable", headers={"Retry-After": "1"}).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error", code="internal_error").response()

    return app


class RequireAPIKey:
    """Pure ASGI middleware: with a key configured, every path but /health and /metrics
    (the probes and the scraper) needs `Authorization: Bearer <key>` (401 otherwise)."""

    OPEN = {"/health", "/metrics"}

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key or scope.get("path") in self.OPEN:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            err = APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        elif not hmac.compare_digest(token.encode(), self.api_key.encode()):
            err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await err.response()(scope, receive, send)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with the wire models the chat route validates itself (it reads
    the body within the size limit first), the model ids served, and without the 422 that
    FastAPI declares but this server never sends (its errors are 400s)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionRequest, ChatCompletionChunk):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
    # The ids this server answers to (anything else is a 404 model_not_found).
    schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] = sorted(app.state.loopserve.model_aliases)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc
