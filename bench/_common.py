"""Helpers shared by the benchmark scripts in ``bench/`` (not a benchmark itself).

* :func:`free_port`, :class:`Server` — start a process that serves HTTP on 127.0.0.1, wait
  until it answers, stop it (SIGTERM, then SIGKILL), keep its output for error reports;
* :func:`start_gateway` — write a YAML config into a temp dir and run
  ``python -m gateway.cli serve --config FILE --port N``, reading the ``afk_...`` key it
  prints on a new database (or given the key of a data dir copied with :func:`copy_data_dir`);
* :func:`postgres_database` — a throwaway PostgreSQL server and database, for ``--database postgresql``;
* :func:`count_by_status` — jobs or LoRAs per status, read straight from a gateway's database;
* :func:`create_small_lora`, :func:`wait_lora` — a LoRA through the API, and waiting for a status;
* :class:`RssSampler` — a background thread sampling a process's RSS (baseline and peak);
* :func:`median`, :func:`percentile`, :func:`table` — figures and a compact table;
* :func:`small_jpegs` — tiny valid JPEGs for requests that only need *some* images;
* :func:`handle_sigterm` — turn SIGTERM into an exception so ``with`` blocks clean up.

Every process is started in its own session (so a Ctrl-C in the terminal reaches only the
benchmark, which then stops its children in order) and every temp dir is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import io
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
KEY_RE = re.compile(r"\bafk_[A-Za-z0-9_\-]{20,}")
MiB = 1024 * 1024


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class Server:
    """A child process serving HTTP on ``127.0.0.1:port``; use as a context manager.

    stdout and stderr are read by a thread into ``lines`` (merged, last 2000 kept), so the
    child never blocks on a full pipe and its log lines can be shown when something fails.
    """

    def __init__(self, name: str, argv: Sequence[str], port: int, *, cwd: Path = ROOT,
                 env: dict[str, str] | None = None, health_path: str = "/healthz") -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.cwd = cwd
        self.env = env
        self.health_path = health_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: deque[str] = deque(maxlen=2000)
        self._new_line = threading.Condition()
        self._reader: threading.Thread | None = None

    # -- lifecycle
    def start(self, timeout: float = 60.0) -> "Server":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True)
        self._reader.start()
        self.wait_ready(timeout)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._new_line:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_ready(self, timeout: float) -> None:
        """Poll ``health_path`` until it answers 200 (or the process dies / time runs out)."""
        deadline = time.monotonic() + timeout
        url = self.base_url + self.health_path
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise ServerError(f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} "
                                      f"before answering:\n{self.tail()}")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(f"{self.name} did not answer {url} within {timeout:.0f}s:\n{self.tail()}")
                time.sleep(0.1)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        if self._reader is not None:
            self._reader.join(2)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        lines = list(self.lines)[-n:]
        return "\n".join(f"    [{self.name}] {line}" for line in lines) or f"    [{self.name}] (no output)"

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The first match of ``pattern`` in the output, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    m = pattern.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive():
                    return None
                self._new_line.wait(min(left, 0.2))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss


def python_server(name: str, script: Path, args: Sequence[str], port: int) -> Server:
    """A :class:`Server` running ``python SCRIPT ARGS`` with the venv's interpreter."""
    return Server(name, [sys.executable, str(script), *args], port)


# --------------------------------------------------------------------------- the gateway


def gateway_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A benchmark config: everything under ``tmp``, quiet logs, no rate limit, a high cap.

    Top-level dict values in ``overrides`` are merged one level deep into the defaults here.
    """
    cfg: dict[str, Any] = {
        "data_dir": str(tmp / "data"),
        "logging": {"level": "warning"},
        "teams": {"rate_limit_per_minute": 0, "max_concurrent_trainings": 1000, "bootstrap_credits": 10_000},
        # long trainings, so a running engine would not churn through state changes mid-benchmark
        "providers": {"sandbox": {"training_seconds": 3600}},
        "uploads": {"tmp_dir": str(tmp / "upload-tmp")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set engine.image_nice=0`` (values parsed as YAML) as a nested mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def run_main(run: Any, args: Any) -> int:
    """A benchmark's ``run(args)`` with the shared exits: 1 on a server error, 130 on Ctrl-C or
    SIGTERM (every server stopped and temp dir removed on the way out)."""
    handle_sigterm()
    try:
        return run(args)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; servers stopped, temp files removed", file=sys.stderr)
        return 130


def add_set_argument(parser: Any) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the gateways (a tuned run, labelled so), e.g. "
                             "engine.image_nice=0 or uploads.pixel_check=structure; repeatable")


class Gateway(Server):
    """``lora-gateway serve`` on a fresh data dir; ``key`` is the bootstrap team's API key."""

    key: str
    tmp: Path
    config_path: Path


