"""LoRA rules: form validation, the per-team cap, the create fee, trigger words, archive."""

from __future__ import annotations

import re
from typing import Any

import structlog

from gateway.context import Gateway
from gateway.engine import loras as lora_engine
from gateway.netsafety import UnsafeUrl
from gateway.errors import Conflict, InsufficientCredits, NotFound, RateLimited, ValidationFailed
from gateway.services import idempotency
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from gateway.store import teams as teams_store
from gateway.store.models import Artifact, Lora, Principal
from gateway.timeutil import is_uuid, new_id, now
from gateway.triggers import generate_trigger_word
from gateway.uploads import ReceivedUpload

log = structlog.get_logger()

CREATE_FEE = lora_engine.CREATE_FEE
SUBJECT_KINDS = ("person", "style", "object")
GENDERS = ("female", "male", "non-binary")
WEBHOOK_EVENTS = ("completed", "failed")
FIELDS = ("name", "subjectKind", "gender", "ethnicity", "age", "steps", "loraRank", "webhookUrl", "webhookEvents")
CAP_RETRY_AFTER_S = 60


class LoraForm:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _int_field(fields: dict[str, str], name: str, default: int, lo: int, hi: int, errors: dict[str, list[str]]) -> int:
    raw = fields.get(name)
    if raw is None or raw.strip() == "":
        return default
    if not re.fullmatch(r"[+-]?\d+", raw.strip()):
        errors.setdefault(name, []).append("Expected an integer")
        return default
    value = int(raw)
    if not lo <= value <= hi:
        errors.setdefault(name, []).append(f"Must be between {lo} and {hi}")
    return value


def _str_field(fields: dict[str, str], name: str, lo: int, hi: int, errors: dict[str, list[str]], required: bool) -> str | None:
    raw = fields.get(name)
    if raw is None or raw.strip() == "":
        if required:
            errors.setdefault(name, []).append("Required")
        return None
    value = raw.strip()
    if not lo <= len(value) <= hi:
        errors.setdefault(name, []).append(f"Must be {lo}–{hi} characters")
    return value


def parse_form(fields: dict[str, str]) -> LoraForm:
    """Validate the text fields of ``POST /v2/loras``; every problem is reported at once."""
    errors: dict[str, list[str]] = {}
    for name in fields:
        if name not in FIELDS:
            errors.setdefault(name, []).append(f"Unknown field (allowed: {', '.join(FIELDS)})")
    name = _str_field(fields, "name", 1, 60, errors, required=True)
    kind = (fields.get("subjectKind") or "person").strip()
    if kind not in SUBJECT_KINDS:
        errors.setdefault("subjectKind", []).append(f"Must be one of {', '.join(SUBJECT_KINDS)}")
    person = kind == "person"
    gender = _str_field(fields, "gender", 1, 20, errors, required=person)
    if gender is not None and gender not in GENDERS:
        errors.setdefault("gender", []).append(f"Must be one of {', '.join(GENDERS)}")
    ethnicity = _str_field(fields, "ethnicity", 1, 40, errors, required=person)
    age = _str_field(fields, "age", 1, 40, errors, required=False)
    steps = _int_field(fields, "steps", 1000, 500, 3000, errors)
    rank = _int_field(fields, "loraRank", 32, 8, 64, errors)
    webhook_url = _str_field(fields, "webhookUrl", 1, 2048, errors, required=False)
    events_raw = fields.get("webhookEvents")
    events = list(WEBHOOK_EVENTS)
    if events_raw is not None and events_raw.strip():
        events = [e.strip() for e in events_raw.split(",") if e.strip()]
        bad = [e for e in events if e not in WEBHOOK_EVENTS]
        if bad or not events:
            errors.setdefault("webhookEvents", []).append("A comma-separated subset of completed,failed")
    if errors:
        first = next(iter(errors))
        raise ValidationFailed(f"Invalid request: {first}: {errors[first][0]}", errors)
    return LoraForm(
        name=name, subject_kind=kind, gender=gender, ethnicity=ethnicity, age=age, steps=steps, rank=rank,
        webhook_url=webhook_url, webhook_events=",".join(dict.fromkeys(events)),
    )


