"""Attempts: every try of a provider for a LoRA or a job, recorded before the provider is
called, and what provider callbacks may do to them."""

from __future__ import annotations

from typing import Any, Iterable

from gateway.store.base import Connection
from gateway.store.jobs import ACTIVE_JOB
from gateway.store.loras import ACTIVE_LORA
from gateway.store.models import Attempt, row_to
from gateway.store.sql import assignments, marks
from gateway.timeutil import now

TABLES = {"lora": "loras", "job": "jobs"}
ACTIVE = {"lora": ACTIVE_LORA, "job": ACTIVE_JOB}
ATTEMPT_COLUMNS = set(Attempt.__struct_fields__)


async def insert_attempt(conn: Connection, attempt: Attempt) -> None:
    data = {k: getattr(attempt, k) for k in Attempt.__struct_fields__}
    cols = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    await conn.execute(f"INSERT INTO attempts ({cols}) VALUES ({marks})", tuple(data.values()))

async def update_attempt(conn: Connection, attempt_id: str, **fields: Any) -> None:
    cols, values = assignments(fields, ATTEMPT_COLUMNS)
    await conn.execute(f"UPDATE attempts SET {cols} WHERE id = ?", (*values, attempt_id))

async def attempts_for(conn: Connection, kind: str, owner_id: str) -> list[Attempt]:
    rows = await conn.execute_fetchall(
        "SELECT * FROM attempts WHERE owner_kind = ? AND owner_id = ? ORDER BY seq", (kind, owner_id)
    )
    return [row_to(Attempt, r) for r in rows]

async def current_attempts(conn: Connection, kind: str, owner_ids: list[str]) -> list[Attempt]:
    """The newest attempt of each owner (one query for a batch)."""
    out: list[Attempt] = []
    for i in range(0, len(owner_ids), 500):
        chunk = owner_ids[i : i + 500]
        marks = ", ".join("?" for _ in chunk)
        rows = await conn.execute_fetchall(
            f"""SELECT a.* FROM attempts a
                WHERE a.owner_kind = ? AND a.owner_id IN ({marks})
                  AND a.seq = (SELECT MAX(seq) FROM attempts b WHERE b.owner_kind = a.owner_kind AND b.owner_id = a.owner_id)""",
            (kind, *chunk),
        )
        out += [row_to(Attempt, r) for r in rows]
    return out

async def get_attempt(conn: Connection, attempt_id: str) -> Attempt | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM attempts WHERE id = ?", (attempt_id,)))
    return row_to(Attempt, rows[0]) if rows else None

async def current_attempt(conn: Connection, kind: str, owner_id: str) -> Attempt | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT * FROM attempts WHERE owner_kind = ? AND owner_id = ? ORDER BY seq DESC LIMIT 1", (kind, owner_id)
        )
    )
    return row_to(Attempt, rows[0]) if rows else None

async def hint_attempt(conn: Connection, provider: str, attempt_id: str, *, every_s: float) -> str | None:
    """An unverifiable callback named this attempt: make its row's poll due now, at most once per
    ``every_s`` per attempt, and only for the current, in-flight attempt of an active row.
    Returns the row's id when something moved."""
    t = now()
    cur = await conn.execute(
        """UPDATE attempts SET hinted_at = ?
           WHERE id = ? AND provider = ? AND state IN ('queued', 'running') AND (hinted_at IS NULL OR hinted_at <= ?)
             AND seq = (SELECT MAX(seq) FROM attempts b WHERE b.owner_kind = attempts.owner_kind
                                                         AND b.owner_id = attempts.owner_id)""",
        (t, attempt_id, provider, t - every_s),
    )
    if cur.rowcount != 1:
        return None
    attempt = await get_attempt(conn, attempt_id)
    assert attempt is not None
    table, active = TABLES[attempt.owner_kind], ACTIVE[attempt.owner_kind]
    marks = ", ".join("?" for _ in active)
    cur = await conn.execute(
        f"UPDATE {table} SET next_run_at = ? WHERE id = ? AND stage = 'poll' AND status IN ({marks})",
        (t, attempt.owner_id, *active),
    )
    return attempt.owner_id if cur.rowcount == 1 else None

