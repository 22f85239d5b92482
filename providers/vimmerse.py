"""``vimmerse``: Flux Pro finetunes (``POST /finetune``) and generation with them (``FluxFinetuned``).

What Vimmerse is, as capability data: it takes image files (or image URLs), not a zip; it picks
the rank itself; it makes its own trigger word, which is also the key of its status endpoint; it
gives no downloadable weights (the LoRA is not portable: generation only here), only sample
images; and it has no seed, strength, guidance or step controls.

Its public docs leave much unsaid, so the adapter reads defensively and never guesses success:

- the trigger word is looked for in the create answer in every place it might be (a
  ``trigger_word`` field, a bare JSON string, ``data.results[0]``, ``data.id``), checked to look
  like a word (not a URL, not a UUID); none found: the attempt fails (retryable) and the raw
  answer is logged;
- a finetune is done when its status lists sample URLs; failed on an explicit failure (a status
  word such as ``fail``, or a 4xx with a ``message``); anything else, a shape never seen
  included, is "still training" (logged once in full) and the engine's stuck timer ends it;
- Vimmerse signs no callbacks: a callback is only a hint that makes the attempt's poll due now.

The vendor's JSON lives in private Structs and plain dicts read by pure functions; its error
bodies go to the log, never into a message a client sees.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Literal

import anyio
import httpx
import msgspec
import structlog

from plugins.hookspecs import hookimpl
from providers.base import (
    ASPECT_RATIOS, CallbackEvent, Capabilities, Cost, Dataset, GeneratedImage, GenerationSpec, GenerationStatus,
    InferenceCapabilities, LoraHandle, Provider, ProviderAuthError, ProviderError, ProviderOutcomeUnknown,
    ProviderRateLimited, ProviderRejected, ProviderSetup, ProviderUnavailable,
    TrainingCapabilities, TrainingSpec, TrainingStatus, TrainingSubmission,
)
from providers.httputil import clip, download, retry_after, retrying, transient

log = structlog.get_logger()

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
#: what a vendor trigger word may look like: a word, with underscores or dashes
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{1,63}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ASSET_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FINETUNE_TYPES = {"person": "Character", "object": "Product", "style": "Style"}
_FAILED = {"fail", "failed", "failure", "error", "cancel", "cancelled", "canceled"}
_QUEUED = {"new", "queued", "queue", "queue_bullet", "pending", "waiting"}
_RUNNING = {"processing", "processing_bullet", "running", "training", "in_progress", "started"}
#: secrets and account identifiers never logged from a vendor body
_REDACT = re.compile(r'("(?:api_?key|token|secret|authorization|customer_id|primary_user_id)"\s*:\s*)"[^"]*"',
                     re.IGNORECASE)


class VimmerseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``providers.vimmerse`` in the config file."""

    api_key: Annotated[str, msgspec.Meta(min_length=1)]
    base_url: str = "https://api.vimmerse.net"
    #: the finetune model: Flux Pro or Flux (dev)
    option: Literal["FluxProFinetune", "FluxFinetune"] = "FluxProFinetune"
    #: the generation ``option`` that selects a finetune (addressed by its trigger word in the prompt)
    inference_option: str = "FluxFinetuned"
    #: ``auto``: ``num_iterations`` 0 (Vimmerse chooses); ``steps``: the LoRA's ``steps`` (500–3000)
    iterations: Literal["auto", "steps"] = "auto"
    #: ``files``: upload the prepared images; ``image_urls``: hand over signed gateway URLs of them
    #: (needs ``server.public_base_url``)
    dataset_delivery: Literal["files", "image_urls"] = "files"
    #: generation's ``creativity_strength`` 1–10 (unset: Vimmerse's default, 5)
    creativity_strength: Annotated[int, msgspec.Meta(ge=1, le=10)] | None = None
    enhance_image: bool = False
    #: per network operation (connect, each read, each write)
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: extra tries for status GETs and downloads after a transport error, with doubling backoff
    poll_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    poll_backoff_s: NonNegative = 0.5
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    #: declared costs (Vimmerse publishes no finetune price: set your contract's)
    cost_per_training: NonNegative = 0.0
    cost_per_image: NonNegative = 0.0

    def __repr__(self) -> str:  # never print the key
        return f"VimmerseConfig(base_url={self.base_url!r}, option={self.option!r}, api_key='***')"


