"""The engine loop: lease due rows, run their steps with bounded concurrency, keep leases alive.

The database is the queue. Any number of processes may run an Engine on the same file; a
row is worked on by whoever holds its lease. Leases are renewed while a step runs, released
when it ends, and expire if the process dies, so another process (or the restarted one)
takes over.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import anyio
import structlog

from gateway.context import Gateway
from gateway.engine import jobs, loras
from gateway.engine.common import LeaseLost
from gateway.store import durability, work
from gateway.webhooks import Deliverer
from gateway.timeutil import now

log = structlog.get_logger()

#: training polls claimed together (one task, one write transaction for the "still running" answers)
POLL_BATCH = 500
#: how much earlier than due a training poll may be made, so polls gather into batches
POLL_LOOKAHEAD_S = 1.0


class Engine:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = anyio.Event()
        self._deliveries_due = anyio.Event()
        self._inflight: set[tuple[str, str]] = set()
        self._rerun: set[tuple[str, str]] = set()
        self._polling = 0  # rows in the poll batch now running (at most one batch at a time)
        self.ready = False
        self.deliverer = Deliverer(
            gw.db, gw.settings.webhooks, gw.webhook_client, self.owner, lease_s=gw.settings.engine.lease_s
        )
        gw.wake = self.wake

    def wake(self) -> None:
        self._wake.set()
        self._deliveries_due.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        e = self.gw.settings.engine
        log.info("engine_started", owner=self.owner, concurrency=e.concurrency)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._deliver_loop)
                self.ready = True
                task_status.started()
                while True:
                    free = e.concurrency - (len(self._inflight) - self._polling)
                    if free > 0:
                        for kind, row in await self._claim(free):
                            if (kind, row.id) in self._inflight:
                                # its task released it a moment ago and is still finishing:
                                # that task runs it again, so one row never runs twice at once
                                self._rerun.add((kind, row.id))
                                continue
                            self._inflight.add((kind, row.id))
                            tg.start_soon(self._run_one, kind, row)
                    if not self._polling:
                        polls = await self._claim_polls()
                        if polls:  # one task polls them all and writes once
                            self._polling = len(polls)
                            self._inflight.update(("lora", row.id) for row in polls)
                            tg.start_soon(self._run_polls, polls)
                    with anyio.move_on_after(e.poll_interval_s):
                        await self._wake.wait()
                    self._wake = anyio.Event()
        finally:
            self.ready = False
            with anyio.CancelScope(shield=True):
                await self._release_all()
            log.info("engine_stopped", owner=self.owner)

    async def _claim(self, limit: int) -> list[tuple[str, Any]]:
        """Due rows for per-row steps (training polls excepted: see _claim_polls)."""
        lease = self.gw.settings.engine.lease_s
        async with self.gw.db.tx() as conn:
            jobs_due = await work.claim_due(conn, "job", owner=self.owner, lease_s=lease, limit=limit)
            loras_due = await work.claim_due(
                conn, "lora", owner=self.owner, lease_s=lease, limit=limit - len(jobs_due), skip_stage="poll"
            )
        return [("job", j) for j in jobs_due] + [("lora", lo) for lo in loras_due]

    async def _claim_polls(self) -> list[Any]:
        """Training polls due now or within POLL_LOOKAHEAD_S, as one batch: asking a little
        early lets thousands of trainings in flight be polled in a few large batches."""
        e = self.gw.settings.engine
        lookahead = min(POLL_LOOKAHEAD_S, e.min_poll_interval_s / 4)
        async with self.gw.db.tx() as conn:
            return await work.claim_due(
                conn, "lora", owner=self.owner, lease_s=e.lease_s, limit=POLL_BATCH, only_stage="poll",
                at=now() + lookahead,
            )

    async def _run_polls(self, rows: list[Any]) -> None:
        """Poll a batch of training loras; the answers that need more than "still running"
        continue as ordinary steps."""
        try:
            rest = await loras.poll_many(self.gw, rows, self.owner)
        except Exception:
            log.exception("engine_poll_batch_crashed", size=len(rows))
            rest = [(row, None) for row in rows]
        done = {row.id for row in rows} - {lora.id for lora, _ in rest}
        for lora_id in done:
            self._inflight.discard(("lora", lora_id))
            self._rerun.discard(("lora", lora_id))
        try:
            async with anyio.create_task_group() as tg:
                for lora, polled in rest:
                    tg.start_soon(self._run_one, "lora", lora, polled)
        finally:
            self._polling = 0
            self._wake.set()  # claims only: a "still running" answer queues no webhook

    async def _run_one(self, kind: str, row: Any, polled: Any = None) -> None:
        """Run a leased row's steps. Every step ends by writing its row with the lease
        released (or finds the row is no longer its own), so nothing is released here on a
        normal return; a lease a step failed to release expires, since the heartbeat renews
        only rows in flight."""
        try:
            claimed = row
            while True:
                if kind == "lora":
                    await loras.step(self.gw, row.id, self.owner, claimed, polled)
                else:
                    await jobs.step(self.gw, row.id, self.owner, claimed)
                if (kind, row.id) not in self._rerun:
                    break
                self._rerun.discard((kind, row.id))
                claimed, polled = None, None  # re-read: it was claimed again while this task finished
        except LeaseLost:
            log.info("lease_lost", kind=kind, id=row.id)
        except Exception:
            log.exception("engine_step_crashed", kind=kind, id=row.id)
            # retried later by whoever holds the lease then; the backoff keeps a bug from spinning
            async with self.gw.db.tx() as conn:
                await work.release(conn, kind, row.id, self.owner, next_run_at=now() + self.gw.settings.engine.crash_backoff_s)
        finally:
            self._rerun.discard((kind, row.id))
            self._inflight.discard((kind, row.id))
            self.wake()

    async def _deliver_loop(self) -> None:
        e = self.gw.settings.engine
        while True:
            try:
                sent = await self.deliverer.run_due(self.gw.settings.webhooks.concurrency)
            except Exception:
                log.exception("webhook_loop_failed")
                sent = 0
            if sent:
                continue  # there may be more due right away
            with anyio.move_on_after(e.poll_interval_s):
                await self._deliveries_due.wait()
            self._deliveries_due = anyio.Event()

    async def _heartbeat(self) -> None:
        e = self.gw.settings.engine
        while True:
            await anyio.sleep(e.lease_s / 3)
            if not self._inflight:
                continue
            async with self.gw.db.tx() as conn:
                await work.renew_leases(conn, self.owner, now() + e.lease_s, list(self._inflight))
                await durability.renew_delivery_leases(conn, self.owner, now() + e.lease_s)

    async def _release_all(self) -> None:
        try:
            async with self.gw.db.tx() as conn:
                await work.release_owner(conn, self.owner)
                await durability.release_deliveries(conn, self.owner)
        except Exception:  # the database may already be closed on a hard stop
            log.warning("lease_release_failed", owner=self.owner, exc_info=True)
