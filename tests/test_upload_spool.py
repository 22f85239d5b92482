"""Spool directories: named after their owner, and swept at start-up once that owner is gone."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.uploads import _host_tag, _proc_stat, receive_upload, sweep_spool_dirs
from tests.images import image_set
from tests.test_uploads import CT, SMALL, encode, images

ROOT = Path(__file__).resolve().parents[1]

# A gateway stand-in: receives an upload whose client sends half of the body, then stalls.
UPLOADER = r"""
import asyncio, sys
from pathlib import Path
from gateway.uploads import UploadLimits, receive_upload
from tests.images import image_set
from tests.test_uploads import CT, encode, images

body = encode(images(image_set(3)))

async def chunks():
    yield body[: len(body) // 2]
    print("mid-body", flush=True)
    await asyncio.sleep(3600)
    yield body[len(body) // 2 :]

asyncio.run(receive_upload(chunks(), CT, UploadLimits(min_images=1), tmp_root=Path(sys.argv[1])))
"""


def start_uploader(tmp_root: Path) -> subprocess.Popen[bytes]:
    """A process stuck mid-upload, its spool directory (with a partial image in it) in ``tmp_root``."""
    proc = subprocess.Popen([sys.executable, "-c", UPLOADER, str(tmp_root)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else b""
    if line != b"mid-body\n":
        proc.kill()
        raise AssertionError(f"the uploader did not start: {line!r} {proc.communicate()[1].decode()[-2000:]}")
    return proc


def spool_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("lora-upload-")}


def owned_by(root: Path, pid: int) -> Path:
    (path,) = [p for p in root.iterdir() if p.name.startswith(f"lora-upload-{pid}-")]
    return path


async def test_spool_dir_of_a_killed_upload_is_swept_and_live_ones_stay(tmp_path: Path) -> None:
    killed = start_uploader(tmp_path)
    live = start_uploader(tmp_path)
    body = encode(images(image_set(3)))
    pulled = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        pulled.set()
        await asyncio.Event().wait()
        yield body[len(body) // 2 :]

    ours = asyncio.create_task(receive_upload(stalled(), CT, SMALL, tmp_root=tmp_path))
    try:
        await asyncio.wait_for(pulled.wait(), 10)
        await asyncio.sleep(0.05)
        dead_dir, live_dir = owned_by(tmp_path, killed.pid), owned_by(tmp_path, live.pid)
        own_dir = owned_by(tmp_path, os.getpid())
        assert list(dead_dir.iterdir()), "the killed upload had started writing its first image"

        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert dead_dir.is_dir()  # a SIGKILL leaves the spool directory behind: nothing ran to remove it

        assert sweep_spool_dirs(tmp_path) == 1
        assert not dead_dir.exists()
        assert live_dir.is_dir() and own_dir.is_dir()  # their owners run: untouched
        assert list(live_dir.iterdir()) and list(own_dir.iterdir())
        assert sweep_spool_dirs(tmp_path) == 0
    finally:
        ours.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ours
        live.kill()
        live.wait(10)
        killed.kill()
        killed.wait(10)
    assert not own_dir.exists()  # the cancelled upload removed its own
    assert live_dir.is_dir()  # (killed too: the next sweep takes it)
    assert sweep_spool_dirs(tmp_path) == 1
    assert spool_dirs(tmp_path) == set()


def test_spool_dir_name_names_the_owner(tmp_path: Path) -> None:
    async def one_part() -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield encode(images(image_set(1)))

        up = await receive_upload(chunks(), CT, SMALL, tmp_root=tmp_path)
        try:
            pid, start, host, rest = up.tmp_dir.name.removeprefix("lora-upload-").split("-", 3)
            stat = _proc_stat(os.getpid())
            assert int(pid) == os.getpid() and stat is not None and int(start) == stat[1]
            assert host == _host_tag() and len(host) == 8 and rest
        finally:
            up.cleanup()

    asyncio.run(one_part())


def test_sweep_rules(tmp_path: Path) -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    stat = _proc_stat(os.getpid())
    assert stat is not None
    me, started, host, dead = os.getpid(), stat[1], _host_tag(), exited.pid
    other_host = "0123abcd" if host != "0123abcd" else "abcd0123"
    hour_ago = time.time() - 3700

    def make(name: str, old: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "0000").write_bytes(b"x")
        if old:
            os.utime(path, (hour_ago, hour_ago))
        return path

    gone = [
        make(f"lora-upload-{dead}-{started}-{host}-abc_1234"),  # its process exited
        make(f"lora-upload-{me}-{started - 1}-{host}-reused00"),  # a live pid, but another process: reused
        make(f"lora-upload-{dead}-0-{host}-nostart0", old=True),
        make(f"lora-upload-{me}-{started}-{other_host}-faraway0", old=True),  # another host's, unchanged for an hour
        make("lora-upload-k2x9_q7a", old=True),  # an older gateway's (no owner in the name), over an hour old
    ]
    kept = [
        make(f"lora-upload-{me}-{started}-{host}-live0001", old=True),  # ours: its owner runs
        make(f"lora-upload-{me}-0-{host}-unknown0"),  # a live pid, start unknown: may be the owner
        make(f"lora-upload-{dead}-{started}-{other_host}-faraway1"),  # another host's, recent
        make("lora-upload-freshleg"),  # an older gateway's, recent: it may still be running
        make("lora-upload-notes-2024", old=True),  # not a spool name
        make("lora-uploads", old=True),
        make("other-dir", old=True),
    ]
    not_dirs = [tmp_path / f"lora-upload-{dead}-{started}-{host}-{kind}" for kind in ("afile000", "link0000")]
    not_dirs[0].write_bytes(b"not a dir")
    target = make("elsewhere", old=True)
    not_dirs[1].symlink_to(target)

    assert sweep_spool_dirs(tmp_path) == len(gone)
    assert [p.name for p in gone if p.exists()] == []
    assert all(p.is_dir() and (p / "0000").exists() for p in [*kept, target])
    assert not_dirs[0].is_file() and not_dirs[1].is_symlink()
    assert sweep_spool_dirs(tmp_path) == 0


def test_sweep_defaults_to_the_system_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"lora-upload-99999999999-1-{_host_tag()}-zzzzzzzz").mkdir()  # no such pid can exist
    assert sweep_spool_dirs(None) == 1
    assert sweep_spool_dirs(tmp_path / "missing") == 0


async def test_the_gateway_sweeps_dead_uploads_spool_at_start(make_api, tmp_path: Path) -> None:
    """A SIGKILLed upload's spool dir (under uploads.tmp_dir) is gone once a gateway starts."""
    spool = tmp_path / "spool"
    spool.mkdir()
    code = (
        "import asyncio, os, sys, time\n"
        "from pathlib import Path\n"
        "from gateway.uploads import UploadLimits, receive_upload\n"
        "async def chunks():\n"
        "    yield b'--b\\r\\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\\r\\n\\r\\n'\n"
        "    print('receiving', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "    yield b'x'\n"
        f"asyncio.run(receive_upload(chunks(), 'multipart/form-data; boundary=b', UploadLimits(), Path({str(spool)!r})))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"receiving"
    proc.kill()
    proc.wait()
    assert [p.name for p in spool.iterdir() if p.name.startswith("lora-upload-")], "the killed upload left nothing?"
    async with make_api(uploads={"tmp_dir": str(spool)}):
        assert not [p for p in spool.iterdir() if p.name.startswith("lora-upload-")]
