"""The server's Prometheus metrics (prometheus_client), one registry per app.

Counters and histograms are updated by the request handlers and the worker (its hooks:
`queue_wait`, `cancelled`, `failed`, `persist_failed`, `finished`); the state gauges (queue,
sessions, KV bytes, evictions) are read from the live server at scrape time. The Ray
ingress merges the replicas' expositions (cluster.merge_metrics), so the names here are
the cluster's names too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# `_created` timestamps would be summed into nonsense by the cluster's merge of replicas.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class StateSnapshot:
    """What the state collector reads at scrape time (the app's ServerState provides it)."""

    in_flight: int
    running: int
    queue_limit: int
    sessions: int
    kv_bytes: int
    kv_budget_bytes: int
    evictions: int


class _StateCollector:
    def __init__(self, read: Callable[[], StateSnapshot]):
        self.read = read

    def collect(self):
        st = self.read()
        for name, help_, value in (
            ("loopserve_requests_in_flight", "Chat requests admitted and not finished (waiting + running).", st.in_flight),
            ("loopserve_requests_running", "Chat requests being decoded.", st.running),
            ("loopserve_queue_limit", "Maximum waiting + running chat requests.", st.queue_limit),
            ("loopserve_sessions", "Live sessions (KV caches) in the pool.", st.sessions),
            ("loopserve_kv_bytes", "KV bytes held by live sessions.", st.kv_bytes),
            ("loopserve_kv_budget_bytes", "KV byte budget of the session pool.", st.kv_budget_bytes),
        ):
            yield GaugeMetricFamily(name, help_, value=value)
        yield CounterMetricFamily("loopserve_session_evictions",
                                  "Sessions whose KV was evicted (LRU) to stay within the budget.", value=st.evictions)


def render_families(*families) -> str:
    """The exposition of metric families computed on the spot (e.g. the Ray ingress's own)."""
    registry = CollectorRegistry()
    registry.register(_Fixed(families))
    return generate_latest(registry).decode()


class _Fixed:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


class Metrics:
    def __init__(self, read_state: Callable[[], StateSnapshot], model: str, method: str):
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("loopserve_http_requests", "HTTP responses by path and status code.",
                                     ["path", "code"], registry=r)
        self.rejected = Counter("loopserve_requests_rejected", "Chat requests refused with 429 because the queue was full.",
                                registry=r)
        self.cancelled_requests = Counter("loopserve_requests_cancelled",
                                          "Chat requests whose generation stopped because the client went away.", registry=r)
        self.completed = Counter("loopserve_requests_completed", "Chat requests that generated a whole answer.", registry=r)
        self.generation_errors = Counter("loopserve_generation_errors", "Chat requests that failed inside the engine.",
                                         registry=r)
        self.persist_errors = Counter("loopserve_persist_errors", "Finished turns that could not be written to the store.",
                                      registry=r)
        self.prompt_tokens = Counter("loopserve_prompt_tokens", "Prompt tokens of completed requests.", registry=r)
        self.cached_tokens = Counter("loopserve_cached_tokens", "Prompt tokens reused from a live session's KV cache.",
                                     registry=r)
        self.prefill_tokens = Counter("loopserve_prefill_tokens", "Prompt tokens prefilled (rebuilt history included).",
                                      registry=r)
        self.rebuilt_tokens = Counter("loopserve_rebuilt_tokens",
                                      "History tokens re-prefilled to rebuild an evicted or lost session.", registry=r)
        self.generated_tokens = Counter("loopserve_generated_tokens", "Tokens generated, cancelled requests included.",
                                        registry=r)
        self.acquisitions = Counter("loopserve_session_acquisitions",
                                    "How requests found their session: continue, fork, new (+rebuild).", ["kind"], registry=r)
        self.ttft = Histogram("loopserve_ttft_seconds", "Time from submission to the first text delta.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_s = Histogram("loopserve_queue_wait_seconds", "Time a request waited for the worker.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        Info("loopserve", "Served model and method.", registry=r).info({"model": model, "method": method})
        r.register(_StateCollector(read_state))

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    # -- hooks of the request handlers ----------------------------------------------------------
    def response(self, path: str, code: int) -> None:
        self.http_requests.labels(path=path, code=str(code)).inc()

    def rejected_request(self) -> None:
        self.rejected.inc()

    # -- hooks of the worker --------------------------------------------------------------------
    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_s.observe(seconds)

    def cancelled(self, generated: int) -> None:
        self.cancelled_requests.inc()
        self.generated_tokens.inc(generated)

    def failed(self) -> None:
        self.generation_errors.inc()

    def persist_failed(self) -> None:
        self.persist_errors.inc()

    def finished(self, info: dict) -> None:
        self.completed.inc()
        self.prompt_tokens.inc(info["prompt_tokens"])
        self.cached_tokens.inc(info["cached_tokens"])
        self.prefill_tokens.inc(info["prefill_tokens"])
        self.rebuilt_tokens.inc(info["rebuilt_tokens"])
        self.generated_tokens.inc(info["completion_tokens"])
        self.acquisitions.labels(kind=info["session"]).inc()
        self.ttft.observe(info["ttft_s"])


class StatusCounter:
    """Pure ASGI middleware counting responses by path and status (streaming-safe)."""

    PATHS = {"/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json"}

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
            if path.startswith("/v1/models/"):
                path = "/v1/models/{model}"
            elif path not in self.PATHS:
                path = "other"
            self.metrics.response(path, status["code"])
