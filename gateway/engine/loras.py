"""LoRA steps: PENDING → UPLOADING (prepare, submit) → TRAINING (poll, fetch) → READY | FAILED.

Each step reads the row, does one idempotent thing and writes the next state in one
transaction, conditioned on the worker's lease. ``stage`` says which step is next:

    prepare  normalise + caption + zip the dataset                (status UPLOADING)
    submit   pick a provider, charge 255, record the attempt, send (UPLOADING, or TRAINING on fallback)
    poll     ask the provider how the current attempt is doing     (TRAINING)
    fetch    copy the weights into storage and check them          (TRAINING)
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import anyio
import structlog

from gateway.artifacts import ArtifactInvalid, inspect_artifact
from gateway.context import MB, Gateway
from gateway.datasets import PrepConfig, prepare_dataset
from gateway import webhooks
from gateway.engine.common import LeaseLost, new_attempt, poll_delay
from gateway.engine.routing import TrainingNeeds
from gateway.store import teams as teams_store
from gateway.store import work
from gateway.store.models import Artifact, Attempt, Lora
from gateway.timeutil import new_id, now
from plugins.captioners.base import CaptionContext
from providers.base import Dataset, Provider, ProviderError, ProviderTimeout, TrainingSpec, TrainingStatus

log = structlog.get_logger()

TRAINING_FEE = 255
CREATE_FEE = 2
#: tries to copy a finished training's weights before the attempt counts as failed
FETCH_TRIES = 5
#: status requests one poll batch has in flight at once
POLL_CONCURRENCY = 32


async def _update(conn, lora: Lora, owner: str, **fields) -> None:
    if not await work.update_lora(conn, lora.id, lease=owner, **fields):
        raise LeaseLost(lora.id)


def _dataset_dir(gw: Gateway, lora_id: str) -> Path:
    return gw.work_dir / "loras" / lora_id


async def step(
    gw: Gateway, lora_id: str, owner: str, claimed: Lora | None = None, polled: Polled | None = None
) -> None:
    """Run steps for one leased lora until it waits (poll) or ends. ``claimed`` is the row
    as the claim returned it (saves a read for the first step); ``polled`` is an answer
    :func:`poll_many` already got from the provider (so it is not asked twice)."""
    while True:
        if claimed is not None:
            lora, claimed = claimed, None
        else:
            async with gw.db.read() as conn:
                lora = await work.get_lora(conn, lora_id)
        if lora is None or lora.lease_owner != owner or lora.status not in work.ACTIVE_LORA:
            return
        handler = _STAGES.get(lora.stage)
        if handler is None:
            raise RuntimeError(f"lora {lora.id} has unknown stage {lora.stage!r}")
        bound = structlog.contextvars.bound_contextvars(lora_id=lora.id, stage=lora.stage)
        with bound:
            if polled is not None and lora.stage == "poll":
                again = await _poll(gw, lora, owner, polled)
            else:
                again = await handler(gw, lora, owner)
            polled = None
        if not again:
            return


# --------------------------------------------------------------------------- prepare


async def _prepare(gw: Gateway, lora: Lora, owner: str) -> bool:
    if lora.status == "PENDING":
        async with gw.db.tx() as conn:
            await _update(conn, lora, owner, status="UPLOADING")
        log.info("lora_uploading")
    out_dir = _dataset_dir(gw, lora.id)
    raw_dir = out_dir / "raw"
    await anyio.to_thread.run_sync(lambda: raw_dir.mkdir(parents=True, exist_ok=True))
    raw_paths = []
    for i in range(lora.image_count):
        key = await _raw_key(gw, lora.id, i)
        if key is None:
            await _fail(gw, lora, owner, f"dataset image {i + 1} is missing from storage")
            return False
        local = gw.storage.local_path(key)
        if local is None:
            local = raw_dir / key.rsplit("/", 1)[-1]
            await gw.storage.fetch_to(key, local)
        raw_paths.append(local)
    ctx = CaptionContext(
        trigger_word=lora.trigger_word,
        subject_kind=lora.subject_kind,
        gender=lora.gender,
        ethnicity=lora.ethnicity,
        age=lora.age,
    )
    cfg = PrepConfig(max_side=gw.settings.datasets.max_side, jpeg_quality=gw.settings.datasets.jpeg_quality)
    try:
        prepared = await prepare_dataset(raw_paths, out_dir, ctx, gw.captioner, gw.fallback_captioner, cfg, log)
    except (OSError, ValueError) as e:
        log.warning("dataset_prepare_failed", error=str(e))
        await _fail(gw, lora, owner, "the dataset could not be prepared: an image could not be processed")
        return False
    await gw.storage.put_file(f"loras/{lora.id}/dataset.zip", prepared.zip_path)
    async with gw.db.tx() as conn:
        await _update(conn, lora, owner, stage="submit")
    log.info("dataset_prepared", images=prepared.image_count)
    return True


async def _raw_key(gw: Gateway, lora_id: str, i: int) -> str | None:
    for ext in ("jpg", "png", "webp"):
        key = f"loras/{lora_id}/raw/{i + 1:03d}.{ext}"
        if await gw.storage.size(key) is not None:
            return key
    return None


async def _ensure_dataset(gw: Gateway, lora: Lora) -> Dataset:
    """The prepared dataset on local disk (re-extracted from storage after a move or restart)."""
    out_dir = _dataset_dir(gw, lora.id)
    images, zip_path = out_dir / "images", out_dir / "dataset.zip"
    key = f"loras/{lora.id}/dataset.zip"

    def intact() -> bool:
        return zip_path.exists() and images.is_dir() and len(list(images.glob("*.jpg"))) == lora.image_count

    if not await anyio.to_thread.run_sync(intact):
        await anyio.to_thread.run_sync(lambda: out_dir.mkdir(parents=True, exist_ok=True))
        await gw.storage.fetch_to(key, zip_path)

        def extract() -> None:
            shutil.rmtree(images, ignore_errors=True)
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(images)

        await anyio.to_thread.run_sync(extract)
    zip_url = gw.file_url(key) if gw.settings.server.public_base_url else None
    return Dataset(zip_path=zip_path, directory=images, image_count=lora.image_count, zip_url=zip_url)


# --------------------------------------------------------------------------- submit


async def _submit(gw: Gateway, lora: Lora, owner: str) -> bool:
    async with gw.db.read() as conn:
        attempts = await work.attempts_for(conn, "lora", lora.id)
    current = attempts[-1] if attempts else None
    if current is not None and current.state == "submitting":
        return await _reconcile(gw, lora, owner, current)

    if lora.attempts_used >= gw.settings.engine.max_attempts:
        await _fail(gw, lora, owner, _last_error(attempts) or "no provider could train this LoRA")
        return False
    needs = TrainingNeeds(lora.subject_kind, lora.steps, lora.lora_rank)
    # a provider that may hold a job we cannot find again is not sent another one
    unknown = {a.provider for a in attempts if a.state == "unknown"}
    provider = gw.router.pick_training(needs, [a.provider for a in attempts], exclude=unknown)
    if provider is None:
        reason = _last_error(attempts) if unknown else None
        await _fail(gw, lora, owner, reason or "no configured provider can train this LoRA (subject kind, steps or rank)")
        return False

    attempt = new_attempt("lora", lora.id, len(attempts) + 1, provider, provider.capabilities.cost.per_training)
    try:
        async with gw.db.tx() as conn:
            await teams_store.apply_credits(
                conn, lora.team_id, -TRAINING_FEE, reason="LoRA training", ref=lora.id, kind="lora_training"
            )
            await work.insert_attempt(conn, attempt)
            await _update(conn, lora, owner, attempts_used=lora.attempts_used + 1)
    except teams_store.InsufficientBalance as e:
        await _fail(gw, lora, owner, f"insufficient credits to start training: {TRAINING_FEE} required, {e.available} available")
        return False
    return await _send(gw, lora, owner, provider, attempt)


async def _send(gw: Gateway, lora: Lora, owner: str, provider: Provider, attempt: Attempt) -> bool:
    spec = TrainingSpec(
        attempt_id=attempt.id, lora_id=lora.id, name=lora.name, subject_kind=lora.subject_kind,
        gender=lora.gender, ethnicity=lora.ethnicity, age=lora.age, steps=lora.steps,
        lora_rank=lora.lora_rank, trigger_word=lora.trigger_word, team_id=lora.team_id,
    )
    dataset = await _ensure_dataset(gw, lora)
    log.info("training_submitting", provider=provider.name, attempt=attempt.seq)
    try:
        submission = await provider.start_training(spec, dataset)
    except ProviderTimeout as e:
        # ambiguous: the request may have arrived. Never send it blindly again.
        gw.router.breaker.failure(provider.name)
        log.warning("submission_ambiguous", provider=provider.name, error=e.message)
        if provider.capabilities.can_lookup:  # keep it 'submitting': _reconcile asks the provider
            async with gw.db.tx() as conn:
                await _update(conn, lora, owner, next_run_at=now() + gw.settings.engine.min_poll_interval_s,
                              lease_owner=None, lease_expires=None)
            return False
        return await _attempt_failed(gw, lora, owner, attempt, f"submission outcome unknown: {e.message}", True, unknown=True)
    except ProviderError as e:
        gw.router.breaker.failure(provider.name)
        log.warning("provider_call_failed", provider=provider.name, call="start_training", error=e.message, retryable=e.retryable)
        return await _attempt_failed(gw, lora, owner, attempt, e.message, e.retryable, delay=getattr(e, "retry_after", None))
    gw.router.breaker.success(provider.name)
    try:
        async with gw.db.tx() as conn:
            await work.update_attempt(
                conn, attempt.id, provider_ref=submission.ref, provider_trigger_word=submission.trigger_word,
                state="queued", submitted_at=now(), progressed_at=now(),
            )
            await _update(
                conn, lora, owner, status="TRAINING", stage="poll",
                started_at=lora.started_at or now(), next_run_at=now() + gw.settings.engine.min_poll_interval_s,
                lease_owner=None, lease_expires=None,
            )
    except LeaseLost:
        # archived (or taken over) while we were submitting: do not leave a training running
        await _cancel_quietly(provider, submission.ref)
        raise
    log.info("training_submitted", provider=provider.name, provider_ref=submission.ref)
    return False


async def _reconcile(gw: Gateway, lora: Lora, owner: str, attempt: Attempt) -> bool:
    """The process stopped between recording an attempt and learning the provider's job id."""
    provider = gw.providers.get(attempt.provider)
    if provider is None:
        return await _attempt_failed(gw, lora, owner, attempt, "provider is no longer configured", True)
    if provider.capabilities.can_lookup:
        try:
            found = await provider.lookup_training(attempt.id)
        except ProviderError as e:
            log.warning("provider_call_failed", provider=provider.name, call="lookup_training", error=e.message)
            async with gw.db.tx() as conn:
                await _update(conn, lora, owner, next_run_at=now() + 5, lease_owner=None, lease_expires=None)
            return False
        if found is None:
            log.info("submission_reconciled", provider=provider.name, found=False)
            return await _send(gw, lora, owner, provider, attempt)  # never arrived: send it now
        log.info("submission_reconciled", provider=provider.name, found=True, provider_ref=found.ref)
        async with gw.db.tx() as conn:
            await work.update_attempt(
                conn, attempt.id, provider_ref=found.ref, provider_trigger_word=found.trigger_word,
                state="queued", submitted_at=now(), progressed_at=now(),
            )
            await _update(
                conn, lora, owner, status="TRAINING", stage="poll", started_at=lora.started_at or now(),
                next_run_at=now(), lease_owner=None, lease_expires=None,
            )
        return False
    # the provider cannot tell us: do not resubmit blindly to it; move on to another provider
    return await _attempt_failed(gw, lora, owner, attempt, "submission outcome unknown after an interruption", True, unknown=True)


