"""Helpers the repositories share: JSON columns, ``SET`` lists, placeholder lists."""

from __future__ import annotations

from typing import Any, Iterable

import msgspec

from gateway.timeutil import now


def encode(value: Any) -> str:
    return msgspec.json.encode(value).decode()


decode = msgspec.json.decode


def marks(values: Iterable[Any]) -> str:
    """``?, ?, ?``: one placeholder per value."""
    return ", ".join("?" for _ in values)


def skip_locked(conn: Any) -> str:
    """What a claim's candidate SELECT ends with: PostgreSQL locks the rows it picks and skips
    those another transaction holds; SQLite's single writer needs nothing."""
    return " FOR UPDATE SKIP LOCKED" if conn.dialect == "postgresql" else ""


def lock_row(conn: Any) -> str:
    """What a SELECT ends with to lock its rows until the transaction ends (PostgreSQL)."""
    return " FOR UPDATE" if conn.dialect == "postgresql" else ""


def assignments(fields: dict[str, Any], allowed: set[str]) -> tuple[str, list[Any]]:
    """``col = ?, ...`` and its values (dicts and lists as JSON) for an UPDATE."""
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns: {sorted(unknown)}")
    cols = ", ".join(f"{k} = ?" for k in fields)
    values = [encode(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
    return cols, values


async def update_leased(
    conn: Any, table: str, allowed: set[str], row_id: str, lease: str | None, fields: dict[str, Any]
) -> bool:
    """UPDATE one row by id; with ``lease`` only while that worker holds it. Whether it did."""
    fields.setdefault("updated_at", now())
    cols, values = assignments(fields, allowed)
    sql = f"UPDATE {table} SET {cols} WHERE id = ?"
    args = [*values, row_id]
    if lease is not None:
        sql += " AND lease_owner = ?"
        args.append(lease)
    cur = await conn.execute(sql, args)
    return cur.rowcount == 1
