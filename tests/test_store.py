"""The store conformance suite: every repository function, on SQLite and on PostgreSQL (a real
server the session starts), with the same expectations; plus what each backend must hold under
concurrency (two Database objects on one database stand for two processes or replicas)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from gateway.store import attempts as attempts_store
from gateway.store import cancels as cancels_store
from gateway.store import deliveries as deliveries_store
from gateway.store import health as health_store
from gateway.store import idempotency as idempotency_store
from gateway.store import jobs as jobs_store
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from gateway.store import meta as meta_store
from gateway.store import queue as queue_store
from gateway.store import ratelimits as ratelimit_store
from gateway.store import teams as teams_store
from gateway.store import workers as workers_store
from gateway.store.migrations import NAMES, MigrationsPending, SchemaTooNew, applied
from gateway.store.models import Artifact, Attempt, JobImage
from gateway.store.postgres import PostgresDatabase, translate
from gateway.store.sqlite import SqliteDatabase
from gateway.timeutil import new_id, now


def make_db(backend: str, tmp_path: Path, url: str | None) -> Any:
    if backend == "postgresql":
        assert url is not None
        return PostgresDatabase(url, pool_size=4)
    return SqliteDatabase(tmp_path / "gw.sqlite3")


@pytest.fixture
async def db(backend: str, tmp_path: Path, database_url: str | None) -> AsyncIterator[Any]:
    d = make_db(backend, tmp_path, database_url)
    await d.open()
    yield d
    await d.close()


@pytest.fixture
async def other(backend: str, tmp_path: Path, database_url: str | None, db: Any) -> AsyncIterator[Any]:
    """A second Database on the same database: another process, or another replica."""
    d = make_db(backend, tmp_path, database_url)
    await d.open()
    yield d
    await d.close()


async def team(db: Any, credits: int = 1000) -> str:
    async with db.tx() as conn:
        return (await teams_store.create_team(conn, name="t", credits=credits)).id


LORA = dict(user_id="u", key_id="k", name="Ada", subject_kind="person", gender=None, ethnicity=None, age=None,
            status="PENDING", image_count=15, steps=1000, lora_rank=16, webhook_url=None,
            webhook_events="completed,failed", stage="prepare")


async def lora(db: Any, team_id: str, *, word: str | None = None, **fields: Any) -> str:
    lora_id = new_id()
    t = now()
    async with db.tx() as conn:
        assert await loras_store.insert_lora(conn, **{**LORA, "id": lora_id, "team_id": team_id,
                                                       "trigger_word": word or uuid.uuid4().hex[:8].upper(),
                                                       "next_run_at": t, "created_at": t, "updated_at": t, **fields})
    return lora_id


async def job(db: Any, team_id: str, lora_id: str, **fields: Any) -> str:
    job_id, t = new_id(), now()
    async with db.tx() as conn:
        await jobs_store.insert_job(conn, **{
            "id": job_id, "team_id": team_id, "user_id": "u", "key_id": "k", "lora_id": lora_id, "model": "flux-lora",
            "status": "QUEUED", "progress": 0, "input": {"prompt": "p", "fluxLoraParams": {"loraId": lora_id}},
            "credit_cost": 2, "webhook_url": None, "webhook_events": ["completed"], "webhook_status": None,
            "stage": "start", "next_run_at": t, "created_at": t, "updated_at": t, **fields})
    return job_id


def attempt(owner_kind: str, owner_id: str, seq: int = 1, **fields: Any) -> Attempt:
    base = dict(id=new_id(), owner_kind=owner_kind, owner_id=owner_id, seq=seq, provider="p1", provider_ref=None,
                provider_trigger_word=None, state="submitting", progress=None, error=None, retryable=False,
                cost=1.5, currency="USD", polls=0, created_at=now(), submitted_at=None, progressed_at=None,
                finished_at=None)
    return Attempt(**{**base, **fields})


# --------------------------------------------------------------------------- the SQL itself


def test_placeholders_become_numbered_outside_literals_and_comments() -> None:
    assert translate("SELECT ? , '?' , \"a?\" -- ?\n, ?") == "SELECT $1 , '?' , \"a?\" -- ?\n, $2"
    assert translate("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"
    assert translate("CREATE FUNCTION f() AS $$ BEGIN RAISE '?'; END $$; SELECT ?") == \
        "CREATE FUNCTION f() AS $$ BEGIN RAISE '?'; END $$; SELECT $1"


# --------------------------------------------------------------------------- migrations


async def test_migrations_are_recorded_once(db: Any, backend: str, tmp_path: Path, database_url: str | None) -> None:
    async with db.read() as conn:
        assert await applied(conn) == NAMES
    again = make_db(backend, tmp_path, database_url)
    await again.open()  # nothing left to apply
    async with again.read() as conn:
        assert await applied(conn) == NAMES
    await again.close()


async def test_a_newer_schema_is_refused(db: Any, backend: str, tmp_path: Path, database_url: str | None) -> None:
    async with db.tx() as conn:
        await conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", ("m999_from_the_future", now()))
    newer = make_db(backend, tmp_path, database_url)
    with pytest.raises(SchemaTooNew, match="m999_from_the_future"):
        await newer.open()
    await newer.close()


async def test_check_mode_refuses_pending_migrations(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "postgresql":
        server = request.getfixturevalue("pg_server")
        name = f"e_{uuid.uuid4().hex[:12]}"
        url = server.create_database(name)  # empty: not from the template
        fresh: Any = PostgresDatabase(url, pool_size=2)
    else:
        fresh = SqliteDatabase(tmp_path / "fresh.sqlite3")
    try:
        with pytest.raises(MigrationsPending, match="m001_initial"):
            await fresh.open(migrate=False)
        await fresh.close()
        await fresh.open(migrate=True)
        await fresh.close()
        await fresh.open(migrate=False)  # up to date now
    finally:
        await fresh.close()
        if backend == "postgresql":
            server.drop_database(name)


async def test_replicas_starting_together_migrate_once(backend: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        dbs = [SqliteDatabase(tmp_path / "together.sqlite3") for _ in range(3)]
    else:
        server = request.getfixturevalue("pg_server")
        name = f"e_{uuid.uuid4().hex[:12]}"
        url = server.create_database(name)
        dbs = [PostgresDatabase(url, pool_size=2) for _ in range(3)]
    try:
        await asyncio.gather(*(d.open() for d in dbs))
        async with dbs[0].read() as conn:
            assert await applied(conn) == NAMES
    finally:
        for d in dbs:
            await d.close()
        if backend == "postgresql":
            server.drop_database(name)


# --------------------------------------------------------------------------- teams, keys, meta


async def test_teams_users_keys(db: Any) -> None:
    async with db.tx() as conn:
        t = await teams_store.create_team(conn, name="acme", credits=50, max_concurrent_trainings=3)
        user = await teams_store.create_user(conn, team_id=t.id, email="a@example.com")
        key = await teams_store.insert_key(conn, team_id=t.id, user_id=user.id, name="ci", prefix="afk_abc",
                                           digest=b"\x01" * 32)
        assert await teams_store.set_team_limits(conn, t.id, rate_limit_per_minute=7)
        assert await teams_store.set_team_routing(conn, t.id, {"training": {"providers": ["a"]}})
    async with db.read() as conn:
        got = await teams_store.get_team(conn, t.id)
        assert (got.credits, got.max_concurrent_trainings, got.rate_limit_per_minute) == (50, 3, 7)
        assert [x.id for x in await teams_store.list_teams(conn)] == [t.id]
        assert await teams_store.team_routing(conn, t.id) == {"training": {"providers": ["a"]}}
        assert (await teams_store.team_owner(conn, t.id)).email == "a@example.com"
        assert (await teams_store.get_user(conn, user.id)).team_id == t.id
        found, team_rate = await teams_store.key_with_team_limit(conn, b"\x01" * 32)
        assert (found.id, found.digest, found.active, team_rate) == (key.id, b"\x01" * 32, True, 7)
        assert await teams_store.key_with_team_limit(conn, b"\x02" * 32) is None
        assert [k.id for k in await teams_store.list_keys(conn, t.id)] == [key.id]
    async with db.tx() as conn:
        assert await teams_store.set_key_active(conn, key.id, False)
        assert await teams_store.revoke_key(conn, key.id)
        assert not await teams_store.revoke_key(conn, key.id)  # once
        assert await teams_store.set_team_routing(conn, t.id, None)
    async with db.read() as conn:
        k = await teams_store.key_by_id(conn, key.id)
        assert k.active is False and k.revoked_at is not None
        assert await teams_store.team_routing(conn, t.id) is None


async def test_meta_keeps_the_first_value(db: Any, other: Any) -> None:
    async with db.tx() as conn:
        assert await meta_store.put_new(conn, "secret", "aa") == "aa"
    async with other.tx() as conn:
        assert await meta_store.put_new(conn, "secret", "bb") == "aa"
        assert await meta_store.get(conn, "missing") is None


# --------------------------------------------------------------------------- ledger


async def test_ledger_charges_once_and_never_below_zero(db: Any) -> None:
    t = await team(db, credits=10)
    async with db.tx() as conn:
        assert await ledger_store.apply_credits(conn, t, -4, reason="r", ref="x", kind="job")
        assert not await ledger_store.apply_credits(conn, t, -4, reason="r", ref="x", kind="job")  # once
        with pytest.raises(ledger_store.InsufficientBalance) as e:
            await ledger_store.apply_credits(conn, t, -7, reason="r", ref="y", kind="job")
        assert (e.value.required, e.value.available) == (7, 6)
        assert await ledger_store.refund(conn, t, ref="x", charge_kind="job", reason="failed")
        assert not await ledger_store.refund(conn, t, ref="x", charge_kind="job", reason="failed")
        assert not await ledger_store.refund(conn, t, ref="nothing", charge_kind="job", reason="failed")
    async with db.read() as conn:
        entries = await ledger_store.ledger_for(conn, t)
        assert [(e.amount, e.kind) for e in entries] == [(10, "grant"), (-4, "job"), (4, "job_refund")]
        assert entries[0].id < entries[1].id < entries[2].id
        assert (await teams_store.get_team(conn, t)).credits == 10


async def test_the_ledger_is_append_only_and_the_balance_constrained(db: Any) -> None:
    t = await team(db)
    for sql in ("UPDATE ledger SET amount = 0", "DELETE FROM ledger"):
        with pytest.raises(Exception, match="append-only"):
            async with db.tx() as conn:
                await conn.execute(sql)
    with pytest.raises(Exception, match="(?i)check"):
        async with db.tx() as conn:
            await conn.execute("UPDATE teams SET credits = -1 WHERE id = ?", (t,))


async def test_concurrent_charges_of_one_reference_apply_once(db: Any, other: Any) -> None:
    t = await team(db, credits=100)

    async def charge(d: Any) -> bool:
        try:
            async with d.tx() as conn:
                return await ledger_store.apply_credits(conn, t, -30, reason="r", ref="same", kind="lora_training")
        except Exception as e:  # PostgreSQL: the loser may hit the unique key and roll back
            assert "unique" in str(e).lower() or "duplicate" in str(e).lower()
            return False

    assert sorted(await asyncio.gather(charge(db), charge(other))) == [False, True]
    async with db.read() as conn:
        assert (await teams_store.get_team(conn, t)).credits == 70


# --------------------------------------------------------------------------- loras, artifacts


async def test_loras(db: Any) -> None:
    t = await team(db)
    ids = [await lora(db, t) for _ in range(3)]
    async with db.tx() as conn:
        assert await loras_store.update_lora(conn, ids[0], status="READY", sample_keys=["a", "b"])
        assert not await loras_store.update_lora(conn, ids[0], lease="nobody", status="FAILED")
        await loras_store.insert_artifact(conn, Artifact(id=new_id(), lora_id=ids[0], sha256="s", size=3, format="diffusers",
                                                         storage_key="k", source_url=None, created_at=now()))
        await loras_store.insert_artifact(conn, Artifact(id=new_id(), lora_id=ids[0], sha256="t", size=4, format="kohya",
                                                         storage_key="k2", source_url=None, created_at=now()))
    async with db.read() as conn:
        got = await loras_store.get_lora(conn, ids[0], t)
        assert got.status == "READY" and got.sample_keys == ["a", "b"] and got.portable is True
        assert await loras_store.get_lora(conn, ids[0], "another-team") is None
        assert await loras_store.lora_status(conn, ids[1], t) == "PENDING"
        assert await loras_store.count_active_trainings(conn, t) == 2
        assert (await loras_store.artifact_for(conn, ids[0])).sha256 == "s"  # the first one stays
        page = await loras_store.list_loras(conn, t, limit=2, cursor=None, include_archived=False)
        assert [x.id for x in page] == ids[::-1][:2]
        rest = await loras_store.list_loras(conn, t, limit=2, cursor=page[-1].id, include_archived=False)
        assert [x.id for x in rest] == [ids[0]]


async def test_trigger_words_are_unique_among_live_loras_by_constraint(db: Any) -> None:
    t = await team(db)
    first = await lora(db, t, word="AAAA1")
    t0 = now()
    fields = {**LORA, "id": new_id(), "team_id": t, "trigger_word": "AAAA1", "next_run_at": t0, "created_at": t0,
              "updated_at": t0}
    async with db.tx() as conn:
        assert not await loras_store.insert_lora(conn, **fields)  # nothing written
        await loras_store.update_lora(conn, first, status="ARCHIVED")
        assert await loras_store.insert_lora(conn, **fields)  # an archived LoRA's word is free again


async def test_the_team_row_lock_orders_concurrent_creates(db: Any, other: Any) -> None:
    """Count-then-insert under the team's row lock: two transactions that each see room for one
    more never both insert."""
    t = await team(db)
    async with db.tx() as conn:
        await teams_store.set_team_limits(conn, t, max_concurrent_trainings=1)
    results: list[str] = []

    async def create(d: Any, hold: float) -> None:
        async with d.tx() as conn:
            locked = await teams_store.get_team(conn, t, lock=True)
            if await loras_store.count_active_trainings(conn, t) >= locked.max_concurrent_trainings:
                results.append("refused")
                return
            t0 = now()
            await loras_store.insert_lora(conn, **{**LORA, "id": new_id(), "team_id": t, "trigger_word": new_id()[:8],
                                                   "next_run_at": t0, "created_at": t0, "updated_at": t0})
            await asyncio.sleep(hold)  # the other one is waiting for the lock meanwhile
            results.append("created")

    await asyncio.gather(create(db, 0.3), create(other, 0.0))
    assert sorted(results) == ["created", "refused"]


# --------------------------------------------------------------------------- jobs


async def test_jobs(db: Any) -> None:
    t = await team(db)
    lo = await lora(db, t)
    ids = [await job(db, t, lo, model="flux-lora", status=s) for s in ("QUEUED", "COMPLETED", "COMPLETED")]
    async with db.tx() as conn:
        assert await jobs_store.update_job(conn, ids[0], progress=50, ignored_params=["seed"])
        await jobs_store.insert_job_images(conn, [JobImage(job_id=ids[1], idx=i, storage_key=f"k{i}", format="png",
                                                           width=8, height=8) for i in range(2)])
        await jobs_store.insert_job_images(conn, [JobImage(job_id=ids[1], idx=0, storage_key="k0b", format="jpg",
                                                           width=8, height=8)])
    async with db.read() as conn:
        j = await jobs_store.get_job(conn, ids[0], t)
        assert j.progress == 50 and j.ignored_params == ["seed"] and j.input["prompt"] == "p"
        assert j.webhook_events == ["completed"]
        assert await jobs_store.get_job(conn, ids[0], "another") is None
        assert [(i.idx, i.storage_key) for i in await jobs_store.job_images(conn, ids[1])] == [(0, "k0b"), (1, "k1")]
        assert await jobs_store.job_models(conn, t) == ["flux-lora"]
        done = await jobs_store.list_jobs(conn, t, limit=10, cursor=None, user_id=None, status="COMPLETED",
                                          model=None, search=None)
        assert [x.id for x in done] == ids[:0:-1]
        after = await jobs_store.list_jobs(conn, t, limit=10, cursor=(done[0].created_at, done[0].id), user_id="u",
                                           status=None, model="flux-lora", search=None)
        assert [x.id for x in after] == [ids[1], ids[0]]
        assert [x.id for x in await jobs_store.list_jobs(conn, t, limit=10, cursor=None, user_id=None, status=None,
                                                         model=None, search=ids[2])] == [ids[2]]


# --------------------------------------------------------------------------- attempts


async def test_attempts_and_callbacks(db: Any) -> None:
    t = await team(db)
    lo = await lora(db, t, status="TRAINING", stage="poll", next_run_at=now() + 3600)
    first = attempt("lora", lo, 1, state="failed", submitted_at=now())
    second = attempt("lora", lo, 2, state="ambiguous", submitted_at=now())
    async with db.tx() as conn:
        await attempts_store.insert_attempt(conn, first)
        await attempts_store.insert_attempt(conn, second)
        await attempts_store.update_attempt(conn, first.id, error="boom", retryable=True)
        # a callback binds a job id to the current ambiguous attempt, never to an old one
        assert not await attempts_store.bind_callback(conn, "p1", first.id, "ref-old")
        assert await attempts_store.bind_callback(conn, "p1", second.id, "ref-1")
        assert not await attempts_store.bind_callback(conn, "p1", second.id, "ref-2")  # it has a ref now
        assert await attempts_store.poll_now_for_ref(conn, "p1", "ref-1") == lo
        assert await attempts_store.poll_now_for_ref(conn, "p1", "unknown-ref") is None
        assert await attempts_store.hint_attempt(conn, "p1", second.id, every_s=60) == lo
        assert await attempts_store.hint_attempt(conn, "p1", second.id, every_s=60) is None  # rate-limited
        await attempts_store.fill_ref(conn, first.id, "ref-0")
        await attempts_store.fill_ref(conn, first.id, "ref-x")  # only fills a missing one
    async with db.read() as conn:
        got = await attempts_store.attempts_for(conn, "lora", lo)
        assert [(a.seq, a.state, a.provider_ref) for a in got] == [(1, "failed", "ref-0"), (2, "queued", "ref-1")]
        assert got[0].error == "boom" and got[0].retryable is True and got[1].hinted_at is not None
        assert (await attempts_store.current_attempt(conn, "lora", lo)).id == second.id
        assert [a.id for a in await attempts_store.current_attempts(conn, "lora", [lo, "none"])] == [second.id]
        assert (await attempts_store.get_attempt(conn, first.id)).cost == 1.5
        assert await attempts_store.attempts_in_flight(conn, ["queued", "running"]) == {("p1", "lora"): 1}
        usage = await attempts_store.team_usage(conn, t, since=0)
        assert sorted((u[0], u[1], u[4]) for u in usage) == [("p1", "lora", 1.5), ("p1", "lora", 1.5)]
        assert await attempts_store.team_usage(conn, "other", since=0) == []
    async with db.tx() as conn:
        await attempts_store.mark_cancelled(conn, second.id, ["queued", "running"])
        await attempts_store.mark_cancelled(conn, first.id, ["queued", "running"])  # ended already: unchanged
    async with db.read() as conn:
        assert [a.state for a in await attempts_store.attempts_for(conn, "lora", lo)] == ["failed", "cancelled"]


# --------------------------------------------------------------------------- the queue


async def test_claims_leases_and_polls(db: Any) -> None:
    t = await team(db)
    due = [await lora(db, t) for _ in range(3)]
    later = await lora(db, t, next_run_at=now() + 3600)
    async with db.tx() as conn:
        claimed = await queue_store.claim_due(conn, "lora", owner="w1", lease_s=60, limit=2)
        assert len(claimed) == 2 and all(c.lease_owner == "w1" and c.lease_expires > now() for c in claimed)
        more = await queue_store.claim_due(conn, "lora", owner="w2", lease_s=60, limit=10)
        assert [c.id for c in more] == [x for x in due if x not in {c.id for c in claimed}]  # never a leased one
        assert await queue_store.claim_due(conn, "lora", owner="w2", lease_s=60, limit=10, lookahead_s=7200) != []
    async with db.tx() as conn:  # the look-ahead took `later` for w2
        assert not await queue_store.update_row(conn, "lora", later, lease="w1", stage="poll")
        assert await queue_store.update_row(conn, "lora", later, lease="w2", stage="poll")
        await queue_store.renew_leases(conn, "w1", 600, [("lora", claimed[0].id)])
        await queue_store.release_owner(conn, "w2")
    async with db.read() as conn:
        renewed = await loras_store.get_lora(conn, claimed[0].id)
        assert renewed.lease_expires > now() + 500
        assert (await loras_store.get_lora(conn, later)).lease_owner is None
        assert (await queue_store.count_by_status(conn))[("lora", "PENDING")] == 4
    # an expired lease is taken over
    async with db.tx() as conn:
        await queue_store.update_row(conn, "lora", claimed[1].id, lease_expires=now() - 1)
        taken = await queue_store.claim_due(conn, "lora", owner="w3", lease_s=60, limit=10, only_stage="prepare")
        assert claimed[1].id in [x.id for x in taken]
    # stage filters, jobs, and a batch of "still running" answers
    j = await job(db, t, due[0], stage="poll")
    a = attempt("job", j, 1, state="queued", provider_ref="r")
    async with db.tx() as conn:
        await attempts_store.insert_attempt(conn, a)
        assert await queue_store.claim_due(conn, "job", owner="w4", lease_s=60, limit=5, skip_stage="poll") == []
        (polled,) = await queue_store.claim_due(conn, "job", owner="w4", lease_s=60, limit=5, only_stage="poll")
        await queue_store.apply_running_polls(conn, "job", "w4", [{
            "attempt_id": a.id, "owner_id": j, "state": "running", "polls": 1, "progress": 0.5,
            "progressed_at": now(), "next_run_at": now() + 30}])
    async with db.read() as conn:
        after = await jobs_store.get_job(conn, j)
        assert after.lease_owner is None and after.next_run_at > now() + 20
        assert (await attempts_store.get_attempt(conn, a.id)).state == "running"


async def test_concurrent_claims_never_take_one_row_twice(db: Any, other: Any) -> None:
    """Two claimers at the same moment, each holding its transaction open: every row goes to
    exactly one (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: its single writer)."""
    t = await team(db)
    for _ in range(20):
        await lora(db, t)
    got: dict[str, list[str]] = {}

    async def claim(d: Any, owner: str) -> None:
        async with d.tx() as conn:
            rows = await queue_store.claim_due(conn, "lora", owner=owner, lease_s=60, limit=15)
            await asyncio.sleep(0.2)  # hold the locks while the other claims
        got[owner] = [r.id for r in rows]

    await asyncio.gather(claim(db, "a"), claim(other, "b"))
    assert not set(got["a"]) & set(got["b"])
    assert len(got["a"]) + len(got["b"]) == 20


async def test_leases_are_measured_by_the_database_clock(db: Any) -> None:
    async with db.read() as conn:
        t = await conn.now()
    assert abs(t - time.time()) < 5


# --------------------------------------------------------------------------- idempotency


def record(team_id: str, key: str, object_id: str, created_at: float | None = None) -> Any:
    return idempotency_store.IdempotencyRecord(team_id=team_id, key=key, route="POST /v2/loras", request_digest="d",
                                               object_id=object_id, created_at=created_at or now())


async def test_idempotency_records(db: Any) -> None:
    async with db.tx() as conn:
        assert await idempotency_store.claim(conn, record("t", "k", "o1"), expired_before=now() - 60)
        assert not await idempotency_store.claim(conn, record("t", "k", "o2"), expired_before=now() - 60)
        assert (await idempotency_store.idempotency_get(conn, "t", "k", newer_than=0)).object_id == "o1"
        await idempotency_store.idempotency_put(conn, record("t", "old", "o3", created_at=now() - 100_000))
        # an expired record is taken over by the next request with its key
        assert await idempotency_store.claim(conn, record("t", "old", "o4"), expired_before=now() - 60)
        await idempotency_store.idempotency_put(conn, record("t", "stale", "o5", created_at=now() - 100_000))
        assert await idempotency_store.idempotency_purge(conn, older_than=now() - 50_000) == 1
    async with db.read() as conn:
        assert (await idempotency_store.idempotency_get(conn, "t", "old", newer_than=0)).object_id == "o4"
        assert await idempotency_store.idempotency_get(conn, "t", "stale", newer_than=0) is None


async def test_the_first_insert_holds_the_key(db: Any, other: Any) -> None:
    """Insert-as-lock: while the first request's transaction is open, the second waits; once
    it commits, the second sees its record (and when it rolls back, the second takes the key)."""
    order: list[str] = []

    async def first(commit: bool, key: str) -> None:
        try:
            async with db.tx() as conn:
                assert await idempotency_store.claim(conn, record("t", key, "first"), expired_before=0)
                await asyncio.sleep(0.3)
                order.append("first done")
                if not commit:
                    raise RuntimeError("rolled back")
        except RuntimeError:
            pass

    async def second(key: str) -> bool:
        await asyncio.sleep(0.05)
        async with other.tx() as conn:
            won = await idempotency_store.claim(conn, record("t", key, "second"), expired_before=0)
            order.append("second claimed")
            return won

    _, won = await asyncio.gather(first(True, "k1"), second("k1"))
    assert won is False and order == ["first done", "second claimed"]
    order.clear()
    _, won = await asyncio.gather(first(False, "k2"), second("k2"))
    assert won is True and order == ["first done", "second claimed"]


# --------------------------------------------------------------------------- deliveries


def delivery(**fields: Any) -> Any:
    base = dict(id=new_id(), team_id="t", key_id="k", owner_kind="job", owner_id="j", event="completed",
                dedup=new_id(), url="https://hooks.example.com/x", payload=b'{"a": 1}', terminal=True,
                status="pending", attempts=0, next_try_at=now(), lease_owner=None, lease_expires=None,
                last_status_code=None, last_error=None, created_at=now(), delivered_at=None)
    return deliveries_store.Delivery(**{**base, **fields})


async def test_deliveries(db: Any) -> None:
    d1, d2 = delivery(), delivery(next_try_at=now() + 3600)
    async with db.tx() as conn:
        assert await deliveries_store.insert_delivery(conn, d1)
        assert not await deliveries_store.insert_delivery(conn, delivery(dedup=d1.dedup))  # one per dedup key
        assert await deliveries_store.insert_delivery(conn, d2)
        assert await deliveries_store.claim_deliveries(conn, owner="w", lease_s=60, limit=10) == [d1.id]
        assert await deliveries_store.claim_deliveries(conn, owner="v", lease_s=60, limit=10) == []
        await deliveries_store.renew_delivery_leases(conn, "w", 600, ids=[d1.id])
    async with db.read() as conn:
        held = await deliveries_store.get_delivery(conn, d1.id)
        assert held.lease_owner == "w" and held.lease_expires > now() + 500 and held.payload == b'{"a": 1}'
    async with db.tx() as conn:
        rec = await deliveries_store.record_delivery_attempt(conn, held, owner="w", status_code=500, error=None,
                                                             duration_ms=12, outcome="pending", next_try_at=now() + 5)
        assert rec == (1, "pending")
        # a try by someone who lost the lease is logged, but moves nothing
        rec = await deliveries_store.record_delivery_attempt(conn, held, owner="w", status_code=200, error=None,
                                                             duration_ms=9, outcome="delivered", next_try_at=now())
        assert rec == (2, None)
        assert await deliveries_store.replay_delivery(conn, d2.id, "t")
        assert not await deliveries_store.replay_delivery(conn, d2.id, "another team")
        (claimed,) = await deliveries_store.claim_deliveries(conn, owner="w", lease_s=60, limit=10)
        assert claimed == d2.id
    async with db.read() as conn:
        stale = await deliveries_store.get_delivery(conn, d2.id)
    async with db.tx() as conn:
        await deliveries_store.replay_delivery(conn, d2.id, "t")  # a replay arrives during the try
        rec = await deliveries_store.record_delivery_attempt(conn, stale, owner="w", status_code=200, error=None,
                                                             duration_ms=9, outcome="delivered", next_try_at=now())
        assert rec == (1, "replayed")
        await deliveries_store.release_deliveries(conn, "w")
    async with db.read() as conn:
        first = await deliveries_store.get_delivery(conn, d1.id)
        assert (first.status, first.attempts, first.last_status_code) == ("pending", 1, 500)
        again = await deliveries_store.get_delivery(conn, d2.id)
        assert again.status == "pending" and again.replays == 2
        assert [x.attempt for x in await deliveries_store.delivery_attempts(conn, d1.id)] == [1, 2]
        assert {x.id for x in await deliveries_store.list_deliveries(conn, "t")} == {d1.id, d2.id}
        assert [x.id for x in await deliveries_store.list_deliveries(conn, "t", status="delivered")] == []


# --------------------------------------------------------------------------- cancels, health, workers, rate limits


async def test_cancels(db: Any) -> None:
    a = attempt("lora", "l1", 1, state="queued")
    async with db.tx() as conn:
        await conn.execute("INSERT INTO attempts (id, owner_kind, owner_id, seq, provider, state, created_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (a.id, "lora", "l1", 1, "p1", "queued", now()))
        await cancels_store.request_cancel(conn, a, "stuck")
        await cancels_store.request_cancel(conn, a, "again", ref="r1")  # idempotent; fills the ref
        (req,) = await cancels_store.claim_cancels(conn, owner="w", lease_s=60, limit=5)
        assert (req.provider_ref, req.reason, req.lease_owner) == ("r1", "stuck", "w")
        assert await cancels_store.claim_cancels(conn, owner="v", lease_s=60, limit=5) == []
        await cancels_store.renew_cancel_leases(conn, "w", 600, [a.id])
        await cancels_store.retry_cancel(conn, a.id, "w", next_try_at=now() - 1, error="busy")
        (req,) = await cancels_store.claim_cancels(conn, owner="v", lease_s=60, limit=5)
        assert req.tries == 1 and req.last_error == "busy"
        assert not await cancels_store.close_cancel(conn, a.id, "w", state="done")  # w lost it
        assert await cancels_store.close_cancel(conn, a.id, "v", state="done", ref="r2")
        await cancels_store.release_cancels(conn, "v")
    async with db.read() as conn:
        (done,) = await cancels_store.cancels_for(conn, "lora", "l1")
        assert (done.state, done.provider_ref, done.tries) == ("done", "r1", 2)


async def test_health(db: Any, other: Any) -> None:
    async with db.tx() as conn:
        for _ in range(2):
            await health_store.record_failures(conn, "p1", "training", count=1, threshold=3, at=100.0)
        await health_store.record_failures(conn, "p1", "training", count=1, threshold=3, at=101.0)
        await health_store.record_success(conn, "p2", "inference", at=101.0)
    async with other.read() as conn:  # another process sees it
        rows = {(b.instance, b.operation): b for b in await health_store.breakers(conn)}
    assert (rows[("p1", "training")].state, rows[("p1", "training")].failures, rows[("p1", "training")].opened_at) == \
        ("open", 3, 101.0)
    assert rows[("p2", "inference")].state == "closed"
    wins = []
    for d, who in ((db, "a1"), (other, "a2")):
        async with d.tx() as conn:
            wins.append(await health_store.claim_probe(conn, "p1", "training", who, cooldown_s=10, ttl_s=60, at=120.0))
    assert wins == [True, False]
    async with db.tx() as conn:
        await health_store.record_success(conn, "p1", "training", at=130.0)
        await health_store.add_calls(conn, [("p1", "training", 5, 3, 1, 30.0), ("p1", "training", 6, 1, 0, 5.0)])
        await health_store.add_calls(conn, [("p1", "training", 6, 2, 2, 10.0)])
        assert (await health_store.breakers(conn))[0].state == "closed"
        assert await health_store.recent_calls(conn, since_minute=5) == {("p1", "training"): (6, 3, 45.0)}
        await health_store.purge_calls(conn, before_minute=6)
        assert await health_store.recent_calls(conn, since_minute=0) == {("p1", "training"): (3, 2, 15.0)}


async def test_workers(db: Any) -> None:
    async with db.tx() as conn:
        await workers_store.beat(conn, "w1", host="h", pid=1, started_at=now())
        await workers_store.beat(conn, "w2", host="h", pid=2, started_at=now())
        await workers_store.beat(conn, "w1", host="h", pid=1, started_at=now())
    async with db.read() as conn:
        live = await workers_store.live_workers(conn, within_s=60)
        assert {o for o, _ in live} == {"w1", "w2"} and all(0 <= age < 5 for _, age in live)
        assert await workers_store.last_beat(conn) is not None
    async with db.tx() as conn:
        await workers_store.remove(conn, "w2")
        assert await workers_store.purge(conn, older_than_s=3600) == 0
        assert await workers_store.purge(conn, older_than_s=-60) == 1  # "older than a minute from now"
        assert await workers_store.live_workers(conn, within_s=60) == []


async def test_shared_rate_buckets(db: Any) -> None:
    async with db.tx() as conn:
        assert [await ratelimit_store.take(conn, "k", 3) for _ in range(3)] == [None, None, None]
        left = await ratelimit_store.take(conn, "k", 3)
        assert left is not None and 0 <= left < 1
        assert await ratelimit_store.take(conn, "other-key", 3) is None


# --------------------------------------------------------------------------- notifications


async def test_notifications_reach_other_processes(db: Any, other: Any, backend: str) -> None:
    heard: list[str] = []
    arrived = asyncio.Event()

    def on(payload: str) -> None:
        heard.append(payload)
        arrived.set()

    other.listen("work", on)
    await asyncio.sleep(0.2)  # the listening connection is up
    await db.notify("work", "hello")
    if backend == "sqlite":  # one machine: the others poll; nothing is sent
        await asyncio.sleep(0.1)
        assert heard == []
        return
    await asyncio.wait_for(arrived.wait(), 5)
    assert heard == ["hello"]

