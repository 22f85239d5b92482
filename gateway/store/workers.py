"""Engine heartbeats: one row per process that runs the engine, so an API-only process can
tell (``/readyz``) whether any engine is running against this database."""

from __future__ import annotations



async def beat(conn, owner: str, *, host: str, pid: int, started_at: float) -> None:
    """A heartbeat, stamped with the database's clock (replicas' clocks may differ)."""
    await conn.execute(
        """INSERT INTO engine_workers (owner, host, pid, started_at, beat_at) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (owner) DO UPDATE SET beat_at = excluded.beat_at""",
        (owner, host, pid, started_at, await conn.now()),
    )


async def live_workers(conn, *, within_s: float) -> list[tuple[str, float]]:
    """``(owner, seconds since its beat)`` of every engine that beat within ``within_s``, newest first."""
    t = await conn.now()
    rows = await conn.execute_fetchall(
        "SELECT owner, beat_at FROM engine_workers WHERE beat_at >= ? ORDER BY beat_at DESC", (t - within_s,)
    )
    return [(r[0], t - r[1]) for r in rows]


async def last_beat(conn) -> float | None:
    rows = list(await conn.execute_fetchall("SELECT MAX(beat_at) FROM engine_workers"))
    return rows[0][0] if rows else None


async def remove(conn, owner: str) -> None:
    await conn.execute("DELETE FROM engine_workers WHERE owner = ?", (owner,))


async def purge(conn, *, older_than_s: float) -> int:
    cur = await conn.execute("DELETE FROM engine_workers WHERE beat_at < ?", (await conn.now() - older_than_s,))
    return cur.rowcount