class _Asset(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str | None = None
    results: list[Any] = []
    message: str | None = None
    error: str | None = None


class _Wrapped(msgspec.Struct, frozen=True, kw_only=True):
    data: _Asset


# --------------------------------------------------------------------------- pure reading


def _redacted(body: bytes, n: int = 2000) -> str:
    return _REDACT.sub(r'\1"***"', body[:n].decode("utf-8", "replace"))


def _is_word(value: Any) -> bool:
    return isinstance(value, str) and bool(_WORD.fullmatch(value)) and not _UUID.fullmatch(value)


def read_trigger_word(body: bytes) -> str | None:
    """The trigger word in a ``POST /finetune`` answer, wherever it sits, or None.

    Candidates, most explicit first: a ``trigger_word`` field (top level or under ``data``), the
    body as a bare JSON string, ``data.results[0]``, ``data.id``. A candidate must look like a word:
    no URL, no UUID (an asset id)."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    candidates: list[Any] = []
    if isinstance(doc, dict):
        candidates.append(doc.get("trigger_word"))
    if isinstance(data, dict):
        candidates.append(data.get("trigger_word"))
    candidates.append(doc if isinstance(doc, str) else None)
    if isinstance(data, dict):
        results = data.get("results")
        candidates.append(results[0] if isinstance(results, list) and results else None)
        candidates.append(data.get("id"))
    return next((c for c in candidates if _is_word(c)), None)


def multipart_body(fields: list[tuple[str, str]], files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body (``POST /finetune`` is documented as one, with or without
    files): text fields in order (repeats kept), then the files. Returns (body, Content-Type)."""
    boundary = secrets.token_hex(16)
    out = bytearray()
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, (filename, data, ctype) in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _sample_urls(items: list[Any]) -> list[str]:
    urls = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("URL") or item.get("url")
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            urls.append(item)
    return urls


def training_from_wire(doc: Any) -> TrainingStatus | None:
    """A ``GET /finetune/{word}`` 200 body as a status; None for a shape never seen (the caller
    logs it and reports "running": an unknown shape is never taken as success)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if isinstance(data, list):
        urls = _sample_urls(data)
        if urls:
            return TrainingStatus(state="succeeded", progress=1.0, sample_urls=urls)
        return TrainingStatus(state="running") if not data else None
    fields = data if isinstance(data, dict) else doc if isinstance(doc, dict) else None
    if fields is None:
        return None
    word = str(fields.get("status") or fields.get("processing_status") or "").lower()
    progress = fields.get("progress_percentage")
    fraction = max(0.0, min(0.99, float(progress) / 100)) if isinstance(progress, (int, float)) else None
    if word in _FAILED:
        reason = fields.get("message") or fields.get("error")
        log.warning("vimmerse_training_failed", reason=clip(str(reason)) if reason else None)
        return TrainingStatus(state="failed", error="vimmerse: the finetune failed",
                              retryable=transient(str(reason) if reason else None))
    if word in _QUEUED:
        return TrainingStatus(state="queued", progress=fraction or 0.0)
    if word in _RUNNING:
        return TrainingStatus(state="running", progress=fraction)
    return None  # e.g. "success" without sample URLs: not done as far as we can tell


def generation_from_wire(asset: _Asset) -> GenerationStatus:
    word = (asset.status or "").lower()
    if word in _FAILED:
        log.warning("vimmerse_generation_failed", asset_id=asset.id, reason=clip(asset.message or asset.error))
        return GenerationStatus(state="failed", ref=asset.id, error="vimmerse: the generation failed",
                                retryable=transient(asset.message or asset.error))
    urls = _sample_urls(asset.results)
    if word == "success" and urls:
        return GenerationStatus(state="succeeded", ref=asset.id, progress=1.0, images=[GeneratedImage(url=u) for u in urls])
    if word in _QUEUED:
        return GenerationStatus(state="queued", ref=asset.id, progress=0.0)
    return GenerationStatus(state="running", ref=asset.id)  # processing, or success still without results


def read_asset(body: bytes) -> _Asset:
    """An asset, bare (the v2 routes) or wrapped in ``data`` (the legacy ones and ``GET /asset``)."""
    for typ in (_Wrapped, _Asset):
        try:
            got = msgspec.json.decode(body, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        return got.data if isinstance(got, _Wrapped) else got
    raise ValueError("not an asset")


# --------------------------------------------------------------------------- the adapter


class VimmerseAdapter(Provider):
    """Trains Flux Pro finetunes on Vimmerse and generates with them (non-portable LoRAs)."""

    name = "vimmerse"
    config_type = VimmerseConfig

    def __init__(self, config: VimmerseConfig, setup: ProviderSetup) -> None:
        super().__init__(config, setup)
        self.config: VimmerseConfig = config
        self.sleep: Callable[[float], Awaitable[None]] = anyio.sleep
        self.clock: Callable[[], float] = time.time
        timeout = httpx.Timeout(config.timeout_s)
        self._api = setup.http_client(
            base_url=config.base_url.rstrip("/"), timeout=timeout, headers={"X-Api-Key": config.api_key},
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections),
        )
        self._files = setup.http_client(timeout=timeout, follow_redirects=True)  # result URLs: no key
        self._unknown_logged = False
        self.capabilities = Capabilities(
            training=TrainingCapabilities(min_steps=500, max_steps=3000, rank_controllable=False,
                                          dataset_input="image_urls" if config.dataset_delivery == "image_urls" else "files",
                                          produces_artifact=False, makes_trigger_word=True),
            inference=InferenceCapabilities(accepts_lora_file=False, max_outputs=4, aspect_ratios=ASPECT_RATIOS,
                                            output_formats=frozenset({"png"}), honours=frozenset()),
            cost=Cost(per_training=config.cost_per_training, per_image=config.cost_per_image),
            webhooks_in=bool(setup.public_base_url), can_lookup=False, can_cancel=False,
        )

    # ------------------------------------------------------------------ pure conversions

    def training_fields(self, spec: TrainingSpec, dataset: Dataset) -> list[tuple[str, str]]:
        """The multipart text fields of ``POST /finetune`` (files go alongside)."""
        fields = [
            ("option", self.config.option),
            ("finetune_type", _FINETUNE_TYPES.get(spec.subject_kind, "Auto")),
            ("num_iterations", str(spec.steps if self.config.iterations == "steps" else 0)),
            ("lora_prefix", spec.trigger_word),  # Vimmerse's word is built from it
        ]
        if self.config.dataset_delivery == "image_urls":
            fields += [("image_urls", url) for url in dataset.image_urls]
        hook = self._hook_url(spec.attempt_id)
        if hook:
            fields.append(("webhook_url", hook))
        return fields

    def generation_body(self, spec: GenerationSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": spec.prompt, "quantity": spec.num_outputs, "option": self.config.inference_option,
            "aspect_ratio": spec.aspect_ratio, "async_mode": True, "enhance_image": self.config.enhance_image,
        }
        if self.config.creativity_strength is not None:
            body["creativity_strength"] = self.config.creativity_strength
        hook = self._hook_url(spec.attempt_id)
        if hook:
            body["webhook_url"] = hook
        return body

    def _hook_url(self, attempt_id: str) -> str | None:
        base = self.setup.public_base_url
        return f"{base.rstrip('/')}/hooks/{self.name}?attempt={attempt_id}" if base else None

    # ------------------------------------------------------------------ HTTP plumbing

    def _error(self, resp: httpx.Response, what: str, *, final: bool = False) -> ProviderError:
        """Map a non-2xx answer onto the ProviderError tree. The vendor's body goes to the log only."""
        status = resp.status_code
        try:
            doc = msgspec.json.decode(resp.content)
        except msgspec.DecodeError:
            doc = None
        code = doc.get("message") if isinstance(doc, dict) and isinstance(doc.get("message"), str) else None
        detail = doc.get("detail") if isinstance(doc, dict) else None
        log.warning("provider_http_error", provider=self.name, call=what, status_code=status,
                    code=clip(code, 60) if code else None, detail=clip(str(detail)) if detail else None)
        if status in (401, 403):
            log.error("provider_config_error", provider=self.name, call=what, status_code=status,
                      hint="check providers.vimmerse.api_key")
            return ProviderAuthError(f"vimmerse: {what}: HTTP {status} (API key refused)")
        if status == 429:
            return ProviderRateLimited(f"vimmerse: {what}: HTTP 429", retry_after=retry_after(resp.headers.get("retry-after")))
        if status == 402:
            return ProviderError(f"vimmerse: {what}: the Vimmerse account has insufficient credit", retryable=True)
        if status >= 500:
            if final and doc is None:  # a proxy's page, or nothing: it may have been accepted
                return ProviderOutcomeUnknown(f"vimmerse: {what}: HTTP {status} without a Vimmerse error body; "
                                              "it may have been received")
            return ProviderUnavailable(f"vimmerse: {what}: HTTP {status}")
        if status == 404:
            return ProviderRejected(f"vimmerse: {what}: not found")
        if status == 422:
            return ProviderRejected(f"vimmerse: {what}: the request did not validate (HTTP 422; see the log)")
        return ProviderRejected(f"vimmerse: {what}: refused (HTTP {status})")

    async def _post(self, path: str, what: str, **kw: Any) -> httpx.Response:
        """A billable POST, sent once: not connected → unavailable; sent, no answer → ambiguous."""
        try:
            return await self._api.post(path, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise ProviderUnavailable(f"vimmerse: {what}: could not connect ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise ProviderOutcomeUnknown(f"vimmerse: {what}: no answer ({type(e).__name__}); "
                                         "it may have been received") from None

    async def _get(self, path: str, what: str) -> httpx.Response:
        return await retrying(lambda: self._api.get(path), name=self.name, what=what,
                              retries=self.config.poll_retries, backoff_s=self.config.poll_backoff_s,
                              sleep=self.sleep)

    def _log_unknown(self, what: str, body: bytes) -> None:
        log.warning("vimmerse_unknown_answer", call=what, body=_redacted(body))

    # ------------------------------------------------------------------ training

    async def start_training(self, spec: TrainingSpec, dataset: Dataset) -> TrainingSubmission:
        if self.config.dataset_delivery == "image_urls" and not dataset.image_urls:
            raise ProviderRejected("vimmerse: dataset_delivery is 'image_urls' but the gateway has no public URL; "
                                   "set server.public_base_url or use dataset_delivery: files", retryable=True)
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        if self.config.dataset_delivery == "files":  # the normalised images: at most 1024 px each
            datas = await anyio.to_thread.run_sync(lambda: [Path(p).read_bytes() for p in dataset.files])
            files = [("image_files", (Path(p).name, d, "image/jpeg")) for p, d in zip(dataset.files, datas)]
        if not files and not dataset.image_urls:
            raise ProviderRejected("vimmerse: the dataset has no images")
        body, content_type = multipart_body(self.training_fields(spec, dataset), files)
        resp = await self._post("/finetune", "submit training", content=body, headers={"Content-Type": content_type})
        if resp.status_code // 100 != 2:
            raise self._error(resp, "submit training", final=True)
        word = read_trigger_word(resp.content)
        if word is None:
            self._log_unknown("submit training", resp.content)
            raise ProviderError("vimmerse: the finetune answer held no trigger word the gateway could read",
                                retryable=True)
        log.info("vimmerse_trigger_word", provider_ref=word)
        return TrainingSubmission(ref=word, trigger_word=word)

    async def training_status(self, ref: str) -> TrainingStatus:
        if not _WORD.fullmatch(ref):
            raise ProviderRejected(f"vimmerse: {ref[:40]!r} is not a trigger word")
        resp = await self._get(f"/finetune/{ref}", "training status")
        if resp.status_code == 404:  # it does not know the finetune (any more)
            return TrainingStatus(state="failed", error="vimmerse: the finetune is not known to Vimmerse", retryable=True)
        if resp.status_code in (400, 409, 410) and self._message(resp):  # an explicit failure
            log.warning("vimmerse_training_failed", reason=clip(self._message(resp)))
            return TrainingStatus(state="failed", error="vimmerse: the finetune failed", retryable=transient(self._message(resp)))
        if resp.status_code // 100 != 2:
            raise self._error(resp, "training status")
        try:
            status = training_from_wire(msgspec.json.decode(resp.content))
        except msgspec.DecodeError:
            status = None
        if status is None:
            if not self._unknown_logged:  # once per process: it repeats on every poll
                self._log_unknown("training status", resp.content)
                self._unknown_logged = True
            return TrainingStatus(state="running")
        return status

    @staticmethod
    def _message(resp: httpx.Response) -> str | None:
        try:
            doc = msgspec.json.decode(resp.content)
        except msgspec.DecodeError:
            return None
        return doc.get("message") if isinstance(doc, dict) and isinstance(doc.get("message"), str) else None

    # ------------------------------------------------------------------ inference

    async def generate(self, spec: GenerationSpec, lora: LoraHandle) -> GenerationStatus:
        if lora.trained_by != self.name or not lora.provider_trigger_word:
            raise ProviderRejected("vimmerse: generates only with LoRAs it trained itself")
        if lora.provider_trigger_word not in spec.prompt:  # the engine swaps the gateway's word for it
            raise ProviderRejected("vimmerse: the prompt lacks the finetune's trigger word")
        resp = await self._post("/v2/image/text-2-image", "submit generation", json=self.generation_body(spec))
        if resp.status_code // 100 != 2:
            raise self._error(resp, "submit generation", final=True)
        try:
            return generation_from_wire(read_asset(resp.content))
        except ValueError:
            self._log_unknown("submit generation", resp.content)
            raise ProviderOutcomeUnknown("vimmerse: submit generation: an answer without an asset id; "
                                         "it may have been received") from None

    async def generation_status(self, ref: str) -> GenerationStatus:
        if not _ASSET_ID.fullmatch(ref):
            raise ProviderRejected(f"vimmerse: bad asset id {ref[:40]!r}")
        resp = await self._get(f"/asset/{ref}", "generation status")
        if resp.status_code == 404:
            return GenerationStatus(state="failed", ref=ref, error="vimmerse: the asset is not known to Vimmerse",
                                    retryable=True)
        if resp.status_code // 100 != 2:
            raise self._error(resp, "generation status")
        try:
            return generation_from_wire(read_asset(resp.content))
        except ValueError:
            self._log_unknown("generation status", resp.content)
            return GenerationStatus(state="running", ref=ref)

    # ------------------------------------------------------------------ files, callbacks

    async def fetch_file(self, url: str, dest: Path, *, max_bytes: int) -> None:
        """Stream a sample or result image to ``dest`` (no credentials sent), capped at ``max_bytes``."""
        await download(self._files, url, Path(dest), max_bytes=max_bytes, name=self.name,
                       retries=self.config.poll_retries, backoff_s=self.config.poll_backoff_s, sleep=self.sleep)

    async def verify_callback(self, headers: dict[str, str], body: bytes,
                              params: dict[str, str] | None = None) -> CallbackEvent:
        """Vimmerse signs nothing, so a callback proves nothing: it is a hint naming the attempt
        (from the URL the adapter gave), whose poll the gateway then makes due now. The body is
        not read."""
        attempt = (params or {}).get("attempt", "")
        if not _UUID.fullmatch(attempt):
            raise ProviderAuthError("vimmerse: a callback without the attempt the gateway put in its URL")
        return CallbackEvent(hint=True, attempt_id=attempt.lower())

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._files.aclose()


@hookimpl
def register_providers(register: Callable[[type], None]) -> None:
    """Register the Vimmerse provider (``providers.vimmerse``)."""
    register(VimmerseAdapter)
