"""Three replicas: ``lora-gateway serve`` processes, each with its engine, on one PostgreSQL
database and one ``data_dir``. What one process guaranteed with SQLite's single writer has to
hold across them: the team cap, idempotency keys, key revocation, the rate limit, and crash
recovery when replicas are SIGKILLed."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from gateway.config import settings_from_mapping
from gateway.services import accounts
from gateway.store.db import database_at
from tests.crash_harness import GatewayProcess, HarnessConfig, _free_port, run, wait_until_ready
from tests.images import image_set, multipart_files

ADMIN = "replica-admin-token"
AUTH_CACHE_S = 60.0  # long: a revoked key must stop working because the replicas were told, not by expiry


class Replicas:
    def __init__(self, procs: list[GatewayProcess], url: str, cfg: dict[str, Any]) -> None:
        self.procs, self.url, self.cfg = procs, url, cfg
        self.bases = [p.base for p in procs]

    async def team(self, *, credits: int = 100_000, max_trainings: int = 10,
                   rate_limit: int | None = None) -> tuple[str, str, str]:
        """A new team: (team id, key, key id)."""
        db = database_at(settings_from_mapping(self.cfg, env={}), self.url)
        await db.open(migrate=False)
        try:
            team, new = await accounts.create_team(db, name=f"t-{uuid.uuid4().hex[:6]}", credits=credits,
                                                   max_concurrent_trainings=max_trainings)
            if rate_limit is not None:
                await accounts.set_limits(db, team.id, max_concurrent_trainings=None, rate_limit_per_minute=rate_limit)
        finally:
            await db.close()
        return team.id, new.key, new.record.id

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        db = database_at(settings_from_mapping(self.cfg, env={}), self.url)
        await db.open(migrate=False)
        try:
            async with db.read() as conn:
                return list(await conn.execute_fetchall(sql, args))
        finally:
            await db.close()


@pytest.fixture(scope="module")
def replicas(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Three replicas started together on an empty database: they take turns migrating it."""
    work = tmp_path_factory.mktemp("replicas")
    name = f"r_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    cfg = {
        "data_dir": str(work / "data"),
        "database": {"url": url, "pool_size": 5},
        "server": {"auth_cache_s": AUTH_CACHE_S, "admin_token": ADMIN},
        # trainings that outlast the tests: they stay active, so the cap is what decides
        "providers": {"sandbox": {"training_seconds": 600, "queue_seconds": 0.1}},
        "engine": {"poll_interval_s": 0.2, "lease_s": 10},
        "teams": {"bootstrap_credits": 0, "rate_limit_per_minute": 0},
        "logging": {"format": "json", "level": "warning"},
    }
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    procs = []
    for i in range(3):
        (work / f"logs{i}").mkdir()
        procs.append(GatewayProcess(config, _free_port(), work / f"logs{i}"))
    try:
        for p in procs:
            p.start()
        wait_until_ready(procs)
        yield Replicas(procs, url, cfg)
    finally:
        for p in procs:
            p.stop()
        pg_server.drop_database(name)


def _create(base: str, key: str, i: int, idempotency_key: str | None = None) -> dict[str, Any]:
    headers = {"X-API-Key": key, **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
    return dict(url=f"{base}/v2/loras", headers=headers,
                data={"name": f"subject {i}", "subjectKind": "object"}, files=multipart_files(image_set(15, size=(96, 72))))


async def test_the_replicas_share_one_migrated_schema(replicas: Replicas) -> None:
    rows = await replicas.rows("SELECT name FROM _migrations")
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) and "m001_initial" in names  # each migration applied once
    async with httpx.AsyncClient(timeout=10) as client:
        for base in replicas.bases:
            assert (await client.get(f"{base}/readyz")).status_code == 200


