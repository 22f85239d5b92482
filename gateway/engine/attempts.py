"""One attempt runner for every operation: LoRA trainings and generation jobs.

A row (a lora or a job) moves through the same stages whichever operation it is::

    (preludes)  op-specific work before the first attempt (dataset preparation, job start)
    submit      pick a provider, record the attempt (and charge), send it
                → ambiguous: reconcile (look it up, or wait a bounded time for a callback)
    poll        ask the provider about the current attempt; stuck / past its deadline: give up
    finish      copy the results into gateway storage, then the terminal success
    done        READY / COMPLETED or FAILED, written once, with refunds and the webhook

A failed attempt (a submit error, a failed or stuck training, results that cannot be copied)
falls back to the next eligible provider within one budget per row (``engine.max_attempts``):
providers not tried yet come first, a provider that failed is tried again only after them and
at most once more, and never after a failure the adapter marked not retryable (the row then
fails). An attempt given up on while the vendor may still run it is cancelled durably (a
request row the engine works through, see ``gateway.engine.cancels``). Anything a superseded
attempt reports later is ignored: only the current attempt is ever polled or completed.

Each operation (:class:`Operation`) supplies only what differs: the provider calls, the row
fields, what success stores, what failure refunds. Every step raises a ``ProviderError`` or a
:class:`~gateway.engine.errors.StepError`; the worker counts anything else against the row's
crash budget (:meth:`Runner.crashed`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar, Collection

import anyio
import msgspec
import structlog

from gateway.config import EngineSettings
from gateway.context import Gateway
from gateway.engine.errors import LeaseLost, StepError
from gateway.health import OPERATIONS
from gateway.store import attempts as attempts_store
from gateway.store import queue as queue_store
from gateway.store import cancels as cancels_store
from gateway.store.models import Attempt
from gateway.timeutil import new_id, now
from providers.base import (
    Provider, ProviderError, ProviderOutcomeUnknown, ProviderRateLimited, ProviderTimeout, ProviderUnavailable,
)

log = structlog.get_logger()

#: tries to copy a finished attempt's results before the attempt counts as failed
FINISH_TRIES = 5
#: attempt states in which the vendor may be working on it (a cancel is owed when given up)
IN_FLIGHT = ("submitting", "ambiguous", "queued", "running")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Timing:
    stuck_after_s: float
    deadline_s: float
    min_poll_s: float
    max_poll_s: float

    def poll_delay(self, polls: int) -> float:
        """Exponential backoff between status polls, from min to max; ``polls`` counts the polls
        made in the attempt's current state, so the backoff restarts when the state changes."""
        return min(self.max_poll_s, self.min_poll_s * (2 ** min(polls, 16)))


def timing(e: EngineSettings, operation: str, provider: str) -> Timing:
    """The operation's timing for ``provider``: its override, else the operation's, else the engine's."""
    layers = [getattr(e.providers[provider], operation)] if provider in e.providers else []
    layers.append(getattr(e, operation))

    def pick(name: str, default: float) -> float:
        return next((v for v in (getattr(layer, name) for layer in layers) if v is not None), default)

    min_poll = pick("min_poll_interval_s", e.min_poll_interval_s)
    return Timing(
        stuck_after_s=pick("stuck_after_s", 3600), deadline_s=pick("deadline_s", 86_400),
        min_poll_s=min_poll, max_poll_s=max(min_poll, pick("max_poll_interval_s", e.max_poll_interval_s)),
    )


@dataclass
class Answer:
    """What a provider said about an attempt, in the same shape for every operation."""

    state: str  # queued | running | succeeded | failed
    ref: str | None = None
    progress: float | None = None
    trigger_word: str | None = None  # a vendor's own word (trainings)
    error: str | None = None
    retryable: bool = False
    raw: Any = None  # the provider's own status object (artifact URL, images)


@dataclass
class Polled:
    """A status request made ahead of the row's step (poll batches): the answer or the error."""

    attempt: Attempt
    provider: Provider
    answer: Answer | None = None
    error: ProviderError | None = None
    ms: float = 0.0


#: errors that say the provider itself is in trouble (they count against its health); a
#: rejection, an auth error or a failed job are about the request and never do
PROVIDER_SIDE = (ProviderUnavailable, ProviderTimeout, ProviderRateLimited, ProviderOutcomeUnknown)