# --------------------------------------------------------------------------- poll / fetch


def _poll_delay(gw: Gateway, polls: int) -> float:
    return poll_delay(gw.settings.engine, polls)


class Polled:
    """One provider answer about a lora's current attempt: a status, or the error raised."""

    def __init__(self, attempt: Attempt, provider: Provider, status: TrainingStatus | None, error: ProviderError | None):
        self.attempt = attempt
        self.provider = provider
        self.status = status
        self.error = error


async def _ask(provider: Provider, attempt: Attempt) -> Polled:
    assert attempt.provider_ref is not None
    try:
        return Polled(attempt, provider, await provider.training_status(attempt.provider_ref), None)
    except ProviderError as e:
        return Polled(attempt, provider, None, e)


def _still_running(gw: Gateway, lora: Lora, p: Polled) -> dict | None:
    """The writes for a "still queued/running" answer, or None if the answer needs a step."""
    status, attempt = p.status, p.attempt
    if status is None or status.state not in ("queued", "running"):
        return None
    progressed = status.progress is not None and (attempt.progress is None or status.progress > attempt.progress)
    if not progressed and now() - (attempt.progressed_at or attempt.created_at) > gw.settings.engine.stuck_after_s:
        return None  # stuck: the step cancels it and moves on
    return {
        # the backoff restarts when the state changes (per-state backoff)
        "attempt_id": attempt.id, "lora_id": lora.id, "state": status.state,
        "polls": attempt.polls + 1 if status.state == attempt.state else 0,
        "progress": status.progress if status.progress is not None else attempt.progress,
        "progressed_at": now() if progressed or status.state != attempt.state else attempt.progressed_at,
        # from the time it was due, not from now: a poll made a little early (batching) still
        # leaves a whole interval before the next one
        "next_run_at": max(now(), lora.next_run_at) + _poll_delay(gw, attempt.polls),
    }


