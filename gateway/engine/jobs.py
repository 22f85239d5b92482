"""Generation jobs: QUEUED → PROCESSING (submit, poll, finish) → COMPLETED | FAILED.

What generation adds to the attempt runner (``gateway.engine.attempts``):

    start   PROCESSING                                    (the 2 credits per image were charged at POST)
    finish  fetch, check and (re-)encode the images into storage → COMPLETED

Progress changes are queued as ``progress`` webhooks; FAILED refunds the whole charge.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import structlog

from gateway import webhooks
from gateway.context import MB, Gateway
from gateway.engine.attempts import Answer, Operation, Runner
from gateway.engine.errors import LeaseLost, StepError
from gateway.engine.routing import InferenceNeeds
from gateway.imaging import SIZES, finalise_image
from gateway.store import attempts as attempts_store
from gateway.store import jobs as jobs_store
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from gateway.store.models import Artifact, Attempt, Job, JobImage, Lora
from gateway.timeutil import now
from gateway.triggers import apply_trigger
from providers.base import GENERATION_PARAMS, GenerationSpec, GenerationStatus, LoraHandle, Provider

log = structlog.get_logger()

CREDITS_PER_IMAGE = 2


def _answer(status: GenerationStatus) -> Answer:
    return Answer(state=status.state, ref=status.ref, progress=status.progress, error=status.error,
                  retryable=status.retryable, raw=status)


def _params(job: Job) -> dict[str, Any]:
    return job.input["fluxLoraParams"]


async def _start(runner: Runner, job: Job) -> bool:
    async with runner.gw.db.tx() as conn:
        await GENERATION.write(conn, job, runner.owner, status="PROCESSING", stage="submit", progress=0,
                               started_at=now())
    return True


async def _lora(gw: Gateway, job: Job) -> tuple[Lora, LoraHandle, Artifact | None]:
    async with gw.db.read() as conn:
        lora = await loras_store.get_lora(conn, job.lora_id, job.team_id)
        if lora is None or lora.status != "READY":
            raise StepError("the LoRA is no longer available")
        attempt = (await attempts_store.get_attempt(conn, lora.trained_attempt_id) if lora.trained_attempt_id
                   else await attempts_store.current_attempt(conn, "lora", lora.id))  # (rows from before the pin)
        artifact = await loras_store.artifact_for(conn, lora.id)
    handle = LoraHandle(
        lora_id=lora.id,
        trigger_word=lora.trigger_word,
        provider_trigger_word=attempt.provider_trigger_word if attempt else None,
        trained_by=attempt.provider if attempt else None,
        trained_ref=attempt.provider_ref if attempt else None,
        artifact_path=gw.storage.local_path(artifact.storage_key) if artifact else None,
        artifact_url=gw.file_url(artifact.storage_key) if artifact and gw.settings.server.public_base_url else None,
        artifact_format=artifact.format if artifact else None,
        artifact_key=artifact.storage_key if artifact else None,
        artifact_sha256=artifact.sha256 if artifact else None,
    )
    return lora, handle, artifact


def _spec(job: Job, attempt_id: str, handle: LoraHandle, provider: Provider) -> GenerationSpec:
    p = _params(job)
    ratio = p.get("aspect_ratio") or "1:1"
    width, height = SIZES[ratio]
    own_word = handle.provider_trigger_word if provider.name == handle.trained_by else None
    return GenerationSpec(
        attempt_id=attempt_id, job_id=job.id,
        prompt=apply_trigger(job.input["prompt"], handle.trigger_word, own_word),
        num_outputs=p.get("num_outputs", 1), aspect_ratio=ratio, width=width, height=height,
        output_format=p.get("output_format") or "png",
        lora_strength=p.get("lora_strength", 1.0),
        guidance_scale=p.get("guidance_scale", 3.5),
        num_inference_steps=p.get("num_inference_steps", 28),
        seed=p.get("seed"),
        team_id=job.team_id,
    )


class GenerationOperation(Operation):
    kind = "job"
    name = "generation"
    active = jobs_store.ACTIVE_JOB
    no_provider = "no configured provider can generate with this LoRA and these parameters"
    results = "the generated images"

    def __init__(self) -> None:
        self.preludes = {"start": _start}

    async def load(self, conn: Any, row_id: str) -> Job | None:
        return await jobs_store.get_job(conn, row_id)

    async def write(self, conn: Any, row: Job, owner: str, **fields: Any) -> None:
        if not await jobs_store.update_job(conn, row.id, lease=owner, **fields):
            raise LeaseLost(row.id)

    async def candidates(self, gw: Gateway, job: Job) -> list[Provider]:
        lora, handle, artifact = await _lora(gw, job)
        p = _params(job)
        needs = InferenceNeeds(
            num_outputs=p.get("num_outputs", 1), aspect_ratio=p.get("aspect_ratio") or "1:1",
            portable=lora.portable and artifact is not None, trained_by=handle.trained_by,
            set_params=frozenset(p), artifact_format=handle.artifact_format,
            weights_local=handle.artifact_path is not None, key=job.id, team_id=job.team_id,
            preferred=job.preferred_provider,
        )
        return await gw.router.inference_order(needs)

    def cost(self, provider: Provider, job: Job) -> float:
        return provider.capabilities.cost.per_image * _params(job).get("num_outputs", 1)

    async def send(self, gw: Gateway, job: Job, provider: Provider, attempt: Attempt) -> Answer:
        _, handle, _ = await _lora(gw, job)
        return _answer(await provider.generate(_spec(job, attempt.id, handle, provider), handle))

    async def lookup(self, provider: Provider, attempt_id: str) -> Answer | None:
        found = await provider.lookup_generation(attempt_id)
        return _answer(found) if found is not None else None

    async def status(self, provider: Provider, ref: str) -> Answer:
        return _answer(await provider.generation_status(ref))

    async def cancel(self, provider: Provider, ref: str) -> None:
        await provider.cancel_generation(ref)

    def accepted_fields(self, job: Job, provider: Provider) -> dict[str, Any]:
        """Which of the parameters the client set this provider ignores (shown on the job)."""
        caps = provider.capabilities.inference
        honours = caps.honours if caps is not None else frozenset()
        return {"ignored_params": sorted((set(_params(job)) & GENERATION_PARAMS) - honours)}

    def running_fields(self, job: Job, answer: Answer) -> dict[str, Any]:
        if answer.progress is None:
            return {}
        progress = int(round(answer.progress * 100))
        return {"progress": progress} if progress != job.progress else {}

    async def on_running(self, conn: Any, job: Job, fields: dict[str, Any]) -> None:
        if "progress" in fields:
            await webhooks.on_job_event(conn, job.id, "progress")

    async def finish(self, runner: Runner, job: Job, provider: Provider, attempt: Attempt, answer: Answer) -> None:
        gw = runner.gw
        status: GenerationStatus = answer.raw
        fmt = _params(job).get("output_format") or "png"
        expected = _params(job).get("num_outputs", 1)
        if len(status.images) != expected:
            raise StepError(f"the provider returned {len(status.images)} images, {expected} expected", retryable=True)
        images: list[JobImage] = []
        with tempfile.TemporaryDirectory(dir=gw.work_dir) as tmp:
            for i, img in enumerate(status.images):
                raw, out = Path(tmp) / f"raw{i}", Path(tmp) / f"out{i}"
                if img.data is not None:
                    await anyio.to_thread.run_sync(raw.write_bytes, img.data)
                elif img.url:
                    await provider.fetch_file(img.url, raw, max_bytes=int(gw.settings.engine.max_image_mb * MB))
                else:
                    raise StepError("the provider returned an empty image", retryable=True)
                width, height = await gw.image_workers.run(finalise_image, raw, out, fmt)
                key = f"jobs/{job.id}/{i + 1}.{fmt}"
                await gw.storage.put_file(key, out, move=True)
                images.append(JobImage(job_id=job.id, idx=i, storage_key=key, format=fmt, width=width, height=height))
        async with gw.db.tx() as conn:
            await jobs_store.insert_job_images(conn, images)
            await attempts_store.update_attempt(conn, attempt.id, state="succeeded", progress=1.0,
                                      finished_at=attempt.finished_at or now())
            await self.write(conn, job, runner.owner, status="COMPLETED", stage="done", progress=100,
                             completed_at=now(), error=None, lease_owner=None, lease_expires=None)
            await webhooks.on_job_event(conn, job.id, "completed", [gw.file_url(i.storage_key) for i in images])
        log.info("job_completed", provider=provider.name, images=len(images))

    async def failed(self, conn: Any, job: Job, owner: str, error: str) -> None:
        """FAILED: the whole charge is refunded and ``creditCost`` becomes 0."""
        await self.write(conn, job, owner, status="FAILED", stage="done", error=error, completed_at=now(),
                         credit_cost=0, lease_owner=None, lease_expires=None)
        await ledger_store.refund(conn, job.team_id, ref=job.id, charge_kind="job", reason="generation failed")
        await webhooks.on_job_event(conn, job.id, "failed")


GENERATION = GenerationOperation()

__all__ = ["GENERATION", "GenerationOperation", "CREDITS_PER_IMAGE"]
