"""Copy every durable row from one database to another (``lora-gateway copy``): how a team moves
from the embedded SQLite file to PostgreSQL, or back, with the ids, the ledger, the attempts and
the deliveries unchanged.

Both databases must be at this version's schema; the destination must hold no rows yet. Tables
go in the order the migrations made them, so that every row a foreign key names is there first,
and each table in batches, all in one transaction on the destination: a copy that fails leaves
the destination as empty as it found it. Process-local rows (engine heartbeats, rate buckets)
are not copied: they mean nothing to the new database's processes.

Files (uploads, weights, generated images, a local provider's state) are not in the database:
give the replicas the same ``data_dir``, or copy it beside the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from gateway.store.base import Connection, Database

#: every durable table, parents before children
TABLES = [
    "meta", "teams", "users", "api_keys", "loras", "attempts", "artifacts", "jobs", "job_images", "ledger",
    "idempotency", "deliveries", "delivery_attempts", "cancels", "provider_health", "provider_calls",
]
#: tables left behind on purpose (each process's own, rebuilt as it runs)
SKIPPED = ["_migrations", "engine_workers", "rate_buckets"]
#: rows per INSERT batch
BATCH = 500


class CopyError(RuntimeError):
    pass


@dataclass
class CopyReport:
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


async def tables(conn: Connection) -> list[str]:
    """The tables in this database (any order)."""
    if conn.dialect == "sqlite":
        rows = await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    else:
        rows = await conn.execute_fetchall(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE'")
    return [r[0] for r in rows]


async def columns(conn: Connection, table: str) -> dict[str, str]:
    """``{column: kind}``, kind one of ``int``, ``float``, ``bytes``, ``text``."""
    if conn.dialect == "sqlite":
        rows = await conn.execute_fetchall(f"PRAGMA table_info({table})")
        declared = {r[1]: (r[2] or "").upper() for r in rows}
    else:
        rows = await conn.execute_fetchall(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position", (table,))
        declared = {r[0]: r[1].upper() for r in rows}

    def kind(t: str) -> str:
        if "INT" in t:
            return "int"
        if any(x in t for x in ("REAL", "DOUBLE", "FLOAT", "NUMERIC")):
            return "float"
        if t in ("BLOB", "BYTEA"):
            return "bytes"
        return "text"

    return {name: kind(t) for name, t in declared.items()}


def _coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bytes":
        return bytes(value)
    return value if isinstance(value, str) else str(value)


async def check_tables(conn: Connection) -> None:
    """Every table is either copied or skipped on purpose: a migration that adds a table must
    say which."""
    unknown = sorted(set(await tables(conn)) - set(TABLES) - set(SKIPPED))
    if unknown:
        raise CopyError(f"tables this version does not know how to copy: {', '.join(unknown)}")


async def copy_database(source: Database, dest: Database, *,
                        progress: Callable[[str, int], None] | None = None) -> CopyReport:
    """Copy every durable row of ``source`` into the empty ``dest`` (both open, both migrated)."""
    report = CopyReport()
    async with source.read() as src:
        await check_tables(src)
        async with dest.tx() as dst:
            await check_tables(dst)
            for table in TABLES:
                if await dst.execute_fetchall(f"SELECT 1 FROM {table} LIMIT 1"):
                    raise CopyError(f"the destination is not empty ({table} has rows): copy into a new database")
            for table in TABLES:
                have = await columns(src, table)
                want = await columns(dst, table)
                missing = sorted(set(have) - set(want))
                if missing:
                    raise CopyError(f"{table}: the destination lacks columns {', '.join(missing)}")
                names = list(have)
                kinds = [want[n] for n in names]
                insert = (f"INSERT INTO {table} ({', '.join(names)}) "
                          f"VALUES ({', '.join('?' for _ in names)})")
                order = "id" if "id" in names else ", ".join(names[:3])
                rows = await src.execute_fetchall(f"SELECT {', '.join(names)} FROM {table} ORDER BY {order}")
                count = 0
                for start in range(0, len(rows), BATCH):
                    batch: list[Sequence[Any]] = [
                        tuple(_coerce(r[i], kinds[i]) for i in range(len(names))) for r in rows[start:start + BATCH]
                    ]
                    await dst.executemany(insert, batch)
                    count += len(batch)
                report.rows[table] = count
                if progress is not None:
                    progress(table, count)
            if dst.dialect == "postgresql":  # the ledger's identity goes on after the copied ids
                await dst.execute(
                    "SELECT setval(pg_get_serial_sequence('ledger', 'id'), "
                    "COALESCE((SELECT MAX(id) FROM ledger), 0) + 1, false)")
    return report
