"""Live-server fixtures: uvicorn on 127.0.0.1 (a free port) in a background thread."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

TINY = "tiny-llama"


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

    engine = Engine(load_model(model), method=method, knobs=knobs or {})
    options.setdefault("db_path", str(tmp_path_factory.mktemp("db") / "conversations.sqlite"))
    options.setdefault("default_temperature", 0.0)
    return LiveServer(create_app(engine, **options)).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = make_server(tmp_path_factory, max_queue=8, max_active=2, max_body_bytes=256 * 1024)
    yield s
    s.stop()
