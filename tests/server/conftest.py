"""Live-server fixtures: uvicorn on 127.0.0.1 (a free port) in a background thread."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

TINY = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.app = app
        self.state = app.state.loopserve
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, api_key: str = "unused", timeout: float = 60.0):
        from openai import OpenAI

        # trust_env=False: never route loopback traffic through a proxy from the environment.
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout,
                      http_client=httpx.Client(trust_env=False, timeout=timeout))

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=timeout)

    def metric(self, name: str, **labels) -> float:
        text = self.http().get("/metrics").text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0


def make_server(tmp_path_factory, model=TINY, method="dense", knobs=None, **options) -> LiveServer:
    from loopserve.engine import Engine
    from loopserve.models import load_model
    from loopserve.server import create_app
    from loopserve.server.app import ServerConfig

    # The served default numerics (`loopserve serve`, Ray replicas), not the library's float32.
    engine = Engine(load_model(model, dtype=ServerConfig.dtype), method=method, knobs=knobs or {})
    options.setdefault("db_path", str(tmp_path_factory.mktemp("db") / "conversations.sqlite"))
    options.setdefault("default_temperature", 0.0)
    return LiveServer(create_app(engine, **options)).start()


@contextmanager
def live_server(tmp_path_factory, **options):
    """A server of its own for one test (`make_server` options), stopped at the end."""
    s = make_server(tmp_path_factory, **options)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = make_server(tmp_path_factory, max_queue=8, max_active=2, max_body_bytes=256 * 1024)
    yield s
    s.stop()


# -- a private Redis server (the shared store of the Ray Serve deployment) ---------------------
class RedisServer:
    """redis-server on 127.0.0.1 (a free port) with its data in a temp dir; stop()/start()
    keep the data (append-only file), as a restart of the store would."""

    def __init__(self, data_dir):
        import shutil

        self.binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        self.dir = str(data_dir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> "RedisServer":
        import subprocess

        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--appendonly", "yes",
             "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.time() + 20
        while True:
            try:
                if client.ping():
                    return self
            except redis.exceptions.RedisError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
            self.proc.wait(15)
            self.proc = None


def need_redis_binary(server: RedisServer) -> None:
    if server.binary is None:
        msg = "redis-server is not installed: run scripts/redis.sh install"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs it (.ci/run): never skip there
        pytest.skip(msg)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    need_redis_binary(srv)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def make_redis(tmp_path):
    """A factory of private Redis servers (not started) that the test stops and restarts."""
    made = []

    def make() -> RedisServer:
        srv = RedisServer(tmp_path / f"redis{len(made)}")
        os.makedirs(srv.dir, exist_ok=True)
        need_redis_binary(srv)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


# -- deterministic control of the generation worker ----------------------------------------------
class StepGate:
    """Holds the server's worker before a decode step of the chosen requests, so a test
    knows a stream is still running whatever the machine's speed.

    Wraps `Worker._step` of one live server: a job for which `hold(job)` is true waits
    before its step until the test calls `release()` or the job is cancelled (a client
    disconnect); the worker thread waits with it, so nothing else is decoded meanwhile.
    `held` is set while a job waits; `stepped_after_hold` once that job's step has run
    (finished, cancelled, or one more token)."""

    WAIT = 120.0  # a guard against a hung test, not a speed assumption

    def __init__(self, server: "LiveServer", hold):
        self.worker = server.state.worker
        self.hold = hold
        self.held = threading.Event()
        self.opened = threading.Event()
        self.stepped_after_hold = threading.Event()
        self.held_job = None
        self.generated_when_held = None
        self._original = self.worker._step

    def _step(self, job) -> None:
        gated = not self.opened.is_set() and self.hold(job)
        if gated:
            self.held_job = job
            self.generated_when_held = len(job.acquired.pooled.session.token_ids) - len(job.prompt.ids)
            self.held.set()
            deadline = time.monotonic() + self.WAIT
            while not (self.opened.is_set() or job.cancelled) and time.monotonic() < deadline:
                self.opened.wait(0.01)
        self._original(job)
        if gated:
            self.stepped_after_hold.set()

    def __enter__(self) -> "StepGate":
        self.worker._step = self._step
        return self

    def release(self) -> None:
        self.opened.set()

    def __exit__(self, *exc) -> None:
        self.release()
        self.worker._step = self._original


def wait_event(event: threading.Event, what: str) -> None:
    """Wait for something the test caused (generous bound: a guard against hangs only)."""
    assert event.wait(StepGate.WAIT), f"timed out waiting for {what}"


def wait_until(cond, what: str, guard_s: float = 60.0) -> None:
    """Poll a condition the test caused; the bound only guards against a hang."""
    deadline = time.monotonic() + guard_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def held_stream(server: LiveServer, text: str, max_tokens: int = 50):
    """A streamed request (user message `text`) that is admitted and provably running: the
    worker holds it before its first decode step until it is closed (at the latest when
    the block ends). Yields the stream."""
    with StepGate(server, hold=lambda job: job.messages[-1]["content"] == text) as gate:
        stream = server.client().chat.completions.create(model=TINY, messages=[{"role": "user", "content": text}],
                                                         max_tokens=max_tokens, temperature=0, stream=True)
        try:
            next(iter(stream))  # the first chunk: admitted
            wait_event(gate.held, "the request to reach the worker")
            yield stream
        finally:
            stream.close()
