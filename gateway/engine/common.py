"""What the LoRA and job steps share: the lease error, new attempts, the poll backoff."""

from __future__ import annotations

from gateway.config import EngineSettings
from gateway.store.models import Attempt
from gateway.timeutil import new_id, now
from providers.base import Provider


class LeaseLost(Exception):
    """The row was archived or taken over; the step's writes were rolled back."""


def new_attempt(kind: str, owner_id: str, seq: int, provider: Provider, cost: float) -> Attempt:
    """An attempt in state ``submitting``: recorded before the provider is called."""
    return Attempt(
        id=new_id(), owner_kind=kind, owner_id=owner_id, seq=seq, provider=provider.name,
        provider_ref=None, provider_trigger_word=None, state="submitting", progress=None, error=None,
        retryable=False, cost=cost, currency=provider.capabilities.cost.currency,
        polls=0, created_at=now(), submitted_at=None, progressed_at=None, finished_at=None,
    )


def poll_delay(e: EngineSettings, polls: int) -> float:
    """Exponential backoff between status polls, from min to max poll interval."""
    return min(e.max_poll_interval_s, e.min_poll_interval_s * (2 ** min(polls, 16)))
