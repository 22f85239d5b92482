"""LocalStorage: round trips, atomic writes, moves, prefix deletes and key validation."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgspec
import pytest

from plugins.storage import local as local_mod
from plugins.storage.base import StorageError
from plugins.storage.local import BlobNotFound, LocalStorage, LocalStorageConfig


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(LocalStorageConfig(), tmp_path)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


async def test_put_get_size_and_local_path(storage: LocalStorage, tmp_path: Path) -> None:
    assert await storage.put_bytes("loras/a/x.bin", b"hello") == 5
    assert await storage.get_bytes("loras/a/x.bin") == b"hello"
    assert await storage.size("loras/a/x.bin") == 5
    assert await storage.size("loras/a/missing") is None
    assert await storage.size("loras/a") is None  # a folder is not a blob
    assert storage.local_path("loras/a/x.bin") == tmp_path / "blobs" / "loras" / "a" / "x.bin"
    assert (tmp_path / "blobs/loras/a/x.bin").read_bytes() == b"hello"
    assert await storage.put_bytes("loras/a/x.bin", b"bye") == 3  # overwrite
    assert await storage.get_bytes("loras/a/x.bin") == b"bye"
    assert temp_files(tmp_path) == []


async def test_custom_root(tmp_path: Path) -> None:
    s = LocalStorage(LocalStorageConfig(root=str(tmp_path / "elsewhere")), tmp_path / "data")
    await s.put_bytes("k", b"1")
    assert (tmp_path / "elsewhere" / "k").read_bytes() == b"1"


def test_config_forbids_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"root": "/x", "bogus": 1}, LocalStorageConfig)
    assert msgspec.convert({}, LocalStorageConfig).root is None


async def test_missing_blob_errors(storage: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound):
        await storage.get_bytes("nope")
    with pytest.raises(StorageError):
        async for _ in storage.iter_bytes("nope"):
            pass
    with pytest.raises(FileNotFoundError):  # BlobNotFound is both
        await storage.fetch_to("nope", tmp_path / "out")


async def test_iter_bytes_chunks(storage: LocalStorage) -> None:
    data = os.urandom(10_000)
    await storage.put_bytes("big", data)
    chunks = [c async for c in storage.iter_bytes("big", chunk_size=4096)]
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == data
    assert [c async for c in storage.iter_bytes("big")] == [data]


async def test_fetch_to(storage: LocalStorage, tmp_path: Path) -> None:
    await storage.put_bytes("a/b", b"payload")
    dest = tmp_path / "out" / "sub" / "file"
    await storage.fetch_to("a/b", dest)
    assert dest.read_bytes() == b"payload"
    assert temp_files(tmp_path) == []


async def test_put_file_copy_and_move(storage: LocalStorage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    assert await storage.put_file("c/copy", src) == 3
    assert src.exists()
    assert await storage.put_file("c/moved", src, move=True) == 3
    assert not src.exists()
    assert await storage.get_bytes("c/copy") == await storage.get_bytes("c/moved") == b"abc"
    with pytest.raises(StorageError):
        await storage.put_file("c/x", tmp_path / "absent")


async def test_put_file_move_across_filesystems(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"xyz" * 1000)
    real_replace = os.replace

    def replace(a: object, b: object) -> None:
        if Path(str(a)) == src:
            raise OSError(errno.EXDEV, "cross-device link")
        real_replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(local_mod.os, "replace", replace)
    assert await storage.put_file("d/moved", src, move=True) == 3000
    assert not src.exists()
    assert await storage.get_bytes("d/moved") == b"xyz" * 1000
    assert temp_files(tmp_path) == []


async def test_failed_write_leaves_old_content_and_no_temp(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.put_bytes("e/f", b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(local_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        await storage.put_bytes("e/f", b"new")
    monkeypatch.undo()
    assert await storage.get_bytes("e/f") == b"old"
    assert temp_files(tmp_path) == []


async def test_delete_prefix(storage: LocalStorage, tmp_path: Path) -> None:
    for key in ("loras/1/a", "loras/1/b/c", "loras/1/b/d", "loras/2/a"):
        await storage.put_bytes(key, b"x")
    assert await storage.delete_prefix("loras/1/") == 3
    assert not (tmp_path / "blobs/loras/1").exists()
    assert await storage.size("loras/2/a") == 1
    assert await storage.delete_prefix("loras/1") == 0  # already gone
    assert await storage.delete_prefix("loras/2/a") == 1  # a single blob
    assert await storage.size("loras/2/a") is None


BAD_KEYS = ["", "/etc/passwd", "a/../b", "..", "../x", "a\\b", "a\x00b", "a//b", "./a", "a/", "C:/x"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_key_validation(storage: LocalStorage, key: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        await storage.put_bytes(key, b"x")
    with pytest.raises(StorageError):
        await storage.get_bytes(key)
    with pytest.raises(StorageError):
        await storage.size(key)
    with pytest.raises(StorageError):
        storage.local_path(key)
    with pytest.raises(StorageError):
        await storage.fetch_to(key, tmp_path / "out")
    if key not in ("a/",):  # a trailing slash is fine for a prefix
        with pytest.raises(StorageError):
            await storage.delete_prefix(key)
    assert not (tmp_path / "blobs").exists() or list((tmp_path / "blobs").rglob("*")) == []


async def test_delete_prefix_refuses_root(storage: LocalStorage) -> None:
    await storage.put_bytes("keep", b"x")
    for prefix in ("", "/"):
        with pytest.raises(StorageError):
            await storage.delete_prefix(prefix)
    assert await storage.size("keep") == 1


def test_registers_through_hook() -> None:
    got: list[type] = []
    local_mod.register_storage(got.append)
    assert got == [LocalStorage] and LocalStorage.name == "local"
