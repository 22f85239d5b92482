"""Provider health, shared by every process: one breaker row per provider instance and operation
(training, inference), plus per-minute call counts for ``GET /v2/providers``."""

from __future__ import annotations

from typing import Any, Iterable

import msgspec

from gateway.store.models import row_to


class Breaker(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    operation: str  # training | inference
    state: str  # closed | open (half-open is an open breaker past its cooldown)
    failures: int  # provider-side failures in a row
    opened_at: float | None
    probe_attempt: str | None  # the one attempt let through while half-open
    probe_expires: float | None
    updated_at: float


async def breakers(conn: Any) -> list[Breaker]:
    return [row_to(Breaker, r) for r in await conn.execute_fetchall("SELECT * FROM provider_health")]


async def record_failures(conn: Any, instance: str, operation: str, *, count: int, threshold: int, at: float) -> None:
    """``count`` provider-side failures: the breaker opens at ``threshold`` in a row; a failure
    while open (the probe's) opens it afresh."""
    await conn.execute(
        """INSERT INTO provider_health (instance, operation, state, failures, opened_at, updated_at)
           VALUES (?, ?, CASE WHEN CAST(? AS BIGINT) >= CAST(? AS BIGINT) THEN 'open' ELSE 'closed' END, ?,
                   CASE WHEN CAST(? AS BIGINT) >= CAST(? AS BIGINT) THEN CAST(? AS DOUBLE PRECISION) END, ?)
           ON CONFLICT (instance, operation) DO UPDATE SET
             failures = provider_health.failures + excluded.failures,
             state = CASE WHEN provider_health.state = 'open'
                               OR provider_health.failures + excluded.failures >= CAST(? AS BIGINT)
                          THEN 'open' ELSE 'closed' END,
             opened_at = CASE WHEN provider_health.state = 'open'
                                   OR provider_health.failures + excluded.failures >= CAST(? AS BIGINT)
                              THEN CAST(? AS DOUBLE PRECISION) ELSE provider_health.opened_at END,
             probe_attempt = NULL, probe_expires = NULL, updated_at = excluded.updated_at""",
        (instance, operation, count, threshold, count, count, threshold, at, at, threshold, threshold, at),
    )


async def record_success(conn: Any, instance: str, operation: str, *, at: float) -> None:
    """A provider-side success: the breaker closes and its count restarts."""
    await conn.execute(
        """INSERT INTO provider_health (instance, operation, state, failures, updated_at) VALUES (?, ?, 'closed', 0, ?)
           ON CONFLICT (instance, operation) DO UPDATE SET state = 'closed', failures = 0, opened_at = NULL,
             probe_attempt = NULL, probe_expires = NULL, updated_at = excluded.updated_at""",
        (instance, operation, at),
    )


async def claim_probe(conn: Any, instance: str, operation: str, attempt_id: str, *, cooldown_s: float,
                      ttl_s: float, at: float) -> bool:
    """Let ``attempt_id`` be the one probe of an open breaker past its cooldown; False when
    another live probe holds it (or the breaker is not half-open)."""
    cur = await conn.execute(
        """UPDATE provider_health SET probe_attempt = ?, probe_expires = ?, updated_at = ?
           WHERE instance = ? AND operation = ? AND state = 'open' AND opened_at <= ?
             AND (probe_expires IS NULL OR probe_expires < ?)""",
        (attempt_id, at + ttl_s, at, instance, operation, at - cooldown_s, at),
    )
    return cur.rowcount == 1


async def add_calls(conn: Any, rows: Iterable[tuple[str, str, int, int, int, float]]) -> None:
    """Per-minute call counts ``(instance, operation, minute, calls, failures, total_ms)``."""
    await conn.executemany(
        """INSERT INTO provider_calls (instance, operation, minute, calls, failures, total_ms) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (instance, operation, minute) DO UPDATE SET calls = provider_calls.calls + excluded.calls,
             failures = provider_calls.failures + excluded.failures,
             total_ms = provider_calls.total_ms + excluded.total_ms""",
        list(rows),
    )


async def recent_calls(conn: Any, *, since_minute: int) -> dict[tuple[str, str], tuple[int, int, float]]:
    """``(instance, operation) -> (calls, failures, total_ms)`` since ``since_minute``."""
    rows = await conn.execute_fetchall(
        """SELECT instance, operation, SUM(calls), SUM(failures), SUM(total_ms) FROM provider_calls
           WHERE minute >= ? GROUP BY instance, operation""",
        (since_minute,),
    )
    return {(r[0], r[1]): (int(r[2]), int(r[3]), float(r[4])) for r in rows}


async def purge_calls(conn: Any, *, before_minute: int) -> None:
    await conn.execute("DELETE FROM provider_calls WHERE minute < ?", (before_minute,))
