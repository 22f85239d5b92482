"""A stateful fake of an OpenAI-compatible vision ``/v1/chat/completions`` endpoint.

A plain ASGI callable (no lifespan needed)::

    fake = FakeOpenAIChat()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="http://openai.test/v1")

It records every request, validates the OpenAI vision body shape (400 otherwise), checks that
the data URL decodes as a JPEG with Pillow, and can be scripted to fail the next N calls.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx
from PIL import Image

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_DATA_URL_PREFIX = "data:image/jpeg;base64,"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    json: Any  # parsed body, or None when it was not JSON


@dataclass
class _Scripted:
    status: int
    remaining: int
    body: bytes | None


@dataclass
class FakeOpenAIChat:
    """The fake's state; ``app`` is the ASGI callable to mount."""

    reply: str | None = "a woman smiling in a park"
    requests: list[RecordedRequest] = field(default_factory=list)
    _script: list[_Scripted] = field(default_factory=list)

    def script(self, status: int = 500, times: int = 1, body: bytes | None = None) -> None:
        """Answer the next ``times`` calls with ``status`` (and ``body``, default a JSON error)."""
        self._script.append(_Scripted(status, times, body))

    def client_factory(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``http_client_factory`` for ``OpenAICaptioner`` that routes to this fake."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), **kwargs)

    @property
    def app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        return self._asgi

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # tolerated, never required
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.requests.append(RecordedRequest(scope["method"], scope["path"], headers, parsed))
        status, payload = self._respond(scope["method"], scope["path"], parsed)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _respond(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        if method != "POST" or not path.endswith("/chat/completions"):
            return 404, _error("not found")
        if self._script:
            step = self._script[0]
            step.remaining -= 1
            if step.remaining <= 0:
                self._script.pop(0)
            return step.status, step.body if step.body is not None else _error(f"scripted {step.status}")
        problem = _vision_problem(body)
        if problem:
            return 400, _error(problem)
        return 200, json.dumps(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": self.reply}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
            }
        ).encode()


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()


def _vision_problem(body: Any) -> str | None:
    """Why ``body`` is not a valid OpenAI vision chat request with one JPEG, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model is required"
    if "max_tokens" in body and not isinstance(body["max_tokens"], int):
        return "max_tokens must be an integer"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    user = messages[-1]
    if not isinstance(user, dict) or user.get("role") != "user" or not isinstance(user.get("content"), list):
        return "last message must be a user message with a content list"
    parts = user["content"]
    texts = [p for p in parts if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
    images = [p for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if not texts:
        return "a text part is required"
    if len(images) != 1:
        return "exactly one image_url part is required"
    url = (images[0].get("image_url") or {}).get("url")
    if not isinstance(url, str) or not url.startswith(_DATA_URL_PREFIX):
        return "image_url.url must be a data:image/jpeg;base64 URL"
    try:
        raw = base64.b64decode(url[len(_DATA_URL_PREFIX) :], validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            fmt = img.format
            img.verify()
    except (binascii.Error, ValueError, OSError):
        return "image could not be decoded"
    if fmt != "JPEG":
        return f"image is {fmt}, not JPEG"
    return None
