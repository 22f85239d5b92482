"""One test per defect the engine review found (each failed on the engine before the attempt
runner): the cap, a dataset failure, stuck jobs, durable cancels, the crash budget, a provider
leaving the config, bounded lookups, supervision, poll backoff, result-copy retries, idempotency
purge and the balance check. Providers here are sandbox subclasses registered as plugins: the
sandbox is a real provider (files on disk, its own job state), and each subclass changes one
behaviour the way a vendor would."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any, Callable

import anyio
import msgspec
import pytest

from gateway.engine.attempts import Answer, Runner, timing
from gateway.engine.jobs import GENERATION
from gateway.engine.worker import Engine
from gateway.store import attempts as attempts_store
from gateway.store import idempotency as idempotency_store
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from gateway.store import cancels as cancels_store
from gateway.store.models import Attempt
from gateway.timeutil import new_id, now
from plugins.hookspecs import hookimpl
from providers.base import ProviderRateLimited, ProviderUnavailable
from providers.sandbox import SandboxProvider
from tests.conftest import Api
from tests.test_engine import attempts, ledger, wait_cancels_done


def gen_body(lora_id: str, **params: Any) -> dict[str, Any]:
    return {"prompt": "a photo", "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id, **params}}


async def wait_for(pred: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- 1. the cap is a cap


class Counting(SandboxProvider):
    """The sandbox, recording how many provider calls (generations, status polls) run at once."""

    name = "counting"
    now_running = 0
    most = 0

    async def _track(self, call: Callable[[], Any]) -> Any:
        Counting.now_running += 1
        Counting.most = max(Counting.most, Counting.now_running)
        try:
            await asyncio.sleep(0.05)
            return await call()
        finally:
            Counting.now_running -= 1

    async def generate(self, spec, lora):  # type: ignore[override]
        return await self._track(lambda: SandboxProvider.generate(self, spec, lora))

    async def training_status(self, ref):  # type: ignore[override]
        return await self._track(lambda: SandboxProvider.training_status(self, ref))


class Plugins:
    @hookimpl
    def register_providers(self, register):
        for cls in (Counting, CancelFlaky, SlowSubmit, Buggy, LookupDown, Stalling, RateLimitedFetch):
            register(cls)


def only(name: str, **opts: Any) -> dict[str, Any]:
    return dict(plugins=(Plugins(),), providers={name: {"training_seconds": 0.2, "queue_seconds": 0, **opts}},
                routing={"training": {"providers": [name]}, "inference": {"providers": [name]}})


async def test_concurrency_caps_steps_and_poll_batches_together(make_api) -> None:
    """With concurrency 4, never more than 4 provider calls at once, polls of trainings in flight
    included (a finished poll batch used to leave the cap far above it: 100 steps at once)."""
    Counting.now_running = Counting.most = 0
    async with make_api(**only("counting"), engine={"concurrency": 4}, max_trainings=50) as api:
        lora = await api.ready_lora()
        sandbox = api.gw.providers["counting"]
        sandbox.config = msgspec.structs.replace(sandbox.config, training_seconds=120)  # the rest train "forever"
        for _ in range(12):
            assert (await api.create_lora(name="slow")).status_code == 202
        await asyncio.sleep(1.0)  # their polls run in batches now
        Counting.most = 0
        jobs = await asyncio.gather(*(api.client.post("/v2/images/generate", headers=api.h(), json=gen_body(lora["id"]))
                                      for _ in range(30)))
        for r in jobs:
            assert (await api.wait_job(r.json()["jobId"]))["status"] == "COMPLETED"
        assert 1 <= Counting.most <= 4, Counting.most


# --------------------------------------------------------------------------- 2. a dataset failure ends


async def test_a_dataset_that_cannot_be_prepared_fails_and_refunds(make_api) -> None:
    """prepare_dataset raises DatasetError for an image it cannot normalise: the LoRA ends FAILED
    with its create fee back and its cap slot free (it used to stay UPLOADING, retried forever)."""
    async with make_api(server={"run_workers": False}, max_trainings=1) as api:
        r = await api.create_lora()
        lora_id = r.json()["id"]
        key = f"loras/{lora_id}/raw/001.jpg"
        api.gw.storage.local_path(key).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg any more")  # damaged in storage
        async with anyio.create_task_group() as tg:
            await tg.start(Engine(api.gw).run)
            lora = await api.wait_lora(lora_id, timeout=20)
            tg.cancel_scope.cancel()
        assert lora["status"] == "FAILED" and "could not be prepared" in lora["error"] and "image 1" in lora["error"]
        assert await ledger(api) == [(-2, "lora_create"), (2, "lora_create_refund")]
        assert (await api.create_lora()).status_code == 202  # the cap slot is free again


# --------------------------------------------------------------------------- 5. stuck jobs end


class Stalling(SandboxProvider):
    """Accepts generations, then answers every status request with a 503."""

    name = "stalling"

    async def generation_status(self, ref):  # type: ignore[override]
        raise ProviderUnavailable("stalling: 503 from upstream")


async def test_a_generation_running_past_its_deadline_fails_refunded_and_cancelled(make_api) -> None:
    """A provider that reports progress forever: the job ends FAILED at the generation deadline,
    refunded, and each abandoned attempt gets a cancel request (it used to stay PROCESSING)."""
    async with make_api(providers={"sandbox": {"training_seconds": 0.2, "queue_seconds": 0,
                                               "generation_seconds": 3600}},
                        engine={"generation": {"deadline_s": 0.6, "stuck_after_s": 60}}) as api:
        lora = await api.ready_lora()
        before = await api.credits()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json=gen_body(lora["id"], num_outputs=2))
        job = await api.wait_job(r.json()["jobId"], timeout=20)
        assert job["status"] == "FAILED" and "still not finished" in job["error"] and job["creditCost"] == 0
        assert await api.credits() == before
        tries = await attempts(api, "job", job["id"])
        assert len(tries) == 2 and all(a.state in ("failed", "cancelled") for a in tries)
        reqs = await wait_cancels_done(api, "job", job["id"])
        assert {r.attempt_id for r in reqs} == {a.id for a in tries}


async def test_a_provider_answering_5xx_forever_makes_the_job_stuck(make_api) -> None:
    async with make_api(**only("stalling", generation_seconds=5),
                        engine={"generation": {"stuck_after_s": 0.5}}) as api:
        lora = await api.ready_lora()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json=gen_body(lora["id"]))
        job = await api.wait_job(r.json()["jobId"], timeout=20)
        assert job["status"] == "FAILED" and "no progress" in job["error"] and job["creditCost"] == 0


# --------------------------------------------------------------------------- 6. durable cancels


class CancelFlaky(SandboxProvider):
    """Its cancel endpoint fails twice before it works."""

    name = "cancelflaky"
    failures = 2

    async def cancel_training(self, ref):  # type: ignore[override]
        if CancelFlaky.failures:
            CancelFlaky.failures -= 1
            raise ProviderUnavailable("cancelflaky: 503 on cancel")
        await super().cancel_training(ref)


async def _training(api: Api, lora_id: str) -> None:
    async def training() -> bool:
        return (await api.client.get(f"/v2/loras/{lora_id}", headers=api.h())).json()["status"] == "TRAINING"

    await wait_for(training, what="TRAINING")


async def test_a_failed_cancel_is_retried_until_the_vendor_confirms(make_api) -> None:
    CancelFlaky.failures = 2
    async with make_api(**only("cancelflaky", training_seconds=120)) as api:
        lora_id = (await api.create_lora()).json()["id"]
        await _training(api, lora_id)
        assert (await api.client.delete(f"/v2/loras/{lora_id}", headers=api.h())).status_code == 204
        (req,) = await wait_cancels_done(api, "lora", lora_id)
        assert req.state == "done" and req.tries == 3
        (attempt,) = await attempts(api, "lora", lora_id)
        status = await api.gw.providers["cancelflaky"].training_status(attempt.provider_ref)
        assert status.state == "failed" and status.error == "cancelled"  # the vendor stopped training
        assert await ledger(api) == [(-2, "lora_create"), (-255, "lora_training")]  # it had begun: 255 kept


async def test_a_cancel_survives_the_process_that_asked_for_it(make_api) -> None:
    """The DELETE commits the archive and the cancel request together; an API-only process
    never calls the vendor itself. An engine (another process, or this one restarted) later
    works the request through."""
    async with make_api(providers={"sandbox": {"training_seconds": 120, "queue_seconds": 0}}) as api:
        lora_id = (await api.create_lora()).json()["id"]
        await _training(api, lora_id)
    # the same data dir, now served by an API-only process
    async with make_api(server={"run_workers": False},
                        providers={"sandbox": {"training_seconds": 120, "queue_seconds": 0}}) as api2:
        r = await api2.client.delete(f"/v2/loras/{lora_id}", headers=api2.h(api.key))
        assert r.status_code == 204
        async with api2.gw.db.read() as conn:
            (req,) = await cancels_store.cancels_for(conn, "lora", lora_id)
        assert req.state == "pending"
        sandbox = api2.gw.providers["sandbox"]
        assert (await sandbox.training_status(req.provider_ref)).state == "running"  # not cancelled yet
        async with anyio.create_task_group() as tg:
            await tg.start(Engine(api2.gw).run)
            (req,) = await wait_cancels_done(api2, "lora", lora_id)
            tg.cancel_scope.cancel()
        assert req.state == "done"
        assert (await sandbox.training_status(req.provider_ref)).error == "cancelled"


class SlowSubmit(SandboxProvider):
    """Takes every training, but its answer is held until the test lets it go."""

    name = "slowsubmit"
    gate: asyncio.Event | None = None
    entered: asyncio.Event | None = None

    async def start_training(self, spec, dataset):  # type: ignore[override]
        assert SlowSubmit.gate is not None and SlowSubmit.entered is not None
        submission = await super().start_training(spec, dataset)
        SlowSubmit.entered.set()
        await SlowSubmit.gate.wait()
        return submission


async def test_archived_while_submitting_gets_the_255_back_and_the_late_job_is_cancelled(make_api) -> None:
    SlowSubmit.gate, SlowSubmit.entered = asyncio.Event(), asyncio.Event()
    async with make_api(**only("slowsubmit", training_seconds=120)) as api:
        start = await api.credits()
        lora_id = (await api.create_lora()).json()["id"]
        await asyncio.wait_for(SlowSubmit.entered.wait(), 20)  # charged 255; the vendor's answer is on its way
        assert await api.credits() == start - 2 - 255
        assert (await api.client.delete(f"/v2/loras/{lora_id}", headers=api.h())).status_code == 204
        assert await api.credits() == start - 2  # no vendor had accepted it: the 255 is back
        SlowSubmit.gate.set()  # ... and now the vendor's acceptance arrives
        (req,) = await wait_cancels_done(api, "lora", lora_id)
        assert req.state == "done" and req.provider_ref
        sandbox = api.gw.providers["slowsubmit"]
        assert (await sandbox.training_status(req.provider_ref)).error == "cancelled"
        assert await ledger(api) == [(-2, "lora_create"), (-255, "lora_training"), (255, "lora_training_refund")]


# --------------------------------------------------------------------------- 8. crash budget, gone providers, lookups


class Buggy(SandboxProvider):
    """Every training submit hits a bug in the gateway's own code path (not a ProviderError)."""

    name = "buggy"

    async def start_training(self, spec, dataset):  # type: ignore[override]
        raise RuntimeError("a bug")


