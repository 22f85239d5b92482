"""Apiframe-shaped JSON for the records (CONTRACTS.md §1.3 and §1.5)."""

from __future__ import annotations

from typing import Any

from gateway.context import Gateway
from gateway.store.models import Job, JobImage, Lora
from gateway.timeutil import iso


def lora_view(lora: Lora, gw: Gateway) -> dict[str, Any]:
    ready = lora.status == "READY"
    view = {
        "id": lora.id,
        "userId": lora.user_id,
        "teamId": lora.team_id,
        "name": lora.name,
        "subjectKind": lora.subject_kind,
        "gender": lora.gender,
        "ethnicity": lora.ethnicity,
        "age": lora.age,
        "status": lora.status,
        "imageCount": lora.image_count,
        "steps": lora.steps,
        "loraRank": lora.lora_rank,
        "isReady": ready,
        "hasWeights": ready and lora.artifact_id is not None,
        # exposed once READY (and kept visible on an archived LoRA that had been READY)
        "triggerWord": lora.trigger_word if lora.completed_at and lora.error is None and lora.status in ("READY", "ARCHIVED") else None,
        "error": lora.error,
        "createdAt": iso(lora.created_at),
        "startedAt": iso(lora.started_at),
        "completedAt": iso(lora.completed_at),
    }
    # extension (not in Apiframe's LoRA object): where the weights live, and the sample images a
    # provider that keeps its weights returned
    view["gateway"] = {
        "portable": ready and lora.portable and lora.artifact_id is not None,
        "samples": [gw.file_url(k) for k in lora.sample_keys or []],
    }
    return view


def job_view(gw: Gateway, job: Job, images: list[JobImage]) -> dict[str, Any]:
    result = None
    if job.status == "COMPLETED":
        result = {"images": [gw.file_url(i.storage_key) for i in images]}
    return {
        "id": job.id,
        "status": job.status,
        "model": job.model,
        "progress": job.progress,
        "result": result,
        "error": job.error,
        "creditCost": job.credit_cost,
        "webhookStatus": job.webhook_status,
        "createdAt": iso(job.created_at),
        "completedAt": iso(job.completed_at),
        "expired": job.expired_at is not None,
        "input": job.input,
        # extension: the parameters the client set that the provider serving the job ignores
        "gateway": {"ignoredParams": job.ignored_params or []},
    }
