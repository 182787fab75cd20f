"""The HTTP endpoints: chat completions (whole or streamed), models, health, metrics.

Each handler finds the server's state (`ServerState`, app.py) on `request.app.state`.
A chat request is authenticated (middleware, app.py), read within the body limit,
validated (protocol.py), admitted (a queue slot until the worker ends it: 429 beyond
`max_queue`), turned into prompt ids on a preparation thread, and handed to the worker
(sessions.py), whose events become the answer or the SSE stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine.registry import resolve_method
from ..engine.sampling import SamplingParams
from .metrics import CONTENT_TYPE
from .protocol import (
    DONE,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    ChunkWriter,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
    bad_request,
    completion,
    extension,
    parse_chat_request,
    sse,
    too_large,
)
from .sessions import Job

try:
    from jinja2 import TemplateError as _JinjaError
except ImportError:  # pragma: no cover
    _JinjaError = ValueError
TEMPLATE_ERRORS = (_JinjaError, ValueError, TypeError, KeyError)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    why = {400: "Invalid request (OpenAI-style error body naming the parameter).",
           401: "Missing or wrong API key.", 404: "Unknown model.", 413: "Request body too large.",
           429: "Queue full; retry after `Retry-After` seconds.", 500: "Failure inside the engine.",
           503: "Conversation store unavailable; retry after `Retry-After` seconds."}
    return {s: {"model": ErrorBody, "description": why[s]} for s in statuses}


router = APIRouter()


@router.get("/health", response_model=Health, responses=_errors(500))
async def health(request: Request):
    st = request.app.state.loopserve
    return {"status": "ok", "model": st.model_id, "method": st.method, "sessions": len(st.pool.sessions),
            "in_flight": st.in_flight, "max_queue": st.cfg.max_queue, "persistent": st.store.persistent}


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format 0.0.4."}})
async def metrics(request: Request):
    return PlainTextResponse(request.app.state.loopserve.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=ModelList, responses=_errors(401))
async def list_models(request: Request):
    return {"object": "list", "data": [request.app.state.loopserve.model_card()]}


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=_errors(401, 404))
async def get_model(model: str, request: Request):
    st = request.app.state.loopserve
    if model not in st.model_aliases:
        raise APIError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")
    return st.model_card()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 beyond `limit` bytes (drained up to a cap first, so the
    client reads the answer instead of a reset connection)."""
    declared = request.headers.get("content-length")
    try:
        declared_n = int(declared) if declared is not None else 0
    except ValueError:
        raise bad_request("Invalid Content-Length header.", None, "invalid_header") from None
    drain_cap = 4 * limit + (1 << 20)
    if declared_n > drain_cap:
        raise too_large(limit)  # do not even read it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > drain_cap:
            break
    if size > limit:
        raise too_large(limit)
    return b"".join(chunks)


def sampling_params(req: ChatCompletionRequest, default_max_tokens: int, default_temperature: float,
                    max_context: int) -> SamplingParams:
    name, max_tokens = ("max_completion_tokens", req.max_completion_tokens)
    if max_tokens is None:
        name, max_tokens = "max_tokens", req.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif max_tokens > max_context:
        raise bad_request(f"Invalid value for '{name}': {max_tokens}; this model's context window is {max_context} tokens "
                          "(prompt and answer together).", name)
    temperature = default_temperature if req.temperature is None else req.temperature
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                          top_p=1.0 if req.top_p is None else float(req.top_p),
                          top_k=0 if req.top_k in (None, -1) else req.top_k, seed=req.seed, stop=stop,
                          ignore_eos=req.ignore_eos).validate()


def request_knobs(method: str, base: dict, extra: dict | None) -> dict:
    """The server's knobs with the request's `loopserve` ones on top; a bad one is a 400
    naming it (each knob is checked on its own, so the message names the right one)."""
    knobs = dict(base)
    if not extra:
        return knobs
    declared = resolve_method(method, base).knobs()
    for name, value in extra.items():
        if name not in declared:
            raise bad_request(f"Invalid 'loopserve' knobs for method {method!r}: unknown knob {name!r}; "
                              f"known: {sorted(declared)}.", f"loopserve.{name}", "invalid_knob")
        try:
            resolve_method(method, {**base, name: value})
        except (ValueError, TypeError) as e:
            raise bad_request(f"Invalid 'loopserve' knobs for method {method!r}: {e}", f"loopserve.{name}",
                              "invalid_knob") from None
    knobs.update(extra)
    try:
        resolve_method(method, knobs)
    except (ValueError, TypeError) as e:  # knobs valid alone but not together
        raise bad_request(f"Invalid 'loopserve' knobs for method {method!r}: {e}", "loopserve", "invalid_knob") from None
    return knobs


