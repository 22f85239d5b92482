"""Teams, users and API keys."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.store.base import Connection
from gateway.store.ledger import apply_credits
from gateway.store.models import ApiKey, Team, User, row_to
from gateway.store.sql import lock_row
from gateway.timeutil import new_id, now


async def create_team(
    conn: Connection, *, name: str, credits: int = 0, max_concurrent_trainings: int = 10
) -> Team:
    team_id = new_id()
    await conn.execute(
        "INSERT INTO teams (id, name, credits, max_concurrent_trainings, created_at) VALUES (?, ?, 0, ?, ?)",
        (team_id, name, max_concurrent_trainings, now()),
    )
    if credits:
        await apply_credits(conn, team_id, credits, reason="initial credits", ref=new_id(), kind="grant")
    team = await get_team(conn, team_id)
    assert team is not None
    return team

async def get_team(conn: Connection, team_id: str, *, lock: bool = False) -> Team | None:
    """A team; ``lock``: its row stays locked until the transaction ends (PostgreSQL; SQLite's
    write transactions are serialised already)."""
    rows = list(await conn.execute_fetchall(f"SELECT * FROM teams WHERE id = ?{lock_row(conn) if lock else ''}",
                                            (team_id,)))
    return row_to(Team, rows[0]) if rows else None

async def find_teams(conn: Connection, ref: str) -> list[Team]:
    """Teams whose id is ``ref``, else those named ``ref`` (case-insensitively)."""
    rows = list(await conn.execute_fetchall("SELECT * FROM teams WHERE id = ?", (ref.lower(),)))
    if not rows:
        rows = list(await conn.execute_fetchall(
            "SELECT * FROM teams WHERE LOWER(name) = LOWER(?) ORDER BY created_at", (ref,)))
    return [row_to(Team, r) for r in rows]


async def list_teams(conn: Connection) -> list[Team]:
    return [row_to(Team, r) for r in await conn.execute_fetchall("SELECT * FROM teams ORDER BY created_at")]

async def set_team_limits(
    conn: Connection,
    team_id: str,
    *,
    max_concurrent_trainings: int | None = None,
    rate_limit_per_minute: int | None = None,
) -> bool:
    cur = await conn.execute(
        """UPDATE teams SET
             max_concurrent_trainings = COALESCE(?, max_concurrent_trainings),
             rate_limit_per_minute = COALESCE(?, rate_limit_per_minute)
           WHERE id = ?""",
        (max_concurrent_trainings, rate_limit_per_minute, team_id),
    )
    return cur.rowcount == 1

async def team_routing(conn: Connection, team_id: str) -> dict[str, Any] | None:
    """A team's own routes as stored (``{"training": {...}, "inference": {...}}``), or None."""
    rows = list(await conn.execute_fetchall("SELECT routing FROM teams WHERE id = ?", (team_id,)))
    return msgspec.json.decode(rows[0][0]) if rows and rows[0][0] else None

async def set_team_routing(conn: Connection, team_id: str, routing: dict[str, Any] | None) -> bool:
    cur = await conn.execute("UPDATE teams SET routing = ? WHERE id = ?",
                             (msgspec.json.encode(routing).decode() if routing else None, team_id))
    return cur.rowcount == 1

async def create_user(conn: Connection, *, team_id: str, email: str | None, role: str = "owner") -> User:
    user_id = new_id()
    await conn.execute(
        "INSERT INTO users (id, team_id, email, role, created_at) VALUES (?, ?, ?, ?, ?)",
        (user_id, team_id, email, role, now()),
    )
    return User(id=user_id, team_id=team_id, email=email, role=role)

async def get_user(conn: Connection, user_id: str) -> User | None:
    rows = list(await conn.execute_fetchall("SELECT id, team_id, email, role FROM users WHERE id = ?", (user_id,)))
    return row_to(User, rows[0]) if rows else None

async def team_owner(conn: Connection, team_id: str) -> User | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT id, team_id, email, role FROM users WHERE team_id = ? ORDER BY created_at LIMIT 1", (team_id,)
        )
    )
    return row_to(User, rows[0]) if rows else None

async def insert_key(
    conn: Connection, *, team_id: str, user_id: str, name: str, prefix: str, digest: bytes
) -> ApiKey:
    key_id = new_id()
    ts = now()
    await conn.execute(
        """INSERT INTO api_keys (id, team_id, user_id, name, prefix, digest, active, created_at)
           VALUES (?, ?, ?, ?, ?, ?, 1, ?)""",
        (key_id, team_id, user_id, name, prefix, digest, ts),
    )
    return ApiKey(
        id=key_id, team_id=team_id, user_id=user_id, name=name, prefix=prefix, digest=digest,
        active=True, created_at=ts, revoked_at=None,
    )

async def key_with_team_limit(conn: Connection, digest: bytes) -> tuple[ApiKey, int | None] | None:
    """The key for a digest plus its team's rate-limit override, in one query (the auth path)."""
    rows = list(
        await conn.execute_fetchall(
            """SELECT k.*, t.rate_limit_per_minute AS team_rate FROM api_keys k JOIN teams t ON t.id = k.team_id
               WHERE k.digest = ?""",
            (digest,),
        )
    )
    if not rows:
        return None
    data = dict(rows[0])
    team_rate = data.pop("team_rate")
    return row_to(ApiKey, data), team_rate

async def key_by_id(conn: Connection, key_id: str) -> ApiKey | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM api_keys WHERE id = ?", (key_id,)))
    return row_to(ApiKey, rows[0]) if rows else None

async def find_keys(conn: Connection, *, key_id: str, prefix: str, digest: bytes | None) -> list[ApiKey]:
    """Keys with this id, or this display prefix, or (given) this digest."""
    rows = await conn.execute_fetchall(
        "SELECT * FROM api_keys WHERE id = ? OR prefix = ? OR digest = ? ORDER BY created_at",
        (key_id, prefix, digest or b""))
    return [row_to(ApiKey, r) for r in rows]


async def list_keys(conn: Connection, team_id: str) -> list[ApiKey]:
    rows = await conn.execute_fetchall("SELECT * FROM api_keys WHERE team_id = ? ORDER BY created_at", (team_id,))
    return [row_to(ApiKey, r) for r in rows]

async def revoke_key(conn: Connection, key_id: str) -> bool:
    cur = await conn.execute(
        "UPDATE api_keys SET active = 0, revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now(), key_id)
    )
    return cur.rowcount == 1

async def set_key_active(conn: Connection, key_id: str, active: bool) -> bool:
    cur = await conn.execute("UPDATE api_keys SET active = ? WHERE id = ?", (int(active), key_id))
    return cur.rowcount == 1