async def precheck_create(gw: Gateway, principal: Principal) -> None:
    """Cheap checks before the upload is read: the cap and the create fee (checked again after)."""
    async with gw.db.read() as conn:
        team = await teams_store.get_team(conn, principal.team_id)
        active = await loras_store.count_active_trainings(conn, principal.team_id)
    assert team is not None
    _check_cap(active, team.max_concurrent_trainings)
    if team.credits < CREATE_FEE:
        raise InsufficientCredits(CREATE_FEE, team.credits)


def _check_cap(active: int, cap: int) -> None:
    if active >= cap:
        raise RateLimited(
            f"This team already has {active} LoRAs in training (the limit is {cap}); "
            "wait for one to finish or fail, then retry",
            CAP_RETRY_AFTER_S,
        )


async def check_webhook_url(gw: Gateway, url: str | None, path: str = "webhookUrl") -> None:
    """400 unless the URL is https and resolves only to public addresses (see netsafety)."""
    if url is None:
        return
    try:
        await gw.url_policy.check(url)
    except UnsafeUrl as e:
        raise ValidationFailed.at(path, f"Not an allowed webhook URL: {e}") from None


ROUTE = "POST /v2/loras"
#: draws of a trigger word before giving up (a clash is one in millions)
TRIGGER_WORD_TRIES = 20


def request_digest(upload: ReceivedUpload) -> str:
    """What makes two uploads the same request: the fields and each image's bytes, in order
    (not the raw body, whose multipart boundary differs on every retry)."""
    return idempotency.digest({"fields": upload.fields, "images": [i.sha256 for i in upload.images]})


async def create(
    gw: Gateway, principal: Principal, upload: ReceivedUpload, *, idempotency_key: str | None = None,
    preferred: str | None = None,
) -> tuple[Lora, bool]:
    """Store the images, charge the create fee and queue the LoRA. Returns (lora, replayed)."""
    digest = request_digest(upload)
    if idempotency_key:
        async with gw.db.read() as conn:
            earlier = await idempotency.lookup(conn, principal.team_id, idempotency_key, ROUTE, digest)
            if earlier is not None:
                return await _existing(conn, earlier), True
    form = parse_form(upload.fields)
    await check_webhook_url(gw, form.webhook_url)
    lora_id = new_id()
    replayed: Lora | None = None
    try:
        for img in upload.images:
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[img.format]
            await gw.storage.put_file(f"loras/{lora_id}/raw/{img.index + 1:03d}.{ext}", img.path, move=True)
        async with gw.db.tx() as conn:
            if idempotency_key:  # a concurrent request with the same key may have won the race
                earlier = await idempotency.claim(conn, principal.team_id, idempotency_key, ROUTE, digest, lora_id)
                if earlier is not None:
                    replayed = await _existing(conn, earlier)
            if replayed is None:
                lora = await _insert(conn, principal, lora_id, form, len(upload.images), preferred)
    except BaseException:
        # nothing half-written stays behind: the row was rolled back, remove the stored images
        await gw.storage.delete_prefix(f"loras/{lora_id}/")
        raise
    if replayed is not None:
        await gw.storage.delete_prefix(f"loras/{lora_id}/")
        return replayed, True
    log.info("lora_created", lora_id=lora_id, team_id=principal.team_id, images=len(upload.images))
    gw.wake()
    return lora, False


