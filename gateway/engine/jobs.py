"""Generation job steps: QUEUED → PROCESSING (submit, poll, store) → COMPLETED | FAILED.

    submit  pick a provider, record the attempt, ask it to generate
    poll    ask the provider about a generation that did not finish inline
    store   (inline after submit/poll) fetch, check and re-encode the images into storage
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
import structlog

from gateway import webhooks
from gateway.context import MB, Gateway
from gateway.engine.common import LeaseLost, new_attempt, poll_delay
from gateway.engine.routing import InferenceNeeds
from gateway.imaging import SIZES, OutputInvalid, finalise_image
from gateway.store import teams as teams_store
from gateway.store import work
from gateway.store.models import Attempt, Job, JobImage, Lora
from gateway.timeutil import now
from gateway.triggers import apply_trigger
from providers.base import GenerationSpec, GenerationStatus, LoraHandle, Provider, ProviderError, ProviderTimeout

log = structlog.get_logger()

CREDITS_PER_IMAGE = 2


async def _update(conn, job: Job, owner: str, **fields) -> None:
    if not await work.update_job(conn, job.id, lease=owner, **fields):
        raise LeaseLost(job.id)


async def step(gw: Gateway, job_id: str, owner: str, claimed: Job | None = None) -> None:
    while True:
        if claimed is not None:
            job, claimed = claimed, None
        else:
            async with gw.db.read() as conn:
                job = await work.get_job(conn, job_id)
        if job is None or job.lease_owner != owner or job.status not in work.ACTIVE_JOB:
            return
        with structlog.contextvars.bound_contextvars(job_id=job.id, stage=job.stage):
            handler = _STAGES[job.stage]
            again = await handler(gw, job, owner)
        if not again:
            return


async def _start(gw: Gateway, job: Job, owner: str) -> bool:
    async with gw.db.tx() as conn:
        await _update(conn, job, owner, status="PROCESSING", stage="submit", progress=0, started_at=now())
    return True


async def _lora_handle(gw: Gateway, job: Job) -> tuple[Lora | None, LoraHandle | None, str | None]:
    async with gw.db.read() as conn:
        lora = await work.get_lora(conn, job.lora_id, job.team_id)
        if lora is None or lora.status != "READY":
            return lora, None, None
        attempt = await work.current_attempt(conn, "lora", lora.id)
        artifact = await work.artifact_for(conn, lora.id)
    artifact_path = gw.storage.local_path(artifact.storage_key) if artifact else None
    handle = LoraHandle(
        lora_id=lora.id,
        trigger_word=lora.trigger_word,
        provider_trigger_word=attempt.provider_trigger_word if attempt else None,
        trained_by=attempt.provider if attempt else None,
        trained_ref=attempt.provider_ref if attempt else None,
        artifact_path=artifact_path,
        artifact_url=gw.file_url(artifact.storage_key) if artifact and gw.settings.server.public_base_url else None,
        artifact_format=artifact.format if artifact else None,
    )
    return lora, handle, attempt.provider if attempt else None


def _spec(job: Job, attempt_id: str, handle: LoraHandle, provider: Provider) -> GenerationSpec:
    p = job.input["fluxLoraParams"]
    ratio = p.get("aspect_ratio") or "1:1"
    width, height = SIZES[ratio]
    own_word = handle.provider_trigger_word if provider.name == handle.trained_by else None
    return GenerationSpec(
        attempt_id=attempt_id,
        job_id=job.id,
        prompt=apply_trigger(job.input["prompt"], handle.trigger_word, own_word),
        num_outputs=p.get("num_outputs", 1),
        aspect_ratio=ratio,
        width=width,
        height=height,
        output_format=p.get("output_format") or "png",
        lora_strength=p.get("lora_strength", 1.0),
        guidance_scale=p.get("guidance_scale", 3.5),
        num_inference_steps=p.get("num_inference_steps", 28),
        seed=p.get("seed"),
        team_id=job.team_id,
    )


async def _submit(gw: Gateway, job: Job, owner: str) -> bool:
    async with gw.db.read() as conn:
        attempts = await work.attempts_for(conn, "job", job.id)
    lora, handle, _ = await _lora_handle(gw, job)
    if handle is None or lora is None:
        await _fail(gw, job, owner, "the LoRA is no longer available")
        return False
    current = attempts[-1] if attempts else None
    if current is not None and current.state == "submitting":
        return await _reconcile(gw, job, owner, current, handle)
    if job.attempts_used >= gw.settings.engine.max_attempts:
        await _fail(gw, job, owner, next((a.error for a in reversed(attempts) if a.error), "generation failed"))
        return False
    p = job.input["fluxLoraParams"]
    needs = InferenceNeeds(
        num_outputs=p.get("num_outputs", 1), aspect_ratio=p.get("aspect_ratio") or "1:1",
        portable=lora.portable, trained_by=handle.trained_by,
    )
    unknown = {a.provider for a in attempts if a.state == "unknown"}
    provider = gw.router.pick_inference(needs, [a.provider for a in attempts], exclude=unknown)
    if provider is None:
        reason = next((a.error for a in reversed(attempts) if a.error), None) if unknown else None
        await _fail(gw, job, owner, reason or "no configured provider can generate with this LoRA and these parameters")
        return False
    attempt = new_attempt("job", job.id, len(attempts) + 1, provider, provider.capabilities.cost.per_image * needs.num_outputs)
    async with gw.db.tx() as conn:
        await work.insert_attempt(conn, attempt)
        await _update(conn, job, owner, attempts_used=job.attempts_used + 1)
    return await _send(gw, job, owner, provider, attempt, handle)


async def _send(gw: Gateway, job: Job, owner: str, provider: Provider, attempt: Attempt, handle: LoraHandle) -> bool:
    spec = _spec(job, attempt.id, handle, provider)
    log.info("generation_submitting", provider=provider.name, attempt=attempt.seq)
    try:
        status = await provider.generate(spec, handle)
    except ProviderTimeout as e:
        # ambiguous: it may have arrived. Never send it blindly again.
        gw.router.breaker.failure(provider.name)
        log.warning("submission_ambiguous", provider=provider.name, error=e.message)
        if provider.capabilities.can_lookup:  # stays 'submitting': _reconcile asks the provider
            async with gw.db.tx() as conn:
                await _update(conn, job, owner, next_run_at=now() + gw.settings.engine.min_poll_interval_s,
                              lease_owner=None, lease_expires=None)
            return False
        return await _attempt_failed(gw, job, owner, attempt, f"submission outcome unknown: {e.message}", True, unknown=True)
    except ProviderError as e:
        gw.router.breaker.failure(provider.name)
        log.warning("provider_call_failed", provider=provider.name, call="generate", error=e.message)
        return await _attempt_failed(gw, job, owner, attempt, e.message, e.retryable, delay=getattr(e, "retry_after", None))
    return await _handle_status(gw, job, owner, provider, attempt, status, spec.output_format)


async def _reconcile(gw: Gateway, job: Job, owner: str, attempt: Attempt, handle: LoraHandle) -> bool:
    """The process stopped between recording the attempt and hearing back from the provider."""
    provider = gw.providers.get(attempt.provider)
    if provider is None or not provider.capabilities.can_lookup:
        # cannot ask: do not send blindly again to it; the job moves on within its budget
        return await _attempt_failed(gw, job, owner, attempt, "generation outcome unknown after an interruption", True,
                                     unknown=True)
    try:
        found = await provider.lookup_generation(attempt.id)
    except ProviderError as e:
        log.warning("provider_call_failed", provider=provider.name, call="lookup_generation", error=e.message)
        async with gw.db.tx() as conn:
            await _update(conn, job, owner, next_run_at=now() + 5, lease_owner=None, lease_expires=None)
        return False
    log.info("submission_reconciled", provider=provider.name, found=found is not None)
    if found is None:
        return await _send(gw, job, owner, provider, attempt, handle)  # it never arrived
    fmt = job.input["fluxLoraParams"].get("output_format") or "png"
    return await _handle_status(gw, job, owner, provider, attempt, found, fmt)


async def _poll(gw: Gateway, job: Job, owner: str) -> bool:
    async with gw.db.read() as conn:
        attempt = await work.current_attempt(conn, "job", job.id)
    assert attempt is not None and attempt.provider_ref is not None
    provider = gw.providers.get(attempt.provider)
    if provider is None:
        return await _attempt_failed(gw, job, owner, attempt, "provider is no longer configured", True)
    try:
        status = await provider.generation_status(attempt.provider_ref)
    except ProviderError as e:
        log.warning("provider_call_failed", provider=provider.name, call="generation_status", error=e.message)
        if not e.retryable:
            return await _attempt_failed(gw, job, owner, attempt, e.message, False)
        retry_after = getattr(e, "retry_after", None)
        if retry_after:
            async with gw.db.tx() as conn:
                await _update(conn, job, owner, next_run_at=now() + retry_after, lease_owner=None, lease_expires=None)
            return False
        status = GenerationStatus(state="running", ref=attempt.provider_ref, progress=attempt.progress)
    return await _handle_status(gw, job, owner, provider, attempt, status, job.input["fluxLoraParams"].get("output_format") or "png")


async def _handle_status(
    gw: Gateway, job: Job, owner: str, provider: Provider, attempt: Attempt, status: GenerationStatus, fmt: str
) -> bool:
    if status.state == "failed":
        gw.router.breaker.failure(provider.name)
        return await _attempt_failed(gw, job, owner, attempt, status.error or "generation failed", status.retryable)
    gw.router.breaker.success(provider.name)
    if status.state == "succeeded":
        return await _store(gw, job, owner, provider, attempt, status, fmt)
    delay = poll_delay(gw.settings.engine, attempt.polls)
    progress = int(round((status.progress or 0) * 100)) if status.progress is not None else job.progress
    async with gw.db.tx() as conn:
        await work.update_attempt(
            conn, attempt.id, state=status.state, provider_ref=status.ref or attempt.provider_ref,
            submitted_at=attempt.submitted_at or now(), polls=attempt.polls + 1, progress=status.progress,
        )
        await _update(conn, job, owner, stage="poll", progress=progress, next_run_at=now() + delay,
                      lease_owner=None, lease_expires=None)
        if progress is not None and progress != job.progress:
            await webhooks.on_job_event(conn, job.id, "progress")
    return False


async def _store(
    gw: Gateway, job: Job, owner: str, provider: Provider, attempt: Attempt, status: GenerationStatus, fmt: str
) -> bool:
    expected = job.input["fluxLoraParams"].get("num_outputs", 1)
    if len(status.images) != expected:
        return await _attempt_failed(gw, job, owner, attempt, f"provider returned {len(status.images)} images, expected {expected}", True)
    images: list[JobImage] = []
    try:
        with tempfile.TemporaryDirectory(dir=gw.work_dir) as tmp:
            for i, img in enumerate(status.images):
                raw, out = Path(tmp) / f"raw{i}", Path(tmp) / f"out{i}"
                if img.data is not None:
                    await anyio.to_thread.run_sync(raw.write_bytes, img.data)
                elif img.url:
                    await provider.fetch_file(img.url, raw, max_bytes=int(gw.settings.engine.max_image_mb * MB))
                else:
                    raise OutputInvalid("provider returned an empty image")
                width, height = await anyio.to_thread.run_sync(finalise_image, raw, out, fmt)
                key = f"jobs/{job.id}/{i + 1}.{fmt}"
                await gw.storage.put_file(key, out, move=True)
                images.append(JobImage(job_id=job.id, idx=i, storage_key=key, format=fmt, width=width, height=height))
    except (ProviderError, OutputInvalid, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        log.warning("generation_output_failed", provider=provider.name, error=message)
        return await _attempt_failed(gw, job, owner, attempt, f"the generated images could not be stored: {message}", True)
    async with gw.db.tx() as conn:
        await work.insert_job_images(conn, images)
        await work.update_attempt(conn, attempt.id, state="succeeded", progress=1.0, finished_at=now(),
                                  provider_ref=status.ref or attempt.provider_ref, submitted_at=attempt.submitted_at or now())
        await _update(conn, job, owner, status="COMPLETED", stage="done", progress=100, completed_at=now(),
                      error=None, lease_owner=None, lease_expires=None)
        await webhooks.on_job_event(conn, job.id, "completed", [gw.file_url(i.storage_key) for i in images])
    log.info("job_completed", provider=provider.name, images=len(images))
    return False


async def _attempt_failed(
    gw: Gateway, job: Job, owner: str, attempt: Attempt, error: str, retryable: bool,
    *, delay: float | None = None, unknown: bool = False,
) -> bool:
    async with gw.db.tx() as conn:
        await work.update_attempt(conn, attempt.id, state="unknown" if unknown else "failed", error=error[:500],
                                  retryable=retryable, finished_at=now())
        if retryable and job.attempts_used < gw.settings.engine.max_attempts:
            await _update(conn, job, owner, stage="submit", lease_owner=None, lease_expires=None,
                          next_run_at=now() + (delay or 0))
            log.info("attempt_fallback", provider=attempt.provider, error=error)
            return False
    await _fail(gw, job, owner, error)
    return False


async def _fail(gw: Gateway, job: Job, owner: str, error: str) -> None:
    """FAILED: the whole charge is refunded and ``creditCost`` becomes 0."""
    async with gw.db.tx() as conn:
        await _update(conn, job, owner, status="FAILED", stage="done", error=error[:500], completed_at=now(),
                      credit_cost=0, lease_owner=None, lease_expires=None)
        await teams_store.refund(conn, job.team_id, ref=job.id, charge_kind="job", reason="generation failed")
        await webhooks.on_job_event(conn, job.id, "failed")
    log.info("job_failed", error=error)


_STAGES = {"start": _start, "submit": _submit, "poll": _poll}
