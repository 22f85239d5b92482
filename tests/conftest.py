"""Shared fixtures: a fresh gateway on its own temp SQLite file per test, driven in-process."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient as _LitestarAsyncTestClient


class AsyncTestClient(_LitestarAsyncTestClient):
    """Litestar's AsyncTestClient, made truly async.

    In Litestar 2.25 its transport runs every request through a *blocking portal* (a new
    thread and event loop per request, blocking the caller's loop), and ``__aenter__`` runs
    the lifespan on yet another loop. The gateway's database and workers must live on one
    loop, and concurrency tests need requests that really overlap, so requests go through
    httpx's ASGITransport on the test's loop, and the fixture runs the lifespan itself.
    """

    def __init__(self, app: Litestar, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))

    async def __aenter__(self) -> "AsyncTestClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None  # the in-memory transport holds no connections


@asynccontextmanager
async def running(app: Litestar) -> AsyncIterator[None]:
    """Run the app's lifespan in one task of the test's loop, as an ASGI server would.

    pytest-asyncio may run a fixture's setup and teardown in different tasks, and the
    lifespan owns a task group, which must be entered and left by the same task.
    """
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(serve())
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises the start-up error
    try:
        yield
    finally:
        stop.set()
        await task

from gateway.app import create_app
from gateway.config import Settings, settings_from_mapping
from gateway.context import Gateway
from gateway.services import accounts
from plugins.manager import make_plugin_manager
from tests.images import image_set, multipart_files


def fast_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Embedded defaults, tuned so the engine moves quickly in tests."""
    cfg: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "engine": {"poll_interval_s": 0.05, "min_poll_interval_s": 0.05, "max_poll_interval_s": 0.2, "lease_s": 30,
                   "retry_backoff_s": 0.05, "crash_backoff_s": 0.05},
        "providers": {"sandbox": {"training_seconds": 0.3, "queue_seconds": 0.05}},
        "teams": {"rate_limit_per_minute": 0},
        "logging": {"level": "warning"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@dataclass
class Api:
    """An in-process client plus the gateway behind it and one team's key."""

    client: AsyncTestClient
    app: Litestar
    key: str
    team_id: str

    @property
    def gw(self) -> Gateway:
        return self.app.state.gw

    def h(self, key: str | None = None) -> dict[str, str]:
        return {"X-API-Key": key or self.key}

    async def new_team(self, credits: int = 10_000, max_trainings: int = 10) -> tuple[str, str]:
        team, new = await accounts.create_team(
            self.gw.db, name="other", credits=credits, max_concurrent_trainings=max_trainings
        )
        return team.id, new.key

    async def credits(self, team_id: str | None = None) -> int:
        r = await self.client.get("/v2/me", headers=self.h() if team_id is None else self.h(team_id))
        return r.json()["team"]["credits"]

    async def create_lora(self, n: int = 15, key: str | None = None, **fields: Any) -> httpx.Response:
        data = {"name": "Ada", "subjectKind": "person", "gender": "female", "ethnicity": "east asian", **fields}
        data = {k: str(v) for k, v in data.items() if v is not None}
        return await self.client.post("/v2/loras", headers=self.h(key), data=data, files=multipart_files(image_set(n)))

    async def wait_lora(self, lora_id: str, *, key: str | None = None, timeout: float = 90) -> dict[str, Any]:
        return await self._wait(f"/v2/loras/{lora_id}", ("READY", "FAILED", "ARCHIVED"), key, timeout)

    async def wait_job(self, job_id: str, *, key: str | None = None, timeout: float = 90) -> dict[str, Any]:
        return await self._wait(f"/v2/jobs/{job_id}", ("COMPLETED", "FAILED"), key, timeout)

    async def _wait(self, path: str, done: tuple[str, ...], key: str | None, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.client.get(path, headers=self.h(key))
            assert r.status_code == 200, r.text
            body = r.json()
            if body["status"] in done:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} stuck in {body['status']}: {body}")
            await asyncio.sleep(0.05)

    async def ready_lora(self, **fields: Any) -> dict[str, Any]:
        r = await self.create_lora(**fields)
        assert r.status_code == 202, r.text
        body = await self.wait_lora(r.json()["id"])
        assert body["status"] == "READY", body
        return body


#: the tests' DNS: no network here, so names resolve from this table (addresses as in real life)
FAKE_DNS = {
    "example.com": ["93.184.215.14"],
    "hooks.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "localhost": ["127.0.0.1"],
    "internal.example.com": ["10.0.0.5"],
    "rebind.example.com": ["169.254.169.254"],
    "mixed.example.com": ["93.184.215.14", "192.168.1.10"],
    "v6local.example.com": ["::1"],
}


async def fake_resolver(host: str, port: int) -> list[str]:
    try:
        return list(FAKE_DNS[host.lower()])
    except KeyError:
        raise OSError(f"cannot resolve {host}") from None


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return settings_from_mapping(fast_config(tmp_path, **overrides), env={})


# --------------------------------------------------------------------------- backends
#
# Tests that use ``make_api`` (or ``api``) in the modules below run twice: on SQLite and on a
# real PostgreSQL that the session starts itself (tests/pgserver.py), each test on a database of
# its own (a copy of a migrated template). Together they call every store function; the store
# conformance suite (test_store.py) runs on both as well. A test that reaches into the SQLite
# file itself is marked ``sqlite_only``.

BOTH_BACKENDS = {
    "test_api_auth", "test_api_jobs", "test_api_loras", "test_callbacks", "test_engine", "test_engine_findings",
    "test_flow", "test_idempotency", "test_provider_endpoints", "test_routing", "test_triggers", "test_webhooks",
    "test_webhook_delivery", "test_health", "test_store", "test_retention",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: runs on the SQLite backend only (it reaches into the file)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames or "backend" in getattr(metafunc, "_parametrized_backend", ()):
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in BOTH_BACKENDS and metafunc.definition.get_closest_marker("sqlite_only") is None:
        metafunc.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` (the default) or ``postgresql``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One throwaway PostgreSQL server for the session, on a RAM disk where there is one, with a
    template database already migrated."""
    from tests.pgserver import PgServer

    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30 else None
    with PgServer(base_dir=base) as server:
        server.create_database(PG_TEMPLATE)
        asyncio.run(_migrate(server.dsn(PG_TEMPLATE)))
        yield server


PG_TEMPLATE = "lgw_template"


async def _migrate(url: str) -> None:
    from gateway.store.postgres import PostgresDatabase

    db = PostgresDatabase(url, pool_size=2)
    await db.open()
    await db.close()


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The test's own database: None for SQLite (a file in the test's data dir), else a fresh
    PostgreSQL database copied from the migrated template."""
    if backend != "postgresql":
        yield None
        return
    server = request.getfixturevalue("pg_server")
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = server.create_database(name, template=PG_TEMPLATE)
    yield url
    server.drop_database(name)


@pytest.fixture
def make_api(tmp_path: Path, database_url: str | None) -> Callable[..., Any]:
    """``async with make_api(**config_overrides) as api:`` for tests that need their own config."""
    @asynccontextmanager
    async def factory(
        *, credits: int = 10_000, max_trainings: int = 10, transports: dict | None = None,
        plugins: tuple = (), **overrides: Any,
    ) -> AsyncIterator[Api]:
        if database_url is not None:
            overrides["database"] = {**overrides.get("database", {}), "url": database_url}
        settings = make_settings(tmp_path, **overrides)
        pm = make_plugin_manager(load_entrypoints=False, extra=plugins)
        app = create_app(settings, pm=pm, transports=transports)
        # Litestar's AsyncTestClient.__aenter__ runs the lifespan on a separate portal thread
        # and event loop; the database and workers must live on the test's loop, so the
        # lifespan is run here and the client is used without entering it.
        async with running(app), AsyncTestClient(app, timeout=60) as client:
            app.state.gw.url_policy.resolver = fake_resolver
            team, new = await accounts.create_team(
                app.state.gw.db, name="test", credits=credits, max_concurrent_trainings=max_trainings
            )
            yield Api(client=client, app=app, key=new.key, team_id=team.id)

    return factory


@pytest.fixture
async def api(make_api: Callable[..., Any]) -> AsyncIterator[Api]:
    async with make_api() as a:
        yield a