async def poll_many(gw: Gateway, loras: list[Lora], owner: str) -> list[tuple[Lora, Polled | None]]:
    """Poll many leased loras at once and write every "still running" answer in one
    transaction (the common case, so 10,000 trainings in flight stay cheap). Returns the
    loras that need their full step, with the answer already fetched."""
    async with gw.db.read() as conn:
        current = {a.owner_id: a for a in await work.current_attempts(conn, "lora", [lo.id for lo in loras])}
    asks: dict[str, Polled | None] = {}

    async def one(lora: Lora) -> None:
        attempt = current.get(lora.id)
        provider = gw.providers.get(attempt.provider) if attempt else None
        asks[lora.id] = await _ask(provider, attempt) if attempt and provider and attempt.provider_ref else None

    limiter = anyio.CapacityLimiter(POLL_CONCURRENCY)

    async def bounded(lora: Lora) -> None:
        async with limiter:
            await one(lora)

    async with anyio.create_task_group() as tg:
        for lora in loras:
            tg.start_soon(bounded, lora)
    running, rest = [], []
    for lora in loras:
        polled = asks.get(lora.id)
        update = _still_running(gw, lora, polled) if polled is not None else None
        (running.append(update) if update is not None else rest.append((lora, polled)))
    if running:
        async with gw.db.tx() as conn:
            await work.apply_running_polls(conn, owner, running)
    return rest