def retry_after(e: BaseException) -> float | None:
    value = getattr(e, "retry_after", None)
    return float(value) if value else None


def new_attempt(kind: str, owner_id: str, seq: int, provider: Provider, cost: float, *,
                attempt_id: str | None = None) -> Attempt:
    """An attempt in state ``submitting``: recorded before the provider is called."""
    return Attempt(
        id=attempt_id or new_id(), owner_kind=kind, owner_id=owner_id, seq=seq, provider=provider.name,
        provider_ref=None, provider_trigger_word=None, state="submitting", progress=None, error=None,
        retryable=False, cost=cost, currency=provider.capabilities.cost.currency,
        polls=0, created_at=now(), submitted_at=None, progressed_at=None, finished_at=None,
    )


def choose(candidates: list[Provider], attempts: list[Attempt], unhealthy: Collection[str] = ()) -> Provider | None:
    """The next provider for a row, from ``candidates`` (eligible, in routing order): one not
    tried yet if any; else one tried once whose failure was retryable. Never a provider that
    may hold the work already (``unknown``) or that failed in a way the adapter called final.
    An ``unhealthy`` one (its breaker open) only when no other is left."""
    counts = Counter(a.provider for a in attempts)
    barred = {a.provider for a in attempts if a.state == "unknown" or (a.state == "failed" and not a.retryable)}
    pool = [p for p in candidates if p.name not in barred and counts[p.name] < 2]
    pool.sort(key=lambda p: (p.name in unhealthy, counts[p.name] > 0))  # stable: routing order within
    return pool[0] if pool else None


def summary(attempts: list[Attempt], limit: int = 500) -> str | None:
    """What happened on each failed attempt, for the row's ``error``."""
    failed = [a for a in attempts if a.error]
    if not failed:
        return None
    if len(failed) == 1:
        return failed[0].error[:limit]  # type: ignore[index]
    text = "; ".join(f"attempt {a.seq} ({a.provider}): {a.error}" for a in failed)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- operations


Handler = Callable[["Runner", Any], Awaitable[bool]]


class Operation(ABC):
    """What one operation (training, generation) supplies to the runner."""

    kind: ClassVar[str]  # the row kind: 'lora' | 'job' (attempts.owner_kind)
    name: ClassVar[str]  # 'training' | 'generation' (timing, logs)
    active: ClassVar[tuple[str, ...]]  # row statuses in which work remains
    no_provider: ClassVar[str]  # the error when no configured provider is eligible
    results: ClassVar[str]  # what finish copies, for messages ("the trained weights")

    #: op-specific stages run before ``submit`` (stage name -> handler)
    preludes: dict[str, Handler] = {}

    # -- rows
    @abstractmethod
    async def load(self, conn: Any, row_id: str) -> Any: ...

    @abstractmethod
    async def write(self, conn: Any, row: Any, owner: str, **fields: Any) -> None:
        """Update the row if ``owner`` still holds its lease, else raise LeaseLost."""

    # -- routing
    @abstractmethod
    async def candidates(self, gw: Gateway, row: Any) -> list[Provider]:
        """Eligible providers in routing order (may raise StepError: nothing can serve it)."""

    def cost(self, provider: Provider, row: Any) -> float:
        return 0.0

    async def record(self, conn: Any, row: Any, attempt: Attempt) -> dict[str, Any]:
        """In the transaction that records a new attempt (charges); row fields to write with it.
        Raise StepError to fail the row instead (nothing is written)."""
        return {}

    # -- provider calls
    @abstractmethod
    async def send(self, gw: Gateway, row: Any, provider: Provider, attempt: Attempt) -> Answer: ...

    @abstractmethod
    async def lookup(self, provider: Provider, attempt_id: str) -> Answer | None: ...

    @abstractmethod
    async def status(self, provider: Provider, ref: str) -> Answer: ...

    @abstractmethod
    async def cancel(self, provider: Provider, ref: str) -> None: ...

    # -- what the row shows
    def accepted_fields(self, row: Any, provider: Provider) -> dict[str, Any]:
        """Row fields to write when ``provider`` accepts an attempt."""
        return {}

    def running_fields(self, row: Any, answer: Answer) -> dict[str, Any]:
        """Row fields a "still running" answer changes (empty: nothing the client sees)."""
        return {}

    async def on_running(self, conn: Any, row: Any, fields: dict[str, Any]) -> None:
        """In the transaction that wrote ``running_fields`` (e.g. queue a progress webhook)."""

    # -- terminal states
    @abstractmethod
    async def finish(self, runner: "Runner", row: Any, provider: Provider, attempt: Attempt, answer: Answer) -> None:
        """Copy the results into storage and write the terminal success (lease-conditioned).
        Raise ProviderError or StepError if the results cannot be copied (retried)."""

    @abstractmethod
    async def failed(self, conn: Any, row: Any, owner: str, error: str) -> None:
        """Write FAILED, the refunds the row's state owes and the webhook, in ``conn``'s transaction."""

    async def after_terminal(self, gw: Gateway, row_id: str) -> None:
        """Clean up once the row is terminal (work directories)."""


