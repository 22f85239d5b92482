"""Generation jobs and their images."""

from __future__ import annotations

from typing import Any, Iterable

from gateway.store.base import Connection
from gateway.store.models import Job, JobImage, row_to
from gateway.store.sql import decode, encode, update_leased

ACTIVE_JOB = ("QUEUED", "PROCESSING")
JOB_COLUMNS = set(Job.__struct_fields__)


def job_from_row(row: Any) -> Job:
    data = dict(row)
    data["input"] = decode(data["input"])
    for col in ("webhook_events", "ignored_params"):
        data[col] = decode(data[col]) if data.get(col) else None
    return row_to(Job, data)


async def insert_job(conn: Connection, **fields: Any) -> None:
    values = [encode(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
    cols = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    await conn.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", values)

async def get_job(conn: Connection, job_id: str, team_id: str | None = None) -> Job | None:
    if team_id is None:
        rows = await conn.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,))
    else:
        rows = await conn.execute_fetchall("SELECT * FROM jobs WHERE id = ? AND team_id = ?", (job_id, team_id))
    rows = list(rows)
    return job_from_row(rows[0]) if rows else None

async def list_jobs(
    conn: Connection,
    team_id: str,
    *,
    limit: int,
    cursor: tuple[float, str] | None,
    user_id: str | None,
    status: str | None,
    model: str | None,
    search: str | None,
) -> list[Job]:
    where = ["team_id = ?"]
    args: list[Any] = [team_id]
    for col, val in (("user_id", user_id), ("status", status), ("model", model), ("id", search)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    if cursor:
        where.append("(created_at, id) < (?, ?)")
        args += list(cursor)
    rows = await conn.execute_fetchall(
        f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?",
        (*args, limit),
    )
    return [job_from_row(r) for r in rows]

async def job_models(conn: Connection, team_id: str) -> list[str]:
    rows = await conn.execute_fetchall("SELECT DISTINCT model FROM jobs WHERE team_id = ? ORDER BY model", (team_id,))
    return [r[0] for r in rows]

async def update_job(conn: Connection, job_id: str, *, lease: str | None = None, **fields: Any) -> bool:
    """Update a job; with ``lease`` only if that worker still holds it. Returns whether it did."""
    return await update_leased(conn, "jobs", JOB_COLUMNS, job_id, lease, fields)

async def insert_job_images(conn: Connection, images: Iterable[JobImage]) -> None:
    await conn.executemany(
        """INSERT INTO job_images (job_id, idx, storage_key, format, width, height) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (job_id, idx) DO UPDATE SET storage_key = excluded.storage_key,
             format = excluded.format, width = excluded.width, height = excluded.height""",
        [(i.job_id, i.idx, i.storage_key, i.format, i.width, i.height) for i in images],
    )

async def job_images(conn: Connection, job_id: str) -> list[JobImage]:
    rows = await conn.execute_fetchall("SELECT * FROM job_images WHERE job_id = ? ORDER BY idx", (job_id,))
    return [row_to(JobImage, r) for r in rows]


async def due_for_expiry(conn: Connection, *, completed_before: float, limit: int = 500) -> list[str]:
    """Completed jobs whose images are older than the retention, not expired yet."""
    rows = await conn.execute_fetchall(
        "SELECT id FROM jobs WHERE status = 'COMPLETED' AND expired_at IS NULL AND completed_at < ? "
        "ORDER BY completed_at LIMIT ?", (completed_before, limit))
    return [r[0] for r in rows]


async def mark_expired(conn: Connection, job_ids: list[str], at: float) -> None:
    await conn.executemany("UPDATE jobs SET expired_at = ? WHERE id = ? AND expired_at IS NULL",
                           [(at, job_id) for job_id in job_ids])

