"""A stateful fake of WaveSpeed's API (CONTRACTS.md §2), as a plain ASGI app.

In-process::

    fake = FakeWaveSpeed()
    client = httpx.AsyncClient(transport=fake.transport(), base_url="http://wavespeed.test")

or over real HTTP on 127.0.0.1 (uvicorn in a background thread)::

    with serve_on_loopback(fake.app) as base_url: ...

What it does, as the vendor would:

- an ``{code, message, data}`` envelope on every API answer; ``Authorization: Bearer <api_key>``
  checked on every ``/api/v3`` path (401 without it or with a wrong key);
- predictions (trainings and generations) that move ``created → processing → completed|failed``
  as the fake's clock advances (``advance(s)``), or by poll counts (``polls_per_state``);
- the media upload flows: a ticket (``POST /api/v3/media/uploads``) with a ``PUT`` target and a
  ``download_url`` on the fake itself, and ``POST /api/v3/media/upload/binary`` (multipart ``file``);
- trainings FETCH their ``data`` zip URL with httpx and check it (``NNN.jpg`` images that Pillow
  opens, each with an ``NNN.txt`` caption holding ``trigger_word`` as a whole word); a bad zip
  makes the training fail with the reason. Completed trainings serve a real small safetensors
  file; generations fetch their LoRA, and serve real W×H images in the requested format;
- webhooks to the ``?webhook=`` URL with a real ``v3`` signature when a prediction completes or fails;
- scripted faults: ``script(kind_or_path, status=..., times=N, retry_after=..., delay=...)``,
  ``fail_trainings``, ``final_status`` (cancelled/timeout/deleted), ``truncate_artifacts``.

URLs it hands out use the host the request came in on, so they work in both modes. Every request
is recorded in ``requests``; webhook attempts in ``deliveries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import re
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import uvicorn
from PIL import Image

from providers.safetensors import SafetensorsInvalid, read_header
from providers.sandbox import build_lora_safetensors

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_PIL = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_TERMINAL = {"completed", "failed", "cancelled", "timeout", "deleted"}


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    json: Any  # parsed JSON body, or None
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks: int = 0  # how many ASGI body messages carried bytes (>1 means it was streamed)
    kind: str = ""


@dataclass
class Delivery:
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the request itself failed
    error: str | None = None
    response: bytes = b""


@dataclass
class _Scripted:
    target: str
    status: int | None
    remaining: int
    retry_after: str | None
    delay: float
    body: bytes | None
    accept: bool = False


@dataclass
class _Prediction:
    id: str
    kind: str  # "training" | "generation"
    model: str
    input: dict[str, Any]
    created: float
    queue_s: float
    run_s: float
    host: str
    webhook: str | None = None
    error: str | None = None  # the outcome, decided at submit
    forced: str | None = None  # a terminal status other than completed/failed
    cancelled: bool = False
    polls: int = 0
    created_at: str = ""


def sign(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """WaveSpeed's recipe: HMAC-SHA256 hex over ``id.timestamp.body``, key = secret minus ``whsec_``."""
    key = secret.removeprefix("whsec_").encode()
    return "v3," + hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def check_zip(data: bytes, trigger_word: str, min_images: int = 4) -> str | None:
    """Why ``data`` is not a usable training zip, or None."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return "data is not a zip file"
    with zf:
        names = set(zf.namelist())
        images = sorted(n for n in names if re.fullmatch(r"\d{3,}\.jpg", n))
        if len(images) < min_images:
            return f"the zip holds {len(images)} NNN.jpg images; at least {min_images} are needed"
        word = re.compile(rf"(?<!\w){re.escape(trigger_word)}(?!\w)")
        for name in images:
            caption = name[:-4] + ".txt"
            if caption not in names:
                return f"caption {caption} is missing"
            if not word.search(zf.read(caption).decode("utf-8", "replace")):
                return f"caption {caption} does not contain the trigger word {trigger_word!r}"
            try:
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    im.load()
                    if im.format != "JPEG":
                        return f"{name} is {im.format}, not JPEG"
            except Exception:  # noqa: BLE001 - any decoder error means a bad image
                return f"{name} is not a readable image"
    return None


class TimeoutASGITransport(httpx.ASGITransport):
    """``ASGITransport`` that honours the request's read timeout (plain ASGITransport ignores it),
    so a scripted ``delay`` turns into an ``httpx.ReadTimeout`` in-process."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        limit = (request.extensions.get("timeout") or {}).get("read")
        if limit is None:
            return await super().handle_async_request(request)
        try:
            with anyio.fail_after(limit):
                return await super().handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout("timed out (fake)", request=request) from None


