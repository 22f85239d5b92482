"""Loras, jobs, attempts and artifacts: the rows the engine works on.

Both loras and jobs are queue rows: ``next_run_at`` says when a step is due and a lease
(``lease_owner``, ``lease_expires``) says who is working on it. Updates made by a worker are
conditioned on its lease, so a worker that lost its lease (it was too slow, or another
process took over after a crash) changes nothing.
"""

from __future__ import annotations

from typing import Any, Iterable

import aiosqlite
import msgspec

from gateway.store.models import Artifact, Attempt, Job, JobImage, Lora, row_to
from gateway.timeutil import now

ACTIVE_LORA = ("PENDING", "UPLOADING", "TRAINING")
ACTIVE_JOB = ("QUEUED", "PROCESSING")
_TABLES = {"lora": "loras", "job": "jobs"}
_ACTIVE = {"lora": ACTIVE_LORA, "job": ACTIVE_JOB}

_LORA_COLUMNS = set(Lora.__struct_fields__)
_JOB_COLUMNS = set(Job.__struct_fields__)
_ATTEMPT_COLUMNS = set(Attempt.__struct_fields__)


def _encode(value: Any) -> str:
    return msgspec.json.encode(value).decode()


_decode = msgspec.json.decode


def _job(row: Any) -> Job:
    data = dict(row)
    data["input"] = _decode(data["input"])
    for col in ("webhook_events", "ignored_params"):
        data[col] = _decode(data[col]) if data.get(col) else None
    return row_to(Job, data)


def _lora(row: Any) -> Lora:
    data = dict(row)
    data["sample_keys"] = _decode(data["sample_keys"]) if data.get("sample_keys") else None
    return row_to(Lora, data)