async def test_a_row_that_keeps_crashing_ends_failed_with_its_refunds(make_api) -> None:
    async with make_api(**only("buggy"), engine={"max_crashes": 3}) as api:
        start = await api.credits()
        lora = await api.wait_lora((await api.create_lora()).json()["id"], timeout=20)
        assert lora["status"] == "FAILED" and "internal error" in lora["error"] and "3 times" in lora["error"]
        assert await api.credits() == start  # 255 and 2 refunded: it never trained
        async with api.gw.db.read() as conn:
            assert (await loras_store.get_lora(conn, lora["id"])).crashes == 3


async def test_a_provider_that_left_the_config_is_moved_off(api: Api) -> None:
    """A row whose current attempt names a provider no longer configured moves on (it used to
    raise KeyError on every step, forever)."""
    lora = await api.ready_lora()
    async with api.gw.db.tx() as conn:  # as if it had been training at 'gone', now done there
        await loras_store.update_lora(conn, lora["id"], status="TRAINING", stage="finish", next_run_at=now(),
                               lease_owner=None, lease_expires=None, artifact_id=None)
        await conn.execute("UPDATE attempts SET provider = 'gone' WHERE owner_id = ?", (lora["id"],))
        await conn.execute("DELETE FROM artifacts WHERE lora_id = ?", (lora["id"],))
    api.gw.wake()
    body = await api.wait_lora(lora["id"])
    assert body["status"] == "READY"
    tries = await attempts(api, "lora", lora["id"])
    assert [(a.provider, a.state) for a in tries] == [("gone", "failed"), ("sandbox", "succeeded")]
    assert "no longer configured" in tries[0].error


