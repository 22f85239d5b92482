"""The SQLite backend (the embedded default): WAL mode, one writer per process plus readers, on
the event loop.

Every read the gateway makes is an indexed lookup of a few rows, and every write transaction
is a handful of such statements: tens of microseconds each in SQLite, less than handing the
work to a database thread and back. So by default both run on the event loop's own thread
through plain ``sqlite3`` connections (``database.inline_reads`` / ``inline_writes``):

- A write transaction (:meth:`Database.tx`) is serialised by an asyncio lock. Its body is a
  series of store calls whose ``await``s never suspend, so it runs from ``BEGIN`` to
  ``COMMIT`` in one go: one trip, no thread hand-offs. ``BEGIN IMMEDIATE`` never blocks the
  loop: when another process holds SQLite's write lock it is retried with short async sleeps
  until ``busy_timeout_ms`` has passed.
- In WAL mode with ``synchronous = NORMAL`` a commit does not fsync. The fsyncing part, the
  checkpoint that copies the log back into the database file, runs in a background thread
  (automatic checkpoints are off on the loop's connection).
- Readers never wait for the writer (WAL).

``inline_writes: false`` keeps the writer in an aiosqlite thread instead (each statement is
then a trip to that thread). Several processes (the API and ``lora-gateway worker``) may share
the file; SQLite's lock orders their transactions.

SQL lives only in ``gateway/store``. Notifications (``notify`` / ``listen``) are not needed
here: the processes sharing a SQLite file are on one machine and find new work by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import aiosqlite
import anyio
import structlog

from gateway.store.migrations import apply_migrations

log = structlog.get_logger()

#: how often the background thread checkpoints the WAL when something was committed
CHECKPOINT_EVERY_S = 1.0


class InlineConnection:
    """A plain sqlite3 connection used on the event loop's thread, with the async methods the
    store functions call. None of them suspends: awaiting one runs the statement at once."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def now(self) -> float:
        return time.time()  # every process sharing the file is on this machine: one clock

    async def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, parameters)

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, parameters)

    async def execute_fetchall(self, sql: str, parameters: Any = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, parameters).fetchall()

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def close(self) -> None:
        self._conn.close()


class ThreadedConnection:
    """An aiosqlite connection (its statements run in a thread of its own) behind the same
    methods."""

    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def now(self) -> float:
        return time.time()

    async def execute(self, sql: str, parameters: Any = ()) -> Any:
        return await self._conn.execute(sql, parameters)

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Any:
        return await self._conn.executemany(sql, parameters)

    async def execute_fetchall(self, sql: str, parameters: Any = ()) -> Any:
        return await self._conn.execute_fetchall(sql, parameters)

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    async def close(self) -> None:
        await self._conn.close()


