"""Open the configured database: SQLite (the embedded default) or PostgreSQL, by ``database.url``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.store.base import Connection, Database
from gateway.store.migrations import MigrationsPending, SchemaTooNew
from gateway.store.sqlite import SqliteDatabase

if TYPE_CHECKING:
    from gateway.config import Settings

__all__ = ["Connection", "Database", "MigrationsPending", "SchemaTooNew", "SqliteDatabase", "database_at",
           "database_for"]


def database_for(settings: "Settings", *, read_connections: int | None = None) -> Database:
    """The database the settings name, not opened yet."""
    d = settings.database
    if settings.database_backend == "postgresql":
        from gateway.store.postgres import PostgresDatabase

        return PostgresDatabase(d.url or "", pool_size=d.pool_size, statement_timeout_ms=d.statement_timeout_ms)
    return SqliteDatabase(
        settings.database_path,
        busy_timeout_ms=d.busy_timeout_ms,
        read_connections=read_connections or d.read_connections,
        inline_reads=d.inline_reads,
        inline_writes=d.inline_writes,
    )


def database_at(settings: "Settings", url: str) -> Database:
    """The database at ``url`` (``sqlite:///PATH``, relative to ``data_dir``, or
    ``postgresql://…``), with the other database settings from ``settings``."""
    import msgspec

    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError(f"not a database URL: {url!r} (sqlite:///PATH or postgresql://USER@HOST/DB)")
    database = msgspec.structs.replace(settings.database, url=url)
    return database_for(msgspec.structs.replace(settings, database=database), read_connections=1)