class LookupDown(SandboxProvider):
    """Can look jobs up, but its lookup endpoint is down."""

    name = "lookupdown"

    async def lookup_training(self, attempt_id):  # type: ignore[override]
        raise ProviderUnavailable("lookupdown: 503 on lookup")


async def test_lookups_of_an_ambiguous_submit_are_bounded(make_api) -> None:
    """An attempt left 'submitting' by a crash, at a provider whose lookup keeps failing: after
    engine.reconcile_tries lookups it counts as unknown and the LoRA fails, refunded (it used to be
    asked every 5 s, forever)."""
    from gateway.engine.attempts import new_attempt

    async with make_api(**only("lookupdown"), server={"run_workers": False}, engine={"reconcile_tries": 3}) as api:
        start = await api.credits()
        lora_id = (await api.create_lora()).json()["id"]
        async with api.gw.db.tx() as conn:  # the state a crash mid-submit leaves behind
            await loras_store.update_lora(conn, lora_id, status="UPLOADING", stage="submit", attempts_used=1)
            await attempts_store.insert_attempt(conn, new_attempt("lora", lora_id, 1, api.gw.providers["lookupdown"], 0))
            await ledger_store.apply_credits(conn, api.team_id, -255, reason="LoRA training", ref=lora_id,
                                            kind="lora_training")
        async with anyio.create_task_group() as tg:
            await tg.start(Engine(api.gw).run)
            body = await api.wait_lora(lora_id, timeout=30)
            tg.cancel_scope.cancel()
        (attempt,) = await attempts(api, "lora", lora_id)
        assert attempt.state == "unknown" and attempt.lookups == 2  # the third failed lookup gave up
        assert body["status"] == "FAILED" and "could not be asked" in body["error"]
        assert await api.credits() == start
        assert not api.gw.providers["lookupdown"].calls()  # and it was never sent blindly


