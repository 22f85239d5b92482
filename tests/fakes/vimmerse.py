"""A stateful fake of the Vimmerse API (Flux LoRA finetunes + text-to-image), as a plain ASGI app.

In-process::

    fake = FakeVimmerse()
    client = httpx.AsyncClient(transport=fake.transport(), base_url="https://api.vimmerse.net")

or over real HTTP on 127.0.0.1 (uvicorn in a background thread)::

    with serve_on_loopback(fake.app) as base_url: ...

URLs the fake hands out (samples, result images) use the scheme and host the request came in on,
so they work in both modes. Call ``await fake.aclose()`` at the end of an in-process test to stop
pending webhook tasks (in loopback mode the server's lifespan shutdown does it).

The wire contract (Vimmerse's public OpenAPI; where the docs are silent the fake makes a choice,
marked *decided*, and often a knob lets a test pick another):

- Auth: ``X-Api-Key: <key>`` on every API path (everything but ``/media/...``). Missing or unknown
  key → 401 ``{"detail": "Not authenticated"}`` / ``{"detail": "Invalid API key"}``; a key in
  ``forbidden_keys`` → 403 ``{"detail": "Not enough permissions"}``. Unknown routes are FastAPI's
  404 ``{"detail": "Not Found"}`` (before auth), wrong methods 405 ``{"detail": "Method Not Allowed"}``.
- Errors: 400/402 ``{"message": "<CODE>"}`` (``BAD_REQUEST``, ``NO_IMAGES``, ``INVALID_IMAGE``,
  ``INVALID_IMAGE_URL`` (*decided*: an image URL that cannot be downloaded), ``FINETUNE_NOT_FOUND``,
  402 ``INSUFFICIENT_CREDIT``); 404 ``{"message": "NOT_FOUND"}``; 422 FastAPI/pydantic-v2
  ``{"detail": [{"type", "loc", "msg", "input", ("ctx")}]}``; 500 plain text.
- ``POST /finetune`` (multipart/form-data, or urlencoded): ``image_files`` (files, repeated),
  ``image_urls`` (repeated; fetched only when no files are sent), ``num_iterations`` (int ≥ 0,
  default 0), ``option`` (``FluxFinetune`` | ``FluxProFinetune`` | ``FluxKontextFinetune``),
  ``finetune_type`` (``Auto`` | ``Character`` | ``Product`` | ``Style``), ``lora_prefix`` (default
  ``MYLORA``; empty → ``MYLORA``, *decided*), ``prompt``, ``webhook_url``. Checks, in order: 422
  for a bad option/finetune_type/num_iterations or a non-file ``image_files`` part; 400
  ``NO_IMAGES``; 400 ``INVALID_IMAGE`` unless every file (or every fetched URL) decodes with
  Pillow; 400 ``INVALID_IMAGE_URL``; 402 when ``credits`` run short. The trigger word is
  ``f"{lora_prefix}_{6 × [A-Z0-9]}"`` (seeded by ``seed``), unique in the fake. Where it sits in
  the answer is unknown, so ``create_variant`` picks it:

  ``"results"`` ``{"data": {envelope, "id": <uuid>, "results": [<word>]}}`` (default) ·
  ``"id"`` the envelope with ``"id": <word>``, ``results`` [] · ``"bare"`` the JSON string ·
  ``"field"`` ``{"trigger_word": <word>}`` · ``"missing"`` the envelope, uuid id, no word anywhere ·
  ``"url"`` the envelope with ``results`` holding a URL (no word).

  The envelope: ``id, customer_id, primary_user_id, args, results, thumbnails, status ("success"),
  mime_type, app_name ("finetune"), created_at, updated_at, history``.
- ``GET /finetune/{trigger_word}``: 404 ``NOT_FOUND`` for a word unknown to this customer. Queued
  for ``queue_s`` then running for ``training_s`` fake seconds, answering per ``status_variant``:
  ``"empty"`` ``{"data": []}`` · ``"status"`` ``{"data": {"status": "processing"}}`` (default) ·
  ``"media"`` ``{"data": {"processing_status": "queue_bullet"|"processing_bullet",
  "progress_percentage": 0..99}}``. Done: ``{"data": [{"URL": "<base>/media/<customer>/ai_images/
  <id>/sample-1.png"}, ...]}`` (``finetune_samples`` real 1024×1024 PNGs). Finetunes created while
  ``fail_finetunes = "<message>"`` fail, per ``failure_variant``: ``"status"`` ``{"data":
  {"status": "fail", "message": msg}}`` (default) · ``"http"`` HTTP 400 ``{"message": msg}``.
- ``POST /v2/image/text-2-image`` (JSON): ``prompt`` (required; empty → 400 ``BAD_REQUEST``,
  *decided*), ``quantity`` 1–4 (1), ``option`` (``"Auto"``; one of ``generate_options`` unless
  that is None), ``aspect_ratio`` (16:9; ``21:9 16:9 4:3 3:2 1:1 2:3 3:4 9:16 9:21``),
  ``creativity_strength`` 1–10 (5), ``enhance_image`` (false), ``async_mode`` (false),
  ``webhook_url``; other fields are ignored (FastAPI's default). No finetune id field: with
  ``option="FluxFinetuned"`` the prompt must hold, as a whole word (case-sensitive, *decided*), the
  trigger word of a *finished* finetune of this customer, else 400 ``FINETUNE_NOT_FOUND``. The answer
  is the asset itself (not wrapped): ``{id, customer_id, primary_user_id, args, results, thumbnails,
  status, mime_type: "image/png", app_name: "text-to-image", quantity, created_at, updated_at,
  history}``; sync: ``status`` "success" and ``results`` filled; ``async_mode``: "processing" and []
  until ``generation_s`` fake seconds have passed. ``fail_generations = "<message>"`` makes
  generations fail (*decided*: sync → 400 ``{"message": msg}``; async → asset ``status`` "fail"
  with ``message``).
- ``GET /asset/{asset_id}``: the asset, ``{"data": asset}`` when ``asset_wrapped`` (default) else
  bare; 404 ``NOT_FOUND`` for an id unknown to this customer (finetune ids included, *decided*).
- Images: real PNGs, ``SIZES[aspect_ratio]`` (multiples of 64 near 1 MP), served without auth
  under ``/media/...`` once their finetune/asset is done (404 ``NOT_FOUND`` before). ``images``
  maps each URL path to a ``MadeImage`` (which prompt / trigger word made it).
- Webhooks: when a finetune or an *async* generation that carried ``webhook_url`` ends, the fake
  POSTs the unsigned JSON ``{"customer_id", "media_id": <finetune or asset id>, "status":
  "success"|"fail"}`` over real HTTP from a background task (timeout ``webhook_timeout_s`` = 10 s,
  ``webhook_attempts`` tries, default 1), recording each attempt in ``deliveries``.

Knobs: ``create_variant``, ``status_variant``, ``failure_variant``, ``asset_wrapped``,
``unknown_shape`` (True or a set of kinds: 200 answers of those kinds become ``unknown_body``,
default ``{"weird": true}``, after the request was processed), ``fail_finetunes``,
``fail_generations``, ``credits`` (None = unlimited; ``finetune_cost`` and ``image_cost`` each),
``generate_options``, ``queue_s``/``training_s``/``generation_s`` (fake seconds), ``seed``,
``fetch_client`` (the httpx client for image URLs and webhooks; None = a plain AsyncClient per
call; URLs on the fake itself are always served in-process).

Faults: ``script(target, status, times=, body=, delay=, accept=)`` with ``target`` a kind
(``finetune``, ``status``, ``generate``, ``asset``, ``media``) or a path prefix starting with
``/``; ``delay`` in an in-process client with a read timeout becomes ``httpx.ReadTimeout``
(``TimeoutASGITransport``); ``accept=True`` processes the request first (a finetune or asset is
created) and only replaces the answer. Time: ``advance(s)``, ``now()``.

Assertions: ``requests`` (``RecordedRequest``: kind, headers, parsed JSON, parsed ``form``),
``finetunes`` (by trigger word), ``assets`` (by id), ``images``, ``deliveries``, ``of_kind(kind)``,
``finetune_status(word)``, ``asset_status(id)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import re
import string
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable, Collection
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
from multipart import MultipartError, MultipartParser, parse_options_header
from PIL import Image

from tests.fakes.wavespeed import TimeoutASGITransport, serve_on_loopback

__all__ = [
    "ASPECT_RATIOS", "SIZES", "Delivery", "FakeVimmerse", "FinetuneForm", "MadeImage", "RecordedRequest",
    "TimeoutASGITransport", "UploadedFile", "serve_on_loopback",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: result sizes per aspect ratio: multiples of 64 near one megapixel, as Flux produces them
SIZES: dict[str, tuple[int, int]] = {
    "21:9": (1536, 640), "16:9": (1344, 768), "4:3": (1152, 896), "3:2": (1216, 832), "1:1": (1024, 1024),
    "2:3": (832, 1216), "3:4": (896, 1152), "9:16": (768, 1344), "9:21": (640, 1536),
}
ASPECT_RATIOS = tuple(SIZES)
FINETUNE_OPTIONS = ("FluxFinetune", "FluxProFinetune", "FluxKontextFinetune")
FINETUNE_TYPES = ("Auto", "Character", "Product", "Style")
CREATE_VARIANTS = ("results", "id", "bare", "field", "missing", "url")
STATUS_VARIANTS = ("empty", "status", "media")
FAILURE_VARIANTS = ("status", "http")
KINDS = ("finetune", "status", "generate", "asset", "media")

_WORD_ALPHABET = string.ascii_uppercase + string.digits
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


# --------------------------------------------------------------------------- records


@dataclass
class UploadedFile:
    """One ``image_files`` part of a finetune request."""

    field: str
    filename: str | None
    content_type: str
    size: int
    data: bytes = field(repr=False)
    image: tuple[str, int, int] | None = None  # (Pillow format, width, height) when it decoded


@dataclass
class FinetuneForm:
    """A parsed ``POST /finetune`` body: every text field as sent (repeats in order) and the files."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    def value(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    @property
    def image_urls(self) -> list[str]:
        return [u for u in self.fields.get("image_urls", []) if u]

    @property
    def image_files(self) -> list[UploadedFile]:
        """The file parts named ``image_files`` (``files`` also holds file parts of other names,
        which the vendor ignores)."""
        return [f for f in self.files if f.field == "image_files"]

    @property
    def file_count(self) -> int:
        return len(self.image_files)

    @property
    def filenames(self) -> list[str | None]:
        return [f.filename for f in self.image_files]

    @property
    def content_types(self) -> list[str]:
        return [f.content_type for f in self.image_files]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    json: Any  # parsed JSON body, or None
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    kind: str = ""  # finetune | status | generate | asset | media | other
    form: FinetuneForm | None = None  # parsed form of a finetune request (also when it was rejected)


