"""The engine: lease due rows, run their steps within one cap, keep leases alive, stay up.

The database is the queue. Any number of processes may run an Engine on the same database; a
row is worked on by whoever holds its lease. Leases are renewed while a step runs, released
when it ends, and expire if the process dies, so another process (or the restarted one)
takes over.

Loops, each supervised (a database error is logged, shown on ``/readyz`` and retried with
backoff; a loop never dies of one):

- steps: claims due rows (both kinds, every stage but ``poll``) and due cancel requests, up to
  ``engine.concurrency`` at once, woken by new work or every ``poll_interval_s``;
- polls: every half second or so, claims the polls due now or within a short look-ahead as
  one batch (up to 500), so thousands of rows in flight are polled in a few large batches;
- housekeeping: renews leases, beats this process's heartbeat row, purges old idempotency keys;
- webhook deliveries (``gateway.webhooks.Deliverer``).

``engine.concurrency`` is a cap on everything that calls a provider: every step and every
status request of a poll batch holds one of its slots.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Awaitable, Callable

import anyio
import anyio.abc
import structlog

from gateway import retention

from gateway.context import Gateway
from gateway.engine.attempts import Polled, Runner
from gateway.engine.cancels import work_cancel
from gateway.engine.errors import LeaseLost
from gateway.engine.jobs import GENERATION
from gateway.engine.loras import TRAINING
from gateway.services.idempotency import TTL_S as IDEMPOTENCY_TTL_S
from gateway.store import deliveries as deliveries_store
from gateway.store import idempotency as idempotency_store
from gateway.store import queue as queue_store
from gateway.store import cancels as cancels_store
from gateway.store import workers as workers_store
from gateway.store.cancels import CancelRequest
from gateway.timeutil import now
from gateway.webhooks import Deliverer

log = structlog.get_logger()

#: polls claimed together (one task, one write transaction for the "still running" answers)
POLL_BATCH = 500
#: how much earlier than due a poll may be made, so polls gather into batches
POLL_LOOKAHEAD_S = 1.0
#: the most often poll batches are claimed
POLL_BATCH_EVERY_S = 0.5
#: cancel requests worked on at once (they share the step slots)
CANCELS_AT_ONCE = 4
#: how often expired idempotency keys and stale heartbeat rows are purged
PURGE_EVERY_S = 600.0


def heartbeat_interval(lease_s: float) -> float:
    return min(10.0, lease_s / 3)


def engine_stale_after(lease_s: float) -> float:
    """An engine whose heartbeat is older than this is not running (a few lease periods)."""
    return 3 * lease_s


class Engine:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        e = gw.settings.engine
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.runners = {op.kind: Runner(gw, op, self.owner) for op in (TRAINING, GENERATION)}
        self._slots = anyio.CapacityLimiter(e.concurrency)
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._leased: set[tuple[str, str]] = set()  # rows this process holds (stepping or in a poll batch)
        self._stepping: set[tuple[str, str]] = set()  # rows in (or waiting for) a step slot
        self._rerun: set[tuple[str, str]] = set()
        self._cancelling: set[str] = set()
        self.faults: dict[str, tuple[float, str]] = {}  # loop -> (when, what) while it is failing
        self.started_at = now()
        self.ready = False
        self.deliverer = Deliverer(gw.db, gw.settings.webhooks, gw.webhook_client, self.owner,
                                   lease_s=max(e.lease_s, gw.settings.webhooks.timeout_s * 2),
                                   poll_interval_s=e.poll_interval_s)
        self.deliverer.on_outcome = lambda outcome: gw.metrics.webhooks.labels(outcome).inc()
        gw.signals.on("work", self.wake)
        gw.signals.on("deliveries", self.deliverer.notify)

    def wake(self) -> None:
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok``, or ``degraded`` with each failing loop's last error."""
        if not self.ready:
            return {"state": "not running"}
        faults = {name: f"{what} (since {time.strftime('%H:%M:%S', time.gmtime(when))}Z)"
                  for name, (when, what) in self.faults.items()}
        if self.deliverer.fault:
            faults["webhooks"] = self.deliverer.fault
        return {"state": "degraded", "faults": faults} if faults else {"state": "ok"}

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        e = self.gw.settings.engine
        log.info("engine_started", owner=self.owner, concurrency=e.concurrency)
        for name, provider in self.gw.providers.items():
            try:
                await provider.start()
            except Exception:  # noqa: BLE001 - one provider's start-up must not stop the engine
                log.exception("provider_start_failed", provider=name)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._supervised, "steps", self._step_loop)
                tg.start_soon(self._supervised, "polls", self._poll_loop)
                tg.start_soon(self._supervised, "housekeeping", self._housekeeping)
                tg.start_soon(self._supervised, "retention", self._retention)
                await tg.start(self.deliverer.run)
                self.ready = True
                task_status.started()
        finally:
            self.ready = False
            self.gw.signals.off("work", self.wake)
            self.gw.signals.off("deliveries", self.deliverer.notify)
            with anyio.CancelScope(shield=True):
                await self._release_all()
            log.info("engine_stopped", owner=self.owner)

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` forever: an exception is logged and shown on /readyz, then the loop is
        started again after a backoff (0.5 s doubling to 30 s). Only cancellation ends it."""
        delay = 0.5
        while True:
            try:
                await loop()
                return
            except Exception as exc:  # noqa: BLE001 - the engine must not die of one error
                self.faults[name] = (now(), f"{type(exc).__name__}: {str(exc)[:200]}")
                log.exception("engine_loop_failed", loop=name, retry_in_s=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _healthy(self, name: str) -> None:
        self.faults.pop(name, None)

    # ------------------------------------------------------------------ steps

    async def _step_loop(self) -> None:
        e = self.gw.settings.engine
        while True:
            free = e.concurrency - len(self._stepping)
            if free > 0:
                for kind, row in await self._claim(free):
                    self._start_step(kind, row)
            free_cancels = min(CANCELS_AT_ONCE - len(self._cancelling), e.concurrency - len(self._stepping))
            if free_cancels > 0:
                async with self.gw.db.tx() as conn:
                    requests = await cancels_store.claim_cancels(conn, owner=self.owner, lease_s=e.lease_s,
                                                                 limit=free_cancels)
                for req in requests:
                    self._cancelling.add(req.attempt_id)
                    self._task_group.start_soon(self._run_cancel, req)
            self._healthy("steps")
            with anyio.move_on_after(e.poll_interval_s):
                await self._wake.wait()
            self._wake = anyio.Event()

    @property
    def _task_group(self) -> anyio.abc.TaskGroup:
        assert self._tg is not None
        return self._tg

    async def _claim(self, limit: int) -> list[tuple[str, Any]]:
        """Due rows for per-row steps (polls excepted: see _poll_loop)."""
        lease = self.gw.settings.engine.lease_s
        async with self.gw.db.tx() as conn:
            jobs_due = await queue_store.claim_due(conn, "job", owner=self.owner, lease_s=lease, limit=limit, skip_stage="poll")
            loras_due = await queue_store.claim_due(conn, "lora", owner=self.owner, lease_s=lease, limit=limit - len(jobs_due),
                                             skip_stage="poll")
        return [("job", j) for j in jobs_due] + [("lora", lo) for lo in loras_due]

    def _start_step(self, kind: str, row: Any, polled: Polled | None = None) -> None:
        key = (kind, row.id)
        if key in self._stepping:
            # its task released it a moment ago and is still finishing: that task runs it
            # again, so one row never runs twice at once
            self._rerun.add(key)
            return
        self._leased.add(key)
        self._stepping.add(key)
        self._task_group.start_soon(self._run_one, kind, row, polled)

    async def _run_one(self, kind: str, row: Any, polled: Polled | None = None) -> None:
        """Run a leased row's steps, holding a slot. Every step ends by writing its row with the
        lease released (or finds the row is no longer its own), so nothing is released here on a
        normal return."""
        key, runner = (kind, row.id), self.runners[kind]
        try:
            async with self._slots:
                claimed = row
                while True:
                    try:
                        await runner.step(row.id, claimed, polled)
                    except LeaseLost:
                        log.info("lease_lost", kind=kind, id=row.id)
                    except Exception as exc:  # noqa: BLE001 - counted against the row's crash budget
                        log.exception("engine_step_crashed", kind=kind, id=row.id)
                        await runner.crashed(row.id, exc)
                    if key not in self._rerun:
                        break
                    self._rerun.discard(key)
                    claimed, polled = None, None  # re-read: it was claimed again while this task finished
        except Exception:  # noqa: BLE001 - the crash handler itself failed (database): the lease expires
            log.exception("engine_crash_handler_failed", kind=kind, id=row.id)
        finally:
            self._rerun.discard(key)
            self._stepping.discard(key)
            self._leased.discard(key)
            self._wake.set()

    async def _run_cancel(self, req: CancelRequest) -> None:
        try:
            async with self._slots:
                await work_cancel(self.gw, self.runners[req.owner_kind].op, req, self.owner)
        except Exception:  # noqa: BLE001 - the request's lease expires and it is tried again
            log.exception("cancel_crashed", attempt_id=req.attempt_id)
        finally:
            self._cancelling.discard(req.attempt_id)

    # ------------------------------------------------------------------ polls

    def _poll_period(self) -> float:
        e = self.gw.settings.engine
        fastest = min([e.min_poll_interval_s] + [
            v for op in ("training", "generation") for v in [getattr(e, op).min_poll_interval_s] if v is not None
        ])
        return min(POLL_BATCH_EVERY_S, fastest / 2)

    async def _poll_loop(self) -> None:
        """Claim the polls due now (or within the look-ahead) as one batch, at most every
        ``_poll_period()``; a batch's status requests share the step slots."""
        e = self.gw.settings.engine
        period = self._poll_period()
        lookahead = min(POLL_LOOKAHEAD_S, period / 2)
        while True:
            started = time.monotonic()
            async with self.gw.db.tx() as conn:
                batches = {}
                for kind in ("job", "lora"):
                    batches[kind] = await queue_store.claim_due(conn, kind, owner=self.owner, lease_s=e.lease_s,
                                                         limit=POLL_BATCH, only_stage="poll", lookahead_s=lookahead)
            for kind, rows in batches.items():
                if rows:
                    self._leased.update((kind, r.id) for r in rows)
                    await self._run_polls(kind, rows)
            self._healthy("polls")
            await anyio.sleep(max(0.0, period - (time.monotonic() - started)))

    async def _run_polls(self, kind: str, rows: list[Any]) -> None:
        """Poll a batch; the answers that need more than "still running" continue as steps."""
        try:
            rest = await self.runners[kind].poll_many(rows, self._slots)
        except Exception:  # noqa: BLE001 - the rows go back to ordinary steps (a fresh poll each)
            log.exception("engine_poll_batch_crashed", kind=kind, size=len(rows))
            rest = [(row, None) for row in rows]
        needs_step = {row.id for row, _ in rest}
        for row in rows:
            if row.id not in needs_step:
                self._leased.discard((kind, row.id))
        for row, polled in rest:
            self._leased.discard((kind, row.id))
            self._start_step(kind, row, polled)

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        e = self.gw.settings.engine
        purged_at = 0.0
        while True:
            async with self.gw.db.tx() as conn:
                if self._leased:
                    await queue_store.renew_leases(conn, self.owner, e.lease_s, list(self._leased))
                if self._cancelling:
                    await cancels_store.renew_cancel_leases(conn, self.owner, e.lease_s, list(self._cancelling))
                await workers_store.beat(conn, self.owner, host=socket.gethostname(), pid=os.getpid(),
                                         started_at=self.started_at)
                if time.monotonic() - purged_at > PURGE_EVERY_S:
                    purged = await idempotency_store.idempotency_purge(conn, older_than=now() - IDEMPOTENCY_TTL_S)
                    await workers_store.purge(conn, older_than_s=86_400)
                    purged_at = time.monotonic()
                    if purged:
                        log.info("idempotency_keys_purged", count=purged)
            await self.gw.health.flush()
            self._healthy("housekeeping")
            await anyio.sleep(heartbeat_interval(e.lease_s))

    async def _retention(self) -> None:
        """The files sweep (gateway.retention): a minute after start, then every
        ``files.sweep_interval_s``."""
        await anyio.sleep(min(60.0, self.gw.settings.files.sweep_interval_s))
        while True:
            await retention.sweep(self.gw)
            self._healthy("retention")
            await anyio.sleep(self.gw.settings.files.sweep_interval_s)

    async def _release_all(self) -> None:
        try:
            async with self.gw.db.tx() as conn:
                await queue_store.release_owner(conn, self.owner)
                await cancels_store.release_cancels(conn, self.owner)
                await deliveries_store.release_deliveries(conn, self.owner)
                await workers_store.remove(conn, self.owner)
        except Exception:  # the database may already be closed on a hard stop
            log.warning("lease_release_failed", owner=self.owner, exc_info=True)
