"""Per-key token buckets in the database, shared by every replica (used on PostgreSQL): ``rate_buckets``."""

from __future__ import annotations

from gateway.store.base import Connection


async def take(conn: Connection, key_id: str, per_minute: int) -> float | None:
    """Take one token from ``key_id``'s bucket (``per_minute`` tokens, refilled continuously, by
    the database's clock). None when one was taken; else the tokens left (below one), from
    which the caller tells how long to wait."""
    t = await conn.now()
    # min(capacity, tokens + elapsed * rate), spelled as a CASE so that both SQLite and PostgreSQL run it
    refill = "(rate_buckets.tokens + (excluded.at - rate_buckets.at) * CAST(? AS DOUBLE PRECISION))"
    capped = f"(CASE WHEN {refill} > CAST(? AS DOUBLE PRECISION) THEN CAST(? AS DOUBLE PRECISION) ELSE {refill} END)"
    rate = per_minute / 60.0
    rows = await conn.execute_fetchall(
        f"""INSERT INTO rate_buckets (key_id, tokens, at) VALUES (?, CAST(? AS DOUBLE PRECISION) - 1, ?)
            ON CONFLICT (key_id) DO UPDATE SET tokens = {capped} - 1, at = excluded.at
            WHERE {capped} >= 1
            RETURNING tokens""",
        (key_id, per_minute, t, rate, per_minute, per_minute, rate, rate, per_minute, per_minute, rate),
    )
    if rows:
        return None
    left = await conn.execute_fetchall("SELECT tokens, at FROM rate_buckets WHERE key_id = ?", (key_id,))
    tokens, at = left[0][0], left[0][1]
    return min(float(per_minute), tokens + (t - at) * rate)
