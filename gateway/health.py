"""Provider health as every process sees it: a breaker per instance and operation, in the database.

- Fed only by provider-side outcomes of real calls, status polls included: unavailable, timeouts,
  rate limits, ambiguous submits count as failures; any answer (even "that job failed") is a
  success. Client errors and rejections never count.
- ``routing.breaker.failures`` in a row open it; after ``cooldown_s`` it is half-open: one probe
  attempt at a time is let through (claimed in the database, so across processes too); the
  probe's success closes it, its failure opens it afresh.
- Writes happen only when something changes (a failure, or a success after failures), so the
  common case of healthy polls costs no transaction. Reads are a small table, cached for half a
  second.

It also keeps per-minute call counts and latencies (flushed every few seconds) for
``GET /v2/providers`` and the Prometheus metrics.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

from gateway.config import BreakerSettings
from gateway.store import health as store
from gateway.store.health import Breaker
from gateway.timeutil import now

#: the row kind an engine operation works on -> the health operation
OPERATIONS = {"lora": "training", "job": "inference"}
#: how long a state read from the database is reused
CACHE_S = 0.5
#: a probe claimed by an attempt that then went quiet is released after this
PROBE_TTL_S = 300.0


class ProviderHealth:
    def __init__(self, db: Any, settings: BreakerSettings, *, clock: Callable[[], float] = now) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self._rows: dict[tuple[str, str], Breaker] = {}
        self._read_at = -1.0
        # (instance, operation, minute) -> [calls, failures, total_ms], waiting to be written
        self._calls: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
        #: called with (instance, operation, state) when this process changes a breaker's state
        self.on_change: Callable[[str, str, str], None] = lambda *a: None

    # ------------------------------------------------------------------ reading

    async def rows(self) -> dict[tuple[str, str], Breaker]:
        if time.monotonic() - self._read_at > CACHE_S:
            async with self.db.read() as conn:
                self._rows = {(b.instance, b.operation): b for b in await store.breakers(conn)}
            self._read_at = time.monotonic()
        return self._rows

    def _state(self, row: Breaker | None) -> str:
        if row is None or row.state == "closed":
            return "closed"
        t = self.clock()
        if row.opened_at is not None and t - row.opened_at >= self.settings.cooldown_s:
            live_probe = row.probe_expires is not None and row.probe_expires >= t
            return "probing" if live_probe else "half-open"
        return "open"

    async def state(self, instance: str, operation: str) -> str:
        """``closed`` | ``half-open`` (a probe may go) | ``probing`` (one is out) | ``open``."""
        return self._state((await self.rows()).get((instance, operation)))

    async def states(self, operation: str) -> dict[str, str]:
        rows = await self.rows()
        return {inst: self._state(row) for (inst, op), row in rows.items() if op == operation}

    # ------------------------------------------------------------------ writing

    async def record(self, instance: str, operation: str, *, ok: bool, failures: int = 1,
                     calls: int | None = None, duration_ms: float | None = None) -> None:
        """The outcome of real provider calls: ``calls`` of them (default: one, or ``failures``),
        ``failures`` of which were provider-side failures when not ``ok``."""
        minute = int(self.clock() // 60)
        stat = self._calls[(instance, operation, minute)]
        stat[0] += calls if calls is not None else (1 if ok else failures)
        stat[1] += 0 if ok else failures
        stat[2] += duration_ms or 0.0
        row = self._rows.get((instance, operation))
        if ok and (row is None or (row.state == "closed" and row.failures == 0)):
            return  # healthy and known healthy: nothing to write
        before = self._state(row)
        t = self.clock()
        async with self.db.tx() as conn:
            if ok:
                await store.record_success(conn, instance, operation, at=t)
            else:
                await store.record_failures(conn, instance, operation, count=failures,
                                            threshold=self.settings.failures, at=t)
            fresh = {(b.instance, b.operation): b for b in await store.breakers(conn)}
        self._rows, self._read_at = fresh, time.monotonic()
        after = self._state(fresh.get((instance, operation)))
        if after != before:
            self.on_change(instance, operation, after)

    async def claim_probe(self, instance: str, operation: str, attempt_id: str) -> bool:
        async with self.db.tx() as conn:
            won = await store.claim_probe(conn, instance, operation, attempt_id, cooldown_s=self.settings.cooldown_s,
                                          ttl_s=PROBE_TTL_S, at=self.clock())
        self._read_at = -1.0  # re-read: the probe is out (or another process holds it)
        return won

    async def flush(self) -> None:
        """Write the call counts gathered so far (the engine's housekeeping calls this)."""
        if not self._calls:
            return
        rows = [(inst, op, minute, int(c), int(f), ms) for (inst, op, minute), (c, f, ms) in self._calls.items()]
        self._calls.clear()
        async with self.db.tx() as conn:
            await store.add_calls(conn, rows)
            await store.purge_calls(conn, before_minute=int(self.clock() // 60) - 24 * 60)

    async def recent(self, minutes: int = 15) -> dict[tuple[str, str], tuple[int, int, float]]:
        async with self.db.read() as conn:
            return await store.recent_calls(conn, since_minute=int(self.clock() // 60) - minutes)