# --------------------------------------------------------------------------- the runner


@dataclass
class Runner:
    gw: Gateway
    op: Operation
    owner: str
    _stages: dict[str, Handler] = field(init=False)

    def __post_init__(self) -> None:
        self._stages = {"submit": Runner._submit, "poll": Runner._poll, "finish": Runner._finish, **self.op.preludes}

    @property
    def engine(self) -> EngineSettings:
        return self.gw.settings.engine

    def timing(self, provider: str) -> Timing:
        return timing(self.engine, self.op.name, provider)

    @property
    def operation(self) -> str:
        return OPERATIONS[self.op.kind]

    async def health(self, provider: Provider, error: BaseException | None = None, started: float | None = None) -> None:
        """Feed the shared breaker with what a real call showed: provider-side trouble is a
        failure; any answer (even "that job failed") is a success; a rejection is neither."""
        ms = (time.monotonic() - started) * 1000 if started is not None else None
        if ms is not None and (error is None or isinstance(error, PROVIDER_SIDE)):
            self.gw.metrics.call_observed(provider.name, self.operation, error is None, ms / 1000)
        if error is None:
            await self.gw.health.record(provider.name, self.operation, ok=True, duration_ms=ms)
        elif isinstance(error, PROVIDER_SIDE):
            await self.gw.health.record(provider.name, self.operation, ok=False, duration_ms=ms)

    async def _open_breakers(self) -> set[str]:
        return {name for name, state in (await self.gw.health.states(self.operation)).items() if state == "open"}

    async def read(self, row_id: str) -> Any:
        async with self.gw.db.read() as conn:
            return await self.op.load(conn, row_id)

    async def attempts(self, row_id: str) -> list[Attempt]:
        async with self.gw.db.read() as conn:
            return await attempts_store.attempts_for(conn, self.op.kind, row_id)

    async def current(self, row_id: str) -> Attempt | None:
        async with self.gw.db.read() as conn:
            return await attempts_store.current_attempt(conn, self.op.kind, row_id)

    async def release(self, row: Any, delay: float, **fields: Any) -> None:
        """Write ``fields`` and hand the row back until ``delay`` from now."""
        async with self.gw.db.tx() as conn:
            await self.op.write(conn, row, self.owner, next_run_at=now() + delay, lease_owner=None,
                                lease_expires=None, **fields)

    # ------------------------------------------------------------------ stepping

    async def step(self, row_id: str, claimed: Any = None, polled: Polled | None = None) -> None:
        """Run a leased row's steps until it waits or ends. ``claimed`` is the row as the claim
        returned it (saves a read); ``polled`` an answer a poll batch already got for it."""
        while True:
            row, claimed = (claimed, None) if claimed is not None else (await self.read(row_id), None)
            if row is None or row.lease_owner != self.owner or row.status not in self.op.active:
                return
            handler = self._stages.get(row.stage)
            if handler is None:
                raise RuntimeError(f"{self.op.kind} {row.id} has unknown stage {row.stage!r}")
            with structlog.contextvars.bound_contextvars(**{f"{self.op.kind}_id": row.id, "stage": row.stage}):
                if polled is not None and row.stage == "poll":
                    again = await self._poll(row, polled)
                else:
                    again = await handler(self, row)
            polled = None
            if not again:
                return

    # ------------------------------------------------------------------ submit / reconcile

    async def _submit(self, row: Any) -> bool:
        attempts = await self.attempts(row.id)
        current = attempts[-1] if attempts else None
        if current is not None and current.state in ("submitting", "ambiguous"):
            return await self._reconcile(row, current)
        if current is not None and current.state in ("queued", "running") and current.provider_ref:
            # an ambiguous submission a provider callback resolved: poll it
            provider = self.gw.providers.get(current.provider)
            async with self.gw.db.tx() as conn:
                await self.op.write(conn, row, self.owner, stage="poll", next_run_at=now(),
                                    **(self.op.accepted_fields(row, provider) if provider else {}))
            return True
        if len(attempts) >= self.engine.max_attempts:
            await self.fail(row, summary(attempts) or self.op.no_provider)
            return False
        try:
            candidates = await self.op.candidates(self.gw, row)
        except StepError as e:
            await self.fail(row, e.message)
            return False
        unhealthy = await self._open_breakers()
        provider, attempt_id = choose(candidates, attempts, unhealthy), new_id()
        while provider is not None and await self.gw.health.state(provider.name, self.operation) in ("half-open", "probing"):
            # its breaker lets one probe through at a time: this attempt, or another instance
            if await self.gw.health.claim_probe(provider.name, self.operation, attempt_id):
                log.info("breaker_probe", provider=provider.name)
                break
            candidates = [c for c in candidates if c is not provider]
            if choose(candidates, attempts, unhealthy) is None:  # nothing else can serve it: wait for the probe
                await self.release(row, self.timing(provider.name).min_poll_s)
                return False
            provider = choose(candidates, attempts, unhealthy)
        if provider is None:
            await self.fail(row, summary(attempts) or self.op.no_provider)
            return False
        attempt = new_attempt(self.op.kind, row.id, len(attempts) + 1, provider, self.op.cost(provider, row),
                              attempt_id=attempt_id)
        try:
            async with self.gw.db.tx() as conn:
                extra = await self.op.record(conn, row, attempt)
                await attempts_store.insert_attempt(conn, attempt)
                await self.op.write(conn, row, self.owner, attempts_used=len(attempts) + 1, **extra)
        except StepError as e:
            await self.fail(row, e.message)
            return False
        return await self._send(row, provider, attempt)

    async def _send(self, row: Any, provider: Provider, attempt: Attempt) -> bool:
        log.info(f"{self.op.name}_submitting", provider=provider.name, attempt=attempt.seq)
        started = time.monotonic()
        try:
            answer = await self.op.send(self.gw, row, provider, attempt)
            await self.health(provider, None, started)
        except ProviderOutcomeUnknown as e:
            await self.health(provider, e, started)
            # it may have been accepted: reconcile, never resend at once
            log.warning("submission_ambiguous", provider=provider.name, error=e.message)
            t = self.timing(provider.name)
            async with self.gw.db.tx() as conn:
                await attempts_store.update_attempt(conn, attempt.id, state="ambiguous", error=e.message[:500],
                                          submitted_at=now())
                await self.op.write(conn, row, self.owner, next_run_at=now() + t.min_poll_s, lease_owner=None,
                                    lease_expires=None)
            return False
        except (ProviderError, StepError) as e:
            await self.health(provider, e, started)
            log.warning("provider_call_failed", provider=provider.name, call=f"submit {self.op.name}",
                        error=e.message, retryable=e.retryable)
            return await self._attempt_failed(row, attempt, e.message, e.retryable, delay=retry_after(e))
        return await self._accepted(row, provider, attempt, answer)

    async def _accepted(self, row: Any, provider: Provider, attempt: Attempt, answer: Answer) -> bool:
        """The provider has the attempt (it said so on submit, on a lookup, or it finished inline)."""
        if answer.state == "failed":
            log.info(f"{self.op.name}_failed", provider=provider.name, error=answer.error, retryable=answer.retryable)
            return await self._attempt_failed(row, attempt, answer.error or f"the {self.op.name} failed",
                                              answer.retryable)
        done = answer.state == "succeeded"
        ref = answer.ref or attempt.provider_ref
        t = now()
        try:
            async with self.gw.db.tx() as conn:
                await attempts_store.update_attempt(
                    conn, attempt.id, provider_ref=ref, provider_trigger_word=answer.trigger_word,
                    state=answer.state, progress=1.0 if done else answer.progress, polls=0,
                    submitted_at=attempt.submitted_at or t, progressed_at=t, finished_at=t if done else None,
                )
                fields = self.op.accepted_fields(row, provider)
                if done:
                    await self.op.write(conn, row, self.owner, stage="finish", **fields)
                else:
                    await self.op.write(
                        conn, row, self.owner, stage="poll", next_run_at=t + self.timing(provider.name).min_poll_s,
                        lease_owner=None, lease_expires=None, **fields,
                    )
        except LeaseLost:
            await self._orphaned(attempt, ref)
            raise
        log.info(f"{self.op.name}_submitted", provider=provider.name, provider_ref=ref, finished=done)
        if done:
            return await self._finish(await self.read(row.id), answer)
        return False

    async def _orphaned(self, attempt: Attempt, ref: str | None) -> None:
        """A provider accepted an attempt whose row we no longer hold (archived, or taken over
        after our lease expired): record the ref, and cancel the vendor's job unless the row
        still wants this attempt."""
        async with self.gw.db.tx() as conn:
            if ref:
                await attempts_store.fill_ref(conn, attempt.id, ref)
            row = await self.op.load(conn, attempt.owner_id)
            current = await attempts_store.current_attempt(conn, self.op.kind, attempt.owner_id)
            wanted = (row is not None and row.status in self.op.active and current is not None
                      and current.id == attempt.id and current.state in IN_FLIGHT)
            if not wanted:
                await cancels_store.request_cancel(conn, attempt, "its work was no longer wanted", ref=ref)
        if not wanted:
            log.info("orphan_cancel_requested", provider=attempt.provider, provider_ref=ref)
            self.gw.wake()

    async def _reconcile(self, row: Any, attempt: Attempt) -> bool:
        """The attempt may be at the provider, but we never heard (a crash mid-send, or an
        ambiguous answer). Look it up where the provider can; else wait, a bounded time, for its
        callback; else count it unknown and never send this work there again."""
        provider = self.gw.providers.get(attempt.provider)
        if provider is None:
            return await self._attempt_failed(row, attempt, f"provider {attempt.provider!r} is no longer configured",
                                              True, unknown=True)
        caps = provider.capabilities
        if caps.can_lookup:
            try:
                found = await self.op.lookup(provider, attempt.id)
            except ProviderError as e:
                lookups = attempt.lookups + 1
                log.warning("provider_call_failed", provider=provider.name, call="lookup", error=e.message, tries=lookups)
                if lookups >= self.engine.reconcile_tries:
                    return await self._attempt_failed(
                        row, attempt, f"submission outcome unknown: the provider could not be asked ({e.message})",
                        True, unknown=True)
                t = self.timing(provider.name)
                async with self.gw.db.tx() as conn:
                    await attempts_store.update_attempt(conn, attempt.id, lookups=lookups)
                    await self.op.write(conn, row, self.owner, lease_owner=None, lease_expires=None,
                                        next_run_at=now() + (retry_after(e) or t.poll_delay(lookups)))
                return False
            log.info("submission_reconciled", provider=provider.name, found=found is not None)
            if found is None:  # it never arrived: send it now (same attempt id, so idempotent)
                return await self._send(row, provider, attempt)
            return await self._accepted(row, provider, attempt, found)
        waited = now() - (attempt.submitted_at or attempt.created_at)
        if caps.callbacks_name_attempts and attempt.state == "ambiguous" and waited < self.engine.reconcile_wait_s:
            # a callback naming this attempt resolves it (gateway.api.hooks); until then, wait
            t = self.timing(provider.name)
            await self.release(row, min(t.max_poll_s, self.engine.reconcile_wait_s - waited))
            return False
        reason = attempt.error if attempt.state == "ambiguous" else None
        return await self._attempt_failed(
            row, attempt, f"submission outcome unknown: {reason}" if reason else "submission outcome unknown after an interruption",
            True, unknown=True)

    # ------------------------------------------------------------------ poll

    async def _poll(self, row: Any, polled: Polled | None = None) -> bool:
        if polled is None:
            attempt = await self.current(row.id)
            if attempt is None or not attempt.provider_ref:
                raise RuntimeError(f"{self.op.kind} {row.id} is polling without a submitted attempt")
            provider = self.gw.providers.get(attempt.provider)
            if provider is None:
                return await self._attempt_failed(row, attempt, f"provider {attempt.provider!r} is no longer configured",
                                                  True)
            polled = Polled(attempt, provider)
            started = time.monotonic()
            try:
                polled.answer = await self.op.status(provider, attempt.provider_ref)
            except ProviderError as e:
                polled.error = e
            await self.health(provider, polled.error, started)
        attempt, provider = polled.attempt, polled.provider
        if polled.error is not None:
            return await self._poll_error(row, attempt, provider, polled.error)
        answer = polled.answer
        assert answer is not None
        if answer.state == "succeeded":
            async with self.gw.db.tx() as conn:
                await attempts_store.update_attempt(conn, attempt.id, state="succeeded", progress=1.0, finished_at=now(), polls=0)
                await self.op.write(conn, row, self.owner, stage="finish")
            log.info(f"{self.op.name}_succeeded", provider=provider.name)
            return await self._finish(await self.read(row.id), answer)
        if answer.state == "failed":
            log.info(f"{self.op.name}_failed", provider=provider.name, error=answer.error, retryable=answer.retryable)
            return await self._attempt_failed(row, attempt, answer.error or f"the {self.op.name} failed", answer.retryable)
        update = self.running_update(row, attempt, answer)
        if update is None:
            return await self._stuck(row, attempt, provider)
        fields = self.op.running_fields(row, answer)
        async with self.gw.db.tx() as conn:
            if fields:
                await self.op.write(conn, row, self.owner, **fields)
                await self.op.on_running(conn, row, fields)
            await queue_store.apply_running_polls(conn, self.op.kind, self.owner, [update])
        if fields:
            self.gw.wake_deliveries()
        return False

    def running_update(self, row: Any, attempt: Attempt, answer: Answer) -> dict[str, Any] | None:
        """The writes for a "still queued/running" answer, or None when the attempt is stuck
        (no progress for ``stuck_after_s``) or past its deadline."""
        t, timing_ = now(), self.timing(attempt.provider)
        changed = answer.state != attempt.state
        progressed = changed or (answer.progress is not None and (attempt.progress is None or answer.progress > attempt.progress))
        last = t if progressed else (attempt.progressed_at or attempt.submitted_at or attempt.created_at)
        if t - last > timing_.stuck_after_s or t - (attempt.submitted_at or attempt.created_at) > timing_.deadline_s:
            return None
        polls = 0 if changed else attempt.polls + 1
        return {
            "attempt_id": attempt.id, "owner_id": row.id, "state": answer.state, "polls": polls,
            "progress": answer.progress if answer.progress is not None else attempt.progress,
            "progressed_at": last,
            # counted from the time it was due, not from now: a poll made a little early
            # (batching) still leaves a whole interval before the next one
            "next_run_at": max(t, row.next_run_at) + timing_.poll_delay(polls),
        }

    async def _poll_error(self, row: Any, attempt: Attempt, provider: Provider, e: ProviderError) -> bool:
        log.warning("provider_call_failed", provider=provider.name, call=f"{self.op.name} status", error=e.message,
                    retryable=e.retryable)
        t = self.timing(provider.name)
        since_progress = now() - (attempt.progressed_at or attempt.submitted_at or attempt.created_at)
        since_submit = now() - (attempt.submitted_at or attempt.created_at)
        if since_progress > t.stuck_after_s or since_submit > t.deadline_s:
            return await self._stuck(row, attempt, provider)
        if not e.retryable:  # it cannot report on this attempt any more: move on elsewhere
            return await self._attempt_failed(row, attempt, e.message, True, cancel=True)
        polls = attempt.polls + 1
        async with self.gw.db.tx() as conn:
            await attempts_store.update_attempt(conn, attempt.id, polls=polls)
            await self.op.write(conn, row, self.owner, next_run_at=now() + (retry_after(e) or t.poll_delay(polls)),
                                lease_owner=None, lease_expires=None)
        return False

    async def _stuck(self, row: Any, attempt: Attempt, provider: Provider) -> bool:
        t = self.timing(provider.name)
        since_submit = now() - (attempt.submitted_at or attempt.created_at)
        if since_submit > t.deadline_s:
            why = f"{provider.name}: still not finished {t.deadline_s:g} s after it was submitted"
        else:
            why = f"{provider.name}: no progress for {t.stuck_after_s:g} s"
        log.warning("attempt_stuck", provider=provider.name, reason=why)
        return await self._attempt_failed(row, attempt, why, True, cancel=True, outcome="stuck")

    # ------------------------------------------------------------------ finish

    async def _finish(self, row: Any, answer: Answer | None = None) -> bool:
        if row is None or row.lease_owner != self.owner or row.status not in self.op.active:
            return False
        attempt = await self.current(row.id)
        assert attempt is not None and attempt.provider_ref is not None
        provider = self.gw.providers.get(attempt.provider)
        if provider is None:
            return await self._attempt_failed(row, attempt, f"provider {attempt.provider!r} is no longer configured", True)
        try:
            if answer is None:  # a later try: ask again (the results are not stored in the row)
                answer = await self.op.status(provider, attempt.provider_ref)
                if answer.state != "succeeded":
                    raise StepError(f"the provider no longer reports a finished {self.op.name}", retryable=True)
            await self.op.finish(self, row, provider, attempt, answer)
        except (ProviderError, StepError) as e:
            fetches = attempt.fetches + 1
            log.warning("results_copy_failed", provider=provider.name, error=e.message, tries=fetches)
            if e.retryable and fetches < FINISH_TRIES:  # copy again later; another attempt is the last resort
                async with self.gw.db.tx() as conn:
                    await attempts_store.update_attempt(conn, attempt.id, fetches=fetches)
                    await self.op.write(
                        conn, row, self.owner, lease_owner=None, lease_expires=None,
                        next_run_at=now() + (retry_after(e) or self.timing(provider.name).poll_delay(fetches)),
                    )
                return False
            return await self._attempt_failed(row, attempt, f"{self.op.results} could not be copied: {e.message}", True)
        self.gw.metrics.attempts.labels(provider.name, self.operation, "succeeded").inc()
        self.gw.wake_deliveries()
        await self.op.after_terminal(self.gw, row.id)
        return False

    # ------------------------------------------------------------------ failure, fallback

    async def _attempt_failed(
        self, row: Any, attempt: Attempt, error: str, retryable: bool, *,
        delay: float | None = None, unknown: bool = False, cancel: bool = False, outcome: str = "failed",
    ) -> bool:
        """Close an attempt; fall back within the budget when the failure allows it, else fail
        the row. ``unknown``: the provider may hold the work but cannot be asked (it is never
        sent the work again). ``cancel``: the vendor may still be running it (stuck, or it can
        no longer report on it): a durable cancel request goes with the close."""
        state = "unknown" if unknown else "failed"
        closed = msgspec.structs.replace(attempt, state=state, retryable=retryable, error=error[:500])
        attempts = [closed if a.id == attempt.id else a for a in await self.attempts(row.id)]
        nxt: Provider | None = None
        if retryable and len(attempts) < self.engine.max_attempts:
            try:
                nxt = choose(await self.op.candidates(self.gw, row), attempts, await self._open_breakers())
            except StepError:
                nxt = None
        wait = delay or 0.0
        if nxt is not None and not delay and any(a.provider == nxt.name for a in attempts):
            tries = sum(a.provider == nxt.name for a in attempts)
            wait = self.engine.retry_backoff_s * 2 ** (tries - 1)  # the same provider again: back off
        async with self.gw.db.tx() as conn:
            await attempts_store.update_attempt(conn, attempt.id, state=state, error=error[:500], retryable=retryable,
                                      finished_at=now())
            if cancel:
                await cancels_store.request_cancel(conn, closed, "superseded: " + error[:200])
            if nxt is not None:
                await self.op.write(conn, row, self.owner, stage="submit", next_run_at=now() + wait,
                                    lease_owner=None, lease_expires=None)
            else:
                await self._fail_in(conn, row, summary(attempts) or error)
        if cancel:
            self.gw.wake()
        self.gw.metrics.attempts.labels(attempt.provider, self.operation, "unknown" if unknown else outcome).inc()
        if nxt is not None:
            self.gw.metrics.fallbacks.labels(attempt.provider, self.operation).inc()
            log.info("attempt_fallback", provider=attempt.provider, next_provider=nxt.name, error=error, wait_s=wait)
            return False
        log.info(f"{self.op.kind}_failed", error=summary(attempts) or error)
        await self.op.after_terminal(self.gw, row.id)
        return False

    async def fail(self, row: Any, error: str) -> None:
        """End the row FAILED (with the refunds its state owes), cancelling an attempt in flight."""
        async with self.gw.db.tx() as conn:
            await self._fail_in(conn, row, error)
        log.info(f"{self.op.kind}_failed", error=error)
        await self.op.after_terminal(self.gw, row.id)

    async def _fail_in(self, conn: Any, row: Any, error: str) -> None:
        current = await attempts_store.current_attempt(conn, self.op.kind, row.id)
        if current is not None and current.state in IN_FLIGHT:
            await attempts_store.update_attempt(conn, current.id, state="failed", error=("abandoned: " + error)[:500],
                                      finished_at=now())
            await cancels_store.request_cancel(conn, current, "its row failed")
            self.gw.wake()
        await self.op.failed(conn, row, self.owner, error[:500])
        self.gw.wake_deliveries()  # (it runs once this transaction has committed)

    # ------------------------------------------------------------------ crashes

    async def crashed(self, row_id: str, exc: BaseException) -> None:
        """A step raised something unexpected: count it. Within the budget, retry later with
        backoff; past ``engine.max_crashes``, end the row FAILED with its refunds."""
        row = await self.read(row_id)
        if row is None or row.lease_owner != self.owner or row.status not in self.op.active:
            return
        crashes = row.crashes + 1
        e = self.engine
        if crashes < e.max_crashes:
            await self.release(row, min(3600.0, e.crash_backoff_s * 2 ** (crashes - 1)), crashes=crashes)
            return
        async with self.gw.db.tx() as conn:  # counted first, so even a failing fail() makes progress
            await self.op.write(conn, row, self.owner, crashes=crashes)
        message = (f"internal error: processing this {'LoRA' if self.op.kind == 'lora' else 'job'} failed "
                   f"{crashes} times ({type(exc).__name__}); the gateway's log has the details")
        try:
            await self.fail(row, message)
        except LeaseLost:
            raise
        except Exception:  # the failure path itself is broken: still end the row, loudly
            log.exception(f"{self.op.kind}_fail_crashed")
            async with self.gw.db.tx() as conn:
                await queue_store.update_row(conn, self.op.kind, row.id, status="FAILED", stage="done", error=message,
                                      completed_at=now(), lease_owner=None, lease_expires=None)

    # ------------------------------------------------------------------ poll batches

    async def _batch_health(self, polls: Any) -> None:
        """A batch's outcomes per provider, fed to the breaker in one go: a provider-side failure
        counts (each one), else one success (which costs no write while it is healthy)."""
        per: dict[str, tuple[Provider, int, int, float]] = {}
        for p in polls:
            provider, ok, bad, ms = per.get(p.provider.name, (p.provider, 0, 0, 0.0))
            side = isinstance(p.error, PROVIDER_SIDE)
            per[p.provider.name] = (provider, ok + (p.error is None), bad + side, ms + p.ms)
        for provider, ok, bad, ms in per.values():
            if bad:
                await self.gw.health.record(provider.name, self.operation, ok=False, failures=bad, calls=ok + bad,
                                            duration_ms=ms)
            elif ok:
                await self.gw.health.record(provider.name, self.operation, ok=True, calls=ok, duration_ms=ms)

    async def poll_many(self, rows: list[Any], limiter: anyio.CapacityLimiter) -> list[tuple[Any, Polled | None]]:
        """Poll many leased rows at once (each status request takes a slot of ``limiter``) and
        write every plain "still running" answer in one transaction, the common case, so
        10,000 trainings in flight stay cheap. Returns the rows that need their full step,
        with the answer already fetched."""
        async with self.gw.db.read() as conn:
            current = {a.owner_id: a for a in await attempts_store.current_attempts(conn, self.op.kind, [r.id for r in rows])}
        polled: dict[str, Polled] = {}

        async def one(row: Any) -> None:
            attempt = current.get(row.id)
            provider = self.gw.providers.get(attempt.provider) if attempt else None
            if attempt is None or provider is None or not attempt.provider_ref:
                return
            p = Polled(attempt, provider)
            async with limiter:
                started = time.monotonic()
                try:
                    p.answer = await self.op.status(provider, attempt.provider_ref)
                except ProviderError as e:
                    p.error = e
                p.ms = (time.monotonic() - started) * 1000
            polled[row.id] = p

        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(one, row)
        await self._batch_health(polled.values())
        running, rest = [], []
        for row in rows:
            p = polled.get(row.id)
            update = None
            if p is not None and p.answer is not None and p.answer.state in ("queued", "running") \
                    and not self.op.running_fields(row, p.answer):
                update = self.running_update(row, p.attempt, p.answer)
            (running.append(update) if update is not None else rest.append((row, p)))
        if running:
            async with self.gw.db.tx() as conn:
                await queue_store.apply_running_polls(conn, self.op.kind, self.owner, running)
        return rest