@contextlib.contextmanager
def start_gateway(tmp: Path, *, port: int | None = None, timeout: float = 60.0, key: str | None = None,
                  name: str = "gateway", **overrides: Any) -> Iterator[Gateway]:
    """Write ``tmp/gateway.yaml`` (see :func:`gateway_config`) and serve it; stop it on exit.

    ``key``: the data dir under ``tmp/data`` already holds a database (copied from an earlier
    run, see :func:`copy_data_dir`) and this is its bootstrap key (none is printed then).
    """
    port = port or free_port()
    cfg = gateway_config(tmp, **overrides)
    (tmp / "upload-tmp").mkdir(parents=True, exist_ok=True)
    config_path = tmp / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    gw = Gateway(name, [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path),
                        "--port", str(port)], port)
    gw.tmp, gw.config_path = tmp, config_path
    try:
        gw.start(timeout)
        if key is None:
            m = gw.wait_for_line(KEY_RE, 5.0)
            if m is None:
                raise ServerError(f"the gateway printed no afk_ API key (not a new database?):\n{gw.tail()}")
            key = m.group(0)
        gw.key = key
        yield gw
    finally:
        gw.stop()


def copy_data_dir(src_tmp: Path, dest_tmp: Path) -> None:
    """Copy a stopped gateway's ``data`` dir (database, blobs, sandbox state) from one
    :func:`start_gateway` temp dir to another, so a new gateway starts from the same state."""
    dest_tmp.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src_tmp / "data", dest_tmp / "data")


def database_path(gw: Gateway) -> Path:
    """The gateway's SQLite file (the default ``database.path`` under ``data_dir``)."""
    return gw.tmp / "data" / "gateway.sqlite3"


def count_by_status(db: Path, table: str) -> dict[str, int]:
    """``SELECT status, COUNT(*) FROM <table> GROUP BY status``, read-only (``jobs`` or ``loras``).

    Read straight from the gateway's database while it runs (WAL: the reader does not block
    the gateway's writer); cheaper than paging through the API for thousands of rows.
    """
    import sqlite3

    if table not in ("jobs", "loras"):
        raise ValueError(table)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status").fetchall())
    finally:
        conn.close()


