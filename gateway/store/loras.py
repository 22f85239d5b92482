"""LoRAs and their artifacts (the stored weights)."""

from __future__ import annotations

from typing import Any

from gateway.store.base import Connection
from gateway.store.models import Artifact, Lora, row_to
from gateway.store.sql import decode, marks, update_leased

ACTIVE_LORA = ("PENDING", "UPLOADING", "TRAINING")
LORA_COLUMNS = set(Lora.__struct_fields__)


def lora_from_row(row: Any) -> Lora:
    data = dict(row)
    data["sample_keys"] = decode(data["sample_keys"]) if data.get("sample_keys") else None
    return row_to(Lora, data)


async def insert_lora(conn: Connection, **fields: Any) -> bool:
    """Insert a LoRA; False (nothing written) when a live LoRA already has its trigger word
    (the unique index ``loras_live_trigger``): draw another word and try again."""
    cols = ", ".join(fields)
    cur = await conn.execute(
        f"""INSERT INTO loras ({cols}) VALUES ({marks(fields)})
            ON CONFLICT (trigger_word) WHERE status NOT IN ('FAILED','ARCHIVED') DO NOTHING""",
        tuple(fields.values()),
    )
    return cur.rowcount == 1


async def get_lora(conn: Connection, lora_id: str, team_id: str | None = None) -> Lora | None:
    if team_id is None:
        rows = await conn.execute_fetchall("SELECT * FROM loras WHERE id = ?", (lora_id,))
    else:
        rows = await conn.execute_fetchall("SELECT * FROM loras WHERE id = ? AND team_id = ?", (lora_id, team_id))
    rows = list(rows)
    return lora_from_row(rows[0]) if rows else None

async def lora_status(conn: Connection, lora_id: str, team_id: str) -> str | None:
    """A team's LoRA's status (None: no such LoRA for this team); one indexed column."""
    rows = list(await conn.execute_fetchall("SELECT status FROM loras WHERE id = ? AND team_id = ?", (lora_id, team_id)))
    return rows[0][0] if rows else None

async def list_loras(
    conn: Connection, team_id: str, *, limit: int, cursor: str | None, include_archived: bool
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
    return [lora_from_row(r) for r in rows]

async def count_active_trainings(conn: Connection, team_id: str) -> int:
    rows = await conn.execute_fetchall(
        "SELECT COUNT(*) FROM loras WHERE team_id = ? AND status IN ('PENDING','UPLOADING','TRAINING')", (team_id,)
    )
    return int(list(rows)[0][0])

async def ended_ids(conn: Connection, ids: list[str]) -> set[str]:
    """Those of ``ids`` whose LoRA is missing or no longer active (``ACTIVE_LORA``)."""
    if not ids:
        return set()
    rows = await conn.execute_fetchall(
        f"SELECT id FROM loras WHERE id IN ({marks(ids)}) AND status IN ({marks(ACTIVE_LORA)})", (*ids, *ACTIVE_LORA))
    return set(ids) - {r[0] for r in rows}


async def update_lora(conn: Connection, lora_id: str, *, lease: str | None = None, **fields: Any) -> bool:
    """Update a lora; with ``lease`` only if that worker still holds it. Returns whether it did."""
    return await update_leased(conn, "loras", LORA_COLUMNS, lora_id, lease, fields)

async def insert_artifact(conn: Connection, artifact: Artifact) -> None:
    data = {k: getattr(artifact, k) for k in Artifact.__struct_fields__}
    cols = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    await conn.execute(
        f"INSERT INTO artifacts ({cols}) VALUES ({marks}) ON CONFLICT (lora_id) DO NOTHING", tuple(data.values())
    )

async def artifact_for(conn: Connection, lora_id: str) -> Artifact | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM artifacts WHERE lora_id = ?", (lora_id,)))
    return row_to(Artifact, rows[0]) if rows else None
