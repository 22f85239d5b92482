"""The database: one aiosqlite writer (serialised by a lock, ``BEGIN IMMEDIATE``) plus a small
pool of readers, in WAL mode so reads never wait on writes. Several processes (the API and
``lora-gateway worker``) may share the file; SQLite's lock plus ``busy_timeout`` orders them.

SQL lives only in ``gateway/store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator

import aiosqlite
import anyio
import structlog

from gateway.store.migrations import MIGRATIONS

log = structlog.get_logger()


class InlineReader:
    """Reads on the event loop's own thread through a plain sqlite3 connection.

    Every read the gateway makes is an indexed lookup of a few rows: tens of microseconds in
    SQLite, less than handing it to a database thread and back. In WAL mode a reader never
    waits for a writer. It offers the one method the store's read functions use."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self._conn.execute("PRAGMA query_only = ON")

    async def execute_fetchall(self, sql: str, parameters: Any = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, parameters).fetchall()

    def close(self) -> None:
        self._conn.close()


class Database:
    def __init__(
        self, path: Path, *, busy_timeout_ms: int = 10_000, read_connections: int = 4, inline_reads: bool = True
    ) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.read_connections = read_connections
        self.inline_reads = inline_reads
        self._inline: InlineReader | None = None
        self._writer: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute("PRAGMA synchronous = NORMAL")
        self._all.append(conn)
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._writer.execute("PRAGMA journal_mode = WAL")
        await self._migrate()
        if self.inline_reads:
            self._inline = InlineReader(self.path, min(self.busy_timeout_ms, 1000))
        else:
            for _ in range(self.read_connections):
                self._readers.put_nowait(await self._connect())

    async def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        for conn in self._all:
            with contextlib.suppress(Exception):
                await conn.close()
        self._all.clear()
        self._writer = None

    async def _migrate(self) -> None:
        async with self.tx() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {r[0] for r in await conn.execute_fetchall("SELECT name FROM _migrations")}
            for migration in MIGRATIONS:
                if migration.__name__ in done:
                    continue
                for statement in migration():
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, strftime('%s','now'))",
                    (migration.__name__,),
                )
                log.info("migration_applied", migration=migration.__name__)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction. Commits on success, rolls back on any exception.

        BEGIN, COMMIT and ROLLBACK are shielded from cancellation, so a cancelled task can
        never leave the shared writer connection inside a half-open transaction.
        """
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            conn = self._writer
            with anyio.CancelScope(shield=True):
                if conn.in_transaction:  # left open by a task cancelled outside anyio's control
                    await conn.execute("ROLLBACK")
                await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.execute("ROLLBACK")
                raise
            else:
                with anyio.CancelScope(shield=True):
                    await conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        """A reader (autocommit; each statement sees the latest commit)."""
        if self._inline is not None:
            yield self._inline
            return
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    async def ping(self) -> bool:
        async with self.read() as conn:
            rows = await conn.execute_fetchall("SELECT 1")
            return list(rows)[0][0] == 1
