"""Generation jobs: the request shape, the per-image charge, reads and lists."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, Literal

import msgspec
import structlog

from gateway.context import Gateway
from gateway.engine.jobs import CREDITS_PER_IMAGE
from gateway.services import idempotency
from gateway.services.loras import check_webhook_url
from gateway.errors import InsufficientCredits, NotFound, ValidationFailed
from gateway.validation import decode_error_message
from gateway.store import jobs as jobs_store
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from gateway.store.models import Job, Principal
from gateway.timeutil import is_uuid, new_id, now

log = structlog.get_logger()

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"]
JOB_STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED")


class FluxLoraParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    loraId: str
    num_outputs: Annotated[int, msgspec.Meta(ge=1, le=4)] = 1
    aspect_ratio: AspectRatio | None = None
    output_format: Literal["png", "jpg", "webp"] | None = None
    lora_strength: Annotated[float, msgspec.Meta(ge=0, le=1.5)] = 1.0
    guidance_scale: Annotated[float, msgspec.Meta(ge=1, le=10)] = 3.5
    num_inference_steps: Annotated[int, msgspec.Meta(ge=4, le=50)] = 28
    seed: Annotated[int, msgspec.Meta(ge=0, le=2_147_483_647)] | None = None


class GenerateImageRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    model: str
    fluxLoraParams: FluxLoraParams | None = None
    webhookUrl: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    webhookEvents: Annotated[list[Literal["progress", "completed", "failed"]], msgspec.Meta(min_length=1)] | None = None


class _SetParams(msgspec.Struct):
    """Which ``fluxLoraParams`` the client sent (not what defaults fill in)."""

    fluxLoraParams: dict[str, Any] | None = None


def decode_generate(body: bytes) -> tuple[GenerateImageRequest, frozenset[str]]:
    """Decode and validate the JSON body; returns it and the names of the ``fluxLoraParams`` the
    client set. Errors are 400s with a ``details`` path."""
    try:
        req = msgspec.json.decode(body, type=GenerateImageRequest)
    except msgspec.ValidationError as e:
        path, msg = decode_error_message(GenerateImageRequest, e)
        path = path or "body"
        raise ValidationFailed(f"Invalid request: {path}: {msg}", {path: [msg]}) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise ValidationFailed("Request body must be valid JSON", {"body": ["Invalid JSON"]}) from None
    if req.model != "flux-lora":
        raise ValidationFailed.at("model", 'Only "flux-lora" is supported by this gateway')
    if req.fluxLoraParams is None:
        raise ValidationFailed.at("fluxLoraParams", "Required for model flux-lora")
    if not is_uuid(req.fluxLoraParams.loraId):
        raise ValidationFailed.at("fluxLoraParams.loraId", "Must be a UUID")
    if req.prompt.strip() == "":
        raise ValidationFailed.at("prompt", "Must not be blank")
    return req, frozenset(msgspec.json.decode(body, type=_SetParams).fluxLoraParams or ())


ROUTE = "POST /v2/images/generate"


def stored_input(req: GenerateImageRequest, set_params: frozenset[str]) -> dict[str, Any]:
    """The request as the job keeps it: only the parameters the client set (validated), so the
    engine applies the defaults and can tell a provider ignored a parameter that was asked for."""
    params = req.fluxLoraParams
    assert params is not None
    out: dict[str, Any] = {"prompt": req.prompt, "model": req.model,
                           "fluxLoraParams": {k: getattr(params, k) for k in sorted(set_params | {"loraId"})}}
    out["fluxLoraParams"]["loraId"] = params.loraId.lower()
    if req.webhookUrl is not None:
        out["webhookUrl"] = req.webhookUrl
    if req.webhookEvents is not None:
        out["webhookEvents"] = list(req.webhookEvents)
    return out


async def create(
    gw: Gateway, principal: Principal, req: GenerateImageRequest, *, idempotency_key: str | None = None,
    set_params: frozenset[str] | None = None, preferred: str | None = None,
) -> tuple[Job, bool]:
    """Charge and queue a generation. Returns the job and whether it is an idempotent replay.
    ``set_params``: the ``fluxLoraParams`` the client sent (default: every field)."""
    params = req.fluxLoraParams
    assert params is not None
    if set_params is None:
        set_params = frozenset(params.__struct_fields__)
    request_digest = idempotency.digest(req) if idempotency_key else ""
    if idempotency_key:
        async with gw.db.read() as conn:
            earlier = await idempotency.lookup(conn, principal.team_id, idempotency_key, ROUTE, request_digest)
            if earlier is not None:
                return await _existing(conn, earlier), True
    await check_webhook_url(gw, req.webhookUrl)
    lora_id = params.loraId.lower()
    async with gw.db.read() as conn:
        status = await loras_store.lora_status(conn, lora_id, principal.team_id)
    if status is None:  # another team's LoRA reads exactly like a missing one
        raise ValidationFailed.at("fluxLoraParams.loraId", "LoRA not found")
    if status != "READY":
        raise ValidationFailed.at("fluxLoraParams.loraId", f"LoRA is not READY (its status is {status})")
    cost = CREDITS_PER_IMAGE * params.num_outputs
    job_id = new_id()
    ts = now()
    fields: dict[str, Any] = dict(
        id=job_id, team_id=principal.team_id, user_id=principal.user_id, key_id=principal.key.id,
        lora_id=lora_id, model=req.model, status="QUEUED", progress=0, input=stored_input(req, set_params),
        credit_cost=cost, webhook_url=req.webhookUrl,
        webhook_events=list(req.webhookEvents) if req.webhookEvents else None,
        webhook_status="pending" if req.webhookUrl else None,
        stage="start", next_run_at=ts, created_at=ts, updated_at=ts, preferred_provider=preferred,
    )
    async with gw.db.tx() as conn:
        if idempotency_key:  # a concurrent request with the same key may have won the race
            earlier = await idempotency.claim(conn, principal.team_id, idempotency_key, ROUTE, request_digest, job_id)
            if earlier is not None:
                return await _existing(conn, earlier), True
        try:
            await ledger_store.apply_credits(conn, principal.team_id, -cost, reason="image generation", ref=job_id, kind="job")
        except ledger_store.InsufficientBalance as e:
            raise InsufficientCredits(cost, e.available) from None
        await jobs_store.insert_job(conn, **fields)
    job = Job(**fields, error=None, lease_owner=None, lease_expires=None, attempts_used=0, started_at=None,
              completed_at=None)
    log.info("job_created", job_id=job_id, lora_id=lora_id, credits=cost)
    gw.wake()
    return job, False


async def _existing(conn, job_id: str) -> Job:
    job = await jobs_store.get_job(conn, job_id)
    assert job is not None, "an idempotency record points at a missing job"
    return job


async def get(gw: Gateway, principal: Principal, job_id: str) -> Job:
    if not is_uuid(job_id):
        raise ValidationFailed.at("id", "Must be a UUID")
    async with gw.db.read() as conn:
        job = await jobs_store.get_job(conn, job_id.lower(), principal.team_id)
    if job is None:
        raise NotFound("Job not found")
    return job


def encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at!r}|{job.id}".encode()).decode().rstrip("=")


#: the time part of a cursor: what ``repr(float)`` writes for a time since the epoch
_CURSOR_TIME = re.compile(r"\d{1,12}(\.\d{1,20})?")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """A ``nextCursor`` this gateway wrote, else a 400: strictly a time (digits, a dot, digits:
    no ``nan``, ``inf``, exponents or signs) and a job id."""
    try:
        if len(cursor) > 200 or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        if not is_uuid(job_id) or not _CURSOR_TIME.fullmatch(ts):
            raise ValueError
        return float(ts), job_id
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed.at(
            "cursor", "Invalid cursor: pass the nextCursor of the previous page unchanged") from None


async def list_page(gw: Gateway, principal: Principal, q: dict[str, Any]) -> tuple[list[Job], str | None, list[str] | None]:
    async with gw.db.read() as conn:
        items = await jobs_store.list_jobs(
            conn, principal.team_id, limit=q["limit"] + 1, cursor=q["cursor"],
            user_id=principal.user_id if q["scope"] == "user" else None,
            status=q["status"], model=q["model"], search=q["search"],
        )
        models = await jobs_store.job_models(conn, principal.team_id) if q["include_models"] else None
    more = len(items) > q["limit"]
    items = items[: q["limit"]]
    return items, (encode_cursor(items[-1]) if more and items else None), models
