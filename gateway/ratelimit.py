"""A per-key token bucket: in memory on SQLite (one machine; each process counts its own
requests), in the database on PostgreSQL, so every replica draws from the same bucket."""

from __future__ import annotations

import math
import time
from typing import Any, Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    async def check(self, key: str, per_minute: int) -> float:
        return self.take(key, per_minute)

    def take(self, key: str, per_minute: int) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is available."""
        if per_minute <= 0:
            return 0.0
        rate = per_minute / 60.0
        t = self.clock()
        tokens, last = self._buckets.get(key, (float(per_minute), t))
        tokens = min(float(per_minute), tokens + (t - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, t)
            return 0.0
        self._buckets[key] = (tokens, t)
        return math.ceil((1.0 - tokens) / rate * 1000) / 1000


class SharedRateLimiter:
    """The same bucket, kept in the database's ``rate_buckets`` table: one upsert per request."""

    def __init__(self, db: Any) -> None:
        self.db = db

    async def check(self, key: str, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        from gateway.store import ratelimits

        async with self.db.tx() as conn:
            tokens = await ratelimits.take(conn, key, per_minute)
        if tokens is None:
            return 0.0
        rate = per_minute / 60.0
        return math.ceil((1.0 - tokens) / rate * 1000) / 1000