async def test_thirty_parallel_creates_over_three_replicas_accept_exactly_ten(replicas: Replicas) -> None:
    team, key, _ = await replicas.team(max_trainings=10)
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(
            client.post(**_create(replicas.bases[i % 3], key, i)) for i in range(30)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == 10 and codes.count(429) == 20, codes
    refused = [r for r in answers if r.status_code == 429]
    assert all("limit is 10" in r.json()["error"] for r in refused)
    assert all(r.headers.get("retry-after") for r in refused)
    rows = await replicas.rows("SELECT COUNT(*) FROM loras WHERE team_id = ?", team)
    assert rows[0][0] == 10
    charges = await replicas.rows("SELECT COUNT(*) FROM ledger WHERE team_id = ? AND kind = 'lora_create'", team)
    assert charges[0][0] == 10  # a refused create is charged nothing


async def test_one_idempotency_key_sent_to_all_three_at_once_makes_one_lora_and_one_charge(replicas: Replicas) -> None:
    team, key, _ = await replicas.team()
    body = _create(replicas.bases[0], key, 0, idempotency_key="same-key-everywhere")
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(
            client.post(f"{base}/v2/loras", headers=body["headers"], data=body["data"], files=body["files"])
            for base in replicas.bases))
    assert [r.status_code for r in answers] == [202, 202, 202], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert (await replicas.rows("SELECT COUNT(*) FROM loras WHERE team_id = ?", team))[0][0] == 1
    creates = await replicas.rows("SELECT COUNT(*) FROM ledger WHERE team_id = ? AND kind = 'lora_create'", team)
    assert creates[0][0] == 1


async def test_a_key_revoked_on_one_replica_is_refused_by_the_others(replicas: Replicas) -> None:
    _, key, key_id = await replicas.team()
    async with httpx.AsyncClient(timeout=10) as client:
        for base in replicas.bases:  # every replica has the key in its cache now
            assert (await client.get(f"{base}/v2/me", headers={"X-API-Key": key})).status_code == 200
        r = await client.post(f"{replicas.bases[0]}/admin/keys/{key_id}/revoke",
                              headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        revoked_at = time.monotonic()
        for base in replicas.bases:
            while (await client.get(f"{base}/v2/me", headers={"X-API-Key": key})).status_code != 401:
                assert time.monotonic() - revoked_at < AUTH_CACHE_S, f"{base} still takes the revoked key"
                await asyncio.sleep(0.05)
        # and again: no replica takes it back
        codes = [(await client.get(f"{b}/v2/me", headers={"X-API-Key": key})).status_code for b in replicas.bases]
        assert codes == [401, 401, 401]
        again = await client.post(f"{replicas.bases[1]}/admin/keys/{key_id}/revoke",
                                  headers={"Authorization": f"Bearer {ADMIN}"})
        assert again.status_code == 404


async def test_the_rate_limit_is_one_bucket_across_replicas(replicas: Replicas) -> None:
    _, key, _ = await replicas.team(rate_limit=6)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [await client.get(f"{replicas.bases[i % 3]}/v2/me", headers={"X-API-Key": key}) for i in range(15)]
    elapsed = time.monotonic() - started
    ok = sum(r.status_code == 200 for r in answers)
    # six tokens, refilled at one every ten seconds: per process it would have been 3 x 6 = 15
    assert 6 <= ok <= 6 + int(elapsed / 10) + 1, [r.status_code for r in answers]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)


async def test_sigkilled_replicas_lose_and_duplicate_nothing(pg_server: Any, tmp_path: Path) -> None:
    name = f"k_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    try:
        report = await run(HarnessConfig(workdir=tmp_path, loras=6, jobs_per_lora=1, kills=5, seed=11,
                                         replicas=3, database_url=url, concurrency=6))
    finally:
        pg_server.drop_database(name)
    assert report.kills == 5
    assert report.loras == 6 and report.jobs == 6
    assert report.anomalies == [], "\n".join(report.anomalies)
    assert report.resubmissions == 0
