"""The OpenAI-compatible HTTP API (FastAPI): chat completions, models, health, metrics.

`create_app(engine_or_config, ...)` returns an ASGI app. One `Engine` serves every request;
a single worker thread (sessions.Worker) owns the model, so generation never blocks the
event loop and model calls never overlap. Requests beyond `max_queue` (waiting + running)
get 429; a client that disconnects cancels its generation; every error is an OpenAI-style
JSON body `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from bisect import bisect_left
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.registry import resolve_method
from ..engine.sampling import SamplingParams
from ..engine.session import Engine
from .sessions import Job, PromptBuilder, SessionPool, Worker, kv_bytes
from .store import StoreUnavailable, open_store

log = logging.getLogger("loopserve.server")

try:
    from jinja2 import TemplateError as _JinjaError
except ImportError:  # pragma: no cover
    _JinjaError = ValueError
_TEMPLATE_ERRORS = (_JinjaError, ValueError, TypeError, KeyError)

_DEFAULT_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}


# -- configuration ----------------------------------------------------------------------------
@dataclass
class ServerConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    method: str = "loopserve"
    knobs: dict = field(default_factory=dict)
    api_key: str | None = None
    # Conversation store: a SQLite file, or a redis:// URL (the shared store of a Ray Serve
    # deployment, see ray_app.py); None keeps conversations in memory only.
    db_path: str | None = None
    kv_budget_bytes: int = 1 << 30  # KV bytes of all live sessions before LRU eviction
    max_queue: int = 16  # requests waiting + running; more get 429
    max_active: int = 4  # requests decoded round-robin at once (the rest wait in order)
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 256
    default_temperature: float = 1.0  # OpenAI's default; send temperature=0 for greedy answers
    served_model_name: str | None = None


# -- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# -- metrics (Prometheus text exposition format, written by hand) -----------------------------
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_METRICS = {
    "loopserve_http_requests_total": ("counter", "HTTP responses by path and status code."),
    "loopserve_requests_rejected_total": ("counter", "Chat requests refused with 429 because the queue was full."),
    "loopserve_requests_cancelled_total": ("counter", "Chat requests whose generation stopped because the client went away."),
    "loopserve_requests_completed_total": ("counter", "Chat requests that generated a whole answer."),
    "loopserve_generation_errors_total": ("counter", "Chat requests that failed inside the engine."),
    "loopserve_persist_errors_total": ("counter", "Finished turns that could not be written to SQLite."),
    "loopserve_prompt_tokens_total": ("counter", "Prompt tokens of completed requests."),
    "loopserve_cached_tokens_total": ("counter", "Prompt tokens reused from a live session's KV cache."),
    "loopserve_prefill_tokens_total": ("counter", "Prompt tokens prefilled (rebuilt history included)."),
    "loopserve_rebuilt_tokens_total": ("counter", "History tokens re-prefilled to rebuild an evicted or lost session."),
    "loopserve_generated_tokens_total": ("counter", "Tokens generated, cancelled requests included."),
    "loopserve_session_acquisitions_total": ("counter", "How requests found their session: continue, fork, new (+rebuild)."),
    "loopserve_session_evictions_total": ("counter", "Sessions whose KV was evicted (LRU) to stay within the budget."),
    "loopserve_ttft_seconds": ("histogram", "Time from submission to the first text delta."),
    "loopserve_queue_wait_seconds": ("histogram", "Time a request waited for the worker."),
    "loopserve_requests_in_flight": ("gauge", "Chat requests admitted and not finished (waiting + running)."),
    "loopserve_requests_running": ("gauge", "Chat requests being decoded."),
    "loopserve_queue_limit": ("gauge", "Maximum waiting + running chat requests."),
    "loopserve_sessions": ("gauge", "Live sessions (KV caches) in the pool."),
    "loopserve_kv_bytes": ("gauge", "KV bytes held by live sessions."),
    "loopserve_kv_budget_bytes": ("gauge", "KV byte budget of the session pool."),
    "loopserve_info": ("gauge", "Served model and method."),
}


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple, float] = defaultdict(float)
        self._hist: dict[str, list] = {}

    @staticmethod
    def _key(name: str, labels: dict) -> tuple:
        return (name, tuple(sorted(labels.items())))

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counters[self._key(name, labels)] += value

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._counters.get(self._key(name, labels), 0.0)

    def observe(self, name: str, value: float, buckets=_TTFT_BUCKETS) -> None:
        with self._lock:
            h = self._hist.setdefault(name, [list(buckets), [0] * (len(buckets) + 1), 0.0, 0])
            h[1][bisect_left(h[0], value)] += 1
            h[2] += value
            h[3] += 1

    # hooks the worker calls
    def queue_wait(self, seconds: float) -> None:
        self.observe("loopserve_queue_wait_seconds", seconds)

    def cancelled(self, generated: int) -> None:
        self.inc("loopserve_requests_cancelled_total")
        self.inc("loopserve_generated_tokens_total", generated)

    def failed(self) -> None:
        self.inc("loopserve_generation_errors_total")

    def persist_failed(self) -> None:
        self.inc("loopserve_persist_errors_total")

    def finished(self, info: dict) -> None:
        self.inc("loopserve_requests_completed_total")
        self.inc("loopserve_prompt_tokens_total", info["prompt_tokens"])
        self.inc("loopserve_cached_tokens_total", info["cached_tokens"])
        self.inc("loopserve_prefill_tokens_total", info["prefill_tokens"])
        self.inc("loopserve_rebuilt_tokens_total", info["rebuilt_tokens"])
        self.inc("loopserve_generated_tokens_total", info["completion_tokens"])
        self.inc("loopserve_session_acquisitions_total", kind=info["session"])
        self.observe("loopserve_ttft_seconds", info["ttft_s"])

    def render(self, gauges: dict[str, float | tuple]) -> str:
        def esc(v: str) -> str:
            return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

        def fmt(labels) -> str:
            return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels) + "}" if labels else ""

        with self._lock:
            counters = dict(self._counters)
            hists = {k: (list(v[0]), list(v[1]), v[2], v[3]) for k, v in self._hist.items()}
        by_name: dict[str, list[str]] = defaultdict(list)
        for (name, labels), v in sorted(counters.items()):
            by_name[name].append(f"{name}{fmt(labels)} {v:g}")
        for name, (buckets, counts, total, n) in hists.items():
            acc = 0
            for b, c in zip(buckets, counts):
                acc += c
                by_name[name].append(f'{name}_bucket{{le="{b:g}"}} {acc}')
            by_name[name].append(f'{name}_bucket{{le="+Inf"}} {n}')
            by_name[name].append(f"{name}_sum {total:.6f}")
            by_name[name].append(f"{name}_count {n}")
        for name, v in gauges.items():
            if isinstance(v, tuple):  # (labels dict, value)
                by_name[name].append(f"{name}{fmt(sorted(v[0].items()))} {v[1]:g}")
            else:
                by_name[name].append(f"{name} {v:g}")
        lines = []
        for name, (typ, help_) in _METRICS.items():
            samples = by_name.pop(name, None)
            if samples is None:
                if typ == "counter" and name != "loopserve_http_requests_total" and name != "loopserve_session_acquisitions_total":
                    samples = [f"{name} 0"]
                elif typ == "histogram":
                    samples = [f'{name}_bucket{{le="+Inf"}} 0', f"{name}_sum 0", f"{name}_count 0"]
                else:
                    samples = []
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}", *samples]
        for name, samples in by_name.items():  # pragma: no cover - undeclared metrics
            lines += [f"# TYPE {name} untyped", *samples]
        return "\n".join(lines) + "\n"


class _StatusCounter:
    """Pure ASGI middleware counting responses by path and status (streaming-safe)."""

    PATHS = {"/v1/chat/completions", "/v1/models", "/health", "/metrics"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            path = path if path in self.PATHS or path.startswith("/v1/models/") else "other"
            if path.startswith("/v1/models/"):
                path = "/v1/models/{model}"
            self.metrics.inc("loopserve_http_requests_total", path=path, code=str(status["code"]))


# -- request parsing --------------------------------------------------------------------------
_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: SamplingParams
    knobs: dict
    stream: bool = False
    include_usage: bool = False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _parse_messages(raw) -> list[dict]:
    if raw is None:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(raw, list):
        raise _bad("'messages' must be an array of message objects.", "messages", "invalid_type")
    if not raw:
        raise _bad("'messages' must contain at least one message (got an empty array).", "messages", "empty_array")
    out = []
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{p} must be an object with 'role' and 'content'.", p, "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"Invalid value for '{p}.role': {role!r}. Supported roles: {', '.join(_ROLES)}.", f"{p}.role", "invalid_role")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{p}.content[{j}]: only text content parts are supported.", f"{p}.content[{j}]", "unsupported_content")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            if m.get("tool_calls") or m.get("function_call"):
                raise _bad(f"{p}: tool calls are not supported.", f"{p}.tool_calls", "unsupported_parameter")
            raise _bad(f"Missing required parameter: '{p}.content'.", f"{p}.content", "missing_required_parameter")
        elif not isinstance(content, str):
            raise _bad(f"'{p}.content' must be a string or an array of text parts.", f"{p}.content", "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_chat_request(payload, cfg: ServerConfig, method: str, base_knobs: dict) -> ChatRequest:
    if not isinstance(payload, dict):
        raise _bad("The request body must be a JSON object.", None, "invalid_type")
    messages = _parse_messages(payload.get("messages"))

    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream", "invalid_type")
    include_usage = False
    so = payload.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
            raise _bad("'stream_options' must be an object like {\"include_usage\": true}.", "stream_options", "invalid_type")
        include_usage = bool(so.get("include_usage", False))

    def num(name, lo, hi, lo_open=False, default=None):
        v = payload.get(name)
        if v is None:
            return default
        if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise _bad(f"Invalid value for '{name}': {v!r}; expected a number in {rng}.", name)
        return v

    max_tokens = payload.get("max_completion_tokens")
    mt_name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, mt_name = payload.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(f"Invalid value for '{mt_name}': {max_tokens!r}; expected an integer >= 1.", mt_name)
    temperature = num("temperature", 0.0, 2.0, default=cfg.default_temperature)
    top_p = num("top_p", 0.0, 1.0, lo_open=True, default=1.0)
    top_k = payload.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    elif not _is_int(top_k) or top_k < 0:
        raise _bad(f"Invalid value for 'top_k': {top_k!r}; expected an integer >= 0 (0 or -1 disables it).", "top_k")
    seed = payload.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad(f"Invalid value for 'seed': {seed!r}; expected an integer.", "seed")
    stop = payload.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise _bad("'stop' must be a non-empty string or an array of up to 4 non-empty strings.", "stop")
    n = payload.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad(f"Invalid value for 'n': {n!r}; only n=1 is supported.", "n", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        v = num(name, -2.0, 2.0, default=0)
        if v:
            raise _bad(f"'{name}' is not supported (only 0).", name, "unsupported_value")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise _bad("'logprobs' is not supported.", "logprobs", "unsupported_parameter")
    for name in ("tools", "functions"):
        if payload.get(name):
            raise _bad(f"'{name}' is not supported.", name, "unsupported_parameter")
    if payload.get("logit_bias"):
        raise _bad("'logit_bias' is not supported.", "logit_bias", "unsupported_parameter")
    rf = payload.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("Only response_format {\"type\": \"text\"} is supported.", "response_format", "unsupported_value")

    ignore_eos = payload.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"Invalid value for 'ignore_eos': {ignore_eos!r}; expected a boolean.", "ignore_eos", "invalid_type")
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                              top_k=top_k, seed=seed, stop=list(stop), ignore_eos=ignore_eos)
    try:
        sampling.validate()
    except ValueError as e:
        raise _bad(str(e).replace("max_new_tokens", "max_tokens"), None) from None

    knobs = dict(base_knobs)
    extra = payload.get("loopserve")
    if extra is not None:
        if not isinstance(extra, dict):
            raise _bad("'loopserve' must be an object of method knobs, e.g. {\"alpha\": 0.9, \"budget\": 1024, \"n_d\": 16}.",
                       "loopserve", "invalid_type")
        knobs.update(extra)
        try:
            resolve_method(method, knobs)
        except (ValueError, TypeError) as e:
            bad = [k for k in extra if str(k) in str(e)]
            raise _bad(f"Invalid 'loopserve' knobs for method {method!r}: {e}",
                       f"loopserve.{bad[0]}" if bad else "loopserve", "invalid_knob") from None
    return ChatRequest(messages, sampling, knobs, bool(stream), include_usage)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"Request body too large: the limit is {limit} bytes.", param=None, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise _bad("Invalid Content-Length header.", None, "invalid_header") from None
    else:
        declared_n = 0
    drain_cap = 4 * limit + (1 << 20)
    if declared_n > drain_cap:
        raise too_big  # do not even read it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > drain_cap:
            break
    if size > limit:
        raise too_big  # the body was drained so the client reads this answer, not a reset
    return b"".join(chunks)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when the client goes away (the body is already read, so the next ASGI
    message is the disconnect)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return
    except asyncio.CancelledError:
        raise
    except Exception:
        return


# -- the application --------------------------------------------------------------------------
class ServerState:
    def __init__(self, engine: Engine, cfg: ServerConfig):
        self.engine = engine
        self.cfg = cfg
        self.method = engine.method
        self.knobs = dict(engine.knobs)
        self.model_id = cfg.served_model_name or getattr(engine.loaded, "name", None) or cfg.model
        aliases = {self.model_id, cfg.model}
        if cfg.model in _DEFAULT_ALIASES:
            aliases |= _DEFAULT_ALIASES
        self.model_aliases = {a for a in aliases if a}
        self.created = int(time.time())
        self.metrics = Metrics()
        self.store = open_store(cfg.db_path)
        self.builder = PromptBuilder(engine.tokenizer, self.store, self.model_id)
        self.pool = SessionPool(engine, cfg.kv_budget_bytes, method=self.method, knobs=self.knobs)
        self.worker = Worker(self.pool, self.store, self.model_id, metrics=self.metrics, max_active=cfg.max_active)
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="loopserve-prep")
        self.in_flight = 0

    def gauges(self) -> dict:
        pool = self.pool
        try:
            sessions = list(pool.sessions.values())
            kv = sum(kv_bytes(p.session) for p in sessions)
        except RuntimeError:  # the worker changed the dict meanwhile: report what we can
            sessions, kv = [], 0
        return {
            "loopserve_requests_in_flight": self.in_flight,
            "loopserve_requests_running": len(self.worker.active),
            "loopserve_queue_limit": self.cfg.max_queue,
            "loopserve_sessions": len(sessions),
            "loopserve_kv_bytes": kv,
            "loopserve_kv_budget_bytes": self.cfg.kv_budget_bytes,
            "loopserve_session_evictions_total": pool.evictions,
            "loopserve_info": ({"model": self.model_id, "method": self.method}, 1),
        }

    def close(self) -> None:
        self.worker.stop()
        self.prep.shutdown(wait=False)
        self.store.close()


def _build_engine(cfg: ServerConfig) -> Engine:
    from ..models.loader import load_model

    return Engine(load_model(cfg.model, dtype=cfg.dtype), method=cfg.method, knobs=cfg.knobs)


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

    app = FastAPI(title="LoopServe", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.loopserve = state
    app.add_middleware(_StatusCounter, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), param=None, code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):  # pragma: no cover - no pydantic bodies
        return _bad(str(exc), None).response()

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable):
        log.warning("%s", exc)
        return APIError(503, f"The conversation store is unavailable; retry shortly. ({exc})", type="server_error",
                        code="store_unavailable", headers={"Retry-After": "1"}).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error", code="internal_error").response()

    def check_auth(request: Request) -> None:
        if not cfg.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", param=None, code="missing_api_key")
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", param=None, code="invalid_api_key")

    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "loopserve",
                "loopserve": {"method": state.method, "knobs": state.knobs, "max_context": engine.max_context}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_id, "method": state.method, "sessions": len(state.pool.sessions),
                "in_flight": state.in_flight, "max_queue": cfg.max_queue, "persistent": state.store.persistent}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.gauges()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        check_auth(request)
        if model not in state.model_aliases:
            raise APIError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        raw = await _read_body(request, cfg.max_body_bytes)
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise _bad(f"We could not parse the JSON body of your request: {e}", None, "invalid_json") from None
        model = payload.get("model") if isinstance(payload, dict) else None
        if isinstance(payload, dict):
            if model is None:
                raise _bad("Missing required parameter: 'model'.", "model", "missing_required_parameter")
            if not isinstance(model, str):
                raise _bad("'model' must be a string.", "model", "invalid_type")
            if model not in state.model_aliases:
                raise APIError(404, f"The model {model!r} does not exist; this server serves {state.model_id!r}.",
                               param="model", code="model_not_found")
        req = parse_chat_request(payload, cfg, state.method, state.knobs)

        # Admission: a slot is held from here until the worker ends the job.
        if state.in_flight >= cfg.max_queue:
            state.metrics.inc("loopserve_requests_rejected_total")
            raise APIError(429, f"Too many requests: {state.in_flight} requests are waiting or running (limit {cfg.max_queue}). "
                           "Retry later.", type="rate_limit_exceeded", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        state.in_flight += 1
        loop = asyncio.get_running_loop()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.in_flight -= 1

        try:
            built = await loop.run_in_executor(state.prep, state.builder.build, req.messages)
        except _TEMPLATE_ERRORS as e:  # e.g. a template that demands alternating roles
            release()
            raise _bad(f"Could not apply the chat template to these messages: {e}", "messages", "invalid_messages") from None
        except BaseException:
            release()
            raise
        n_prompt = len(built.ids)
        if n_prompt >= engine.max_context:
            release()
            raise _bad(
                f"This model's maximum context length is {engine.max_context} tokens. However, your messages resulted in "
                f"{n_prompt} tokens (one position must remain for the answer). Please reduce the length of the messages.",
                "messages", "context_length_exceeded")

        events: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload) -> None:  # called from the worker thread
            def put():
                events.put_nowait((kind, payload))
                if kind != "delta":
                    release()
            try:
                loop.call_soon_threadsafe(put)
            except RuntimeError:  # the loop is closed (shutdown)
                pass

        job = Job(built, req.sampling, req.knobs, req.messages, sink)
        state.worker.start()
        state.worker.submit(job)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        fingerprint = f"loopserve-{state.method}"

        def usage(info: dict) -> dict:
            return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                    "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
                    "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]}}

        def ext(info: dict) -> dict:
            return {k: v for k, v in info.items() if k != "text"}

        if req.stream:
            def chunk(delta: dict, finish=None, **more) -> str:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                        "system_fingerprint": fingerprint,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if req.include_usage:
                    body["usage"] = None
                body.update(more)
                return f"data: {json.dumps(body)}\n\n"

            async def sse():
                watcher = asyncio.create_task(_watch_disconnect(request, job))
                done = False
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        kind, payload = await events.get()
                        if kind == "delta":
                            if payload:
                                yield chunk({"content": payload})
                        elif kind == "done":
                            done = True
                            yield chunk({}, payload["finish_reason"], loopserve=ext(payload))
                            if req.include_usage:
                                body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": state.model_id, "system_fingerprint": fingerprint, "choices": [],
                                        "usage": usage(payload)}
                                yield f"data: {json.dumps(body)}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        elif kind == "error":
                            done = True
                            err = APIError(500, f"Generation failed: {type(payload).__name__}: {payload}",
                                           type="server_error", code="generation_failed")
                            yield f"data: {json.dumps(err.body())}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        else:  # cancelled
                            done = True
                            return
                finally:
                    watcher.cancel()
                    if not done:
                        job.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        watcher = asyncio.create_task(_watch_disconnect(request, job))
        parts: list[str] = []
        try:
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    parts.append(payload)
                elif kind == "done":
                    info = payload
                    break
                elif kind == "error":
                    raise APIError(500, f"Generation failed: {type(payload).__name__}: {payload}", type="server_error",
                                   code="generation_failed")
                else:  # cancelled: the client is gone, nobody reads this
                    return JSONResponse(APIError(499, "Client closed the request.", code="cancelled").body(), status_code=499)
        except BaseException:
            job.cancel()
            raise
        finally:
            watcher.cancel()
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": info["text"], "refusal": None},
                         "logprobs": None, "finish_reason": info["finish_reason"]}],
            "usage": usage(info),
            "loopserve": ext(info),
        }

    return app
