"""What the repositories (the other modules of ``gateway.store``) run on: a ``Connection``, one
unit of work, handed out by a ``Database``. Two backends implement them: SQLite
(``gateway.store.db``, the embedded default) and PostgreSQL (``gateway.store.postgres``).

The repositories are plain async functions, one module per kind of row (``loras``, ``jobs``,
``attempts``, ``queue``, ``ledger``, ``teams``, ``deliveries``, ``idempotency``, ``cancels``,
``health``, ``workers``, ``meta``), taking the connection as their first argument. Their SQL is
written once, with ``?`` placeholders; where the two databases need different SQL (claims
that skip rows another replica has locked, row locks, the database's clock), a repository asks
``conn.dialect``. No SQL lives outside ``gateway/store``.
"""

from __future__ import annotations

from typing import Any, AsyncContextManager, Awaitable, Callable, Iterable, Literal, Protocol, Sequence

Dialect = Literal["sqlite", "postgresql"]


class Result(Protocol):
    #: rows the statement changed
    rowcount: int


class Connection(Protocol):
    """One unit of work: inside ``Database.tx()`` every statement belongs to one transaction,
    committed when the block ends and rolled back if it raises; from ``Database.read()``, each
    statement sees the latest commit."""

    dialect: Dialect

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Result: ...

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Any: ...

    async def execute_fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> Sequence[Any]:
        """Rows that read like tuples (``row[0]``) and mappings (``row["id"]``, ``dict(row)``)."""
        ...

    async def now(self) -> float:
        """The database's clock (seconds since the epoch): what leases are measured by, so
        replicas on machines whose clocks differ agree on who holds a row."""
        ...


class Database(Protocol):
    dialect: Dialect
    #: where it is, without credentials (for logs and /readyz)
    label: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def tx(self) -> AsyncContextManager[Connection]: ...

    def read(self) -> AsyncContextManager[Connection]: ...

    async def ping(self) -> bool: ...

    async def notify(self, channel: str, payload: str = "") -> None:
        """Tell every process on this database (PostgreSQL: NOTIFY; SQLite: nothing to do,
        its processes poll)."""
        ...

    def listen(self, channel: str, callback: Callable[[str], Awaitable[None] | None]) -> None:
        """Call ``callback(payload)`` for each notification on ``channel`` from any process."""
        ...
