"""Domain records returned by the store (never raw rows)."""

from __future__ import annotations

from typing import Any

import msgspec


class Team(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    credits: int
    plan: str
    customer_id: str | None
    max_concurrent_trainings: int
    rate_limit_per_minute: int | None
    created_at: float
    routing: str | None = None  # JSON {training?, inference?}: the team's own routes


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team_id: str
    email: str | None
    role: str


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team_id: str
    user_id: str
    name: str
    prefix: str
    digest: bytes
    active: bool
    created_at: float
    revoked_at: float | None


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The caller of a request, as resolved from its API key."""

    key: ApiKey
    team_id: str
    user_id: str
    rate_limit_per_minute: int | None = None  # the team's override, if any


class Lora(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team_id: str
    user_id: str
    key_id: str
    name: str
    subject_kind: str
    gender: str | None
    ethnicity: str | None
    age: str | None
    status: str
    image_count: int
    steps: int
    lora_rank: int
    trigger_word: str
    error: str | None
    webhook_url: str | None
    webhook_events: str
    stage: str
    next_run_at: float
    lease_owner: str | None
    lease_expires: float | None
    attempts_used: int
    portable: bool
    artifact_id: str | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    archived_at: float | None
    updated_at: float
    crashes: int = 0
    trained_attempt_id: str | None = None
    sample_keys: list[str] | None = None
    preferred_provider: str | None = None


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner_kind: str
    owner_id: str
    seq: int
    provider: str
    provider_ref: str | None
    provider_trigger_word: str | None
    state: str
    progress: float | None
    error: str | None
    retryable: bool
    cost: float | None
    currency: str | None
    polls: int
    created_at: float
    submitted_at: float | None
    progressed_at: float | None
    finished_at: float | None
    lookups: int = 0
    fetches: int = 0
    hinted_at: float | None = None


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    lora_id: str
    sha256: str
    size: int
    format: str
    storage_key: str
    source_url: str | None
    created_at: float


class Job(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team_id: str
    user_id: str
    key_id: str
    lora_id: str
    model: str
    status: str
    progress: int | None
    input: dict[str, Any]
    error: str | None
    credit_cost: int
    webhook_url: str | None
    webhook_events: list[str] | None
    webhook_status: str | None
    stage: str
    next_run_at: float
    lease_owner: str | None
    lease_expires: float | None
    attempts_used: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    updated_at: float
    crashes: int = 0
    ignored_params: list[str] | None = None
    preferred_provider: str | None = None
    #: when its images were deleted (files.retention_days)
    expired_at: float | None = None


class JobImage(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    idx: int
    storage_key: str
    format: str
    width: int
    height: int


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    team_id: str
    amount: int
    reason: str
    ref: str
    kind: str
    created_at: float


def row_to(cls: type[msgspec.Struct], row: Any, **overrides: Any) -> Any:
    data = dict(row)
    data.update(overrides)
    return msgspec.convert(data, cls, strict=False)
