"""Run one HTTP request through an in-process ASGI app and stream its response back.

A Ray Serve engine replica hosts the whole single-node app (app.py: parsing, errors, the
worker, streaming, usage) and the ingress forwards requests to it as plain data: this
module turns a forwarded request into ASGI calls and the app's response into items the
ingress can stream on (first the status and headers, then body chunks). So the
multi-replica server answers exactly like the single-node one.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


def forwarded(method: str, path: str, query: bytes | str, headers: list[tuple[str, str]], body: bytes) -> dict:
    """The plain-data form of a request that crosses process boundaries."""
    return {"method": method, "path": path, "query": query.decode() if isinstance(query, bytes) else query,
            "headers": [(k, v) for k, v in headers], "body": body}


async def call_asgi(app, req: dict) -> AsyncIterator[dict | bytes]:
    """Yield {"status", "headers"} once, then the body chunks (bytes) of `app`'s response.

    When the consumer stops early (the client went away, so Ray cancels the generator), the
    app sees an `http.disconnect`, as it would from a real server, and cancels the job.
    """
    out: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    path = req["path"]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"], "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": req["query"].encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req["headers"]],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
