"""tests/pgserver.py against a real PostgreSQL server: start, connect, template copies,
concurrency, drop, stop, the ``python -m tests.pgserver`` entry point and the crash watchdog."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import asyncpg
import pytest

from tests.pgserver import PgServer, find_bindir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return re.search(r"^State:\s+Z", status, re.M) is None


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


async def test_server_runs_unprivileged_and_tuned(pg: PgServer) -> None:
    assert pg.running and pg.port is not None and pg.pid is not None
    assert pg.tempdir is not None and pg.tempdir.name.startswith("lora-gw-pg-")
    assert pg.tempdir.parent == Path(tempfile.gettempdir())
    assert pg.dsn() == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert pg.dsn("x") == f"postgresql://postgres@127.0.0.1:{pg.port}/x"
    owner = os.stat(pg.datadir).st_uid
    if os.geteuid() == 0:
        assert owner != 0 and pwd.getpwuid(owner).pw_name == pg.user
        assert os.stat(f"/proc/{pg.pid}").st_uid == owner
    else:
        assert owner == os.geteuid() and pg.user is None

    conn = await asyncpg.connect(pg.dsn())
    try:
        assert await conn.fetchval("SELECT 1 + 1") == 2
        assert int(await conn.fetchval("SHOW server_version_num")) >= 150000
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in (
                "fsync", "synchronous_commit", "full_page_writes", "max_connections",
                "listen_addresses", "server_encoding", "lc_collate", "shared_buffers",
            )
        }
        assert settings == {
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "max_connections": "300", "listen_addresses": "127.0.0.1",
            "server_encoding": "UTF8", "lc_collate": "C", "shared_buffers": "128MB",
        }
        assert await conn.fetchval("SELECT current_user") == "postgres"
    finally:
        await conn.close()

    # the Unix socket lives in the temp dir too
    assert pg.socket_dir == pg.tempdir
    assert (pg.tempdir / f".s.PGSQL.{pg.port}").exists()
    conn = await asyncpg.connect(host=str(pg.socket_dir), port=pg.port, user="postgres", database="postgres")
    try:
        assert await conn.fetchval("SELECT 42") == 42
    finally:
        await conn.close()
    assert pg.log_path.exists()


async def test_create_database_from_template(pg: PgServer) -> None:
    pg.create_database("tmpl_copy")
    conn = await asyncpg.connect(pg.dsn("tmpl_copy"))
    try:
        await conn.execute(
            "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL UNIQUE);"
            "INSERT INTO items (name) SELECT 'item-' || g FROM generate_series(1, 500) g"
        )
    finally:
        await conn.close()  # CREATE DATABASE ... TEMPLATE needs the template to have no connections

    times = []
    names = [f"copy_{i}" for i in range(5)]
    for name in names:
        t0 = time.perf_counter()
        dsn = pg.create_database(name, template="tmpl_copy")
        times.append(time.perf_counter() - t0)
        assert dsn == pg.dsn(name)
    print(f"\ncreate_database from template: median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms over {len(times)}")

    conn = await asyncpg.connect(pg.dsn("copy_3"))
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 500
        await conn.execute("INSERT INTO items (name) VALUES ('only-in-copy-3')")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO items (name) VALUES ('item-1')")
    finally:
        await conn.close()
    conn = await asyncpg.connect(pg.dsn("copy_4"))
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 500  # copies are independent
    finally:
        await conn.close()

    dsn = pg.create_database("copy_file", template="tmpl_copy", strategy="file_copy")
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 500
    finally:
        await conn.close()

    for name in [*names, "copy_file", "tmpl_copy"]:
        pg.drop_database(name)
    conn = await asyncpg.connect(pg.dsn())
    try:
        left = await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname LIKE 'copy_%' OR datname = 'tmpl_copy'")
    finally:
        await conn.close()
    assert left == 0


async def test_concurrent_connections(pg: PgServer) -> None:
    pg.create_database("conc")
    n = 150
    started = asyncio.Event()
    count = 0

    async def worker(i: int) -> int:
        nonlocal count
        conn = await asyncpg.connect(pg.dsn("conc"))
        try:
            count += 1
            if count == n:
                started.set()
            await asyncio.wait_for(started.wait(), 20)  # all n connected at once
            seen = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = 'conc'")
            await conn.fetchval("SELECT pg_sleep(0.05)")
            return seen
        finally:
            await conn.close()

    t0 = time.perf_counter()
    seen = await asyncio.gather(*(worker(i) for i in range(n)))
    print(f"\n{n} concurrent connections in {time.perf_counter() - t0:.2f}s")
    assert max(seen) == n
    pg.drop_database("conc")


async def test_helpers_work_inside_a_running_loop_and_drop_forces(pg: PgServer) -> None:
    asyncio.get_running_loop()  # this test runs on pytest-asyncio's loop
    dsn = pg.create_database('we"ird db')
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("SELECT current_database()") == 'we"ird db'
    pg.drop_database('we"ird db')  # WITH (FORCE): ends the open connection
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await conn.fetchval("SELECT 1")
    await conn.close()
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(dsn)
    pg.drop_database('we"ird db')  # missing_ok
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        pg.drop_database('we"ird db', missing_ok=False)
    assert pg.execute("SELECT 1") == "SELECT 1"


def test_stop_stops_the_server_and_removes_the_directory() -> None:
    t0 = time.perf_counter()
    server = PgServer()
    server.start()
    elapsed = time.perf_counter() - t0
    print(f"\nstart() took {elapsed:.2f}s")
    try:
        tempdir, port, pid = server.tempdir, server.port, server.pid
        assert tempdir is not None and port is not None and pid is not None
        assert tempdir.is_dir() and port_open(port) and process_alive(pid)
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    finally:
        server.stop()
    assert not tempdir.exists()
    assert not port_open(port)
    assert wait_until(lambda: not process_alive(pid), 5)
    server.stop()  # idempotent


def test_entry_point_prints_dsn_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.pgserver"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"PGSERVER (postgresql://postgres@127\.0\.0\.1:(\d+)/postgres) ready\n", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        dsn, port = m.group(1), int(m.group(2))

        async def query() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval("SELECT 7")
            finally:
                await conn.close()

        assert asyncio.run(query()) == 7
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        tempdir = re.search(r" in (\S*lora-gw-pg-\S+) ", err)
        assert tempdir, err
        assert not Path(tempdir.group(1)).exists()
        assert not port_open(port)
        assert proc.stdout.read() == ""  # the one line only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watchdog_cleans_up_after_the_owner_is_killed() -> None:
    code = (
        "import sys, time\n"
        "from tests.pgserver import PgServer\n"
        "pg = PgServer(); pg.start()\n"
        "print(pg.tempdir, pg.port, pg.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tempdir, port, pid = proc.stdout.readline().split()
        assert Path(tempdir).is_dir() and port_open(int(port))
    finally:
        proc.kill()  # SIGKILL: no atexit, no finally
        proc.wait()
    assert wait_until(lambda: not Path(tempdir).exists() and not port_open(int(port)), 15)
    assert wait_until(lambda: not process_alive(int(pid)), 5)


def test_missing_binaries_give_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config
    with pytest.raises(RuntimeError) as err:
        find_bindir(str(tmp_path / "*" / "bin"))
    msg = str(err.value)
    assert "pg_config is not on PATH" in msg and "postgresql-15" in msg and "initdb" in msg

    (tmp_path / "14" / "bin").mkdir(parents=True)  # a bindir without the server
    with pytest.raises(RuntimeError, match="holds all of initdb, pg_ctl, postgres"):
        find_bindir(str(tmp_path / "*" / "bin"))
    with pytest.raises(RuntimeError, match="lacks initdb, pg_ctl, postgres"):
        PgServer(bindir=tmp_path / "14" / "bin")


def test_find_bindir_finds_the_installed_server() -> None:
    bindir = find_bindir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bindir / name, os.X_OK)


def test_a_failed_start_says_why_and_leaves_nothing() -> None:
    # pytest's tmp_path sits under a 0700 directory the server's user cannot reach when root
    parent = Path(tempfile.mkdtemp(prefix="lora-gw-pg-test-"))
    try:
        os.chmod(parent, 0o755)
        server = PgServer(settings={"shared_buffers": "lots"}, base_dir=parent)
        with pytest.raises(RuntimeError, match=r'(?s)pg_ctl start failed.*invalid value for parameter "shared_buffers"'):
            server.start()
        assert list(parent.iterdir()) == []
        assert not server.running
    finally:
        shutil.rmtree(parent, ignore_errors=True)
