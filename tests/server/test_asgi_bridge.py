"""The in-process ASGI call an engine replica answers forwarded requests with."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from loopserve.server.asgi_bridge import call_asgi, forwarded


def _app(events: list):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.json()
        return {"got": body, "q": request.url.query, "h": request.headers.get("x-test")}

    @app.get("/stream")
    async def stream(request: Request):
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("generator closed")

        async def watch():
            msg = await request.receive()
            events.append(msg["type"])

        asyncio.get_running_loop().create_task(watch())
        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def test_response_start_then_body_chunks():
    async def go():
        req = forwarded("POST", "/echo", b"a=1", [("X-Test", "yes"), ("content-type", "application/json")], b'{"k": [1, 2]}')
        return [item async for item in call_asgi(_app([]), req)]

    items = asyncio.run(go())
    assert items[0]["status"] == 200 and ("content-type", "application/json") in items[0]["headers"]
    assert b"".join(items[1:]) == b'{"got":{"k":[1,2]},"q":"a=1","h":"yes"}'


def test_consumer_leaving_early_disconnects_the_app():
    events: list = []

    async def go():
        gen = call_asgi(_app(events), forwarded("GET", "/stream", "", [], b""))
        start = await gen.__anext__()
        first = await gen.__anext__()
        await gen.aclose()  # what Ray does when the ingress cancels the call
        await asyncio.sleep(0.1)
        return start, first

    start, first = asyncio.run(go())
    assert start["status"] == 200 and first == b"data: 0\n\n"
    assert "http.disconnect" in events  # the app learns the client is gone (it cancels the job)