@dataclass
class Delivery:
    url: str
    body: bytes
    json: Any
    status: int | None  # None when the request itself failed
    error: str | None = None
    response: bytes = b""


@dataclass
class MadeImage:
    """Where a served image came from."""

    path: str
    kind: str  # "sample" (finetune) | "generation"
    source_id: str  # finetune id or asset id
    index: int  # 1-based
    width: int
    height: int
    prompt: str | None
    trigger_word: str | None  # the finetune used (samples: their own word; base generations: None)


@dataclass
class Finetune:
    id: str
    trigger_word: str
    customer_id: str
    option: str
    finetune_type: str
    num_iterations: int
    lora_prefix: str
    prompt: str
    webhook_url: str | None
    image_count: int
    created: float  # fake time
    queue_s: float
    run_s: float
    host: str
    form: FinetuneForm
    error: str | None = None
    created_at: str = ""
    sample_paths: list[str] = field(default_factory=list)


@dataclass
class Asset:
    id: str
    customer_id: str
    args: dict[str, Any]
    prompt: str
    quantity: int
    aspect_ratio: str
    trigger_word: str | None
    async_mode: bool
    created: float  # fake time
    run_s: float
    host: str
    webhook_url: str | None
    error: str | None = None
    created_at: str = ""
    image_paths: list[str] = field(default_factory=list)


