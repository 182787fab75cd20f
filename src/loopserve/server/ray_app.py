"""LoopServe on Ray Serve: one ingress deployment and N engine replicas, with conversation
affinity, a shared Redis store, and failover.

- `EngineReplica` hosts the complete single-node server (app.py: the worker, session pool,
  prompt building, errors, streaming) and answers forwarded requests through an in-process
  ASGI call (asgi_bridge.py), so every replica behaves exactly like `loopserve serve`.
  All replicas share one Redis store, so any replica can rebuild any conversation.
- `Ingress` is the HTTP entry (Serve's proxy calls it). It computes the conversation key
  (cluster.conversation_key) and calls the engine deployment with `conv_key=`, which the
  custom router (ray_router.py) maps to the owning replica by consistent hashing.
- Failure: if the replica dies while it holds a request, Ray raises an actor error in the
  ingress; the client gets 503 with Retry-After (a stream that already started gets an
  SSE error event). Serve restarts the replica (same rank, so the same conversations); until
  then the ring sends its conversations to a survivor, which rebuilds them from the store.
- `/metrics` fans out to every live replica and merges their expositions (per replica and
  `replica="total"`); `/health` lists the replicas.
"""


import asyncio
import contextvars
import logging
import os
import time

log = logging.getLogger("loopserve.ray")

APP_NAME = "loopserve"
ENGINE_DEPLOYMENT = "LoopServeEngine"


