"""LoRAs and jobs as queue rows: ``next_run_at`` says when a step is due and a lease
(``lease_owner``, ``lease_expires``) says who works on it. Updates made by a worker are
conditioned on its lease, so a worker that lost its lease (it was too slow, or another process
took over after a crash) changes nothing."""

from __future__ import annotations

from typing import Any, Iterable

from gateway.store.attempts import ACTIVE, TABLES
from gateway.store.base import Connection
from gateway.store.jobs import JOB_COLUMNS, job_from_row
from gateway.store.loras import LORA_COLUMNS, lora_from_row
from gateway.store.models import Job, Lora
from gateway.store.sql import marks, skip_locked, update_leased
from gateway.timeutil import now


async def claim_due(
    conn: Connection, kind: str, *, owner: str, lease_s: float, limit: int, lookahead_s: float = 0.0,
    only_stage: str | None = None, skip_stage: str | None = None,
) -> list[Lora] | list[Job]:
    """Lease up to ``limit`` rows of ``kind`` ('lora' or 'job') due within ``lookahead_s`` by the
    database's clock; return them, leased. ``only_stage``/``skip_stage`` select by stage.

    On PostgreSQL the candidates are locked ``FOR UPDATE SKIP LOCKED``: replicas claiming at the
    same moment each get other rows, and a row whose lease another replica just took (committed
    or not) is never claimed twice."""
    table, active = TABLES[kind], ACTIVE[kind]
    t = await conn.now()
    stage_sql, stage_args = "", []
    if only_stage is not None:
        stage_sql, stage_args = " AND stage = ?", [only_stage]
    elif skip_stage is not None:
        stage_sql, stage_args = " AND stage != ?", [skip_stage]
    rows = await conn.execute_fetchall(
        f"""UPDATE {table} SET lease_owner = ?, lease_expires = ?
            WHERE id IN (
              SELECT id FROM {table}
              WHERE status IN ({marks(active)}) AND next_run_at <= ?{stage_sql}
                AND (lease_expires IS NULL OR lease_expires < ?)
              ORDER BY next_run_at LIMIT ?{skip_locked(conn)})
            RETURNING *""",
        (owner, t + lease_s, *active, t + lookahead_s, *stage_args, t, limit),
    )
    return [lora_from_row(r) for r in rows] if kind == "lora" else [job_from_row(r) for r in rows]


async def update_row(conn: Connection, kind: str, row_id: str, *, lease: str | None = None, **fields: Any) -> bool:
    """``update_lora`` / ``update_job`` by kind ('lora' or 'job')."""
    table = TABLES[kind]
    return await update_leased(conn, table, LORA_COLUMNS if kind == "lora" else JOB_COLUMNS, row_id, lease, fields)


async def apply_running_polls(conn: Connection, kind: str, owner: str, updates: list[dict[str, Any]]) -> None:
    """Record "still queued/running" answers for many rows of ``kind`` and release them until
    their next poll: two statements for the whole batch. Rows whose lease ``owner`` lost are
    left alone."""
    table = TABLES[kind]
    t = now()
    await conn.executemany(
        f"""UPDATE attempts SET state = ?, polls = ?, progress = ?, progressed_at = ?
            WHERE id = ? AND EXISTS (SELECT 1 FROM {table} WHERE id = ? AND lease_owner = ?)""",
        [(u["state"], u["polls"], u["progress"], u["progressed_at"], u["attempt_id"], u["owner_id"], owner) for u in updates],
    )
    await conn.executemany(
        f"""UPDATE {table} SET next_run_at = ?, updated_at = ?, lease_owner = NULL, lease_expires = NULL
            WHERE id = ? AND lease_owner = ?""",
        [(u["next_run_at"], t, u["owner_id"], owner) for u in updates],
    )

async def renew_leases(conn: Connection, owner: str, lease_s: float, rows: Iterable[tuple[str, str]]) -> None:
    """Extend ``owner``'s leases on the given (kind, id) rows, the ones it is working on, to
    ``lease_s`` from now (the database's clock)."""
    until = await conn.now() + lease_s
    rows = list(rows)
    for kind, table in TABLES.items():
        ids = [row_id for k, row_id in rows if k == kind]
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            await conn.execute(
                f"UPDATE {table} SET lease_expires = ? WHERE lease_owner = ? AND id IN ({marks(chunk)})", (until, owner, *chunk)
            )


async def release_owner(conn: Connection, owner: str) -> None:
    for table in TABLES.values():
        await conn.execute(
            f"UPDATE {table} SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = ?", (owner,)
        )

async def count_by_status(conn: Connection) -> dict[tuple[str, str], int]:
    """``(kind, status) -> rows``, for both kinds."""
    out: dict[tuple[str, str], int] = {}
    for kind, table in TABLES.items():
        for status, n in await conn.execute_fetchall(f"SELECT status, COUNT(*) FROM {table} GROUP BY status"):
            out[(kind, status)] = int(n)
    return out