@dataclass
class _Scripted:
    target: str
    status: int | None
    remaining: int
    body: Any
    delay: float
    accept: bool


class _Reject(Exception):
    """An error answer raised from deep in a handler."""

    def __init__(self, status: int, payload: Any) -> None:
        super().__init__(status)
        self.status, self.payload = status, payload


# --------------------------------------------------------------------------- the fake


@dataclass
class FakeVimmerse:
    """The fake's state; ``app`` is the ASGI callable to mount."""

    api_key: str = "vm-test-key"
    customer_id: str = "cus_test_0001"
    #: more accounts: API key → customer id (their finetunes and assets are invisible to others)
    other_keys: dict[str, str] = field(default_factory=dict)
    forbidden_keys: set[str] = field(default_factory=set)  # valid keys without permission → 403
    create_variant: str = "results"
    status_variant: str = "status"
    failure_variant: str = "status"
    asset_wrapped: bool = True
    unknown_shape: bool | Collection[str] = False
    unknown_body: Any = field(default_factory=lambda: {"weird": True})
    fail_finetunes: str | None = None  # finetunes created while set fail with this message
    fail_generations: str | None = None  # generations created while set fail with this message
    credits: int | None = None  # None: unlimited
    finetune_cost: int = 10
    image_cost: int = 1
    #: accepted text-2-image options (None: any string); the real list "depends on available models"
    generate_options: Collection[str] | None = frozenset({"Auto", "FluxFinetuned"})
    queue_s: float = 0.05  # finetune queued → running (fake seconds)
    training_s: float = 0.3  # finetune running → done
    generation_s: float = 0.1  # async generation processing → done
    finetune_samples: int = 2
    seed: int | None = None
    clock: Callable[[], float] = time.monotonic
    #: client for image URLs and webhooks (None: a plain httpx.AsyncClient per call)
    fetch_client: httpx.AsyncClient | None = None
    webhook_timeout_s: float = 10.0
    webhook_attempts: int = 1
    requests: list[RecordedRequest] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    finetunes: dict[str, Finetune] = field(default_factory=dict)  # by trigger word
    assets: dict[str, Asset] = field(default_factory=dict)  # by id
    images: dict[str, MadeImage] = field(default_factory=dict)  # by URL path
    _script: list[_Scripted] = field(default_factory=list)
    _offset: float = 0.0
    _rendered: dict[str, bytes] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        for name, value, allowed in (("create_variant", self.create_variant, CREATE_VARIANTS),
                                     ("status_variant", self.status_variant, STATUS_VARIANTS),
                                     ("failure_variant", self.failure_variant, FAILURE_VARIANTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")

    # ------------------------------------------------------------------ test controls

    def script(self, target: str, status: int | None = 500, *, times: int = 1, body: Any = None,
               delay: float = 0.0, accept: bool = False) -> None:
        """Answer the next ``times`` requests of ``target`` with ``status`` after ``delay`` seconds
        (``status=None``: answer normally after the delay). ``target``: a kind (``finetune``,
        ``status``, ``generate``, ``asset``, ``media``) or a path prefix starting with ``/``.
        ``body``: bytes/str sent as is, anything else as JSON; None: the documented body for the
        status. ``accept``: the request is processed as usual first, only the answer is replaced
        (a proxy's error after the vendor accepted the work)."""
        if not target.startswith("/") and target not in KINDS:
            raise ValueError(f"target must be one of {KINDS} or a path prefix")
        self._script.append(_Scripted(target, status, times, body, delay, accept))

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward."""
        self._offset += seconds

    def now(self) -> float:
        return self.clock() + self._offset

    def transport(self) -> TimeoutASGITransport:
        return TimeoutASGITransport(app=self.app)

    def of_kind(self, kind: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == kind]

    @property
    def last_finetune(self) -> Finetune:
        return list(self.finetunes.values())[-1]

    @property
    def last_asset(self) -> Asset:
        return list(self.assets.values())[-1]

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

    # ------------------------------------------------------------------ state

    def finetune_status(self, word: str) -> str:
        """``queued`` | ``running`` | ``success`` | ``fail``."""
        return self._finetune_phase(self.finetunes[word])

    def asset_status(self, asset_id: str) -> str:
        """``processing`` | ``success`` | ``fail``."""
        return self._asset_phase(self.assets[asset_id])

    def _finetune_phase(self, f: Finetune) -> str:
        elapsed = self.now() - f.created
        if elapsed < f.queue_s:
            return "queued"
        if elapsed < f.queue_s + f.run_s:
            return "running"
        return "fail" if f.error else "success"

    def _asset_phase(self, a: Asset) -> str:
        if self.now() - a.created < a.run_s:
            return "processing"
        return "fail" if a.error else "success"

    def _customer(self, key: str) -> str:
        return self.customer_id if key == self.api_key else self.other_keys[key]

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _new_word(self, prefix: str) -> str:
        while True:
            word = f"{prefix}_{''.join(self._rng.choice(_WORD_ALPHABET) for _ in range(6))}"
            if word not in self.finetunes:
                return word

    def _charge(self, cost: int) -> None:
        if self.credits is not None:
            if self.credits < cost:
                raise _Reject(402, {"message": "INSUFFICIENT_CREDIT"})
            self.credits -= cost

    def _unknown(self, kind: str) -> bool:
        if self.unknown_shape is True:
            return kind in ("finetune", "status", "generate", "asset")
        return bool(self.unknown_shape) and kind in self.unknown_shape  # type: ignore[operator]

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.aclose()
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
            parsed = json.loads(body) if body and "json" in headers.get("content-type", "") else None
        except ValueError:
            parsed = None
        method, path = scope["method"], scope["path"]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        kind = _kind(path)
        rec = RecordedRequest(method, path, headers, parsed, query, body, kind)
        self.requests.append(rec)
        host = f"{scope.get('scheme', 'http')}://{headers.get('host', 'api.vimmerse.net')}"
        status, payload, ctype = await self._respond(rec, host)
        out = [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})

    async def _respond(self, rec: RecordedRequest, host: str) -> tuple[int, bytes, str]:
        for step in self._script:
            if step.target == rec.kind or (step.target.startswith("/") and rec.path.startswith(step.target)):
                step.remaining -= 1
                if step.remaining <= 0:
                    self._script.remove(step)
                if step.delay:
                    await asyncio.sleep(step.delay)
                if step.accept:
                    await self._handle(rec, host)
                if step.status is not None:
                    return _scripted_body(step.status, step.body)
                break
        return await self._handle(rec, host)

    async def _handle(self, rec: RecordedRequest, host: str) -> tuple[int, bytes, str]:
        route = _ROUTES.get(rec.kind)
        if route is None:
            return _json(404, {"detail": "Not Found"})
        methods, handler = route
        if rec.method not in methods:
            return _json(405, {"detail": "Method Not Allowed"})
        try:
            if rec.kind == "media":
                return await self._media(rec)
            key = rec.headers.get("x-api-key")
            if not key:
                return _json(401, {"detail": "Not authenticated"})
            if key != self.api_key and key not in self.other_keys:
                return _json(401, {"detail": "Invalid API key"})
            if key in self.forbidden_keys:
                return _json(403, {"detail": "Not enough permissions"})
            status, payload = await handler(self, rec, host, self._customer(key))
        except _Reject as r:
            return _json(r.status, r.payload)
        if status == 200 and self._unknown(rec.kind):
            payload = self.unknown_body
        return _json(status, payload)

    # ------------------------------------------------------------------ finetunes

    async def _create_finetune(self, rec: RecordedRequest, host: str, customer: str) -> tuple[int, Any]:
        form = _parse_form(rec.headers.get("content-type", ""), rec.body)
        rec.form = form
        errors: list[dict[str, Any]] = []
        option = _enum(form.value("option"), "FluxFinetune", FINETUNE_OPTIONS, ["body", "option"], errors)
        ftype = _enum(form.value("finetune_type"), "Auto", FINETUNE_TYPES, ["body", "finetune_type"], errors)
        iterations = _int(form.value("num_iterations"), 0, ["body", "num_iterations"], errors, lo=0)
        for i, raw in enumerate(form.fields.get("image_files", [])):
            errors.append({"type": "value_error", "loc": ["body", "image_files", i],
                           "msg": "Value error, Expected UploadFile, received: <class 'str'>", "input": raw,
                           "ctx": {"error": {}}})
        if errors:
            return 422, {"detail": errors}
        urls, files = form.image_urls, form.image_files
        if not files and not urls:
            raise _Reject(400, {"message": "NO_IMAGES"})
        if files:
            for f in files:
                f.image = await anyio.to_thread.run_sync(_decode, f.data)
                if f.image is None:
                    raise _Reject(400, {"message": "INVALID_IMAGE"})
        else:
            for url in urls:
                data = await self._download(url, host)
                if await anyio.to_thread.run_sync(_decode, data) is None:
                    raise _Reject(400, {"message": "INVALID_IMAGE"})
        self._charge(self.finetune_cost)
        prefix = form.value("lora_prefix") or "MYLORA"
        word = self._new_word(prefix)
        fid = word if self.create_variant == "id" else self._new_id()
        ft = Finetune(id=fid, trigger_word=word, customer_id=customer, option=option, finetune_type=ftype,
                      num_iterations=iterations, lora_prefix=prefix, prompt=form.value("prompt") or "",
                      webhook_url=form.value("webhook_url") or None, image_count=len(files) or len(urls),
                      created=self.now(), queue_s=self.queue_s, run_s=self.training_s, host=host, form=form,
                      error=self.fail_finetunes, created_at=_stamp())
        w, h = SIZES["1:1"]
        for i in range(1, self.finetune_samples + 1):
            path = f"/media/{customer}/ai_images/{fid}/sample-{i}.png"
            ft.sample_paths.append(path)
            self.images[path] = MadeImage(path, "sample", fid, i, w, h, ft.prompt or None, word)
        self.finetunes[word] = ft
        if ft.webhook_url:
            self._spawn(self._deliver_when_done(ft.webhook_url, customer, fid, lambda: self._finetune_phase(ft), host))
        return 200, self._finetune_answer(ft)

    def _finetune_answer(self, ft: Finetune) -> Any:
        if self.create_variant == "bare":
            return ft.trigger_word
        if self.create_variant == "field":
            return {"trigger_word": ft.trigger_word}
        results = {"results": [ft.trigger_word], "id": [], "missing": [],
                   "url": [f"{ft.host}/media/{ft.customer_id}/finetunes/{ft.id}/lora.safetensors"]}[self.create_variant]
        args = {"option": ft.option, "finetune_type": ft.finetune_type, "num_iterations": ft.num_iterations,
                "lora_prefix": ft.lora_prefix, "prompt": ft.prompt, "webhook_url": ft.webhook_url,
                "image_urls": ft.form.image_urls, "image_count": ft.image_count}
        return {"data": {"id": ft.id, "customer_id": ft.customer_id, "primary_user_id": ft.customer_id, "args": args,
                         "results": results, "thumbnails": [], "status": "success",
                         "mime_type": "application/octet-stream", "app_name": "finetune",
                         "created_at": ft.created_at, "updated_at": ft.created_at, "history": []}}

    async def _get_finetune(self, rec: RecordedRequest, host: str, customer: str) -> tuple[int, Any]:
        ft = self.finetunes.get(rec.path.split("/")[2])
        if ft is None or ft.customer_id != customer:
            return 404, {"message": "NOT_FOUND"}
        phase = self._finetune_phase(ft)
        if phase == "success":
            return 200, {"data": [{"URL": f"{host}{p}"} for p in ft.sample_paths]}
        if phase == "fail":
            if self.failure_variant == "http":
                return 400, {"message": ft.error}
            return 200, {"data": {"status": "fail", "message": ft.error}}
        if self.status_variant == "empty":
            return 200, {"data": []}
        if self.status_variant == "status":
            return 200, {"data": {"status": "processing"}}
        if phase == "queued":
            return 200, {"data": {"processing_status": "queue_bullet", "progress_percentage": 0}}
        pct = int(100 * (self.now() - ft.created - ft.queue_s) / ft.run_s) if ft.run_s else 99
        return 200, {"data": {"processing_status": "processing_bullet", "progress_percentage": max(0, min(99, pct))}}

    # ------------------------------------------------------------------ generations

    async def _generate(self, rec: RecordedRequest, host: str, customer: str) -> tuple[int, Any]:
        # FastAPI: no body → missing; a JSON (or untyped) body is parsed; any other body stays bytes
        if not rec.body:
            return 422, {"detail": [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]}
        ctype = rec.headers.get("content-type", "")
        b: Any = rec.body.decode("utf-8", "replace")
        if not ctype or "json" in parse_options_header(ctype)[0]:
            try:
                b = json.loads(rec.body)
            except ValueError as e:
                return 422, {"detail": [{"type": "json_invalid", "loc": ["body", getattr(e, "pos", 0)],
                                         "msg": "JSON decode error", "input": {},
                                         "ctx": {"error": str(e).split(":")[0]}}]}
        if not isinstance(b, dict):
            return 422, {"detail": [{"type": "model_attributes_type", "loc": ["body"],
                                     "msg": "Input should be a valid dictionary or object to extract fields from",
                                     "input": b}]}
        errors: list[dict[str, Any]] = []
        prompt = b.get("prompt")
        if "prompt" not in b:
            errors.append({"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": b})
        elif not isinstance(prompt, str):
            errors.append({"type": "string_type", "loc": ["body", "prompt"], "msg": "Input should be a valid string",
                           "input": prompt})
        quantity = _int(b.get("quantity"), 1, ["body", "quantity"], errors, lo=1, hi=4)
        option = b.get("option", "Auto")
        if not isinstance(option, str):
            errors.append({"type": "string_type", "loc": ["body", "option"], "msg": "Input should be a valid string",
                           "input": option})
        elif self.generate_options is not None and option not in self.generate_options:
            _enum(option, "Auto", tuple(sorted(self.generate_options)), ["body", "option"], errors)
        ratio = _enum(b.get("aspect_ratio"), "16:9", ASPECT_RATIOS, ["body", "aspect_ratio"], errors)
        _int(b.get("creativity_strength"), 5, ["body", "creativity_strength"], errors, lo=1, hi=10)
        _bool(b.get("enhance_image"), False, ["body", "enhance_image"], errors)
        async_mode = _bool(b.get("async_mode"), False, ["body", "async_mode"], errors)
        webhook = b.get("webhook_url")
        if webhook is not None and not isinstance(webhook, str):
            errors.append({"type": "string_type", "loc": ["body", "webhook_url"], "msg": "Input should be a valid string",
                           "input": webhook})
        if errors:
            return 422, {"detail": errors}
        assert isinstance(prompt, str)
        if not prompt.strip():
            return 400, {"message": "BAD_REQUEST"}
        word = None
        if option == "FluxFinetuned":
            word = self._finetune_in(prompt, customer)
            if word is None:
                return 400, {"message": "FINETUNE_NOT_FOUND"}
        if self.fail_generations and not async_mode:
            return 400, {"message": self.fail_generations}
        self._charge(self.image_cost * quantity)
        aid = self._new_id()
        args = {"prompt": prompt, "quantity": quantity, "option": option, "aspect_ratio": ratio,
                "creativity_strength": b.get("creativity_strength", 5), "enhance_image": b.get("enhance_image", False),
                "async_mode": async_mode, "webhook_url": webhook}
        asset = Asset(id=aid, customer_id=customer, args=args, prompt=prompt, quantity=quantity, aspect_ratio=ratio,
                      trigger_word=word, async_mode=async_mode, created=self.now(),
                      run_s=self.generation_s if async_mode else 0.0, host=host, webhook_url=webhook or None,
                      error=self.fail_generations, created_at=_stamp())
        w, h = SIZES[ratio]
        for i in range(1, quantity + 1):
            path = f"/media/{customer}/ai_images/{aid}/image-{i}.png"
            asset.image_paths.append(path)
            self.images[path] = MadeImage(path, "generation", aid, i, w, h, prompt, word)
        self.assets[aid] = asset
        if async_mode and asset.webhook_url:
            self._spawn(self._deliver_when_done(asset.webhook_url, customer, aid, lambda: self._asset_phase(asset), host))
        return 200, self._asset_view(asset, host)

    def _finetune_in(self, prompt: str, customer: str) -> str | None:
        for word, ft in self.finetunes.items():
            if (ft.customer_id == customer and self._finetune_phase(ft) == "success"
                    and re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", prompt)):
                return word
        return None

    def _asset_view(self, a: Asset, host: str) -> dict[str, Any]:
        phase = self._asset_phase(a)
        view: dict[str, Any] = {
            "id": a.id, "customer_id": a.customer_id, "primary_user_id": a.customer_id, "args": a.args,
            "results": [f"{host}{p}" for p in a.image_paths] if phase == "success" else [],
            "thumbnails": [], "status": phase, "mime_type": "image/png", "app_name": "text-to-image",
            "quantity": a.quantity, "created_at": a.created_at, "updated_at": a.created_at, "history": [],
        }
        if phase == "fail":
            view["message"] = a.error
        return view

    async def _get_asset(self, rec: RecordedRequest, host: str, customer: str) -> tuple[int, Any]:
        asset = self.assets.get(rec.path.split("/")[2])
        if asset is None or asset.customer_id != customer:
            return 404, {"message": "NOT_FOUND"}
        view = self._asset_view(asset, host)
        return 200, {"data": view} if self.asset_wrapped else view

    # ------------------------------------------------------------------ media

    async def _media(self, rec: RecordedRequest) -> tuple[int, bytes, str]:
        made = self.images.get(rec.path)
        ready = False
        if made is not None:
            if made.kind == "sample":
                ft = next((f for f in self.finetunes.values() if f.id == made.source_id), None)
                ready = ft is not None and self._finetune_phase(ft) == "success"
            else:
                asset = self.assets.get(made.source_id)
                ready = asset is not None and self._asset_phase(asset) == "success"
        if made is None or not ready:
            return _json(404, {"message": "NOT_FOUND"})
        if made.path not in self._rendered:
            self._rendered[made.path] = await anyio.to_thread.run_sync(_render, made)
        return 200, self._rendered[made.path], "image/png"

    # ------------------------------------------------------------------ outbound HTTP

    @contextlib.asynccontextmanager
    async def _client(self, url: str, host: str) -> AsyncIterator[httpx.AsyncClient]:
        if urlsplit(url).netloc == urlsplit(host).netloc:  # the fake's own URLs: served in-process
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), trust_env=False) as client:
                yield client
        elif self.fetch_client is not None:
            yield self.fetch_client
        else:
            async with httpx.AsyncClient(trust_env=False) as client:
                yield client

    async def _download(self, url: str, host: str) -> bytes:
        try:
            async with self._client(url, host) as client:
                resp = await client.get(url, timeout=10, follow_redirects=True)
        except (httpx.HTTPError, ValueError) as e:  # ValueError: httpx's InvalidURL and friends
            raise _Reject(400, {"message": "INVALID_IMAGE_URL"}) from e
        if resp.status_code != 200:
            raise _Reject(400, {"message": "INVALID_IMAGE_URL"})
        return resp.content

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_when_done(self, url: str, customer: str, media_id: str, phase: Callable[[], str],
                                 host: str) -> None:
        deadline = time.monotonic() + 300
        while (status := phase()) not in ("success", "fail"):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)
        body = json.dumps({"customer_id": customer, "media_id": media_id, "status": status}).encode()
        parsed = json.loads(body)
        for attempt in range(self.webhook_attempts):
            try:
                async with self._client(url, host) as client:
                    resp = await client.post(url, content=body, headers={"content-type": "application/json"},
                                             timeout=self.webhook_timeout_s)
                self.deliveries.append(Delivery(url, body, parsed, resp.status_code, response=resp.content))
                if resp.status_code // 100 == 2:
                    return
            except (httpx.HTTPError, ValueError) as e:
                self.deliveries.append(Delivery(url, body, parsed, None, f"{type(e).__name__}: {e}"))
            if attempt + 1 < self.webhook_attempts:
                await asyncio.sleep(0.05 * 2**attempt)


_ROUTES: dict[str, tuple[tuple[str, ...], Callable[..., Awaitable[tuple[int, Any]]]]] = {
    "finetune": (("POST",), FakeVimmerse._create_finetune),
    "status": (("GET",), FakeVimmerse._get_finetune),
    "generate": (("POST",), FakeVimmerse._generate),
    "asset": (("GET",), FakeVimmerse._get_asset),
    "media": (("GET", "HEAD"), FakeVimmerse._media),  # handled before auth
}


# --------------------------------------------------------------------------- helpers


def _kind(path: str) -> str:
    if path == "/finetune":
        return "finetune"
    for kind, pattern in (("status", r"/finetune/[^/]+"), ("generate", r"/v2/image/text-2-image"),
                          ("asset", r"/asset/[^/]+"), ("media", r"/media/.+")):
        if re.fullmatch(pattern, path):
            return kind
    return "other"


def _json(status: int, payload: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(payload).encode(), "application/json"


def _scripted_body(status: int, body: Any) -> tuple[int, bytes, str]:
    if body is None:
        default = {400: {"message": "BAD_REQUEST"}, 401: {"detail": "Invalid API key"},
                   402: {"message": "INSUFFICIENT_CREDIT"}, 403: {"detail": "Not enough permissions"},
                   404: {"message": "NOT_FOUND"},
                   422: {"detail": [{"type": "value_error", "loc": ["body"], "msg": "Value error, scripted",
                                     "input": None, "ctx": {"error": {}}}]}}.get(status)
        if default is not None:
            return _json(status, default)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = f"HTTP {status}"
        return status, phrase.encode(), "text/plain; charset=utf-8"
    if isinstance(body, bytes):
        try:
            json.loads(body)
            return status, body, "application/json"
        except ValueError:
            return status, body, "text/plain; charset=utf-8"
    if isinstance(body, str):
        return status, body.encode(), "text/plain; charset=utf-8"
    return _json(status, body)


def _stamp() -> str:
    """Vimmerse's timestamp format, e.g. ``2025-05-06 16:35:59.840508+00:00``."""
    return str(datetime.now(timezone.utc))


def _parse_form(content_type: str, body: bytes) -> FinetuneForm:
    """Parse a form body as Starlette would (a non-form body reads as an empty form)."""
    form = FinetuneForm()
    mime, options = parse_options_header(content_type)
    if mime == "application/x-www-form-urlencoded":
        for k, values in parse_qs(body.decode("latin-1"), keep_blank_values=True).items():
            form.fields.setdefault(k, []).extend(values)
        return form
    if mime != "multipart/form-data":
        return form
    if not options.get("boundary"):
        raise _Reject(400, {"detail": "There was an error parsing the body"})
    try:
        for part in MultipartParser(io.BytesIO(body), options["boundary"], content_length=len(body)):
            if part.filename is not None:
                data = part.raw
                form.files.append(UploadedFile(part.name, part.filename, part.content_type, len(data), data))
            else:
                form.fields.setdefault(part.name, []).append(part.value)
    except MultipartError:
        raise _Reject(400, {"detail": "There was an error parsing the body"}) from None
    return form


def _enum(value: Any, default: str, allowed: tuple[str, ...], loc: list[Any], errors: list[dict[str, Any]]) -> str:
    if value is None:
        return default
    if value in allowed:
        return str(value)
    expected = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" or '{allowed[-1]}'" if len(allowed) > 1 else f"'{allowed[0]}'"
    errors.append({"type": "enum", "loc": loc, "msg": f"Input should be {expected}", "input": value,
                   "ctx": {"expected": expected}})
    return default


def _int(value: Any, default: int, loc: list[Any], errors: list[dict[str, Any]], *, lo: int | None = None,
         hi: int | None = None) -> int:
    """Pydantic v2 lax int: ints, integral floats and numeric strings; then the bounds."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        errors.append({"type": "int_type", "loc": loc, "msg": "Input should be a valid integer", "input": value})
        return default
    if isinstance(value, float):
        if not value.is_integer():
            errors.append({"type": "int_from_float", "loc": loc,
                           "msg": "Input should be a valid integer, got a number with a fractional part", "input": value})
            return default
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            errors.append({"type": "int_parsing", "loc": loc,
                           "msg": "Input should be a valid integer, unable to parse string as an integer", "input": value})
            return default
    else:
        number = value
    if lo is not None and number < lo:
        errors.append({"type": "greater_than_equal", "loc": loc, "msg": f"Input should be greater than or equal to {lo}",
                       "input": value, "ctx": {"ge": lo}})
    elif hi is not None and number > hi:
        errors.append({"type": "less_than_equal", "loc": loc, "msg": f"Input should be less than or equal to {hi}",
                       "input": value, "ctx": {"le": hi}})
    return number


def _bool(value: Any, default: bool, loc: list[Any], errors: list[dict[str, Any]]) -> bool:
    """Pydantic v2 lax bool."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    kind = "bool_parsing" if isinstance(value, (str, int, float)) else "bool_type"
    msg = "Input should be a valid boolean" + (", unable to interpret input" if kind == "bool_parsing" else "")
    errors.append({"type": kind, "loc": loc, "msg": msg, "input": value})
    return default


def _decode(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) when Pillow can fully decode ``data``, else None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return str(im.format), im.width, im.height
    except Exception:  # noqa: BLE001 - any decoder error means a bad image
        return None


def _render(made: MadeImage) -> bytes:
    rng = random.Random(made.path)
    w, h = made.width, made.height
    img = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    img.paste((40 * made.index % 256, 120, 200), (0, 0, w // 4, h // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
