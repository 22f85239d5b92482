"""Blob storage: datasets, artifacts and generated images live behind this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar

import msgspec


class StorageError(Exception):
    pass


class BlobNotFound(StorageError, FileNotFoundError):
    """The key holds no blob (catchable as ``StorageError`` or ``FileNotFoundError``)."""


class Storage(ABC):
    """Keys are relative, '/'-separated paths such as ``loras/<id>/dataset.zip``."""

    name: ClassVar[str]
    config_type: ClassVar[type[msgspec.Struct]]

    def __init__(self, config: Any, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir

    @abstractmethod
    async def put_file(self, key: str, src: Path, *, move: bool = False) -> int:
        """Store a local file under ``key`` (atomically), return its size."""

    @abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> int:
        """Store bytes under ``key`` (atomically), return the size."""

    @abstractmethod
    async def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def fetch_to(self, key: str, dest: Path) -> None:
        """Copy the blob to a local file."""

    @abstractmethod
    async def size(self, key: str) -> int | None:
        """Size in bytes, or None if absent."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (a folder); return how many."""

    def local_path(self, key: str) -> Path | None:
        """A local path for the key if this backend keeps files locally, else None."""
        return None