async def _poll(gw: Gateway, lora: Lora, owner: str, polled: Polled | None = None) -> bool:
    if polled is None:
        async with gw.db.read() as conn:
            attempt = await work.current_attempt(conn, "lora", lora.id)
        assert attempt is not None and attempt.provider_ref is not None
        provider = gw.providers.get(attempt.provider)
        if provider is None:
            return await _attempt_failed(gw, lora, owner, attempt, "provider is no longer configured", True)
        polled = await _ask(provider, attempt)
    attempt, provider, status = polled.attempt, polled.provider, polled.status
    if polled.error is not None:
        e = polled.error
        log.warning("provider_call_failed", provider=provider.name, call="training_status", error=e.message)
        if not e.retryable:
            gw.router.breaker.failure(provider.name)
            return await _attempt_failed(gw, lora, owner, attempt, e.message, False)
        if now() - (attempt.progressed_at or attempt.created_at) > gw.settings.engine.stuck_after_s:
            return await _stuck(gw, lora, owner, attempt, provider)
        delay = getattr(e, "retry_after", None) or _poll_delay(gw, attempt.polls)
        async with gw.db.tx() as conn:
            await work.update_attempt(conn, attempt.id, polls=attempt.polls + 1)
            await _update(conn, lora, owner, next_run_at=now() + delay, lease_owner=None, lease_expires=None)
        return False
    assert status is not None
    if status.state == "succeeded":
        async with gw.db.tx() as conn:
            await work.update_attempt(conn, attempt.id, state="succeeded", progress=1.0, finished_at=now(), polls=0)
            await _update(conn, lora, owner, stage="fetch")
        gw.router.breaker.success(provider.name)
        log.info("training_succeeded", provider=provider.name)
        # the artifact URL is not stored: fetch asks the provider again (it is idempotent)
        return True
    if status.state == "failed":
        gw.router.breaker.failure(provider.name)
        log.info("training_failed", provider=provider.name, error=status.error, retryable=status.retryable)
        return await _attempt_failed(gw, lora, owner, attempt, status.error or "training failed", status.retryable)
    update = _still_running(gw, lora, polled)
    if update is None:
        return await _stuck(gw, lora, owner, attempt, provider)
    async with gw.db.tx() as conn:
        await work.apply_running_polls(conn, owner, [update])
    return False