# --------------------------------------------------------------------------- 9. supervision


class Blocker:
    """Another process holding the database's locks: SQLite's write lock, or (PostgreSQL) an
    exclusive lock on the queue tables."""

    def __init__(self, api: Api, backend: str) -> None:
        self.api, self.backend = api, backend

    async def __aenter__(self) -> "Blocker":
        if self.backend == "sqlite":
            self.conn = sqlite3.connect(self.api.gw.settings.database_path, isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            import asyncpg

            self.pg = await asyncpg.connect(self.api.gw.settings.database.url)
            self.tx = self.pg.transaction()
            await self.tx.start()
            await self.pg.execute("LOCK TABLE loras, jobs, cancels, deliveries IN ACCESS EXCLUSIVE MODE")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.backend == "sqlite":
            self.conn.execute("ROLLBACK")
            self.conn.close()
        else:
            await self.tx.rollback()
            await self.pg.close()


async def test_database_errors_do_not_stop_the_engine_and_show_on_readyz(make_api, backend: str) -> None:
    """Another process holds the database's locks past the busy timeout (SQLite) or the
    statement timeout (PostgreSQL): the engine's loops fail, log, back off and show on /readyz
    (503 degraded); once the lock goes they recover and the work moves (a database error used
    to end Engine.run while the API kept serving)."""
    async with make_api(database={"busy_timeout_ms": 100, "statement_timeout_ms": 300}) as api:
        async with Blocker(api, backend):
            async def degraded() -> bool:
                r = await api.client.get("/readyz")
                return r.status_code == 503 and r.json()["checks"]["workers"] == "degraded"

            await wait_for(degraded, what="/readyz to report the failing loops")
            faults = (await api.client.get("/readyz")).json()["checks"]["faults"]
            assert any(("locked" if backend == "sqlite" else "statement timeout") in text for text in faults.values()), faults

        async def recovered() -> bool:
            return (await api.client.get("/readyz")).status_code == 200

        await wait_for(recovered, timeout=30, what="the engine to recover")
        assert (await api.ready_lora())["status"] == "READY"


# --------------------------------------------------------------------------- 10. polls and copies


async def test_poll_backoff_restarts_when_the_state_changes(api: Api) -> None:
    runner = Runner(api.gw, GENERATION, "me")
    t = now()
    attempt = msgspec.convert({
        "id": "a", "owner_kind": "job", "owner_id": "j", "seq": 1, "provider": "sandbox", "provider_ref": "r",
        "provider_trigger_word": None, "state": "queued", "progress": None, "error": None, "retryable": False,
        "cost": 0, "currency": "USD", "polls": 6, "created_at": t, "submitted_at": t, "progressed_at": t,
        "finished_at": None}, type=Attempt)

    class Row:
        id, next_run_at = "j", t

    tm = timing(api.gw.settings.engine, "generation", "sandbox")
    same = runner.running_update(Row, attempt, Answer(state="queued"))
    assert same["polls"] == 7 and same["next_run_at"] == pytest.approx(t + tm.poll_delay(7), abs=0.05)
    moved = runner.running_update(Row, attempt, Answer(state="running"))  # queued -> running
    assert moved["polls"] == 0 and moved["next_run_at"] - now() <= tm.min_poll_s + 0.05


class RateLimitedFetch(SandboxProvider):
    """Trains; its file host answers 429 with Retry-After once."""

    name = "ratelimited"
    limited = 1

    async def fetch_file(self, url, dest, *, max_bytes):  # type: ignore[override]
        if RateLimitedFetch.limited:
            RateLimitedFetch.limited -= 1
            raise ProviderRateLimited("slow down", retry_after=1.0)
        await super().fetch_file(url, dest, max_bytes=max_bytes)


async def test_the_weights_copy_counts_its_own_tries_and_honours_retry_after(make_api) -> None:
    RateLimitedFetch.limited = 1
    async with make_api(**only("ratelimited")) as api:
        lora = await api.ready_lora()
        (attempt,) = await attempts(api, "lora", lora["id"])
        assert attempt.state == "succeeded" and attempt.fetches == 1 and attempt.polls == 0
        async with api.gw.db.read() as conn:
            row = await loras_store.get_lora(conn, lora["id"])
        assert row.completed_at - attempt.finished_at >= 0.95  # it waited as the host asked


# --------------------------------------------------------------------------- 13. idempotency, balance


async def test_expired_idempotency_keys_are_purged(api: Api) -> None:
    async with api.gw.db.tx() as conn:
        await idempotency_store.idempotency_put(conn, idempotency_store.IdempotencyRecord(
            team_id=api.team_id, key="old", route="r", request_digest="d", object_id=new_id(),
            created_at=now() - 25 * 3600))
        await idempotency_store.idempotency_put(conn, idempotency_store.IdempotencyRecord(
            team_id=api.team_id, key="fresh", route="r", request_digest="d", object_id=new_id(), created_at=now()))
    async with anyio.create_task_group() as tg:  # a second engine: its housekeeping purges at start
        await tg.start(Engine(api.gw).run)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    async with api.gw.db.read() as conn:
        keys = [r[0] for r in await conn.execute_fetchall("SELECT key FROM idempotency")]
    assert keys == ["fresh"]


async def test_a_refused_debit_writes_no_ledger_row(api: Api) -> None:
    """The balance is checked before the ledger row is written: a caller that catches the refusal
    and commits leaves no orphan ledger entry behind."""
    async with api.gw.db.tx() as conn:
        with pytest.raises(ledger_store.InsufficientBalance):
            await ledger_store.apply_credits(conn, api.team_id, -10**9, reason="x", ref="too-much", kind="job")
    async with api.gw.db.read() as conn:
        rows = await conn.execute_fetchall("SELECT * FROM ledger WHERE ref = 'too-much'")
    assert list(rows) == []
    assert await api.credits() == 10_000
