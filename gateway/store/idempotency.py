"""``Idempotency-Key`` records: (team, key) -> the request it came with and what it created."""

from __future__ import annotations

import msgspec

from gateway.store.base import Connection
from gateway.store.models import row_to


class IdempotencyRecord(msgspec.Struct, frozen=True, kw_only=True):
    team_id: str
    key: str
    route: str
    request_digest: str
    object_id: str
    created_at: float

async def idempotency_get(conn: Connection, team_id: str, key: str, *, newer_than: float) -> IdempotencyRecord | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT * FROM idempotency WHERE team_id = ? AND key = ? AND created_at > ?", (team_id, key, newer_than)
        )
    )
    return row_to(IdempotencyRecord, rows[0]) if rows else None

async def idempotency_put(conn: Connection, rec: IdempotencyRecord) -> None:
    """Insert, replacing an expired record of the same key."""
    await conn.execute(
        """INSERT INTO idempotency (team_id, key, route, request_digest, object_id, created_at)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (team_id, key) DO UPDATE SET route = excluded.route,
             request_digest = excluded.request_digest, object_id = excluded.object_id,
             created_at = excluded.created_at""",
        (rec.team_id, rec.key, rec.route, rec.request_digest, rec.object_id, rec.created_at),
    )

async def idempotency_purge(conn: Connection, *, older_than: float) -> int:
    """Delete records created before ``older_than`` (they no longer answer replays)."""
    cur = await conn.execute("DELETE FROM idempotency WHERE created_at < ?", (older_than,))
    return cur.rowcount


async def claim(conn: Connection, rec: IdempotencyRecord, *, expired_before: float) -> bool:
    """Insert ``rec`` as the key's owner, the first thing a request with a key does: True when
    this request now owns the key (new, or its record had expired), False when another request
    holds it (read it with ``idempotency_get``). On PostgreSQL a concurrent request with the
    same key waits here until the first one commits (then sees its record) or rolls back
    (then takes the key)."""
    cur = await conn.execute(
        """INSERT INTO idempotency (team_id, key, route, request_digest, object_id, created_at)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (team_id, key) DO UPDATE SET route = excluded.route,
             request_digest = excluded.request_digest, object_id = excluded.object_id,
             created_at = excluded.created_at
           WHERE idempotency.created_at < ?""",
        (rec.team_id, rec.key, rec.route, rec.request_digest, rec.object_id, rec.created_at, expired_before),
    )
    return cur.rowcount == 1