def _sqlite(path: Path, *, busy_timeout_ms: int, query_only: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class _Checkpointer:
    """Checkpoints the WAL from a thread of its own, so the event loop never waits on the fsync."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self.path = Path(path)
        self.label = f"sqlite:///{self.path}"
        self.busy_timeout_ms = busy_timeout_ms
        self.commits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = _sqlite(self.path, busy_timeout_ms=self.busy_timeout_ms)
        try:
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                self._checkpoint(conn)
            self._checkpoint(conn)
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        if not self.commits:
            return
        self.commits = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:  # another process may hold a lock: the next round retries
            log.warning("wal_checkpoint_failed", error=str(e))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(
        self, path: Path, *, busy_timeout_ms: int = 10_000, read_connections: int = 4, inline_reads: bool = True,
        inline_writes: bool = True,
    ) -> None:
        self.path = Path(path)
        self.label = f"sqlite:///{self.path}"
        #: the migrations the last ``open`` applied
        self.applied: list[str] = []
        self.busy_timeout_ms = busy_timeout_ms
        self.read_connections = read_connections
        self.inline_reads = inline_reads
        self.inline_writes = inline_writes
        self._inline_reader: InlineConnection | None = None
        self._writer: InlineConnection | ThreadedConnection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[ThreadedConnection] = asyncio.Queue()
        self._threaded: list[ThreadedConnection] = []

    async def _connect(self) -> ThreadedConnection:
        raw = await aiosqlite.connect(self.path, isolation_level=None)
        raw.row_factory = aiosqlite.Row
        await raw.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        await raw.execute("PRAGMA foreign_keys = ON")
        await raw.execute("PRAGMA synchronous = NORMAL")
        conn = ThreadedConnection(raw)
        self._threaded.append(conn)
        return conn

    async def open(self, *, migrate: bool = True) -> None:
        """Open the file (made if missing) and bring its schema up to date, or with
        ``migrate=False`` only check it is (``MigrationsPending`` if not)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.inline_writes:
            # statements inside a held write transaction do not wait on locks in WAL mode; a
            # short timeout covers the rare exception without ever stalling the loop for long
            raw = _sqlite(self.path, busy_timeout_ms=min(self.busy_timeout_ms, 100))
            raw.execute("PRAGMA journal_mode = WAL")
            raw.execute("PRAGMA wal_autocheckpoint = 0")
            self._writer = InlineConnection(raw)
            self._checkpointer = _Checkpointer(self.path, self.busy_timeout_ms)
        else:
            self._writer = await self._connect()
            await self._writer.execute("PRAGMA journal_mode = WAL")
        async with self.tx() as conn:
            self.applied = await apply_migrations(conn, apply=migrate)
        if self.inline_reads:
            self._inline_reader = InlineConnection(
                _sqlite(self.path, busy_timeout_ms=min(self.busy_timeout_ms, 1000), query_only=True)
            )
        else:
            for _ in range(self.read_connections):
                self._readers.put_nowait(await self._connect())

    async def close(self) -> None:
        if self._inline_reader is not None:
            self._inline_reader.close()
            self._inline_reader = None
        if isinstance(self._writer, InlineConnection):
            self._writer.close()
        self._writer = None
        if self._checkpointer is not None:
            await anyio.to_thread.run_sync(self._checkpointer.stop)
            self._checkpointer = None
        for conn in self._threaded:
            with contextlib.suppress(Exception):
                await conn.close()
        self._threaded.clear()

    async def _begin(self, conn: InlineConnection) -> None:
        """``BEGIN IMMEDIATE`` without blocking the loop: while another process holds the write
        lock, retry after short, growing, jittered sleeps, for up to ``busy_timeout_ms``."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 0.001
        raw = conn._conn
        while True:
            raw.execute("PRAGMA busy_timeout = 0")
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
            finally:
                raw.execute(f"PRAGMA busy_timeout = {min(self.busy_timeout_ms, 100)}")
            await anyio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Any]:
        """One write transaction. Commits on success, rolls back on any exception."""
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            conn = self._writer
            if isinstance(conn, InlineConnection):
                async with self._inline_tx(conn) as c:
                    yield c
                return
            # threaded writer: BEGIN, COMMIT and ROLLBACK are shielded from cancellation, so a
            # cancelled task can never leave the shared connection inside a half-open transaction
            with anyio.CancelScope(shield=True):
                if conn.in_transaction:
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
    async def _inline_tx(self, conn: InlineConnection) -> AsyncIterator[InlineConnection]:
        raw = conn._conn
        if raw.in_transaction:  # a body interrupted without reaching its rollback
            raw.execute("ROLLBACK")
        await self._begin(conn)
        try:
            yield conn
        except BaseException:
            raw.execute("ROLLBACK")
            raise
        raw.execute("COMMIT")
        assert self._checkpointer is not None
        self._checkpointer.commits += 1

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        """A reader (autocommit; each statement sees the latest commit)."""
        if self._inline_reader is not None:
            yield self._inline_reader
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

    async def notify(self, channel: str, payload: str = "") -> None:
        return None  # one machine: the other processes poll

    def listen(self, channel: str, callback: Callable[[str], Any]) -> None:
        return None
