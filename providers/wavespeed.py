"""``wavespeed``: LoRA training (``flux-dev-lora-trainer``) and inference (``flux-dev-lora``).

The wire contract is CONTRACTS.md §2. The vendor's JSON lives in private Structs; the
``*_to_wire`` / ``*_from_wire`` static methods are pure and kept apart from the I/O. Two httpx
clients, both built through ``setup.http_client``: one for the API (it carries the key) and one,
with no credentials, for upload targets and result URLs on WaveSpeed's CDN.

Submits (training, generation) are sent exactly once. Only those final, billable POSTs can be
ambiguous: a timeout or dropped connection after sending, or a 5xx that is not WaveSpeed's own
``{code, message}`` envelope (a proxy's 502/504), raises ``ProviderOutcomeUnknown`` and the
engine reconciles; a 5xx in the vendor's envelope is a refusal (``ProviderUnavailable``,
retried with backoff). Calls before it (the upload ticket, the upload) are plain retryable
errors. Status GETs and file downloads are retried on transport errors with backoff (``sleep``
is an attribute, so tests run instantly).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
import msgspec
import structlog

from plugins.hookspecs import hookimpl
from providers.base import (
    ASPECT_RATIOS, CallbackEvent, Capabilities, Cost, Dataset, GeneratedImage, GenerationSpec,
    GenerationStatus, InferenceCapabilities, LoraHandle, Provider, ProviderAuthError, ProviderError,
    ProviderOutcomeUnknown, ProviderRateLimited, ProviderRejected, ProviderSetup, ProviderTimeout,
    ProviderUnavailable, TrainingCapabilities, TrainingSpec, TrainingStatus, TrainingSubmission,
)
from providers.httputil import CHUNK, clip, download, retry_after, retrying, transient
from providers.safetensors import SafetensorsInvalid, read_header

log = structlog.get_logger()

T = TypeVar("T")
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
_WEBHOOK_TOLERANCE_S = 300
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MIN_SIDE, _MAX_SIDE = 256, 1536
_FORMATS = {"png": "png", "jpg": "jpeg", "webp": "webp"}
#: vendor status -> (gateway state, retryable when failed); ``failed`` is judged by its error text
_STATES: dict[str, tuple[Literal["queued", "running", "succeeded", "failed"], bool]] = {
    "created": ("queued", False), "processing": ("running", False), "completed": ("succeeded", False),
    "failed": ("failed", False), "timeout": ("failed", True), "cancelled": ("failed", False),
    "deleted": ("failed", False),
}
def _failure_retryable(status: str, error: str | None) -> bool:
    """A ``failed`` prediction is retryable only when its error reads like WaveSpeed's own trouble."""
    if status == "failed":
        return transient(error)
    return _STATES.get(status, ("failed", False))[1]


class WaveSpeedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``providers.wavespeed`` in the config file."""

    api_key: Annotated[str, msgspec.Meta(min_length=1)]
    base_url: str = "https://api.wavespeed.ai"
    trainer_model: str = "wavespeed-ai/flux-dev-lora-trainer"
    inference_model: str = "wavespeed-ai/flux-dev-lora"
    #: per network operation (connect, each read, each write), for API and file transfers
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: extra tries for status GETs and downloads after a transport error, with doubling backoff
    poll_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    poll_backoff_s: NonNegative = 0.5
    learning_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.0004
    #: the vendor's default rank (the gateway always sends the LoRA's own ``loraRank``)
    default_rank: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    #: the account's webhook secret (``whsec_...``); with ``server.public_base_url`` it turns callbacks on
    webhook_secret: str | None = None
    #: ``upload``: push the zip through WaveSpeed's media API; ``gateway_url``: hand over a signed gateway URL
    dataset_delivery: Literal["upload", "gateway_url"] = "upload"
    #: connections to the API kept open (and reused); at least the engine's concurrency, so
    #: status polls never reconnect
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    cost_per_training: NonNegative = 1.0
    cost_per_image: NonNegative = 0.015
    max_steps: Annotated[int, msgspec.Meta(ge=500, le=4000)] = 4000
    #: how long an upload of stored LoRA weights (for generation without a public URL) is reused;
    #: WaveSpeed documents 7 days for uploaded files, possibly stale, so a day by default
    weights_upload_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 86_400

    def __repr__(self) -> str:  # never print the key or the secret
        return f"WaveSpeedConfig(base_url={self.base_url!r}, dataset_delivery={self.dataset_delivery!r}, api_key='***')"


# --------------------------------------------------------------------------- wire Structs (private)


class _TrainBody(msgspec.Struct, frozen=True, kw_only=True):
    data: str
    trigger_word: str
    steps: int
    lora_rank: int
    learning_rate: float


class _LoraRef(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    scale: float


class _GenerateBody(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    loras: list[_LoraRef]
    size: str
    num_images: int
    seed: int
    guidance_scale: float
    num_inference_steps: int
    output_format: str


class _Prediction(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    model: str | None = None
    status: str = "created"
    outputs: list[str] | None = None
    error: str | None = None


class _Envelope(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    code: int | None = None
    message: str | None = None
    data: T | None = None


class _UploadTarget(msgspec.Struct, frozen=True, kw_only=True):
    method: str = "PUT"
    url: str
    headers: dict[str, str] = {}


class _Upload(msgspec.Struct, frozen=True, kw_only=True):
    upload: _UploadTarget | None = None  # the ticket flow's PUT target (absent from the binary answer)
    download_url: str


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(CHUNK):
            yield chunk


class WaveSpeedAdapter(Provider):
    """Trains FLUX LoRAs on WaveSpeed and generates with them (or with any portable LoRA)."""

    name = "wavespeed"
    config_type = WaveSpeedConfig

    def __init__(self, config: WaveSpeedConfig, setup: ProviderSetup) -> None:
        super().__init__(config, setup)
        self.config: WaveSpeedConfig = config
        self.clock: Callable[[], float] = time.time
        self.sleep: Callable[[float], Awaitable[None]] = anyio.sleep
        self._callbacks = bool(config.webhook_secret and setup.public_base_url)
        self._ticket_upload = True  # switched off once the ticket endpoint answers 404/405
        self._weights_uploads: dict[str, tuple[str, float]] = {}  # weights sha256 -> (URL, expires)
        timeout = httpx.Timeout(config.timeout_s)
        self._api = setup.http_client(
            base_url=config.base_url.rstrip("/"), timeout=timeout,
            headers={"Authorization": f"Bearer {config.api_key}"},
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections),
        )
        self._files = setup.http_client(timeout=timeout, follow_redirects=True)  # no credentials
        self.capabilities = Capabilities(
            training=TrainingCapabilities(min_steps=500, max_steps=config.max_steps, min_rank=1, max_rank=64,
                                          dataset_input="zip_url" if config.dataset_delivery == "gateway_url" else "zip",
                                          produces_artifact=True),
            inference=InferenceCapabilities(accepts_lora_file=True, max_outputs=4, aspect_ratios=ASPECT_RATIOS,
                                            output_formats=frozenset(_FORMATS)),
            cost=Cost(per_training=config.cost_per_training, per_image=config.cost_per_image),
            webhooks_in=self._callbacks, callbacks_name_attempts=self._callbacks, can_lookup=False, can_cancel=True,
        )

    # ------------------------------------------------------------------ pure conversions

    @staticmethod
    def training_to_wire(spec: TrainingSpec, zip_url: str, config: WaveSpeedConfig) -> _TrainBody:
        if not 500 <= spec.steps <= config.max_steps or not 1 <= spec.lora_rank <= 64:
            raise ProviderRejected(f"wavespeed: steps {spec.steps} / rank {spec.lora_rank} outside 500..{config.max_steps} / 1..64")
        return _TrainBody(data=zip_url, trigger_word=spec.trigger_word, steps=spec.steps,
                          lora_rank=spec.lora_rank, learning_rate=config.learning_rate)

    @staticmethod
    def generation_to_wire(spec: GenerationSpec, lora_path: str) -> _GenerateBody:
        w, h = spec.width, spec.height
        if any(v % 16 or not _MIN_SIDE <= v <= _MAX_SIDE for v in (w, h)):
            raise ProviderRejected(f"wavespeed: size {w}x{h} is not multiples of 16 within {_MIN_SIDE}..{_MAX_SIDE}")
        if spec.output_format not in _FORMATS:
            raise ProviderRejected(f"wavespeed: output format {spec.output_format!r} not supported")
        return _GenerateBody(
            prompt=spec.prompt, loras=[_LoraRef(path=lora_path, scale=spec.lora_strength)], size=f"{w}*{h}",
            num_images=spec.num_outputs, seed=-1 if spec.seed is None else spec.seed,
            guidance_scale=spec.guidance_scale, num_inference_steps=spec.num_inference_steps,
            output_format=_FORMATS[spec.output_format],
        )

    @staticmethod
    def training_from_wire(p: _Prediction) -> TrainingStatus:
        state, _ = _STATES.get(p.status, ("running", False))
        if state == "succeeded":
            if not p.outputs:
                return TrainingStatus(state="failed", error="wavespeed: training completed without weights", retryable=True)
            return TrainingStatus(state="succeeded", progress=1.0, artifact_url=p.outputs[0])
        if state == "failed":
            return TrainingStatus(state="failed", error=f"wavespeed: training {p.status}: {clip(p.error) or 'no reason given'}",
                                  retryable=_failure_retryable(p.status, p.error))
        return TrainingStatus(state=state, progress=0.0 if state == "queued" else None)

    @staticmethod
    def generation_from_wire(p: _Prediction) -> GenerationStatus:
        state, _ = _STATES.get(p.status, ("running", False))
        if state == "succeeded":
            if not p.outputs:
                return GenerationStatus(state="failed", ref=p.id, error="wavespeed: no images returned", retryable=True)
            return GenerationStatus(state="succeeded", ref=p.id, progress=1.0,
                                    images=[GeneratedImage(url=u) for u in p.outputs])
        if state == "failed":
            return GenerationStatus(state="failed", ref=p.id, retryable=_failure_retryable(p.status, p.error),
                                    error=f"wavespeed: generation {p.status}: {clip(p.error) or 'no reason given'}")
        return GenerationStatus(state=state, ref=p.id)

    # ------------------------------------------------------------------ HTTP plumbing

    def _error(self, resp: httpx.Response, what: str, *, final: bool = False) -> ProviderError:
        """Map a non-2xx answer (or an error envelope) onto the ProviderError tree. ``final``: the
        answer to a billable submit, where a 5xx without the vendor's own envelope (a proxy's
        502/504, an HTML page) may follow an acceptance."""
        status = resp.status_code
        try:
            env = msgspec.json.decode(resp.content, type=_Envelope[Any])
            detail = str(env.message or (env.data.get("error") if isinstance(env.data, dict) else None) or "")
            vendor = env.code is not None or env.message is not None
            if status < 400 and env.code:
                status = env.code
        except (msgspec.DecodeError, msgspec.ValidationError):
            detail, vendor = None, False
        if final and status >= 500 and not vendor:
            log.warning("provider_http_error", provider=self.name, call=what, status_code=status, vendor_body=False)
            return ProviderOutcomeUnknown(f"wavespeed: {what}: HTTP {status} without WaveSpeed's error body "
                                          "(a proxy in between?); it may have been received")
        if status in (401, 403):
            log.error("provider_config_error", provider=self.name, call=what, status_code=status,
                      hint="check providers.wavespeed.api_key and the account balance")
            return ProviderAuthError(f"wavespeed: {what}: HTTP {status} (API key refused)")
        log.warning("provider_http_error", provider=self.name, call=what, status_code=status, detail=clip(detail))
        message = f"wavespeed: {what}: HTTP {status}"
        if status == 429:
            return ProviderRateLimited(message, retry_after=retry_after(resp.headers.get("retry-after")))
        if status >= 500:
            return ProviderUnavailable(message)
        if status == 402:
            return ProviderError(message + " (insufficient balance)", retryable=True)
        return ProviderRejected(message)

    def _decode(self, resp: httpx.Response, typ: type[T], what: str, *, final: bool = False) -> T:
        if resp.status_code // 100 != 2:
            raise self._error(resp, what, final=final)
        try:
            env = msgspec.json.decode(resp.content, type=_Envelope[typ])  # type: ignore[valid-type]
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            if final:  # a 2xx we cannot read: it was probably accepted
                raise ProviderOutcomeUnknown(f"wavespeed: {what}: unreadable answer ({e}); it may have been received") from None
            raise ProviderUnavailable(f"wavespeed: {what}: unreadable answer ({e})") from None
        if env.code is not None and env.code >= 400:
            raise self._error(resp, what)
        if env.data is None:
            raise ProviderUnavailable(f"wavespeed: {what}: answer has no data")
        return env.data

    async def _post(self, path: str, body: Any, what: str, *, final: bool = False, **kw: Any) -> httpx.Response:
        """One POST, never repeated. Nothing was sent: ``ProviderUnavailable``. Sent but no answer:
        for a ``final`` (billable) submit ``ProviderOutcomeUnknown``, else ``ProviderTimeout``."""
        try:
            return await self._api.post(path, content=msgspec.json.encode(body),
                                        headers={"Content-Type": "application/json"}, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise ProviderUnavailable(f"wavespeed: {what}: could not connect ({type(e).__name__})") from None
        except httpx.TransportError as e:
            if final:
                raise ProviderOutcomeUnknown(
                    f"wavespeed: {what}: no answer ({type(e).__name__}); it may have been received") from None
            raise ProviderTimeout(f"wavespeed: {what}: no answer ({type(e).__name__})") from None

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """An idempotent call, transport errors and ProviderUnavailable retried ``poll_retries`` times."""
        return await retrying(call, name=self.name, what=what, retries=self.config.poll_retries,
                              backoff_s=self.config.poll_backoff_s, sleep=self.sleep)

    @staticmethod
    def _path(ref: str, action: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", ref):
            raise ProviderRejected(f"wavespeed: bad prediction id {ref[:40]!r}")
        return f"/api/v3/predictions/{ref}/{action}"

    async def _prediction(self, ref: str, what: str) -> _Prediction:
        path = self._path(ref, "result")
        return self._decode(await self._retrying(lambda: self._api.get(path), what), _Prediction, what)

    def _webhook_params(self, attempt_id: str) -> dict[str, str]:
        """``?webhook=`` with the attempt id in it: a callback for a submission whose answer was
        lost then tells the gateway which attempt it is (the body is signed; the id only selects)."""
        if not self._callbacks:
            return {}
        return {"webhook": f"{str(self.setup.public_base_url).rstrip('/')}/hooks/{self.name}?attempt={attempt_id}"}

    # ------------------------------------------------------------------ datasets

    async def _zip_url(self, dataset: Dataset) -> str:
        if self.config.dataset_delivery == "gateway_url":
            if not dataset.zip_url:
                raise ProviderRejected("wavespeed: dataset_delivery is 'gateway_url' but the gateway has no public URL; "
                                       "set server.public_base_url or use dataset_delivery: upload")
            return dataset.zip_url
        return await self.upload(Path(dataset.zip_path))

    async def upload(self, path: Path, *, content_type: str = "application/zip") -> str:
        """Upload a file through the media API (ticket + PUT, else the binary endpoint); its URL."""
        size = (await anyio.Path(path).stat()).st_size
        if self._ticket_upload:
            meta = {"filename": path.name, "size": size, "content_type": content_type}
            resp = await self._post("/api/v3/media/uploads", meta, "upload ticket")
            if resp.status_code not in (404, 405):
                ticket = self._decode(resp, _Upload, "upload ticket")
                if ticket.upload is None:
                    raise ProviderUnavailable("wavespeed: upload ticket has no upload target")
                await self._put(ticket.upload, path, size)
                return ticket.download_url
            log.info("wavespeed_upload_fallback", provider=self.name, status_code=resp.status_code)
            self._ticket_upload = False
        boundary = secrets.token_hex(16)
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> AsyncIterator[bytes]:
            yield head
            async for chunk in _file_chunks(path):
                yield chunk
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(head) + size + len(tail))}
        try:
            resp = await self._api.post("/api/v3/media/upload/binary", content=body(), headers=headers)
        except httpx.TransportError as e:
            raise ProviderUnavailable(f"wavespeed: upload: {type(e).__name__}") from None
        return self._decode(resp, _Upload, "upload").download_url

    async def _put(self, target: _UploadTarget, path: Path, size: int) -> None:
        headers = {**target.headers, "Content-Length": str(size)}
        try:
            resp = await self._files.request(target.method, target.url, content=_file_chunks(path), headers=headers)
        except httpx.TransportError as e:
            raise ProviderUnavailable(f"wavespeed: upload PUT: {type(e).__name__}") from None
        if resp.status_code // 100 != 2:
            raise ProviderError(f"wavespeed: upload PUT refused (HTTP {resp.status_code})", retryable=True)

    # ------------------------------------------------------------------ training

    async def start_training(self, spec: TrainingSpec, dataset: Dataset) -> TrainingSubmission:
        zip_url = await self._zip_url(dataset)
        body = self.training_to_wire(spec, zip_url, self.config)
        resp = await self._post(f"/api/v3/{self.config.trainer_model}", body, "submit training", final=True,
                                params=self._webhook_params(spec.attempt_id))
        return TrainingSubmission(ref=self._decode(resp, _Prediction, "submit training", final=True).id)

    async def training_status(self, ref: str) -> TrainingStatus:
        return self.training_from_wire(await self._prediction(ref, "training status"))

    async def cancel_training(self, ref: str) -> None:
        """Cancel a prediction. A prediction that already ended (400/404) is left as it is: that
        counts as done; other failures raise (the engine asks again later)."""
        resp = await self._post(self._path(ref, "cancel"), {}, "cancel")
        if resp.status_code // 100 != 2 and resp.status_code not in (400, 404):
            raise self._error(resp, "cancel")

    async def cancel_generation(self, ref: str) -> None:
        await self.cancel_training(ref)  # one endpoint for every prediction

    # ------------------------------------------------------------------ inference

    async def _lora_path(self, lora: LoraHandle) -> str:
        """Where WaveSpeed fetches the LoRA's weights: the gateway's signed URL when
        ``server.public_base_url`` is set; otherwise the stored weights uploaded through the media
        API, once per LoRA while the upload lasts (``weights_upload_ttl_s``). Never the vendor's own
        training output URL, which expires after about a week."""
        if lora.artifact_url:
            return lora.artifact_url
        if lora.artifact_key is None and lora.artifact_path is None:
            raise ProviderRejected("wavespeed: the LoRA has no stored weights to generate with", retryable=True)
        cache_key = lora.artifact_sha256 or lora.lora_id
        hit = self._weights_uploads.get(cache_key)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        if lora.artifact_path is not None:
            url = await self.upload(Path(lora.artifact_path), content_type="application/octet-stream")
        else:  # storage elsewhere: fetch a local copy first
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{lora.lora_id}.safetensors"
                await self.setup.storage.fetch_to(lora.artifact_key, path)
                url = await self.upload(path, content_type="application/octet-stream")
        self._weights_uploads[cache_key] = (url, self.clock() + self.config.weights_upload_ttl_s)
        log.info("wavespeed_weights_uploaded", provider=self.name, lora_id=lora.lora_id)
        return url

    async def generate(self, spec: GenerationSpec, lora: LoraHandle) -> GenerationStatus:
        body = self.generation_to_wire(spec, await self._lora_path(lora))
        resp = await self._post(f"/api/v3/{self.config.inference_model}", body, "submit generation", final=True,
                                params=self._webhook_params(spec.attempt_id))
        return self.generation_from_wire(self._decode(resp, _Prediction, "submit generation", final=True))

    async def generation_status(self, ref: str) -> GenerationStatus:
        return self.generation_from_wire(await self._prediction(ref, "generation status"))

    # ------------------------------------------------------------------ files

    async def fetch_file(self, url: str, dest: Path, *, max_bytes: int) -> None:
        """Stream a result URL to ``dest`` (no credentials sent), capped at ``max_bytes``; a
        ``.safetensors`` file must parse as one. Transport errors and 5xx are retried."""

        def check(tmp: Path) -> None:
            if Path(dest).name.endswith(".safetensors") or urlsplit(url).path.endswith(".safetensors"):
                try:
                    read_header(tmp)
                except SafetensorsInvalid as e:
                    raise ProviderError(f"wavespeed: downloaded weights are not whole: {e}", retryable=True) from None

        await download(self._files, url, Path(dest), max_bytes=max_bytes, name=self.name,
                       retries=self.config.poll_retries, backoff_s=self.config.poll_backoff_s, sleep=self.sleep,
                       check=check)

    # ------------------------------------------------------------------ callbacks

    async def verify_callback(self, headers: dict[str, str], body: bytes,
                              params: dict[str, str] | None = None) -> CallbackEvent:
        """Check a ``webhook-signature: v3,<hex>`` callback (HMAC-SHA256 of ``id.timestamp.body``,
        key = the secret without ``whsec_``, not base64-decoded; 300 s window)."""
        secret = self.config.webhook_secret
        wid, ts, sigs = (headers.get(k, "") for k in ("webhook-id", "webhook-timestamp", "webhook-signature"))
        if not secret or not wid or not (ts.isascii() and ts.isdigit()) or not sigs:
            raise ProviderAuthError("wavespeed: callback is unsigned or callbacks are not configured")
        if abs(self.clock() - int(ts)) > _WEBHOOK_TOLERANCE_S:
            raise ProviderAuthError("wavespeed: callback timestamp outside the 300 s window")
        key = secret.removeprefix("whsec_").encode()
        expected = hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).hexdigest().encode()
        given = [s[3:].encode("utf-8", "replace") for s in sigs.split() if s.startswith("v3,")]
        if not any(hmac.compare_digest(expected, g) for g in given):
            raise ProviderAuthError("wavespeed: callback signature does not match")
        try:
            payload = msgspec.json.decode(body, type=_Prediction)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise ProviderAuthError("wavespeed: callback body is not a prediction") from None
        kind = "generation" if payload.model == self.config.inference_model else "training"
        attempt = (params or {}).get("attempt")  # the id the adapter put in the ?webhook= URL
        return CallbackEvent(ref=payload.id, kind=kind, attempt_id=attempt if attempt and _UUID.fullmatch(attempt) else None)

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._files.aclose()


@hookimpl
def register_providers(register: Callable[[type], None]) -> None:
    """Register the WaveSpeed provider (``providers.wavespeed``)."""
    register(WaveSpeedAdapter)
