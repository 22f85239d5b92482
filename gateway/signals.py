"""Signals every process on the database hears: new work for the engines, webhook deliveries
queued, API keys revoked (auth caches cleared).

``send`` calls this process's listeners at once and, on PostgreSQL, tells the other processes
with ``NOTIFY`` (coalesced: at most one notification per channel in flight, and one more if
something was sent meanwhile), so a LoRA created on one replica is picked up by an idle engine
on another in milliseconds instead of at its next poll. On SQLite every process is on one
machine and polls (``engine.poll_interval_s``): nothing is sent. Polling stays the backstop on
both, so a lost notification only delays work.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

import structlog

from gateway.store.base import Database

log = structlog.get_logger()

CHANNELS = ("work", "deliveries", "auth")


class Signals:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._listeners: dict[str, list[Callable[[], None]]] = {c: [] for c in CHANNELS}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self.remote = db.dialect == "postgresql"
        if self.remote:
            for channel in CHANNELS:
                db.listen(channel, lambda payload, c=channel: self._local(c))

    def on(self, channel: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``channel`` is signalled, here or in another process."""
        self._listeners[channel].append(callback)

    def off(self, channel: str, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners[channel].remove(callback)

    def send(self, channel: str) -> None:
        self._local(channel)
        if not self.remote:
            return
        if channel in self._in_flight and not self._in_flight[channel].done():
            self._again.add(channel)
            return
        try:
            self._in_flight[channel] = asyncio.get_running_loop().create_task(self._notify(channel))
        except RuntimeError:  # no loop (a synchronous caller at shutdown): the others poll
            pass

    async def _notify(self, channel: str) -> None:
        while True:
            try:
                await self.db.notify(channel)
            except Exception as e:  # noqa: BLE001 - the other processes poll anyway
                log.warning("notify_failed", channel=channel, error=str(e))
            if channel not in self._again:
                return
            self._again.discard(channel)

    def _local(self, channel: str) -> None:
        for callback in list(self._listeners[channel]):
            try:
                callback()
            except Exception:  # noqa: BLE001
                log.exception("signal_listener_failed", channel=channel)

    async def aclose(self) -> None:
        for task in list(self._in_flight.values()):
            if not task.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, timeout=2)
