"""A real, throwaway PostgreSQL server for the tests (and the benchmarks).

``PgServer`` runs ``initdb`` into a fresh temp directory (``lora-gw-pg-*`` under
``tempfile.gettempdir()``) and starts the server with ``pg_ctl`` on a free TCP port on
127.0.0.1, tuned for disposable data (no fsync, no synchronous commit, no full-page writes).
PostgreSQL refuses to run as root, so when this process is root (as the tests are here and in
CI) the server runs as the ``postgres`` system user that Debian's package creates (``nobody``
when there is none), through ``setpriv`` (or ``runuser``); otherwise as the current user.

Plain and synchronous, with no pytest dependency::

    with PgServer() as pg:
        pg.create_database("tmpl")
        pg.execute("CREATE TABLE t (id int)", dbname="tmpl")
        dsn = pg.create_database("test_1", template="tmpl")
        ...

Clean-up happens in ``stop()`` (also the context manager's exit), at interpreter exit
(``atexit``) and, for a session that dies without running either (SIGKILL, a segfault, an
unhandled SIGTERM), in a small watchdog process that waits for this process to go away and then
stops the server and removes its directory.

``python -m tests.pgserver`` starts one, prints ``PGSERVER <dsn> ready`` on stdout and runs
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, TypeVar

__all__ = ["PgServer", "find_bindir"]

T = TypeVar("T")

SUPERUSER = "postgres"
DEFAULT_GLOB = "/usr/lib/postgresql/*/bin"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")

# Settings for fast, disposable test servers; ``PgServer(settings=...)`` overrides or adds.
DEFAULT_SETTINGS: dict[str, str | int] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": 300,
    "shared_buffers": "128MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "jit": "off",  # compiling queries costs more than it saves on test-sized data
    "timezone": "UTC",
    "log_timezone": "UTC",
    "logging_collector": "off",  # stderr goes to the file given to ``pg_ctl -l``
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "log_min_messages": "warning",
}

# PostgreSQL's limit on a Unix socket path (sizeof(sun_path) - 1, less some slack).
_MAX_SOCKET_PATH = 100

_LIVE: set["PgServer"] = set()
_LIVE_LOCK = threading.Lock()


def find_bindir(glob_pattern: str = DEFAULT_GLOB) -> Path:
    """The directory holding PostgreSQL's server binaries (initdb, pg_ctl, postgres).

    ``pg_config --bindir`` first (Debian's libpq-dev ships a ``pg_config`` that names a bindir
    even without the server installed, so the binaries are checked), then the newest
    ``/usr/lib/postgresql/<version>/bin``. Raises ``RuntimeError`` saying what is missing.
    """
    tried: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        tried.append("pg_config is not on PATH")
    else:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{pg_config} --bindir failed ({exc})")
        else:
            missing = _missing_binaries(Path(out))
            if not missing:
                return Path(out)
            tried.append(f"{pg_config} --bindir gave {out}, which lacks {', '.join(missing)}")

    def version_key(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name  # .../postgresql/<version>/bin
        return tuple(int(p) for p in re.findall(r"\d+", name)) or (-1,)

    candidates = sorted(glob.glob(glob_pattern), key=version_key, reverse=True)
    for cand in candidates:
        if not _missing_binaries(Path(cand)):
            return Path(cand)
    if candidates:
        tried.append(f"none of {', '.join(candidates)} holds all of {', '.join(REQUIRED_BINARIES)}")
    else:
        tried.append(f"nothing matches {glob_pattern}")
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: "
        + "; ".join(tried)
        + ". Install the server, e.g. Debian's `apt-get install postgresql-15` "
        "(scripts/test.sh does this when run as root)."
    )


def _missing_binaries(bindir: Path) -> list[str]:
    return [b for b in REQUIRED_BINARIES if not os.access(bindir / b, os.X_OK)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier (double-quoted, quotes doubled)."""
    if not name or "\x00" in name:
        raise ValueError(f"bad identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def run_coroutine_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``factory()`` to completion on a fresh event loop in a separate thread.

    Works whether or not the calling thread already runs an event loop (the caller blocks
    until the coroutine finishes, loop included).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="pgserver-sql", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# The watchdog: a separate process (its own session, so a Ctrl-C to the test run does not
# reach it) that reads its stdin until EOF, which comes when the owning process closes the pipe
# in stop() or dies however it dies; then, if the directory is still there, it stops the server
# and removes the directory.
_WATCHDOG = r"""
import json, os, shutil, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
cfg = json.loads(sys.argv[1])
try:
    while sys.stdin.buffer.read(65536):
        pass
except Exception:
    pass
if os.path.isdir(cfg["tempdir"]):
    if os.path.exists(os.path.join(cfg["datadir"], "postmaster.pid")):
        subprocess.run(
            cfg["prefix"] + [cfg["pg_ctl"], "stop", "-D", cfg["datadir"], "-m", "immediate", "-w", "-t", "30"],
            env=cfg["env"], cwd=cfg["tempdir"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    shutil.rmtree(cfg["tempdir"], ignore_errors=True)
"""


class PgServer:
    """A throwaway PostgreSQL server on 127.0.0.1 for the life of a test session.

    ``bindir``: where initdb/pg_ctl/postgres are (default: ``find_bindir()``).
    ``user``: the OS user the server runs as when this process is root (default ``postgres``,
    else ``nobody``); ignored when not root. ``settings``: postgresql.conf entries added to or
    overriding ``DEFAULT_SETTINGS``. ``watchdog``: run the crash clean-up process.
    ``base_dir``: where the ``lora-gw-pg-*`` directory goes (default ``tempfile.gettempdir()``);
    a tmpfs such as ``/dev/shm`` makes initdb and CREATE DATABASE several times faster on a
    slow disk, at the cost of RAM (about 40 MB, plus about 8 MB a database).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        user: str | None = None,
        settings: Mapping[str, str | int | float | bool] | None = None,
        startup_timeout: float = 30.0,
        watchdog: bool = True,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if bindir is None:
            self.bindir = find_bindir()
        else:
            self.bindir = Path(bindir)
            missing = _missing_binaries(self.bindir)
            if missing:
                raise RuntimeError(
                    f"PostgreSQL server binaries not found: {self.bindir} lacks {', '.join(missing)}"
                )
        self.settings: dict[str, str | int | float | bool] = {**DEFAULT_SETTINGS, **(settings or {})}
        self.startup_timeout = startup_timeout
        self._use_watchdog = watchdog
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self._is_root = os.geteuid() == 0
        self.user: str | None = None  # the OS user the server runs as, when switched
        self._pw: pwd.struct_passwd | None = None
        if self._is_root:
            self._pw = self._pick_user(user)
            self.user = self._pw.pw_name
        self.port: int | None = None
        self.pid: int | None = None
        self.tempdir: Path | None = None
        self._owner_pid = os.getpid()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._state = "new"  # new -> starting -> running -> stopped

    # -- paths ---------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        return self._need_tempdir() / "data"

    @property
    def log_path(self) -> Path:
        return self._need_tempdir() / "server.log"

    @property
    def socket_dir(self) -> Path | None:
        """Where the Unix socket is (the temp dir), or None when its path would be too long."""
        tmp = self._need_tempdir()
        return tmp if len(str(tmp)) + len("/.s.PGSQL.65535") <= _MAX_SOCKET_PATH else None

    @property
    def running(self) -> bool:
        return self._state == "running"

    def _need_tempdir(self) -> Path:
        if self.tempdir is None:
            raise RuntimeError("PgServer not started")
        return self.tempdir

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "PgServer":
        """initdb, configure, ``pg_ctl start -w``, then wait until a connection succeeds."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"PgServer already {self._state}")
            self._state = "starting"
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._state = "running"
        return self

    def _start(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        self.tempdir = Path(tempfile.mkdtemp(prefix="lora-gw-pg-", dir=self.base_dir))
        if self._pw is not None:
            os.chown(self.tempdir, self._pw.pw_uid, self._pw.pw_gid)
        if self._use_watchdog:
            self._start_watchdog()
        if self._pw is not None:
            probe = self._run(["test", "-w", str(self.tempdir), "-a", "-x", str(self.tempdir)], check=False)
            if probe.returncode != 0:
                raise RuntimeError(
                    f"user {self.user!r} (the server cannot run as root) cannot use {self.tempdir}: "
                    "a directory above it is not searchable by that user; point TMPDIR (or base_dir) "
                    "somewhere it can reach, e.g. /tmp"
                )
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", SUPERUSER,
                "-A", "trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            what="initdb",
        )
        socket_dir = self.socket_dir
        conf = dict(self.settings)
        conf["unix_socket_directories"] = str(socket_dir) if socket_dir is not None else ""
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# lora-gateway tests (tests/pgserver.py)\n")
            for key, value in conf.items():
                f.write(f"{key} = {_conf_value(value)}\n")

        for attempt in range(5):  # the free port can be taken between probing and binding
            self.port = _free_port()
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            remaining = max(1, int(deadline - time.monotonic()))
            res = self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-D", str(self.datadir),
                    "-l", str(self.log_path),
                    "-o", f"-p {self.port}",
                    "-w",
                    "-t", str(remaining),
                ],
                check=False,
            )
            if res.returncode == 0:
                break
            log = self.log_tail()
            if "already in use" in self._log_since(log_start) and attempt < 4:
                continue
            raise RuntimeError(
                f"pg_ctl start failed (exit {res.returncode}): {res.stdout.strip()} {res.stderr.strip()}\n"
                f"--- tail of the server log (its directory is removed) ---\n{log}"
            )
        self.pid = self._read_pid()
        self._wait_connectable(deadline)

    def _wait_connectable(self, deadline: float) -> None:
        import asyncpg

        async def probe() -> None:
            last: BaseException | None = None
            while True:
                try:
                    conn = await asyncpg.connect(self.dsn(), timeout=5)
                    try:
                        await conn.fetchval("SELECT 1")
                    finally:
                        await conn.close()
                    return
                except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
                    last = exc
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL on port {self.port} did not accept connections within "
                        f"{self.startup_timeout}s: {last!r}\n--- tail of the server log (its directory is removed) ---\n"
                        f"{self.log_tail()}"
                    )
                await asyncio.sleep(0.05)

        run_coroutine_sync(probe)

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (immediate, then SIGKILL, if that fails), remove the temp dir.

        Idempotent; a no-op in a forked child of the process that started the server.
        """
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return
            self._state = "stopped"
        try:
            if self.tempdir is not None and (self.datadir / "postmaster.pid").exists():
                pg_ctl = str(self.bindir / "pg_ctl")
                res = self._run([pg_ctl, "stop", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30"], check=False)
                if res.returncode != 0 and (self.datadir / "postmaster.pid").exists():
                    res = self._run(
                        [pg_ctl, "stop", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "10"], check=False
                    )
                    if res.returncode != 0 and self.pid is not None:
                        try:
                            os.kill(self.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        finally:
            if self.tempdir is not None:
                shutil.rmtree(self.tempdir, ignore_errors=True)
            with _LIVE_LOCK:
                _LIVE.discard(self)
            self._stop_watchdog()

    def __enter__(self) -> "PgServer":
        if self._state != "running":
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgServer {self._state} port={self.port} dir={self.tempdir}>"

    # -- SQL helpers ---------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("PgServer not started")
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str, *args: Any, dbname: str = "postgres") -> str:
        """Run one statement (or, without args, several) on ``dbname``; returns its status."""
        import asyncpg

        async def go() -> str:
            conn = await asyncpg.connect(self.dsn(dbname), timeout=10)
            try:
                return await conn.execute(sql, *args)
            finally:
                await conn.close()

        return run_coroutine_sync(go)

    def create_database(self, name: str, template: str | None = None, *, strategy: str | None = None) -> str:
        """``CREATE DATABASE name [TEMPLATE template]``; returns the new database's DSN.

        A template must have no other connections (close yours first; PostgreSQL waits up to
        5 s for them to go, then fails). ``strategy``: ``"wal_log"`` (PostgreSQL 15's default)
        or ``"file_copy"``.
        """
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {quote_ident(template)}"
        if strategy is not None:
            if strategy.lower() not in ("wal_log", "file_copy"):
                raise ValueError(f"strategy must be wal_log or file_copy, not {strategy!r}")
            sql += f" STRATEGY {strategy.upper()}"
        self.execute(sql)
        return self.dsn(name)

    def drop_database(self, name: str, *, force: bool = True, missing_ok: bool = True) -> None:
        """``DROP DATABASE [IF EXISTS] name [WITH (FORCE)]`` (force ends its connections)."""
        sql = "DROP DATABASE " + ("IF EXISTS " if missing_ok else "") + quote_ident(name)
        if force:
            sql += " WITH (FORCE)"
        self.execute(sql)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -----------------------------------------------------------------------
    @staticmethod
    def _pick_user(user: str | None) -> pwd.struct_passwd:
        names = [user] if user is not None else ["postgres", "nobody"]
        for name in names:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            if pw.pw_uid != 0:
                return pw
        raise RuntimeError(
            "PostgreSQL refuses to run as root and no unprivileged user to run it as was found "
            f"(tried {', '.join(names)}); create one, e.g. `useradd --system postgres`"
        )

    def _prefix(self) -> list[str]:
        """The command prefix that drops root for the server's user (empty when not root)."""
        if self._pw is None:
            return []
        if shutil.which("setpriv"):
            return [
                "setpriv",
                f"--reuid={self._pw.pw_uid}",
                f"--regid={self._pw.pw_gid}",
                "--init-groups",
                "--",
            ]
        if shutil.which("runuser"):
            return ["runuser", "-u", self._pw.pw_name, "--"]
        raise RuntimeError("running as root, but neither setpriv nor runuser is available to drop to the postgres user")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        env.pop("LANGUAGE", None)
        if self._pw is not None:
            env.update(HOME=str(self.tempdir), USER=self._pw.pw_name, LOGNAME=self._pw.pw_name)
        return env

    def _run(self, cmd: list[str], *, check: bool = True, what: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self._prefix() + cmd,
            cwd=self.tempdir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{what or cmd[0]} failed (exit {res.returncode}) running as "
                f"{self.user or 'the current user'}:\n{res.stdout}{res.stderr}"
            )
        return res

    def _read_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _start_watchdog(self) -> None:
        cfg = {
            "tempdir": str(self.tempdir),
            "datadir": str(self.datadir),
            "pg_ctl": str(self.bindir / "pg_ctl"),
            "prefix": self._prefix(),
            "env": self._env(),
        }
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:  # only the crash clean-up is lost; stop() and atexit still work
            print(f"pgserver: no watchdog ({sys.executable}: {exc})", file=sys.stderr)

    def _stop_watchdog(self) -> None:
        wd, self._watchdog = self._watchdog, None
        if wd is None:
            return
        try:
            assert wd.stdin is not None
            wd.stdin.close()  # EOF: it finds the directory gone and exits
            wd.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            wd.kill()
            wd.wait()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # pragma: no cover - best effort at exit
            print(f"pgserver: stopping {server!r} at exit failed: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.pgserver",
        description="Run a throwaway PostgreSQL server until SIGTERM/SIGINT; prints "
        "'PGSERVER <dsn> ready' on stdout once it accepts connections.",
    )
    parser.add_argument("--base-dir", help="where its temp directory goes (default: the system temp dir)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    with PgServer(base_dir=args.base_dir) as pg:
        print(
            f"pgserver: PostgreSQL from {pg.bindir} in {pg.tempdir} (pid {pg.pid}, "
            f"log {pg.log_path}) started in {time.monotonic() - t0:.2f}s",
            file=sys.stderr,
            flush=True,
        )
        print(f"PGSERVER {pg.dsn()} ready", flush=True)
        while not stop.wait(1.0):
            pass
    print("pgserver: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
