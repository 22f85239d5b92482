"""``lora-gateway migrate`` and ``lora-gateway copy``: a gateway that outgrew its SQLite file moves
to PostgreSQL with every id, ledger row and attempt intact, and carries on there."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import yaml

from gateway.app import create_app
from gateway.cli import main
from gateway.config import settings_from_mapping
from plugins.manager import make_plugin_manager
from gateway.store.copy import SKIPPED, TABLES, CopyError, copy_database, tables
from gateway.store.db import database_at
from tests.conftest import Api, AsyncTestClient, fake_resolver, fast_config, running

async def dump(db: Any) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    async with db.read() as conn:
        for table in TABLES:
            rows = await conn.execute_fetchall(f"SELECT * FROM {table}")
            out[table] = sorted((tuple(_plain(v) for v in r) for r in rows), key=repr)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, memoryview):
        return bytes(v)
    return v


@asynccontextmanager
async def gateway(cfg: dict[str, Any], key: str, team_id: str) -> AsyncIterator[Api]:
    settings = settings_from_mapping(cfg, env={})
    app = create_app(settings, pm=make_plugin_manager(load_entrypoints=False))
    async with running(app), AsyncTestClient(app, timeout=60) as client:
        app.state.gw.url_policy.resolver = fake_resolver
        yield Api(client=client, app=app, key=key, team_id=team_id)


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def pg_url(pg_server: Any) -> Any:
    """An empty PostgreSQL database with no schema yet."""
    import uuid

    name = f"c_{uuid.uuid4().hex[:12]}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)


def test_migrate_check_then_migrate(tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, fast_config(tmp_path, database={"url": pg_url, "migrate": "check"}), "pg.yaml")
    assert main(["migrate", "--check", "--config", cfg]) == 2
    assert "needs migrations m001_initial" in capsys.readouterr().err
    assert main(["migrate", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "applied m001_initial" in out and "up to date" in out and "secret" not in out
    assert main(["migrate", "--check", "--config", cfg]) == 0
    assert main(["migrate", "--config", cfg]) == 0  # nothing left to do
    assert "applied" not in capsys.readouterr().out


def test_a_sqlite_gateway_moves_to_postgresql(tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sqlite_cfg = fast_config(tmp_path)
    pg_cfg = fast_config(tmp_path, database={"url": pg_url})  # same data_dir: the files stay where they are

    async def before() -> dict[str, Any]:
        from gateway.services import accounts

        settings = settings_from_mapping(sqlite_cfg, env={})
        app = create_app(settings, pm=make_plugin_manager(load_entrypoints=False))
        async with running(app), AsyncTestClient(app, timeout=60) as client:
            app.state.gw.url_policy.resolver = fake_resolver
            team, new = await accounts.create_team(app.state.gw.db, name="t", credits=1_000, max_concurrent_trainings=10)
            api = Api(client=client, app=app, key=new.key, team_id=team.id)
            lora = await api.ready_lora()
            r = await client.post("/v2/images/generate", headers=api.h(), json={
                "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 1}})
            job = await api.wait_job(r.json()["jobId"])
            assert job["status"] == "COMPLETED"
            pending = await api.create_lora(15, name="Bo")  # and one still training when the copy is made
            return {"key": new.key, "team": team.id, "lora": lora, "job": job, "job_id": r.json()["jobId"],
                    "credits": await api.credits(),
                    "pending": pending.json()["id"], "rows": await dump(app.state.gw.db)}

    was = asyncio.run(before())

    assert main(["copy", "--config", write_config(tmp_path, sqlite_cfg, "sqlite.yaml"), "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "ledger:" in out and "copied" in out

    async def after() -> None:
        async with gateway(pg_cfg, was["key"], was["team"]) as api:
            assert api.gw.db.dialect == "postgresql"
            # the same key, the same LoRA (its weights URL signed with the copied secret), the same job
            r = await api.client.get(f"/v2/loras/{was['lora']['id']}", headers=api.h())
            assert r.status_code == 200 and r.json() == was["lora"]
            r = await api.client.get(f"/v2/jobs/{was['job_id']}", headers=api.h())
            assert r.status_code == 200
            assert [u.split("?")[0] for u in r.json()["result"]["images"]] == \
                [u.split("?")[0] for u in was["job"]["result"]["images"]]  # signed anew, for the same files
            # and the link signed before the move is still good here: the secret moved with the rows
            got = await api.client.get("/" + was["job"]["result"]["images"][0].split("://", 1)[1].split("/", 1)[1])
            assert got.status_code == 200 and got.content[:4] in (b"\x89PNG", b"RIFF", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1")
            # the LoRA that was still training finishes here, charged once
            pending = await api.wait_lora(was["pending"])
            assert pending["status"] == "READY"
            async with api.gw.db.read() as conn:
                def charges(ref: str) -> Any:
                    return conn.execute_fetchall("SELECT kind, amount FROM ledger WHERE ref = ? ORDER BY kind", (ref,))
                second, first = await charges(was["pending"]), await charges(was["lora"]["id"])
                total = (await conn.execute_fetchall("SELECT SUM(amount) FROM ledger WHERE team_id = ?", (was["team"],)))[0][0]
            # charged once, like the first (on one side of the move or the other), and the balance is the ledger's sum
            assert [tuple(x) for x in second] == [tuple(x) for x in first] and len(first) >= 1
            assert await api.credits() == total
            # new ledger rows follow the copied ones
            r = await api.client.post("/v2/images/generate", headers=api.h(), json={
                "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": pending["id"], "num_outputs": 1}})
            assert r.status_code == 202, r.text
            async with api.gw.db.read() as conn:
                ids = [x[0] for x in await conn.execute_fetchall("SELECT id FROM ledger ORDER BY id")]
            copied = [row[0] for row in was["rows"]["ledger"]]
            assert ids[:len(copied)] == sorted(copied) and len(ids) > len(copied)

    asyncio.run(after())


def test_copy_preserves_every_row_and_refuses_a_database_with_rows(tmp_path: Path, pg_url: str) -> None:
    sqlite_cfg = fast_config(tmp_path)
    settings = settings_from_mapping(sqlite_cfg, env={})

    async def go() -> None:
        from gateway.services import accounts

        source = database_at(settings, f"sqlite:///{settings.database_path}")
        await source.open()
        team, _ = await accounts.create_team(source, name="t", credits=500, max_concurrent_trainings=3)
        await accounts.add_credits(source, team.id, 25, "grant")
        await accounts.create_key(source, team.id, "second")
        dest = database_at(settings, pg_url)
        await dest.open()
        try:
            report = await copy_database(source, dest)
            assert report.rows["teams"] == 1 and report.rows["ledger"] == 2 and report.rows["api_keys"] == 2
            assert await dump(dest) == await dump(source)
            async with dest.read() as conn:  # every table is copied or skipped on purpose
                assert set(await tables(conn)) == set(TABLES) | set(SKIPPED)
            with pytest.raises(CopyError, match="not empty"):
                await copy_database(source, dest)
            assert await dump(dest) == await dump(source)
            back = database_at(settings, "sqlite:///back.sqlite3")  # and the other way
            await back.open()
            try:
                await copy_database(dest, back)
                assert await dump(back) == await dump(source)
            finally:
                await back.close()
        finally:
            await dest.close()
            await source.close()

    asyncio.run(go())


def test_a_copy_that_fails_leaves_the_destination_empty(tmp_path: Path, pg_url: str) -> None:
    settings = settings_from_mapping(fast_config(tmp_path), env={})

    async def go() -> None:
        from gateway.services import accounts

        source = database_at(settings, f"sqlite:///{settings.database_path}")
        await source.open()
        await accounts.create_team(source, name="t", credits=500, max_concurrent_trainings=3)
        dest = database_at(settings, pg_url)
        await dest.open()

        def boom(table: str, n: int) -> None:
            if table == "ledger":
                raise RuntimeError("disk full")

        try:
            with pytest.raises(RuntimeError, match="disk full"):
                await copy_database(source, dest, progress=boom)
            assert all(not rows for rows in (await dump(dest)).values())
            assert (await copy_database(source, dest)).rows["teams"] == 1  # and it can be run again
        finally:
            await dest.close()
            await source.close()

    asyncio.run(go())


def test_copy_refuses_what_is_not_a_database_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, fast_config(tmp_path), "c.yaml")
    assert main(["copy", "--config", cfg, "--to", "mysql://x"]) == 2
    assert "not a database URL" in capsys.readouterr().err