def _assignments(fields: dict[str, Any], allowed: set[str]) -> tuple[str, list[Any]]:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns: {sorted(unknown)}")
    cols = ", ".join(f"{k} = ?" for k in fields)
    values = [_encode(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
    return cols, values


# --------------------------------------------------------------------------- loras


async def insert_lora(conn: aiosqlite.Connection, **fields: Any) -> None:
    cols = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    await conn.execute(f"INSERT INTO loras ({cols}) VALUES ({marks})", tuple(fields.values()))


async def get_lora(conn: aiosqlite.Connection, lora_id: str, team_id: str | None = None) -> Lora | None:
    if team_id is None:
        rows = await conn.execute_fetchall("SELECT * FROM loras WHERE id = ?", (lora_id,))
    else:
        rows = await conn.execute_fetchall("SELECT * FROM loras WHERE id = ? AND team_id = ?", (lora_id, team_id))
    rows = list(rows)
    return _lora(rows[0]) if rows else None


async def lora_status(conn: aiosqlite.Connection, lora_id: str, team_id: str) -> str | None:
    """A team's LoRA's status (None: no such LoRA for this team); one indexed column."""
    rows = list(await conn.execute_fetchall("SELECT status FROM loras WHERE id = ? AND team_id = ?", (lora_id, team_id)))
    return rows[0][0] if rows else None


async def list_loras(
    conn: aiosqlite.Connection, team_id: str, *, limit: int, cursor: str | None, include_archived: bool
) -> list[Lora]:
    """Newest first; ``cursor`` is the id of the last item of the previous page."""
    where = ["team_id = ?"]
    args: list[Any] = [team_id]
    if not include_archived:
        where.append("status != 'ARCHIVED'")
    if cursor:
        where.append(
            "(created_at, id) < (SELECT created_at, id FROM loras WHERE id = ? AND team_id = ?)"
        )
        args += [cursor, team_id]
    rows = await conn.execute_fetchall(
        f"SELECT * FROM loras WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?",
        (*args, limit),
    )
    return [_lora(r) for r in rows]


async def count_active_trainings(conn: aiosqlite.Connection, team_id: str) -> int:
    rows = await conn.execute_fetchall(
        "SELECT COUNT(*) FROM loras WHERE team_id = ? AND status IN ('PENDING','UPLOADING','TRAINING')", (team_id,)
    )
    return int(list(rows)[0][0])


async def trigger_word_taken(conn: aiosqlite.Connection, word: str) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM loras WHERE trigger_word = ? AND status NOT IN ('FAILED','ARCHIVED')", (word,)
    )
    return bool(list(rows))


async def update_lora(conn: aiosqlite.Connection, lora_id: str, *, lease: str | None = None, **fields: Any) -> bool:
    """Update a lora; with ``lease`` only if that worker still holds it. Returns whether it did."""
    return await _update_row(conn, "loras", _LORA_COLUMNS, lora_id, lease, fields)


async def update_row(conn: aiosqlite.Connection, kind: str, row_id: str, *, lease: str | None = None, **fields: Any) -> bool:
    """``update_lora`` / ``update_job`` by kind ('lora' or 'job')."""
    table = _TABLES[kind]
    return await _update_row(conn, table, _LORA_COLUMNS if kind == "lora" else _JOB_COLUMNS, row_id, lease, fields)


async def _update_row(
    conn: aiosqlite.Connection, table: str, allowed: set[str], row_id: str, lease: str | None, fields: dict[str, Any]
) -> bool:
    fields.setdefault("updated_at", now())
    cols, values = _assignments(fields, allowed)
    sql = f"UPDATE {table} SET {cols} WHERE id = ?"
    args = [*values, row_id]
    if lease is not None:
        sql += " AND lease_owner = ?"
        args.append(lease)
    cur = await conn.execute(sql, args)
    return cur.rowcount == 1


# --------------------------------------------------------------------------- jobs


async def insert_job(conn: aiosqlite.Connection, **fields: Any) -> None:
    values = [_encode(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
    cols = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    await conn.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", values)


async def get_job(conn: aiosqlite.Connection, job_id: str, team_id: str | None = None) -> Job | None:
    if team_id is None:
        rows = await conn.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,))
    else:
        rows = await conn.execute_fetchall("SELECT * FROM jobs WHERE id = ? AND team_id = ?", (job_id, team_id))
    rows = list(rows)
    return _job(rows[0]) if rows else None


async def list_jobs(
    conn: aiosqlite.Connection,
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
    return [_job(r) for r in rows]


async def job_models(conn: aiosqlite.Connection, team_id: str) -> list[str]:
    rows = await conn.execute_fetchall("SELECT DISTINCT model FROM jobs WHERE team_id = ? ORDER BY model", (team_id,))
    return [r[0] for r in rows]


async def update_job(conn: aiosqlite.Connection, job_id: str, *, lease: str | None = None, **fields: Any) -> bool:
    """Update a job; with ``lease`` only if that worker still holds it. Returns whether it did."""
    return await _update_row(conn, "jobs", _JOB_COLUMNS, job_id, lease, fields)


async def insert_job_images(conn: aiosqlite.Connection, images: Iterable[JobImage]) -> None:
    await conn.executemany(
        """INSERT INTO job_images (job_id, idx, storage_key, format, width, height) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (job_id, idx) DO UPDATE SET storage_key = excluded.storage_key,
             format = excluded.format, width = excluded.width, height = excluded.height""",
        [(i.job_id, i.idx, i.storage_key, i.format, i.width, i.height) for i in images],
    )


async def job_images(conn: aiosqlite.Connection, job_id: str) -> list[JobImage]:
    rows = await conn.execute_fetchall("SELECT * FROM job_images WHERE job_id = ? ORDER BY idx", (job_id,))
    return [row_to(JobImage, r) for r in rows]


# --------------------------------------------------------------------------- leases (both kinds)


async def claim_due(
    conn: aiosqlite.Connection, kind: str, *, owner: str, lease_s: float, limit: int, at: float | None = None,
    only_stage: str | None = None, skip_stage: str | None = None,
) -> list[Lora] | list[Job]:
    """Lease up to ``limit`` rows of ``kind`` ('lora' or 'job') due by ``at`` (default now);
    return them, leased. ``only_stage``/``skip_stage`` select by stage."""
    table, active = _TABLES[kind], _ACTIVE[kind]
    t = now()
    due = t if at is None else at
    marks = ", ".join("?" for _ in active)
    stage_sql, stage_args = "", []
    if only_stage is not None:
        stage_sql, stage_args = " AND stage = ?", [only_stage]
    elif skip_stage is not None:
        stage_sql, stage_args = " AND stage != ?", [skip_stage]
    rows = await conn.execute_fetchall(
        f"""UPDATE {table} SET lease_owner = ?, lease_expires = ?
            WHERE id IN (
              SELECT id FROM {table}
              WHERE status IN ({marks}) AND next_run_at <= ?{stage_sql}
                AND (lease_expires IS NULL OR lease_expires < ?)
              ORDER BY next_run_at LIMIT ?)
            RETURNING *""",
        (owner, t + lease_s, *active, due, *stage_args, t, limit),
    )
    return [_lora(r) for r in rows] if kind == "lora" else [_job(r) for r in rows]


# --------------------------------------------------------------------------- attempts


async def insert_attempt(conn: aiosqlite.Connection, attempt: Attempt) -> None:
    data = {k: getattr(attempt, k) for k in Attempt.__struct_fields__}
    cols = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    await conn.execute(f"INSERT INTO attempts ({cols}) VALUES ({marks})", tuple(data.values()))


async def update_attempt(conn: aiosqlite.Connection, attempt_id: str, **fields: Any) -> None:
    cols, values = _assignments(fields, _ATTEMPT_COLUMNS)
    await conn.execute(f"UPDATE attempts SET {cols} WHERE id = ?", (*values, attempt_id))


async def attempts_for(conn: aiosqlite.Connection, kind: str, owner_id: str) -> list[Attempt]:
    rows = await conn.execute_fetchall(
        "SELECT * FROM attempts WHERE owner_kind = ? AND owner_id = ? ORDER BY seq", (kind, owner_id)
    )
    return [row_to(Attempt, r) for r in rows]


async def current_attempts(conn: aiosqlite.Connection, kind: str, owner_ids: list[str]) -> list[Attempt]:
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


async def apply_running_polls(conn: aiosqlite.Connection, kind: str, owner: str, updates: list[dict[str, Any]]) -> None:
    """Record "still queued/running" answers for many rows of ``kind`` and release them until
    their next poll: two statements for the whole batch. Rows whose lease ``owner`` lost are
    left alone."""
    table = _TABLES[kind]
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


async def get_attempt(conn: aiosqlite.Connection, attempt_id: str) -> Attempt | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM attempts WHERE id = ?", (attempt_id,)))
    return row_to(Attempt, rows[0]) if rows else None


async def hint_attempt(conn: aiosqlite.Connection, provider: str, attempt_id: str, *, every_s: float) -> str | None:
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
    table, active = _TABLES[attempt.owner_kind], _ACTIVE[attempt.owner_kind]
    marks = ", ".join("?" for _ in active)
    cur = await conn.execute(
        f"UPDATE {table} SET next_run_at = ? WHERE id = ? AND stage = 'poll' AND status IN ({marks})",
        (t, attempt.owner_id, *active),
    )
    return attempt.owner_id if cur.rowcount == 1 else None


async def count_by_status(conn: aiosqlite.Connection) -> dict[tuple[str, str], int]:
    """``(kind, status) -> rows``, for both kinds."""
    out: dict[tuple[str, str], int] = {}
    for kind, table in _TABLES.items():
        for status, n in await conn.execute_fetchall(f"SELECT status, COUNT(*) FROM {table} GROUP BY status"):
            out[(kind, status)] = int(n)
    return out


async def attempts_in_flight(conn: aiosqlite.Connection, states: Iterable[str]) -> dict[tuple[str, str], int]:
    """``(provider, owner kind) -> count`` of attempts in ``states``."""
    states = list(states)
    marks = ", ".join("?" for _ in states)
    rows = await conn.execute_fetchall(
        f"SELECT provider, owner_kind, COUNT(*) FROM attempts WHERE state IN ({marks}) GROUP BY provider, owner_kind",
        states,
    )
    return {(r[0], r[1]): int(r[2]) for r in rows}


async def team_usage(conn: aiosqlite.Connection, team_id: str, *, since: float) -> list[tuple[str, str, str, float, float]]:
    """``(provider, kind, currency, submitted_at, cost)`` of the team's attempts a provider accepted since ``since``."""
    rows = await conn.execute_fetchall(
        """SELECT a.provider, a.owner_kind, a.currency, a.submitted_at, a.cost FROM attempts a
           WHERE a.submitted_at >= ? AND a.provider_ref IS NOT NULL AND (
             (a.owner_kind = 'lora' AND a.owner_id IN (SELECT id FROM loras WHERE team_id = ?)) OR
             (a.owner_kind = 'job' AND a.owner_id IN (SELECT id FROM jobs WHERE team_id = ?)))""",
        (since, team_id, team_id),
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def current_attempt(conn: aiosqlite.Connection, kind: str, owner_id: str) -> Attempt | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT * FROM attempts WHERE owner_kind = ? AND owner_id = ? ORDER BY seq DESC LIMIT 1", (kind, owner_id)
        )
    )
    return row_to(Attempt, rows[0]) if rows else None


# --------------------------------------------------------------------------- artifacts


async def insert_artifact(conn: aiosqlite.Connection, artifact: Artifact) -> None:
    data = {k: getattr(artifact, k) for k in Artifact.__struct_fields__}
    cols = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    await conn.execute(
        f"INSERT INTO artifacts ({cols}) VALUES ({marks}) ON CONFLICT (lora_id) DO NOTHING", tuple(data.values())
    )


async def artifact_for(conn: aiosqlite.Connection, lora_id: str) -> Artifact | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM artifacts WHERE lora_id = ?", (lora_id,)))
    return row_to(Artifact, rows[0]) if rows else None


async def renew_leases(conn: aiosqlite.Connection, owner: str, until: float, rows: Iterable[tuple[str, str]]) -> None:
    """Extend ``owner``'s leases on the given (kind, id) rows, the ones it is working on."""
    for kind, table in _TABLES.items():
        ids = [row_id for k, row_id in rows if k == kind]
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ", ".join("?" for _ in chunk)
            await conn.execute(
                f"UPDATE {table} SET lease_expires = ? WHERE lease_owner = ? AND id IN ({marks})", (until, owner, *chunk)
            )


async def release_owner(conn: aiosqlite.Connection, owner: str) -> None:
    for table in _TABLES.values():
        await conn.execute(
            f"UPDATE {table} SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = ?", (owner,)
        )


async def bind_callback(conn: aiosqlite.Connection, provider: str, attempt_id: str, ref: str) -> bool:
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


async def poll_now_for_ref(conn: aiosqlite.Connection, provider: str, ref: str) -> str | None:
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
    table, active = _TABLES[kind], _ACTIVE[kind]
    marks = ", ".join("?" for _ in active)
    cur = await conn.execute(
        f"UPDATE {table} SET next_run_at = ? WHERE id = ? AND stage IN ('submit', 'poll') AND status IN ({marks})",
        (now(), owner_id, *active),
    )
    return owner_id if cur.rowcount == 1 else None
