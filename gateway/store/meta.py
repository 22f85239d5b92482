"""Small key-value settings the gateway keeps in its database (the URL-signing secret)."""

from __future__ import annotations

from gateway.store.base import Connection


async def get(conn: Connection, key: str) -> str | None:
    rows = list(await conn.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,)))
    return rows[0][0] if rows else None


async def put_new(conn: Connection, key: str, value: str) -> str:
    """Store ``value`` unless the key has one already; return the value that is stored."""
    await conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
    stored = await get(conn, key)
    assert stored is not None
    return stored