def configure_ray_env(local: bool) -> None:
    """Environment for Ray, set before `import ray` (workers inherit it).

    Always: no usage statistics. For a local single-machine instance (tests, one box) also:
    bind everything to 127.0.0.1 and no token auth on loopback; and point the dashboard's
    cloud-metadata probe (which it makes even with usage stats off) at a closed loopback
    proxy, so nothing leaves the machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        for var in ("http_proxy", "HTTP_PROXY"):
            os.environ.setdefault(var, "http://127.0.0.1:9")
        for var in ("no_proxy", "NO_PROXY"):
            os.environ.setdefault(var, "127.0.0.1,localhost,::1")


configure_ray_env(local=os.environ.get("LOOPSERVE_RAY_LOCAL", "1") == "1")

import ray  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402
from ray import serve  # noqa: E402
from ray.exceptions import RayActorError  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError  # noqa: E402

from .asgi_bridge import call_asgi, forwarded  # noqa: E402
from .cluster import REPLICA_HEADER, conversation_key, merge_metrics  # noqa: E402
from .metrics import CONTENT_TYPE, render_families  # noqa: E402
from .protocol import DONE, replica_unavailable, sse, too_large  # noqa: E402
from .ray_router import KEY_KWARG, TARGET_KWARG  # noqa: E402

# A replica that died, was stopped, or cannot take the request: the client should retry.
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


def _unavailable(exc: BaseException) -> JSONResponse:
    return replica_unavailable(exc).response()


# -- the engine replica ------------------------------------------------------------------------
class EngineReplica:
    def __init__(self, config: dict, threads: int = 1):
        from ..threads import configure
        from .app import ServerConfig, create_app

        configure(threads)  # this replica's thread budget, before its model loads
        self.app = create_app(ServerConfig(**config))
        self.state = self.app.state.loopserve
        self.state.worker.start()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.rank = getattr(getattr(ctx, "rank", None), "rank", None)

    def record_replica_metadata(self) -> dict:
        """Read once by the router: the rank places this replica on the hash ring."""
        return {"rank": self.rank}

    async def handle(self, request: dict, **_routing):
        """Answer one forwarded HTTP request: yields {"status", "headers"}, then body chunks."""
        async for item in call_asgi(self.app, request):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER, self.replica_id))
            yield item

    async def metrics_text(self, **_routing) -> str:
        return self.state.metrics.render()

    async def health(self, **_routing) -> dict:
        st = self.state
        return {"replica": self.replica_id, "rank": self.rank, "sessions": len(st.pool.sessions),
                "in_flight": st.in_flight, "store": type(st.store).__name__}

    def __del__(self):
        try:
            self.state.worker.stop(timeout=2)
        except Exception:
            pass


# -- the ingress -------------------------------------------------------------------------------
ingress_app = FastAPI(title="LoopServe (Ray Serve)", docs_url=None, redoc_url=None)

_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engine, max_body_bytes: int = 8 << 20):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.failures = 0  # requests answered 503 because their replica failed

    # The live replica ids, from the router in this process (created on the first call).
    async def _replicas(self) -> dict[str, str]:
        from .ray_registry import ROUTERS

        router = ROUTERS.get(ENGINE_DEPLOYMENT)
        if router is None:
            await self.engine.health.remote()
            router = ROUTERS.get(ENGINE_DEPLOYMENT)
        return router.live_replicas() if router is not None else {}

    async def _fan_out(self, method: str) -> dict:
        replicas = await self._replicas()
        # Each call from a fresh context: calls made while serving one HTTP request share
        # its request id, and concurrent ones would be confused by the router's bookkeeping.
        calls = [contextvars.Context().run(getattr(self.engine, method).remote, **{TARGET_KWARG: rid}) for rid in replicas]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return {rid: res for rid, res in zip(replicas, results)}

    @ingress_app.get("/metrics")
    async def metrics(self):
        results = await self._fan_out("metrics_text")
        texts = {rid: r for rid, r in results.items() if isinstance(r, str)}
        replicas = GaugeMetricFamily("loopserve_cluster_replicas",
                                     "Engine replicas the ingress routes to, and how many answered /metrics.", labels=["state"])
        replicas.add_metric(["routed"], len(results))
        replicas.add_metric(["reporting"], len(texts))
        failures = CounterMetricFamily("loopserve_cluster_replica_failures",
                                       "Requests answered 503 because their replica failed.", value=self.failures)
        extra = render_families(replicas, failures)
        return PlainTextResponse(merge_metrics(texts, extra), media_type=CONTENT_TYPE)

    @ingress_app.get("/health")
    async def health(self):
        results = await self._fan_out("health")
        reps = [r if isinstance(r, dict) else {"replica": rid, "error": type(r).__name__} for rid, r in results.items()]
        ok = any("error" not in r for r in reps)
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": reps}, status_code=200 if ok else 503)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def forward(self, request: Request, path: str):
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return too_large(self.max_body_bytes).response()
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = conversation_key(headers, body) if request.method == "POST" else None
        req = forwarded(request.method, request.url.path, request.url.query, list(request.headers.items()), body)
        stream = self.engine.options(stream=True).handle.remote(req, **{KEY_KWARG: key})
        try:
            start = await stream.__anext__()
        except REPLICA_FAILURES as e:
            self.failures += 1
            return _unavailable(e)
        except StopAsyncIteration:
            return _unavailable(RuntimeError("empty response"))
        out_headers = {k: v for k, v in start["headers"] if k.lower() not in _HOP_BY_HOP}
        if "text/event-stream" not in out_headers.get("content-type", ""):
            # A whole JSON answer: collect it, so a replica failure can still become a 503.
            chunks = []
            try:
                async for chunk in stream:
                    chunks.append(chunk)
            except REPLICA_FAILURES as e:
                self.failures += 1
                return _unavailable(e)
            return Response(b"".join(chunks), status_code=start["status"], headers=out_headers)

        async def relay():
            try:
                async for chunk in stream:
                    yield chunk
            except REPLICA_FAILURES as e:
                self.failures += 1
                yield (sse(replica_unavailable(e).body()) + DONE).encode()
            finally:
                stream.cancel()  # the client left early: the replica cancels the generation

        return StreamingResponse(relay(), status_code=start["status"], headers=out_headers)


# -- building and running ------------------------------------------------------------------------
def build_app(config: dict, replicas: int = 2, replica_cpus: float = 1.0, health_check_period_s: float = 2.0,
              threads: int | None = None):
    """The Serve application: `Ingress` bound to `replicas` engine replicas of `config`
    (a ServerConfig as a dict; its db_path must be the shared redis:// store). Each replica's
    thread budget is `threads`, by default its reserved CPUs (`replica_cpus`, rounded)."""
    store = str(config.get("db_path") or "")
    if not store.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("a multi-replica server needs a shared store: pass a redis:// URL (scripts/redis.sh start), "
                         f"not {store or 'an in-memory store'!r}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        num_replicas=replicas,
        # Requests of one conversation must wait for their replica, never spill to another.
        max_ongoing_requests=max(64, int(config.get("max_queue", 16)) * 2),
        ray_actor_options={"num_cpus": replica_cpus},
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
        request_router_config=RequestRouterConfig(
            request_router_class="loopserve.server.ray_router.ConversationAffinityRouter",
            request_router_kwargs={"vnodes": 64},
        ),
    )
    ingress = serve.deployment(Ingress, name="LoopServeIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    threads = threads if threads is not None else max(1, round(replica_cpus))
    return ingress.bind(engine.bind(config, threads=threads),
                        max_body_bytes=int(config.get("max_body_bytes", 8 << 20)))


def start(config: dict, *, replicas: int = 2, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          replica_cpus: float = 1.0, num_cpus: int | None = None, health_check_period_s: float = 2.0,
          threads: int | None = None) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port, deploy the app."""
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas=replicas, replica_cpus=replica_cpus, health_check_period_s=health_check_period_s,
                        threads=threads),
              name=APP_NAME, route_prefix="/")


def replica_actors() -> dict[str, str]:
    """unique replica id -> actor name of the engine replicas (for failure drills)."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"] if isinstance(a, dict) else a
        if name.startswith("SERVE_REPLICA::") and f"#{ENGINE_DEPLOYMENT}#" in name:
            out[name.rsplit("#", 1)[1]] = name
    return out


def kill_replica(replica_id: str) -> None:
    """Kill one engine replica's process as a crash would; Serve starts a replacement."""
    ray.kill(ray.get_actor(replica_actors()[replica_id], namespace="serve"), no_restart=True)


def wait_for_replicas(n: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = serve.status().applications.get(APP_NAME)
        dep = st.deployments.get(ENGINE_DEPLOYMENT) if st else None
        if dep is not None and dep.replica_states.get("RUNNING", 0) >= n and str(st.status).endswith("RUNNING"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{n} engine replicas not running after {timeout:.0f}s")
