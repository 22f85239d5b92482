"""The PostgreSQL backend (``database.url: postgresql://...``), for several gateway replicas on
one database: asyncpg with its own connection pool.

- The repositories' SQL is shared with SQLite: ``?`` placeholders become ``$1, $2, ...`` (once
  per statement text, cached), booleans are sent as integers (the schema keeps SQLite's
  0/1 columns), and status strings (``UPDATE 3``) become a ``rowcount``.
- ``tx()`` is one transaction on one pooled connection, at PostgreSQL's default isolation (READ
  COMMITTED). The invariants that SQLite's single writer gave for free are made by the
  database: claims take rows ``FOR UPDATE SKIP LOCKED``, the team cap counts under a lock on the
  team's row, idempotency keys are inserted first as the lock, trigger words are unique by
  constraint, and leases are measured by the database's clock (``now()``).
- ``notify`` / ``listen`` are ``NOTIFY`` / ``LISTEN``: one extra connection per process, kept
  open (and reopened with backoff if it drops; every listener is then called once, since
  notifications may have been missed). Polling stays the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from gateway.store.migrations import apply_migrations

log = structlog.get_logger()

#: channels are namespaced, so one PostgreSQL server can hold several gateways' databases
CHANNEL_PREFIX = "lora_gateway_"


@functools.lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """``?`` placeholders as ``$n``, leaving string literals, quoted names and comments alone."""
    out: list[str] = []
    n = 0
    i, size = 0, len(sql)
    while i < size:
        c = sql[i]
        if c in ("'", '"'):
            j = sql.index(c, i + 1)
            while j + 1 < size and sql[j + 1] == c:  # a doubled quote inside the literal
                j = sql.index(c, j + 2)
            out.append(sql[i:j + 1])
            i = j + 1
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = size if j < 0 else j
            out.append(sql[i:j])
            i = j
        elif c == "$" and re.match(r"\$\w*\$", sql[i:]):  # a dollar-quoted body (a function's)
            tag = re.match(r"\$\w*\$", sql[i:]).group(0)  # type: ignore[union-attr]
            j = sql.index(tag, i + len(tag)) + len(tag)
            out.append(sql[i:j])
            i = j
        elif c == "?":
            n += 1
            out.append(f"${n}")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _args(parameters: Sequence[Any]) -> list[Any]:
    return [int(p) if isinstance(p, bool) else p for p in parameters]


def _rowcount(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _Status:
    __slots__ = ("rowcount",)

    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount


class PgConnection:
    """A pooled asyncpg connection behind the store's Connection protocol."""

    dialect = "postgresql"

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Status:
        if parameters:
            status = await self._raw.execute(translate(sql), *_args(parameters))
        else:
            status = await self._raw.execute(sql)
        return _Status(_rowcount(status))

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> None:
        rows = [_args(p) for p in parameters]
        if rows:
            await self._raw.executemany(translate(sql), rows)

    async def execute_fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[asyncpg.Record]:
        return await self._raw.fetch(translate(sql), *_args(parameters))

    async def now(self) -> float:
        return float(await self._raw.fetchval("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"))


def redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout_s: float = 10.0,
                 statement_timeout_ms: int = 30_000) -> None:
        self.url = url
        self.label = redact(url)
        #: the migrations the last ``open`` applied
        self.applied: list[str] = []
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self._pool: asyncpg.Pool | None = None
        self._listeners: dict[str, list[Callable[[str], Any]]] = {}
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listening: set[str] = set()

    async def _connect_settings(self) -> dict[str, Any]:
        return {"server_settings": {"statement_timeout": str(self.statement_timeout_ms),
                                    "application_name": "lora-gateway"},
                "timeout": self.connect_timeout_s}

    async def open(self, *, migrate: bool = True) -> None:
        kw = await self._connect_settings()
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                               max_inactive_connection_lifetime=300, **kw)
        async with self.tx() as conn:
            self.applied = await apply_migrations(conn, apply=migrate)
        if self._listeners:
            self._start_listening()

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(BaseException):
                await self._listen_task
            self._listen_task = None
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await self._listen_conn.close(timeout=5)
            self._listen_conn = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[PgConnection]:
        assert self._pool is not None, "database is not open"
        async with self._pool.acquire() as raw, raw.transaction():
            yield PgConnection(raw)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[PgConnection]:
        assert self._pool is not None, "database is not open"
        async with self._pool.acquire() as raw:
            yield PgConnection(raw)

    async def ping(self) -> bool:
        assert self._pool is not None
        return await self._pool.fetchval("SELECT 1") == 1

    # ------------------------------------------------------------------ notifications

    async def notify(self, channel: str, payload: str = "") -> None:
        assert self._pool is not None
        await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL_PREFIX + channel, payload)

    def listen(self, channel: str, callback: Callable[[str], Awaitable[None] | None]) -> None:
        self._listeners.setdefault(CHANNEL_PREFIX + channel, []).append(callback)
        if self._pool is not None:
            self._start_listening()

    def _start_listening(self) -> None:
        if self._listen_task is None or self._listen_task.done():
            self._listen_task = asyncio.get_running_loop().create_task(self._keep_listening())
        elif self._listen_conn is not None:  # a channel added while connected
            asyncio.get_running_loop().create_task(self._add_channels(self._listen_conn))

    async def _add_channels(self, conn: asyncpg.Connection) -> None:
        for channel in list(self._listeners):
            if channel not in self._listening:
                self._listening.add(channel)
                await conn.add_listener(channel, self._dispatch)

    def _dispatch(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        for callback in self._listeners.get(channel, []):
            self._call(callback, payload)

    @staticmethod
    def _call(callback: Callable[[str], Any], payload: str) -> None:
        try:
            result = callback(payload)
            if asyncio.iscoroutine(result):
                asyncio.get_running_loop().create_task(result)
        except Exception:  # noqa: BLE001 - a listener's bug must not stop the others
            log.exception("notification_callback_failed")

    async def _keep_listening(self) -> None:
        """One connection that LISTENs on every channel; reopened with backoff when it drops."""
        delay = 0.5
        first = True
        while True:
            try:
                conn = await asyncpg.connect(self.url, **await self._connect_settings())
            except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
                log.warning("listen_connect_failed", error=str(e), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._listen_conn, self._listening = conn, set()
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            try:
                await self._add_channels(conn)
                if not first:  # notifications may have been missed meanwhile: look now
                    for callbacks in self._listeners.values():
                        for callback in callbacks:
                            self._call(callback, "")
                first, delay = False, 0.5
                while not conn.is_closed():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=30)
                    if not conn.is_closed():  # a keep-alive: a dead peer shows up here
                        try:
                            await conn.execute("SELECT 1", timeout=10)
                        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
                            break
                log.warning("listen_connection_lost")
            finally:
                self._listen_conn = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