async def bind_callback(conn: Connection, provider: str, attempt_id: str, ref: str) -> bool:
    """A verified callback names an attempt whose submission is still ambiguous (its answer was
    lost): record the provider's job id, so the engine polls it instead of counting it unknown.
    Only the current attempt of an active row, only while it has no ref."""
    cur = await conn.execute(
        """UPDATE attempts SET provider_ref = ?, state = 'queued', submitted_at = COALESCE(submitted_at, ?),
             progressed_at = ?, polls = 0
           WHERE id = ? AND provider = ? AND provider_ref IS NULL AND state IN ('submitting', 'ambiguous')
             AND seq = (SELECT MAX(seq) FROM attempts b WHERE b.owner_kind = attempts.owner_kind
                                                         AND b.owner_id = attempts.owner_id)
             AND NOT EXISTS (SELECT 1 FROM attempts c WHERE c.provider = ? AND c.provider_ref = ?)""",
        (ref, now(), now(), attempt_id, provider, provider, ref),
    )
    return cur.rowcount == 1

async def poll_now_for_ref(conn: Connection, provider: str, ref: str) -> str | None:
    """A verified callback about ``provider``'s job ``ref``: make its owner's poll due now.

    Only the *current* attempt of an active lora or job counts; a late callback about a
    superseded attempt changes nothing. Returns the owner's id when something moved.
    """
    rows = list(
        await conn.execute_fetchall(
            """SELECT a.owner_kind, a.owner_id FROM attempts a
               WHERE a.provider = ? AND a.provider_ref = ? AND a.state IN ('queued', 'running')
                 AND a.seq = (SELECT MAX(seq) FROM attempts b WHERE b.owner_kind = a.owner_kind AND b.owner_id = a.owner_id)""",
            (provider, ref),
        )
    )
    if not rows:
        return None
    kind, owner_id = rows[0][0], rows[0][1]
    table, active = TABLES[kind], ACTIVE[kind]
    marks = ", ".join("?" for _ in active)
    cur = await conn.execute(
        f"UPDATE {table} SET next_run_at = ? WHERE id = ? AND stage IN ('submit', 'poll') AND status IN ({marks})",
        (now(), owner_id, *active),
    )
    return owner_id if cur.rowcount == 1 else None

async def attempts_in_flight(conn: Connection, states: Iterable[str]) -> dict[tuple[str, str], int]:
    """``(provider, owner kind) -> count`` of attempts in ``states``."""
    states = list(states)
    marks = ", ".join("?" for _ in states)
    rows = await conn.execute_fetchall(
        f"SELECT provider, owner_kind, COUNT(*) FROM attempts WHERE state IN ({marks}) GROUP BY provider, owner_kind",
        states,
    )
    return {(r[0], r[1]): int(r[2]) for r in rows}

async def team_usage(conn: Connection, team_id: str, *, since: float) -> list[tuple[str, str, str, float, float]]:
    """``(provider, kind, currency, submitted_at, cost)`` of the team's attempts a provider accepted since ``since``."""
    rows = await conn.execute_fetchall(
        """SELECT a.provider, a.owner_kind, a.currency, a.submitted_at, a.cost FROM attempts a
           WHERE a.submitted_at >= ? AND a.provider_ref IS NOT NULL AND (
             (a.owner_kind = 'lora' AND a.owner_id IN (SELECT id FROM loras WHERE team_id = ?)) OR
             (a.owner_kind = 'job' AND a.owner_id IN (SELECT id FROM jobs WHERE team_id = ?)))""",
        (since, team_id, team_id),
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def fill_ref(conn: Connection, attempt_id: str, ref: str) -> None:
    """Record the provider's job id on an attempt that has none yet."""
    await conn.execute("UPDATE attempts SET provider_ref = COALESCE(provider_ref, ?) WHERE id = ?", (ref, attempt_id))


async def mark_cancelled(conn: Connection, attempt_id: str, in_flight: Iterable[str]) -> None:
    """The vendor confirmed a cancel: an attempt still in one of the ``in_flight`` states is
    ``cancelled``."""
    states = list(in_flight)
    await conn.execute(
        f"UPDATE attempts SET state = 'cancelled', finished_at = COALESCE(finished_at, ?) "
        f"WHERE id = ? AND state IN ({marks(states)})",
        (now(), attempt_id, *states),
    )
