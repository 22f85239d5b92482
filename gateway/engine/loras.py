"""LoRA trainings: PENDING → UPLOADING (prepare, submit) → TRAINING (poll, finish) → READY | FAILED.

What training adds to the attempt runner (``gateway.engine.attempts``):

    prepare  normalise + caption + zip the dataset                 (status UPLOADING)
    submit   charge 255 with the first attempt, then the provider   (TRAINING once accepted)
    finish   copy the weights into storage and check them            → READY

and ``archive`` (the API's DELETE), which cancels a training in flight durably.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import anyio
import structlog

from gateway import webhooks
from gateway.artifacts import inspect_artifact
from gateway.context import MB, Gateway
from gateway.datasets import PrepConfig, prepare_dataset
from gateway.engine.attempts import IN_FLIGHT, Answer, Operation, Runner
from gateway.engine.errors import LeaseLost, StepError
from gateway.engine.routing import TrainingNeeds
from gateway.imaging import finalise_image, image_format
from gateway.store import attempts as attempts_store
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from gateway.store import cancels as cancels_store
from gateway.store.models import Artifact, Attempt, Lora
from gateway.timeutil import new_id, now
from plugins.captioners.base import CaptionContext
from providers.base import Dataset, Provider, TrainingSpec, TrainingStatus

log = structlog.get_logger()

TRAINING_FEE = 255
CREATE_FEE = 2
#: sample images kept from a provider that returns samples instead of weights
MAX_SAMPLES = 8


def _dataset_dir(gw: Gateway, lora_id: str) -> Path:
    return gw.work_dir / "loras" / lora_id


async def _raw_key(gw: Gateway, lora_id: str, i: int) -> str | None:
    for ext in ("jpg", "png", "webp"):
        key = f"loras/{lora_id}/raw/{i + 1:03d}.{ext}"
        if await gw.storage.size(key) is not None:
            return key
    return None


async def _prepare(runner: Runner, lora: Lora) -> bool:
    gw, owner = runner.gw, runner.owner
    if lora.status == "PENDING":
        async with gw.db.tx() as conn:
            await TRAINING.write(conn, lora, owner, status="UPLOADING")
        log.info("lora_uploading")
    out_dir = _dataset_dir(gw, lora.id)
    raw_dir = out_dir / "raw"
    await anyio.to_thread.run_sync(lambda: raw_dir.mkdir(parents=True, exist_ok=True))
    raw_paths = []
    for i in range(lora.image_count):
        key = await _raw_key(gw, lora.id, i)
        if key is None:
            await runner.fail(lora, f"dataset image {i + 1} is missing from storage")
            return False
        local = gw.storage.local_path(key)
        if local is None:
            local = raw_dir / key.rsplit("/", 1)[-1]
            await gw.storage.fetch_to(key, local)
        raw_paths.append(local)
    ctx = CaptionContext(trigger_word=lora.trigger_word, subject_kind=lora.subject_kind, gender=lora.gender,
                         ethnicity=lora.ethnicity, age=lora.age)
    cfg = PrepConfig(max_side=gw.settings.datasets.max_side, jpeg_quality=gw.settings.datasets.jpeg_quality)
    try:
        prepared = await prepare_dataset(raw_paths, out_dir, ctx, gw.captioner, gw.fallback_captioner, cfg, log)
    except StepError as e:  # DatasetError: an image that cannot be normalised or captioned
        log.warning("dataset_prepare_failed", error=e.message)
        await runner.fail(lora, f"the dataset could not be prepared: {e.message}")
        return False
    await gw.storage.put_file(f"loras/{lora.id}/dataset.zip", prepared.zip_path)
    async with gw.db.tx() as conn:
        await TRAINING.write(conn, lora, owner, stage="submit")
    log.info("dataset_prepared", images=prepared.image_count)
    return True


async def _ensure_dataset(gw: Gateway, lora: Lora, provider: Provider) -> Dataset:
    """The prepared dataset on local disk (re-extracted from storage after a move or restart), in
    the form ``provider`` asks for (``capabilities.training.dataset_input``)."""
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
    files = sorted(await anyio.to_thread.run_sync(lambda: list(images.glob("*.jpg"))))
    public = bool(gw.settings.server.public_base_url)
    caps = provider.capabilities.training
    image_urls: list[str] = []
    if caps is not None and caps.dataset_input == "image_urls" and public:
        for path in files:  # each image behind its own signed URL
            image_key = f"loras/{lora.id}/dataset/{path.name}"
            if await gw.storage.size(image_key) is None:
                await gw.storage.put_file(image_key, path)
            image_urls.append(gw.file_url(image_key))
    return Dataset(zip_path=zip_path, directory=images, image_count=lora.image_count,
                   zip_url=gw.file_url(key) if public else None, files=files, image_urls=image_urls)


def _answer(status: TrainingStatus, ref: str | None = None) -> Answer:
    return Answer(state=status.state, ref=ref, progress=status.progress, error=status.error,
                  retryable=status.retryable, raw=status)


class TrainingOperation(Operation):
    kind = "lora"
    name = "training"
    active = loras_store.ACTIVE_LORA
    no_provider = "no configured provider can train this LoRA (subject kind, steps or rank)"
    results = "the trained weights"

    def __init__(self) -> None:
        self.preludes = {"prepare": _prepare}

    async def load(self, conn: Any, row_id: str) -> Lora | None:
        return await loras_store.get_lora(conn, row_id)

    async def write(self, conn: Any, row: Lora, owner: str, **fields: Any) -> None:
        if not await loras_store.update_lora(conn, row.id, lease=owner, **fields):
            raise LeaseLost(row.id)

    async def candidates(self, gw: Gateway, lora: Lora) -> list[Provider]:
        return await gw.router.training_order(TrainingNeeds(
            lora.subject_kind, lora.steps, lora.lora_rank, key=lora.id, team_id=lora.team_id,
            preferred=lora.preferred_provider))

    def cost(self, provider: Provider, row: Lora) -> float:
        return provider.capabilities.cost.per_training

    async def record(self, conn: Any, lora: Lora, attempt: Attempt) -> dict[str, Any]:
        """The 255 is charged just before the first submit (once: the ledger is unique)."""
        try:
            await ledger_store.apply_credits(conn, lora.team_id, -TRAINING_FEE, reason="LoRA training", ref=lora.id,
                                            kind="lora_training")
        except ledger_store.InsufficientBalance as e:
            raise StepError(f"insufficient credits to start training: {TRAINING_FEE} required, {e.available} available") from None
        return {}

    async def send(self, gw: Gateway, lora: Lora, provider: Provider, attempt: Attempt) -> Answer:
        spec = TrainingSpec(
            attempt_id=attempt.id, lora_id=lora.id, name=lora.name, subject_kind=lora.subject_kind,
            gender=lora.gender, ethnicity=lora.ethnicity, age=lora.age, steps=lora.steps,
            lora_rank=lora.lora_rank, trigger_word=lora.trigger_word, team_id=lora.team_id,
        )
        submission = await provider.start_training(spec, await _ensure_dataset(gw, lora, provider))
        return Answer(state="queued", ref=submission.ref, progress=0.0, trigger_word=submission.trigger_word)

    async def lookup(self, provider: Provider, attempt_id: str) -> Answer | None:
        found = await provider.lookup_training(attempt_id)
        if found is None:
            return None
        return Answer(state="queued", ref=found.ref, trigger_word=found.trigger_word)

    async def status(self, provider: Provider, ref: str) -> Answer:
        return _answer(await provider.training_status(ref))

    async def cancel(self, provider: Provider, ref: str) -> None:
        await provider.cancel_training(ref)

    def accepted_fields(self, lora: Lora, provider: Provider) -> dict[str, Any]:
        return {"status": "TRAINING", "started_at": lora.started_at or now()}

    async def finish(self, runner: Runner, lora: Lora, provider: Provider, attempt: Attempt, answer: Answer) -> None:
        """Copy the weights (a portable LoRA) or, from a provider that keeps them, its sample
        images into storage; then READY, pinned to this attempt."""
        gw = runner.gw
        caps = provider.capabilities.training
        status: TrainingStatus = answer.raw
        artifact, samples = None, None
        if caps is not None and caps.produces_artifact:
            if not status.artifact_url:
                raise StepError("the provider reported no weights for a finished training", retryable=True)
            key = f"loras/{lora.id}/lora.safetensors"
            with tempfile.TemporaryDirectory(dir=gw.work_dir) as tmp:
                dest = Path(tmp) / "lora.safetensors"
                await provider.fetch_file(status.artifact_url, dest, max_bytes=int(gw.settings.engine.max_artifact_mb * MB))
                info = await anyio.to_thread.run_sync(inspect_artifact, dest)
                await gw.storage.put_file(key, dest, move=True)
            artifact = Artifact(id=new_id(), lora_id=lora.id, sha256=info.sha256, size=info.size, format=info.format,
                                storage_key=key, source_url=status.artifact_url, created_at=now())
        else:
            samples = await _copy_samples(gw, lora, provider, status.sample_urls)
        async with gw.db.tx() as conn:
            if artifact is not None:
                await loras_store.insert_artifact(conn, artifact)
            await self.write(conn, lora, runner.owner, status="READY", stage="done", completed_at=now(), error=None,
                             portable=artifact is not None, artifact_id=artifact.id if artifact else None,
                             trained_attempt_id=attempt.id, sample_keys=samples,
                             lease_owner=None, lease_expires=None)
            await webhooks.on_lora_terminal(conn, lora.id)
        log.info("lora_ready", portable=artifact is not None, samples=len(samples or []))

    async def failed(self, conn: Any, lora: Lora, owner: str, error: str) -> None:
        """FAILED: refund 255 if it was charged, and 2 as well if training never began."""
        await self.write(conn, lora, owner, status="FAILED", stage="done", error=error, completed_at=now(),
                         lease_owner=None, lease_expires=None)
        await ledger_store.refund(conn, lora.team_id, ref=lora.id, charge_kind="lora_training", reason="LoRA training failed")
        if lora.started_at is None:
            await ledger_store.refund(conn, lora.team_id, ref=lora.id, charge_kind="lora_create",
                                     reason="LoRA failed before training")
        await webhooks.on_lora_terminal(conn, lora.id)

    async def after_terminal(self, gw: Gateway, row_id: str) -> None:
        await cleanup_work(gw, row_id)


async def _copy_samples(gw: Gateway, lora: Lora, provider: Provider, urls: list[str]) -> list[str]:
    """The sample images a provider without downloadable weights returned, checked and stored."""
    keys = []
    with tempfile.TemporaryDirectory(dir=gw.work_dir) as tmp:
        for i, url in enumerate(urls[:MAX_SAMPLES], start=1):
            raw = Path(tmp) / f"raw{i}"
            await provider.fetch_file(url, raw, max_bytes=int(gw.settings.engine.max_image_mb * MB))
            fmt = await gw.image_workers.run(image_format, raw)
            out = Path(tmp) / f"sample{i}.{fmt}"
            await gw.image_workers.run(finalise_image, raw, out, fmt)
            key = f"loras/{lora.id}/samples/{i}.{fmt}"
            await gw.storage.put_file(key, out, move=True)
            keys.append(key)
    return keys


TRAINING = TrainingOperation()


async def cleanup_work(gw: Gateway, lora_id: str) -> None:
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(_dataset_dir(gw, lora_id), ignore_errors=True))


async def archive(gw: Gateway, lora: Lora) -> None:
    """Soft delete (the API's DELETE): ARCHIVED now, in one transaction with a durable request
    to cancel the training in flight (the engine works through it with retries). A LoRA archived
    before a vendor accepted its current training (still preparing, submitting, or between
    attempts) gets its 255 back."""
    async with gw.db.tx() as conn:
        if not await loras_store.update_lora(conn, lora.id, status="ARCHIVED", stage="done", archived_at=now(),
                                      lease_owner=None, lease_expires=None):
            return
        attempts = await attempts_store.attempts_for(conn, "lora", lora.id)
        current = attempts[-1] if attempts else None
        # a vendor is working on it (or has finished it): the training fee stays charged
        accepted = current is not None and current.provider_ref is not None and current.state in (
            "queued", "running", "succeeded")
        if lora.status in loras_store.ACTIVE_LORA and current is not None and current.state in IN_FLIGHT:
            await attempts_store.update_attempt(conn, current.id, state="cancelled", finished_at=now(),
                                      error="the LoRA was archived")
            await cancels_store.request_cancel(conn, current, "the LoRA was archived")
        if lora.status in loras_store.ACTIVE_LORA and not accepted:
            await ledger_store.refund(conn, lora.team_id, ref=lora.id, charge_kind="lora_training",
                                     reason="LoRA archived before training began")
    log.info("lora_archived", lora_id=lora.id, previous_status=lora.status)
    gw.wake()
    if lora.status in loras_store.ACTIVE_LORA:
        await cleanup_work(gw, lora.id)


__all__ = ["TRAINING", "TrainingOperation", "archive", "TRAINING_FEE", "CREATE_FEE"]
