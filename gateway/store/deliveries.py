"""Outbound webhook deliveries: one row per delivery, leased while it is being sent, and a log
of every try."""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import msgspec

from gateway.store.base import Connection
from gateway.store.models import row_to
from gateway.store.sql import marks, skip_locked
from gateway.timeutil import now


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team_id: str
    key_id: str
    owner_kind: str
    owner_id: str
    event: str
    dedup: str
    url: str
    payload: bytes
    terminal: bool
    status: str
    attempts: int
    next_try_at: float
    lease_owner: str | None
    lease_expires: float | None
    last_status_code: int | None
    last_error: str | None
    created_at: float
    delivered_at: float | None
    #: replays asked for so far (see replay_delivery)
    replays: int = 0

class DeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True):
    delivery_id: str
    attempt: int
    at: float
    status_code: int | None
    error: str | None
    duration_ms: int

async def insert_delivery(conn: Connection, d: Delivery) -> bool:
    """Queue a delivery; an identical one (same dedup key) already queued is kept instead."""
    data = {k: getattr(d, k) for k in Delivery.__struct_fields__}
    cols = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    cur = await conn.execute(
        f"INSERT INTO deliveries ({cols}) VALUES ({marks}) ON CONFLICT (dedup) DO NOTHING", tuple(data.values())
    )
    return cur.rowcount == 1

async def get_delivery(conn: Connection, delivery_id: str) -> Delivery | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)))
    return row_to(Delivery, rows[0]) if rows else None

async def list_deliveries(
    conn: Connection, team_id: str, *, status: str | None = None, limit: int = 100
) -> list[Delivery]:
    sql = "SELECT * FROM deliveries WHERE team_id = ?"
    args: list[Any] = [team_id]
    if status:
        sql += " AND status = ?"
        args.append(status)
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    args.append(limit)
    return [row_to(Delivery, r) for r in await conn.execute_fetchall(sql, args)]

async def delivery_attempts(conn: Connection, delivery_id: str) -> list[DeliveryAttempt]:
    rows = await conn.execute_fetchall(
        "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY attempt", (delivery_id,)
    )
    return [row_to(DeliveryAttempt, r) for r in rows]

async def claim_deliveries(
    conn: Connection, *, owner: str, lease_s: float, limit: int, exclude: Iterable[str] = ()
) -> list[str]:
    """Lease up to ``limit`` due deliveries that nobody holds (or whose holder's lease ran out),
    except those in ``exclude`` (the claimer's own deliveries in flight: their leases are kept
    by renewal, never by claiming them again). Times are the database's."""
    t = await conn.now()
    skip = list(exclude)
    not_in = f"AND id NOT IN ({marks(skip)})" if skip else ""
    rows = await conn.execute_fetchall(
        f"""UPDATE deliveries SET lease_owner = ?, lease_expires = ?
           WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending' AND next_try_at <= ?
                          AND (lease_expires IS NULL OR lease_expires < ?) {not_in} ORDER BY next_try_at LIMIT ?{skip_locked(conn)})
           RETURNING id""",
        (owner, t + lease_s, t, t, *skip, limit),
    )
    return [r[0] for r in rows]


class RecordedAttempt(NamedTuple):
    attempt: int
    #: what the delivery became: ``delivered`` | ``failed`` | ``pending`` (retry later) |
    #: ``replayed`` (a replay arrived during the try: pending and due now) | None (the sender no
    #: longer held the lease, so only the attempt was logged)
    outcome: str | None

async def record_delivery_attempt(
    conn: Connection, d: Delivery, *, owner: str, status_code: int | None, error: str | None,
    duration_ms: int, outcome: str, next_try_at: float,
) -> RecordedAttempt:
    """Log one try (always: the try happened) and, if ``owner`` still holds the lease, move the
    delivery on and release it. ``d`` is the row as read when the try began: if its ``replays``
    count has moved since, an admin replay arrived during the try, so the delivery is left
    pending and due now instead of taking ``outcome``."""
    t = now()
    rows = list(await conn.execute_fetchall(
        """INSERT INTO delivery_attempts (delivery_id, attempt, at, status_code, error, duration_ms)
           SELECT CAST(? AS TEXT), COALESCE(MAX(attempt), 0) + 1, CAST(? AS DOUBLE PRECISION), CAST(? AS BIGINT),
                  CAST(? AS TEXT), CAST(? AS BIGINT) FROM delivery_attempts WHERE delivery_id = ?
           RETURNING attempt""",
        (d.id, t, status_code, error, duration_ms, d.id),
    ))
    attempt = int(rows[0][0])
    rows = list(await conn.execute_fetchall(
        """UPDATE deliveries SET attempts = CASE WHEN attempts > CAST(? AS BIGINT) THEN attempts ELSE ? END,
             status = CASE WHEN replays = ? THEN ? ELSE 'pending' END,
             next_try_at = CASE WHEN replays = ? THEN CAST(? AS DOUBLE PRECISION) ELSE CAST(? AS DOUBLE PRECISION) END,
             last_status_code = ?, last_error = ?,
             delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END,
             lease_owner = NULL, lease_expires = NULL
           WHERE id = ? AND lease_owner = ?
           RETURNING replays""",
        (attempt, attempt, d.replays, outcome, d.replays, next_try_at, t, status_code, error, outcome, t, d.id, owner),
    ))
    if not rows:
        return RecordedAttempt(attempt, None)
    return RecordedAttempt(attempt, outcome if rows[0][0] == d.replays else "replayed")

async def replay_delivery(conn: Connection, delivery_id: str, team_id: str) -> bool:
    """Make a delivery pending and due now (its id stays). A lease is left alone: a try in
    flight still records its attempt, and, seeing ``replays`` moved, leaves the delivery due."""
    cur = await conn.execute(
        "UPDATE deliveries SET status = 'pending', next_try_at = ?, replays = replays + 1 WHERE id = ? AND team_id = ?",
        (now(), delivery_id, team_id),
    )
    return cur.rowcount == 1

async def release_deliveries(conn: Connection, owner: str) -> None:
    await conn.execute(
        "UPDATE deliveries SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = ?", (owner,)
    )

async def renew_delivery_leases(conn: Connection, owner: str, lease_s: float, *, ids: Iterable[str]) -> None:
    """Extend ``owner``'s leases on the deliveries it is sending now (only those) to ``lease_s``
    from now (the database's clock)."""
    until = await conn.now() + lease_s
    ids = list(ids)
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        await conn.execute(
            f"UPDATE deliveries SET lease_expires = ? WHERE lease_owner = ? AND id IN ({marks(chunk)})",
            (until, owner, *chunk),
        )