@dataclass
class FakeWaveSpeed:
    """The fake's state; ``app`` is the ASGI callable to mount."""

    api_key: str = "ws-test-key"
    webhook_secret: str = "whsec_dGVzdHNlY3JldA"
    trainer_model: str = "wavespeed-ai/flux-dev-lora-trainer"
    inference_model: str = "wavespeed-ai/flux-dev-lora"
    queue_s: float = 0.1  # created -> processing
    training_s: float = 0.3  # processing -> completed (trainings)
    generation_s: float = 0.1  # processing -> completed (generations)
    #: when set, each state lasts this many result polls instead of a duration
    polls_per_state: int | None = None
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time  # for webhook timestamps
    #: transport for fetching URLs not on the fake (zip/LoRA URLs) and for webhook deliveries
    #: (None = real network, as in loopback mode)
    fetch_transport: httpx.AsyncBaseTransport | None = None
    ticket_upload: bool = True  # False: the ticket endpoint answers 404 (older accounts)
    check_loras: bool = True  # generations fetch loras[0].path and check it is safetensors
    fail_trainings: str | None = None  # trainings submitted while set fail with this error
    final_status: str | None = None  # predictions submitted while set end in this status
    truncate_artifacts: bool = False
    min_images: int = 4
    webhook_attempts: int = 3
    requests: list[RecordedRequest] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    predictions: dict[str, _Prediction] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    _tickets: dict[str, dict[str, Any]] = field(default_factory=dict)
    _script: list[_Scripted] = field(default_factory=list)
    _offset: float = 0.0
    _images: dict[tuple[str, int], bytes] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # ------------------------------------------------------------------ test controls

    def script(self, target: str, status: int | None = 500, *, times: int = 1, retry_after: str | float | None = None,
               delay: float = 0.0, body: bytes | None = None, accept: bool = False) -> None:
        """Answer the next ``times`` requests of ``target`` with ``status`` after ``delay`` seconds
        (``status=None``: answer normally after the delay). ``target`` is a kind (``train``,
        ``generate``, ``result``, ``cancel``, ``ticket``, ``binary``, ``put``, ``media``, ``cdn``)
        or a path prefix starting with ``/``. ``accept``: the request is processed as usual (a
        submit creates its prediction) and only the answer is replaced, as a proxy's 502/504 in
        front of the vendor would do."""
        ra = None if retry_after is None else str(retry_after)
        self._script.append(_Scripted(target, status, times, ra, delay, body, accept))

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward."""
        self._offset += seconds

    def now(self) -> float:
        return self.clock() + self._offset

    def transport(self) -> TimeoutASGITransport:
        return TimeoutASGITransport(app=self.app)

    def of_kind(self, kind: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == kind]

    async def aclose(self) -> None:
        """Stop pending webhook deliveries (call in the loop that ran the fake)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    @property
    def app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        return self._asgi

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, chunks = b"", 0
        while True:
            message = await receive()
            if message.get("body"):
                body += message["body"]
                chunks += 1
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            parsed = json.loads(body) if body and "json" in headers.get("content-type", "") else None
        except ValueError:
            parsed = None
        method, path = scope["method"], scope["path"]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        kind = self._kind(method, path)
        self.requests.append(RecordedRequest(method, path, headers, parsed, query, body, chunks, kind))
        host = f"{scope.get('scheme', 'http')}://{headers.get('host', 'wavespeed.test')}"
        status, payload, extra = await self._respond(method, path, kind, headers, query, body, parsed, host)
        ctype = extra.pop("content-type", "application/json")
        out = [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]
        out += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    def _kind(self, method: str, path: str) -> str:
        if path == f"/api/v3/{self.trainer_model}":
            return "train"
        if path == f"/api/v3/{self.inference_model}":
            return "generate"
        for kind, pattern in (("result", r"/api/v3/predictions/[^/]+/result"), ("cancel", r"/api/v3/predictions/[^/]+/cancel"),
                              ("ticket", r"/api/v3/media/uploads"), ("binary", r"/api/v3/media/upload/binary"),
                              ("put", r"/upload/[^/]+"), ("media", r"/media/.+"), ("cdn", r"/cdn/.+")):
            if re.fullmatch(pattern, path):
                return kind
        return "other"

    async def _respond(self, method: str, path: str, kind: str, headers: dict[str, str], query: dict[str, str],
                       body: bytes, parsed: Any, host: str) -> tuple[int, bytes, dict[str, str]]:
        for step in self._script:
            if step.target == kind or (step.target.startswith("/") and path.startswith(step.target)):
                step.remaining -= 1
                if step.remaining <= 0:
                    self._script.remove(step)
                if step.delay:
                    await asyncio.sleep(step.delay)
                if step.accept:
                    await self._respond(method, path, kind, headers, query, body, parsed, host)
                if step.status is not None:
                    extra = {"retry-after": step.retry_after} if step.retry_after is not None else {}
                    return step.status, step.body if step.body is not None else _err(step.status, f"scripted {step.status}"), extra
                break
        if path.startswith("/api/v3/"):
            auth = headers.get("authorization")
            if auth is None:
                return 401, _err(401, "Unauthorized: missing Authorization header"), {}
            if auth != f"Bearer {self.api_key}":
                return 401, _err(401, "Invalid API key"), {}
        elif "authorization" in headers:  # a pre-signed storage/CDN URL refuses extra credentials
            return 400, _err(400, "only one auth mechanism allowed"), {}
        handler = {"train": self._train, "generate": self._generate, "result": self._result, "cancel": self._cancel,
                   "ticket": self._ticket, "binary": self._binary, "put": self._put, "media": self._media,
                   "cdn": self._cdn}.get(kind)
        if handler is None:
            return 404, _err(404, f"no route for {method} {path}"), {}
        return await handler(method, path, headers, query, body, parsed, host)

    # ------------------------------------------------------------------ predictions

    def _new(self, kind: str, model: str, inp: dict[str, Any], run_s: float, host: str, webhook: str | None) -> _Prediction:
        pid = uuid.uuid4().hex
        p = _Prediction(id=pid, kind=kind, model=model, input=inp, created=self.now(), queue_s=self.queue_s,
                        run_s=run_s, host=host, webhook=webhook, forced=self.final_status,
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        self.predictions[pid] = p
        if webhook:
            task = asyncio.get_running_loop().create_task(self._deliver_when_done(p))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return p

    def status(self, p: _Prediction) -> str:
        if p.cancelled:
            return "cancelled"
        if self.polls_per_state:
            phase = p.polls / self.polls_per_state
            queued, running = phase < 1, phase < 2
        else:
            elapsed = self.now() - p.created
            queued, running = elapsed < p.queue_s, elapsed < p.queue_s + p.run_s
        if queued:
            return "created"
        if running:
            return "processing"
        return p.forced or ("failed" if p.error else "completed")

    def outputs(self, p: _Prediction) -> list[str]:
        if self.status(p) != "completed":
            return []
        if p.kind == "training":
            return [f"{p.host}/cdn/output/{p.id}.safetensors"]
        ext = _EXT[p.input.get("output_format", "jpeg")]
        return [f"{p.host}/cdn/output/{p.id}/{i}.{ext}" for i in range(p.input.get("num_images", 1))]

    def view(self, p: _Prediction) -> dict[str, Any]:
        status = self.status(p)
        return {
            "id": p.id, "model": p.model, "input": p.input, "outputs": self.outputs(p),
            "urls": {"get": f"{p.host}/api/v3/predictions/{p.id}/result"}, "has_nsfw_contents": [],
            "status": status, "created_at": p.created_at, "error": (p.error or "") if status == "failed" else "",
            "timings": {"inference": int((p.queue_s + p.run_s) * 1000)} if status in _TERMINAL else {},
        }

    async def _train(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        problem = _training_problem(parsed)
        if problem:
            return 400, _err(400, problem), {}
        p = self._new("training", self.trainer_model, parsed, self.training_s, host, query.get("webhook"))
        if self.fail_trainings:
            p.error = self.fail_trainings
        else:
            data, why = await self._fetch(parsed["data"], host)
            p.error = why or check_zip(data, parsed["trigger_word"], self.min_images)
        return 200, _ok(self.view(p)), {}

    async def _generate(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        problem = _generation_problem(parsed)
        if problem:
            return 400, _err(400, problem), {}
        inp = {"num_images": 1, "seed": -1, "output_format": "jpeg", "size": "1024*1024", **parsed}
        p = self._new("generation", self.inference_model, inp, self.generation_s, host, query.get("webhook"))
        if self.check_loras:
            for lora in parsed["loras"]:
                data, why = await self._fetch(lora["path"], host)
                if why is None:
                    why = await anyio.to_thread.run_sync(_safetensors_problem, data)
                if why:
                    p.error = f"could not load LoRA {lora['path'][:80]}: {why}"
                    break
        return 200, _ok(self.view(p)), {}

    async def _result(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        if method != "GET":
            return 405, _err(405, "method not allowed"), {}
        p = self.predictions.get(path.split("/")[4])
        if p is None:
            return 404, _err(404, "prediction not found"), {}
        p.polls += 1
        return 200, _ok(self.view(p)), {}

    async def _cancel(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        p = self.predictions.get(path.split("/")[4])
        if p is None:
            return 404, _err(404, "prediction not found"), {}
        if self.status(p) in _TERMINAL:
            return 400, _err(400, f"prediction is {self.status(p)}; it cannot be cancelled"), {}
        p.cancelled = True
        return 200, _ok(self.view(p)), {}

    # ------------------------------------------------------------------ uploads and files

    async def _ticket(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        if not self.ticket_upload:
            return 404, _err(404, "not found"), {}
        if not isinstance(parsed, dict) or not isinstance(parsed.get("filename"), str) or not isinstance(parsed.get("size"), int):
            return 400, _err(400, "filename and size are required"), {}
        token = uuid.uuid4().hex
        ctype = parsed.get("content_type") or "application/octet-stream"
        self._tickets[token] = {"filename": parsed["filename"], "size": parsed["size"], "content_type": ctype}
        data = {"upload": {"method": "PUT", "url": f"{host}/upload/{token}?X-Fake-Signature=abc",
                           "headers": {"Content-Type": ctype, "x-fake-upload-token": token}},
                "download_url": f"{host}/media/{token}/{parsed['filename']}"}
        return 200, _ok(data), {}

    async def _put(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        token = path.rsplit("/", 1)[1]
        ticket = self._tickets.get(token)
        if method != "PUT" or ticket is None or query.get("X-Fake-Signature") != "abc":
            return 403, _err(403, "signature does not match"), {}
        if headers.get("x-fake-upload-token") != token or headers.get("content-type") != ticket["content_type"]:
            return 403, _err(403, "signed headers missing"), {}
        if headers.get("content-length") != str(ticket["size"]) or len(body) != ticket["size"]:
            return 400, _err(400, "size does not match the ticket"), {}
        self.uploads[token] = body
        return 200, b"", {}

    async def _binary(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        ctype = headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return 400, _err(400, "multipart/form-data expected"), {}
        m = re.search(r'boundary="?([^";]+)"?', ctype)
        parts = body.split(b"--" + m.group(1).encode())[1:-1] if m else []
        for part in parts:
            head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
            disposition = head.decode("latin-1")
            if re.search(r'\bname="file"', disposition):
                fn = re.search(r'filename="([^"]*)"', disposition)
                token, name = uuid.uuid4().hex, (fn.group(1) if fn else "") or "upload.bin"
                self.uploads[token] = content.removesuffix(b"\r\n")
                data = {"type": "file", "download_url": f"{host}/media/{token}/{name}", "filename": name,
                        "size": len(self.uploads[token])}
                return 200, _ok(data), {}
        return 400, _err(400, "field `file` is required"), {}

    async def _media(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        data = self.uploads.get(path.split("/")[2])
        if method != "GET" or data is None:
            return 404, _err(404, "not found"), {}
        return 200, data, {"content-type": "application/zip"}

    async def _cdn(self, method, path, headers, query, body, parsed, host):  # noqa: ANN001, ANN202
        m = re.fullmatch(r"/cdn/output/([0-9a-f]+)(?:\.safetensors|/(\d+)\.(jpg|png|webp))", path)
        p = self.predictions.get(m.group(1)) if m else None
        if method != "GET" or p is None or self.status(p) != "completed":
            return 404, _err(404, "not found"), {}
        if p.kind == "training":
            meta = {"format": "pt", "trigger_word": p.input["trigger_word"], "steps": str(p.input["steps"])}
            data = build_lora_safetensors(seed=0, ref=p.id, rank=p.input["lora_rank"], meta=meta)
            return 200, data[: len(data) // 2] if self.truncate_artifacts else data, {"content-type": "application/octet-stream"}
        index = int(m.group(2))
        if index >= p.input["num_images"] or m.group(3) != _EXT[p.input["output_format"]]:
            return 404, _err(404, "not found"), {}
        if (p.id, index) not in self._images:
            self._images[(p.id, index)] = await anyio.to_thread.run_sync(_render, p.input, index)
        return 200, self._images[(p.id, index)], {"content-type": _MIME[m.group(3)]}

    # ------------------------------------------------------------------ outbound HTTP

    def _client(self, url: str, host: str) -> httpx.AsyncClient:
        own = urlsplit(url).netloc == urlsplit(host).netloc
        transport = httpx.ASGITransport(app=self.app) if own else self.fetch_transport
        return httpx.AsyncClient(transport=transport, trust_env=False, timeout=10)

    async def _fetch(self, url: str, host: str) -> tuple[bytes, str | None]:
        """GET ``url`` as the vendor's workers would; (bytes, None) or (b"", why it failed)."""
        try:
            async with self._client(url, host) as client:
                resp = await client.get(url)
        except httpx.HTTPError as e:
            return b"", f"could not download {urlsplit(url).netloc}: {type(e).__name__}"
        if resp.status_code != 200:
            return b"", f"downloading the file failed with HTTP {resp.status_code}"
        return resp.content, None

    async def _deliver_when_done(self, p: _Prediction) -> None:
        deadline = time.monotonic() + 120
        while self.status(p) not in ("completed", "failed"):  # cancelled/timeout/deleted send nothing
            if p.cancelled or p.forced not in (None, "completed", "failed") or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.02)
        body = json.dumps(self.view(p)).encode()
        wid = f"msg_{uuid.uuid4().hex}"
        assert p.webhook is not None
        for attempt in range(self.webhook_attempts):
            ts = int(self.wall_clock())
            headers = {"content-type": "application/json", "webhook-id": wid, "webhook-timestamp": str(ts),
                       "webhook-signature": sign(self.webhook_secret, wid, ts, body)}
            try:
                async with self._client(p.webhook, p.host) as client:
                    resp = await client.post(p.webhook, content=body, headers=headers)
                self.deliveries.append(Delivery(p.webhook, headers, body, resp.status_code, response=resp.content))
                if resp.status_code // 100 == 2:
                    return
            except httpx.HTTPError as e:
                self.deliveries.append(Delivery(p.webhook, headers, body, None, type(e).__name__))
            await asyncio.sleep(0.05 * 2**attempt)


# --------------------------------------------------------------------------- helpers


def _ok(data: Any) -> bytes:
    return json.dumps({"code": 200, "message": "success", "data": data}).encode()


def _err(status: int, message: str) -> bytes:
    return json.dumps({"code": status, "message": message, "data": None}).encode()


def _training_problem(b: Any) -> str | None:
    if not isinstance(b, dict):
        return "body must be a JSON object"
    if not isinstance(b.get("data"), str) or not b["data"].startswith(("http://", "https://")):
        return "data must be a URL"
    if not isinstance(b.get("trigger_word"), str) or not b["trigger_word"]:
        return "trigger_word is required"
    for name, lo, hi, typ in (("steps", 500, 4000, int), ("lora_rank", 1, 64, int), ("learning_rate", 0, 1, (int, float))):
        if name in b and (not isinstance(b[name], typ) or isinstance(b[name], bool) or not lo <= b[name] <= hi):
            return f"{name} must be within {lo}..{hi}"
    return None


def _generation_problem(b: Any) -> str | None:
    if not isinstance(b, dict) or not isinstance(b.get("prompt"), str) or not b["prompt"]:
        return "prompt is required"
    loras = b.get("loras", [])
    if not isinstance(loras, list) or len(loras) > 4 or not all(
            isinstance(x, dict) and isinstance(x.get("path"), str) and isinstance(x.get("scale"), (int, float))
            and 0 <= x["scale"] <= 4 for x in loras):
        return "loras must be at most 4 items of {path, scale 0..4}"
    m = re.fullmatch(r"(\d+)\*(\d+)", str(b.get("size", "1024*1024")))
    if not m or not all(256 <= int(v) <= 1536 for v in m.groups()):
        return "size must be 'W*H' with each side within 256..1536"
    checks = (("num_images", 1, 4, int), ("seed", -1, 2147483647, int), ("guidance_scale", 0, 20, (int, float)),
              ("num_inference_steps", 1, 50, int))
    for name, lo, hi, typ in checks:
        if name in b and (not isinstance(b[name], typ) or isinstance(b[name], bool) or not lo <= b[name] <= hi):
            return f"{name} must be within {lo}..{hi}"
    if b.get("output_format", "jpeg") not in _PIL:
        return "output_format must be jpeg, png or webp"
    return None


def _safetensors_problem(data: bytes) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        path.write_bytes(data)
        try:
            read_header(path)
        except SafetensorsInvalid as e:
            return str(e)
    return None


def _render(inp: dict[str, Any], index: int) -> bytes:
    w, h = (int(v) for v in inp["size"].split("*"))
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    img.paste((40 * index % 256, 120, 200), (0, 0, w // 4, h // 4))
    buf = io.BytesIO()
    img.save(buf, format=_PIL[inp["output_format"]])
    return buf.getvalue()


class _ThreadServer(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # never touch signal handlers
        return contextlib.nullcontext()


@contextlib.contextmanager
def serve_on_loopback(app: Callable[..., Awaitable[None]], *, lifespan: str = "auto") -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a background thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto set: asyncio turns TCP_NODELAY on
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _ThreadServer(uvicorn.Config(app, log_level="warning", lifespan=lifespan, access_log=False, interface="asgi3"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"loopback-{port}")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the loopback server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
