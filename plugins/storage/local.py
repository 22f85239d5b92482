"""Local-disk blob storage: keys map to files under a root folder, written atomically.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed over
the key's path with ``os.replace``, so a reader never sees a half-written blob. Blocking file
I/O runs in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator, BinaryIO, Callable

import anyio.to_thread
import msgspec

from plugins.hookspecs import hookimpl
from plugins.storage.base import BlobNotFound, Storage, StorageError

_TMP_PREFIX = ".tmp-"


class LocalStorageConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: folder holding the blobs; None means ``<data_dir>/blobs``
    root: str | None = None


def validate_key(key: str) -> list[str]:
    """Split a key into its segments, or raise ``StorageError`` if it could escape the root."""
    if not isinstance(key, str) or not key:
        raise StorageError("storage key must be a non-empty string")
    if "\\" in key or "\x00" in key:
        raise StorageError(f"invalid storage key {key!r}: backslash or NUL")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise StorageError(f"invalid storage key {key!r}: absolute path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    return parts


def atomic_write(dest: Path, write: Callable[[BinaryIO], None]) -> int:
    """Write ``dest`` through ``write(fileobj)`` atomically (temp file + fsync + replace)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest.stat().st_size


class LocalStorage(Storage):
    """Blobs as plain files under ``root``; ``local_path`` exposes them to local providers."""

    name = "local"
    config_type = LocalStorageConfig

    def __init__(self, config: LocalStorageConfig, data_dir: Path) -> None:
        super().__init__(config, data_dir)
        self.root = Path(config.root) if config.root else Path(data_dir) / "blobs"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key))

    def local_path(self, key: str) -> Path:
        return self._path(key)

    async def put_bytes(self, key: str, data: bytes) -> int:
        dest = self._path(key)
        return await anyio.to_thread.run_sync(atomic_write, dest, lambda fh: fh.write(data))

    async def put_file(self, key: str, src: Path, *, move: bool = False) -> int:
        dest = self._path(key)
        src = Path(src)

        def copy(fh: BinaryIO) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, fh, 1024 * 1024)

        def run() -> int:
            if not src.is_file():
                raise StorageError(f"source file {src} does not exist")
            if move:
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(src, dest)
                    return dest.stat().st_size
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
            size = atomic_write(dest, copy)
            if move:
                src.unlink()
            return size

        return await anyio.to_thread.run_sync(run)

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await anyio.to_thread.run_sync(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"no blob at {key!r}") from None

    async def iter_bytes(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await anyio.to_thread.run_sync(open, path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"no blob at {key!r}") from None
        try:
            while chunk := await anyio.to_thread.run_sync(fh.read, chunk_size):
                yield chunk
        finally:
            fh.close()

    async def fetch_to(self, key: str, dest: Path) -> None:
        path = self._path(key)

        def copy(fh: BinaryIO) -> None:
            with open(path, "rb") as s:
                shutil.copyfileobj(s, fh, 1024 * 1024)

        if not await anyio.to_thread.run_sync(path.is_file):
            raise BlobNotFound(f"no blob at {key!r}")
        await anyio.to_thread.run_sync(atomic_write, Path(dest), copy)

    async def size(self, key: str) -> int | None:
        path = self._path(key)

        def stat() -> int | None:
            try:
                return path.stat().st_size if path.is_file() else None
            except FileNotFoundError:
                return None

        return await anyio.to_thread.run_sync(stat)

    async def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix.rstrip("/"))

        def run() -> int:
            if path.is_file():
                path.unlink()
                return 1
            if not path.is_dir():
                return 0
            count = sum(1 for p in path.rglob("*") if p.is_file() and not p.name.startswith(_TMP_PREFIX))
            shutil.rmtree(path)
            return count

        return await anyio.to_thread.run_sync(run)


@hookimpl
def register_storage(register: Callable[[type], None]) -> None:
    """Register the local-disk backend (``storage.backend: local``)."""
    register(LocalStorage)