@contextlib.contextmanager
def postgres_database(kind: str = "postgresql") -> Iterator[str | None]:
    """``kind`` ``postgresql``: a throwaway PostgreSQL server (``tests/pgserver.py``, on a RAM
    disk where there is one) with an empty database, as its URL, stopped on exit; ``sqlite``: None."""
    if kind != "postgresql":
        yield None
        return
    sys.path.insert(0, str(ROOT))
    from tests.pgserver import PgServer

    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30 else None
    with PgServer(base_dir=base) as server:
        yield server.create_database("bench")


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A temp dir removed on exit, whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def handle_sigterm() -> None:
    """Make SIGTERM (and SIGINT, even if inherited as ignored, e.g. as a background job of a
    script) unwind like Ctrl-C, so ``with`` blocks stop children and remove temp dirs."""

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------- memory


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a daemon thread.

    ``baseline`` is the RSS when :meth:`start` was called; ``peak`` the largest value seen
    until :meth:`stop`; ``growth`` = peak - baseline.
    """

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.last = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        return self.proc.memory_info().rss

    def start(self) -> "RssSampler":
        self.baseline = self.peak = self.last = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._rss()
            except psutil.Error:
                return
            self.last = rss
            self.samples += 1
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def stop(self) -> "RssSampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        with contextlib.suppress(psutil.Error):
            self.last = self._rss()
            self.peak = max(self.peak, self.last)
        return self

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- figures


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()

    lines = []
    body = cells
    if header:
        lines.append(fmt(cells[0]))
        lines.append("  ".join("-" * w for w in widths))
        body = cells[1:]
    lines.extend(fmt(r) for r in body)
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "meets goal" if ok else "MISSES goal"


# --------------------------------------------------------------------------- requests


def small_jpegs(n: int, size: tuple[int, int] = (64, 48)) -> list[bytes]:
    """``n`` small, distinct, valid JPEGs (like ``tests/images.py``)."""
    from PIL import Image

    out = []
    for i in range(n):
        img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        img.putpixel((i % size[0], 0), (255, 0, 0))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


LORA_FIELDS = {"name": "Ada", "subjectKind": "person", "gender": "female", "ethnicity": "east asian"}


def create_small_lora(gw: Gateway, n_images: int = 15) -> dict[str, Any]:
    """POST /v2/loras with ``n_images`` tiny JPEGs, as the tests do; returns the 202 body."""
    files = [("images", (f"photo{i:02d}.jpg", data, "image/jpeg")) for i, data in enumerate(small_jpegs(n_images))]
    r = httpx.post(f"{gw.base_url}/v2/loras", headers={"X-API-Key": gw.key}, data=LORA_FIELDS, files=files, timeout=60)
    if r.status_code != 202:
        raise ServerError(f"POST /v2/loras answered {r.status_code}: {r.text[:500]}\n{gw.tail()}")
    return r.json()


def wait_lora(gw: Gateway, lora_id: str, statuses: Sequence[str], timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``GET /v2/loras/{id}`` until its status is one of ``statuses`` (or FAILED: an error)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10, headers={"X-API-Key": gw.key}) as client:
        while True:
            r = client.get(f"{gw.base_url}/v2/loras/{lora_id}")
            if r.status_code != 200:
                raise ServerError(f"GET /v2/loras/{lora_id} answered {r.status_code}: {r.text[:300]}\n{gw.tail()}")
            body = r.json()
            if body["status"] in statuses:
                return body
            if body["status"] in ("FAILED", "ARCHIVED") or time.monotonic() > deadline:
                raise ServerError(f"lora {lora_id} is {body['status']} (waited for {'/'.join(statuses)}): "
                                  f"{body.get('error')}\n{gw.tail()}")
            time.sleep(0.1)


# --------------------------------------------------------------------------- a fake vendor in a child process

#: the fakes' own counters (not counted themselves)
STATS_PATH = "/_bench/stats"


class CountingApp:
    """ASGI wrapper around a ``FakeWaveSpeed``: counts requests by the fake's own kinds
    (``generate``, ``result``, ``ticket``, ``put``, ``cdn``, ..., ``other``) and non-200 answers;
    ``GET /_bench/stats`` answers the counts as JSON and is not counted."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        self.counts: dict[str, int] = {"result": 0, "other": 0, "non_200": 0}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.fake.app(scope, receive, send)
        if scope["path"] == STATS_PATH:
            body = json.dumps(self.counts).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        kind = self.fake._kind(scope["method"], scope["path"])
        self.counts[kind] = self.counts.get(kind, 0) + 1

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                self.counts["non_200"] += 1
            await send(message)

        await self.fake.app(scope, receive, counting_send)


class FakeVendor(Server):
    """A fake vendor's child process. It prints ``FAKE_WAVESPEED <base url> <ready_word>`` once
    it serves; the base URL is read from that line."""

    def __init__(self, name: str, argv: Sequence[str], *, ready_word: str = "ready") -> None:
        super().__init__(name, argv, 0, health_path=STATS_PATH)
        self.line = re.compile(r"FAKE_WAVESPEED (http://127\.0\.0\.1:\d+) " + re.escape(ready_word))

    def wait_ready(self, timeout: float) -> None:
        m = self.wait_for_line(self.line, timeout)
        if m is None:
            raise ServerError(f"the fake WaveSpeed did not start within {timeout:.0f}s:\n{self.tail()}")
        self.base_url = m.group(1)
        self.port = int(self.base_url.rsplit(":", 1)[1])
        super().wait_ready(10)

    def stats(self) -> dict[str, int]:
        return httpx.get(self.base_url + STATS_PATH, timeout=10, trust_env=False).json()