async def _insert(conn: Any, principal: Principal, lora_id: str, form: LoraForm, image_count: int,
                  preferred: str | None = None) -> Lora:
    # the team's row stays locked until this transaction ends, so concurrent creates (on any
    # replica) count one after another and the cap holds
    team = await teams_store.get_team(conn, principal.team_id, lock=True)
    assert team is not None
    _check_cap(await loras_store.count_active_trainings(conn, team.id), team.max_concurrent_trainings)
    ts = now()
    for _ in range(TRIGGER_WORD_TRIES):  # unique among live LoRAs by constraint: draw again on a clash
        inserted = await loras_store.insert_lora(
            conn, id=lora_id, team_id=team.id, user_id=principal.user_id, key_id=principal.key.id,
            name=form.name, subject_kind=form.subject_kind, gender=form.gender, ethnicity=form.ethnicity,
            age=form.age, status="PENDING", image_count=image_count, steps=form.steps,
            lora_rank=form.rank, trigger_word=generate_trigger_word(), webhook_url=form.webhook_url,
            webhook_events=form.webhook_events, stage="prepare", next_run_at=ts, created_at=ts, updated_at=ts,
            preferred_provider=preferred,
        )
        if inserted:
            break
    else:
        raise RuntimeError(f"no free trigger word after {TRIGGER_WORD_TRIES} draws")
    try:
        await ledger_store.apply_credits(conn, team.id, -CREATE_FEE, reason="LoRA create", ref=lora_id, kind="lora_create")
    except ledger_store.InsufficientBalance as e:
        raise InsufficientCredits(e.required, e.available) from None
    lora = await loras_store.get_lora(conn, lora_id)
    assert lora is not None
    return lora


async def _existing(conn: Any, lora_id: str) -> Lora:
    lora = await loras_store.get_lora(conn, lora_id)
    assert lora is not None, "an idempotency record points at a missing LoRA"
    return lora


async def has_idempotent_record(gw: Gateway, principal: Principal, key: str | None) -> bool:
    if not key:
        return False
    async with gw.db.read() as conn:
        return await idempotency.lookup(conn, principal.team_id, key, ROUTE, None) is not None


def check_id(lora_id: str) -> None:
    if not is_uuid(lora_id):
        raise ValidationFailed.at("id", "Must be a UUID")


async def get(gw: Gateway, principal: Principal, lora_id: str) -> Lora:
    check_id(lora_id)
    async with gw.db.read() as conn:
        lora = await loras_store.get_lora(conn, lora_id.lower(), principal.team_id)
    if lora is None:
        raise NotFound("LoRA not found")
    return lora


async def weights(gw: Gateway, principal: Principal, lora_id: str) -> tuple[Lora, Artifact, int]:
    """A READY LoRA's own ``.safetensors`` (the gateway's copy) and its size, for its team."""
    lora = await get(gw, principal, lora_id)
    if lora.status != "READY":
        raise Conflict(f"The LoRA is {lora.status}: its weights can be downloaded once it is READY")
    async with gw.db.read() as conn:
        artifact = await loras_store.artifact_for(conn, lora.id)
    if artifact is None or not lora.portable:
        raise Conflict("This LoRA's weights stay with the provider that trained it (it returns no weights file): "
                       "it can be used for generation here, but not downloaded")
    size = await gw.storage.size(artifact.storage_key)
    if size is None:
        raise NotFound("The weights file is missing from storage")
    return lora, artifact, size


async def list_page(
    gw: Gateway, principal: Principal, *, limit: int, cursor: str | None, include_archived: bool
) -> tuple[list[Lora], str | None]:
    async with gw.db.read() as conn:
        items = await loras_store.list_loras(conn, principal.team_id, limit=limit + 1, cursor=cursor, include_archived=include_archived)
    more = len(items) > limit
    items = items[:limit]
    return items, (items[-1].id if more and items else None)


async def delete(gw: Gateway, principal: Principal, lora_id: str) -> None:
    lora = await get(gw, principal, lora_id)
    if lora.status == "ARCHIVED":
        return  # idempotent
    await lora_engine.archive(gw, lora)