async def _stuck(gw: Gateway, lora: Lora, owner: str, attempt: Attempt, provider: Provider) -> bool:
    log.warning("attempt_stuck", provider=provider.name)
    await _cancel_quietly(provider, attempt.provider_ref)
    return await _attempt_failed(gw, lora, owner, attempt, "the provider made no progress in time", True)


async def _fetch(gw: Gateway, lora: Lora, owner: str) -> bool:
    async with gw.db.read() as conn:
        attempt = await work.current_attempt(conn, "lora", lora.id)
    assert attempt is not None and attempt.provider_ref is not None
    provider = gw.providers[attempt.provider]
    if not (provider.capabilities.training and provider.capabilities.training.produces_artifact):
        await _ready(gw, lora, owner, artifact=None)
        return False
    try:
        status = await provider.training_status(attempt.provider_ref)
        if status.state != "succeeded" or not status.artifact_url:
            raise ProviderError("the provider reported no artifact for a finished training", retryable=True)
        with tempfile.TemporaryDirectory(dir=gw.work_dir) as tmp:
            dest = Path(tmp) / "lora.safetensors"
            await provider.fetch_file(status.artifact_url, dest, max_bytes=int(gw.settings.engine.max_artifact_mb * MB))
            info = await anyio.to_thread.run_sync(inspect_artifact, dest)
            key = f"loras/{lora.id}/lora.safetensors"
            await gw.storage.put_file(key, dest, move=True)
    except (ProviderError, ArtifactInvalid, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        log.warning("artifact_fetch_failed", provider=provider.name, error=message, tries=attempt.polls + 1)
        if attempt.polls + 1 < FETCH_TRIES:  # copy again later; retraining is the last resort
            async with gw.db.tx() as conn:
                await work.update_attempt(conn, attempt.id, polls=attempt.polls + 1)
                await _update(conn, lora, owner, next_run_at=now() + _poll_delay(gw, attempt.polls),
                              lease_owner=None, lease_expires=None)
            return False
        return await _attempt_failed(gw, lora, owner, attempt, f"the trained weights could not be copied: {message}", True)
    artifact = Artifact(
        id=new_id(), lora_id=lora.id, sha256=info.sha256, size=info.size, format=info.format,
        storage_key=key, source_url=status.artifact_url, created_at=now(),
    )
    await _ready(gw, lora, owner, artifact=artifact)
    return False


# --------------------------------------------------------------------------- terminal states


async def _ready(gw: Gateway, lora: Lora, owner: str, artifact: Artifact | None) -> None:
    async with gw.db.tx() as conn:
        if artifact is not None:
            await work.insert_artifact(conn, artifact)
        await _update(
            conn, lora, owner, status="READY", stage="done", completed_at=now(), error=None,
            portable=artifact is not None, artifact_id=artifact.id if artifact else None,
            lease_owner=None, lease_expires=None,
        )
        await webhooks.on_lora_terminal(conn, lora.id)
    log.info("lora_ready", portable=artifact is not None)
    await _cleanup_work(gw, lora.id)


async def _attempt_failed(
    gw: Gateway, lora: Lora, owner: str, attempt: Attempt, error: str, retryable: bool,
    *, delay: float | None = None, unknown: bool = False,
) -> bool:
    """Close an attempt; fall back to the next provider when the failure allows it.

    ``unknown``: the provider may have the job but cannot be asked (an ambiguous submit to a
    provider without lookup); the attempt is marked so and that provider is not used again."""
    async with gw.db.tx() as conn:
        await work.update_attempt(conn, attempt.id, state="unknown" if unknown else "failed", error=error[:500],
                                  retryable=retryable, finished_at=now())
        if retryable and lora.attempts_used < gw.settings.engine.max_attempts:
            await _update(conn, lora, owner, stage="submit", next_run_at=now() + (delay or 0), lease_owner=None, lease_expires=None)
            log.info("attempt_fallback", provider=attempt.provider, error=error)
            return False
    await _fail(gw, lora, owner, error)
    return False


async def _fail(gw: Gateway, lora: Lora, owner: str, error: str) -> None:
    """FAILED: refund 255 if it was charged, and 2 as well if training never began."""
    async with gw.db.tx() as conn:
        await _update(
            conn, lora, owner, status="FAILED", stage="done", error=error[:500], completed_at=now(),
            lease_owner=None, lease_expires=None,
        )
        await teams_store.refund(conn, lora.team_id, ref=lora.id, charge_kind="lora_training", reason="LoRA training failed")
        if lora.started_at is None:
            await teams_store.refund(conn, lora.team_id, ref=lora.id, charge_kind="lora_create", reason="LoRA failed before training")
        await webhooks.on_lora_terminal(conn, lora.id)
    log.info("lora_failed", error=error)
    await _cleanup_work(gw, lora.id)


def _last_error(attempts: list[Attempt]) -> str | None:
    return next((a.error for a in reversed(attempts) if a.error), None)


async def _cancel_quietly(provider: Provider, ref: str | None) -> None:
    if not ref or not provider.capabilities.can_cancel:
        return
    try:
        with anyio.fail_after(10):
            await provider.cancel_training(ref)
    except (ProviderError, TimeoutError) as e:
        log.warning("provider_cancel_failed", provider=provider.name, error=str(e))


async def _cleanup_work(gw: Gateway, lora_id: str) -> None:
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(_dataset_dir(gw, lora_id), ignore_errors=True))


async def archive(gw: Gateway, lora: Lora) -> None:
    """Soft delete (the API's DELETE): ARCHIVED now; cancel upstream training, best effort."""
    async with gw.db.tx() as conn:
        await work.update_lora(
            conn, lora.id, status="ARCHIVED", archived_at=now(), lease_owner=None, lease_expires=None
        )
        attempt = await work.current_attempt(conn, "lora", lora.id)
    log.info("lora_archived", lora_id=lora.id, previous_status=lora.status)
    if lora.status in ("UPLOADING", "TRAINING") and attempt and attempt.provider_ref and attempt.state in ("queued", "running"):
        provider = gw.providers.get(attempt.provider)
        if provider is not None:
            await _cancel_quietly(provider, attempt.provider_ref)
            async with gw.db.tx() as conn:
                await work.update_attempt(conn, attempt.id, state="cancelled", finished_at=now())
    if lora.status in work.ACTIVE_LORA:
        await _cleanup_work(gw, lora.id)


_STAGES = {"prepare": _prepare, "submit": _submit, "poll": _poll, "fetch": _fetch}

__all__ = ["step", "archive", "LeaseLost", "TRAINING_FEE", "CREATE_FEE"]