async def _watch_disconnect(request: Request, job: Job, on_withdrawn) -> None:
    """Cancel `job` when the client goes away (the body is already read, so the next ASGI
    message is the disconnect); a job still queued frees its slot at once."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if job.withdraw():
                    on_withdrawn()
                return
    except asyncio.CancelledError:
        raise
    except Exception:
        return


_CHAT_RESPONSES = {
    200: {"model": ChatCompletion, "description": "The answer; with `stream: true`, server-sent events instead.",
          # One server-sent event (OpenAPI 3.0/3.1 tools, schemathesis among them, read the
          # schema of text/event-stream per event, as OpenAPI 3.2's itemSchema).
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "properties": {
                  "data": {"type": "string", "description": (
                      "A ChatCompletionChunk as JSON; `[DONE]` last; a failure mid-stream is an "
                      "ErrorBody JSON event before `[DONE]`.")},
                  "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
              },
              "description": "`data: <ChatCompletionChunk JSON>` events, then `data: [DONE]`."}}}},
    **_errors(400, 401, 404, 413, 429, 500, 503),
}


@router.post("/v1/chat/completions", responses=_CHAT_RESPONSES, response_model=None,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}})
async def chat_completions(request: Request):
    st = request.app.state.loopserve
    cfg, engine = st.cfg, st.engine
    req = parse_chat_request(await read_body(request, cfg.max_body_bytes))
    if req.model not in st.model_aliases:
        raise APIError(404, f"The model {req.model!r} does not exist; this server serves {st.model_id!r}.",
                       param="model", code="model_not_found")
    sampling = sampling_params(req, cfg.default_max_tokens, cfg.default_temperature, engine.max_context)
    knobs = request_knobs(st.method, st.knobs, req.loopserve)
    messages = req.texts()

    def too_long(n: int, what: str) -> APIError:
        return bad_request(
            f"This model's maximum context length is {engine.max_context} tokens. However, your messages resulted in "
            f"{what}{n} tokens (one position must remain for the answer). Please reduce the length of the messages.",
            "messages", "context_length_exceeded")

    # Refused before tokenising when even the fewest tokens its characters can make do not fit.
    n_min = st.builder.min_tokens(messages)
    if n_min >= engine.max_context:
        raise too_long(n_min, "at least ")

    # Admission: a slot is held from here until the worker ends the job (or it is withdrawn).
    if st.in_flight >= cfg.max_queue:
        st.metrics.rejected_request()
        raise APIError(429, f"Too many requests: {st.in_flight} requests are waiting or running (limit {cfg.max_queue}). "
                       "Retry later.", type="rate_limit_exceeded", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    st.in_flight += 1
    loop = asyncio.get_running_loop()
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            st.in_flight -= 1

    try:
        built = await loop.run_in_executor(st.prep, st.builder.build, messages)
    except TEMPLATE_ERRORS as e:  # e.g. a template that demands alternating roles
        release()
        raise bad_request(f"Could not apply the chat template to these messages: {e}", "messages", "invalid_messages") from None
    except BaseException:
        release()
        raise
    if len(built.ids) >= engine.max_context:
        release()
        raise too_long(len(built.ids), "")

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

    job = Job(built, sampling, knobs, messages, sink)
    st.worker.start()
    st.worker.submit(job)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    fingerprint = f"loopserve-{st.method}"

    def generation_failed(exc: BaseException) -> APIError:
        return APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", type="server_error", code="generation_failed")

    if req.stream:
        writer = ChunkWriter(cid, created, st.model_id, fingerprint, bool(req.stream_options and req.stream_options.include_usage))

        async def stream():
            watcher = asyncio.create_task(_watch_disconnect(request, job, release))
            done = False
            try:
                yield writer.chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        if payload:
                            yield writer.chunk({"content": payload})
                        continue
                    done = True
                    if kind == "done":
                        yield writer.chunk({}, payload["finish_reason"], loopserve=extension(payload))
                        if writer.include_usage:
                            yield writer.usage_chunk(payload)
                        yield DONE
                    elif kind == "error":
                        yield sse(generation_failed(payload).body())
                        yield DONE
                    return  # (cancelled: the client is gone)
            finally:
                watcher.cancel()
                if not done and job.withdraw():
                    release()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    watcher = asyncio.create_task(_watch_disconnect(request, job, release))
    parts: list[str] = []
    try:
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                parts.append(payload)
            elif kind == "done":
                break
            elif kind == "error":
                raise generation_failed(payload)
            else:  # cancelled: the client is gone, nobody reads this
                return JSONResponse(APIError(499, "Client closed the request.", code="cancelled").body(), status_code=499)
    except BaseException:
        if job.withdraw():
            release()
        raise
    finally:
        watcher.cancel()
    return completion(cid, created, st.model_id, fingerprint, payload)

