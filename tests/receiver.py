"""A webhook receiver served by uvicorn on 127.0.0.1 inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import uvicorn


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Records every POST; answers ``status`` (and ``fail_times`` failures first)."""

    fail_times: int = 0
    fail_status: int = 500
    status: int = 200
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    incomplete: int = 0
    base_url: str = ""

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self.incomplete += 1  # the sender died mid-request: nothing was delivered
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(scope["path"], headers, body))
        if self.fail_times > 0:
            self.fail_times -= 1
            status = self.fail_status
        else:
            status = self.status
        await send({"type": "http.response.start", "status": status, "headers": self.extra_headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def wait_for(self, n: int, timeout: float = 15.0) -> list[Received]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.requests) < n:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"receiver got {len(self.requests)} of {n} webhooks")
            await asyncio.sleep(0.02)
        return self.requests


@contextlib.asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    config = uvicorn.Config(receiver.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", interface="asgi3")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    receiver.base_url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        server.should_exit = True
        await task
