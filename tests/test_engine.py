"""The lifecycle engine: credits and refunds, the per-team cap under concurrency, fallback
between providers, archive during training, and lease take-over."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.store import attempts as attempts_store
from gateway.store import ledger as ledger_store
from gateway.store import loras as loras_store
from plugins.hookspecs import hookimpl
from providers.base import ProviderUnavailable
from providers.sandbox import SandboxProvider
from tests.conftest import Api


async def ledger(api: Api, team_id: str | None = None) -> list[tuple[int, str]]:
    async with api.gw.db.read() as conn:
        entries = await ledger_store.ledger_for(conn, team_id or api.team_id)
    return [(e.amount, e.kind) for e in entries if e.kind not in ("grant",)]


async def attempts(api: Api, kind: str, owner_id: str) -> list[Any]:
    async with api.gw.db.read() as conn:
        return await attempts_store.attempts_for(conn, kind, owner_id)


async def wait_cancels_done(api: Api, kind: str, owner_id: str, timeout: float = 20) -> list[Any]:
    from gateway.store import cancels as cancels_store

    deadline = time.monotonic() + timeout
    while True:
        async with api.gw.db.read() as conn:
            reqs = await cancels_store.cancels_for(conn, kind, owner_id)
        if reqs and all(r.state != "pending" for r in reqs):
            return reqs
        assert time.monotonic() < deadline, f"cancel requests still pending: {reqs}"
        await asyncio.sleep(0.05)


async def test_success_charges_2_then_255(api: Api) -> None:
    lora = await api.ready_lora()
    assert await ledger(api) == [(-2, "lora_create"), (-255, "lora_training")]
    assert [a.state for a in await attempts(api, "lora", lora["id"])] == ["succeeded"]


async def test_training_failure_refunds_255_but_not_the_create_fee(make_api) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 0.1, "queue_seconds": 0, "training_failure_rate": 1.0}}) as api:
        start = await api.credits()
        r = await api.create_lora()
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED"
        assert "simulated" in lora["error"]
        assert lora["triggerWord"] is None
        # a retryable failure is retried on the same provider at most once (no other is configured),
        # charged once; the error tells what happened on each attempt
        assert [a.state for a in await attempts(api, "lora", lora["id"])] == ["failed"] * 2
        assert lora["error"].startswith("attempt 1 (sandbox): ") and "attempt 2 (sandbox): " in lora["error"]
        assert await ledger(api) == [(-2, "lora_create"), (-255, "lora_training"), (255, "lora_training_refund")]
        assert await api.credits() == start - 2


async def test_failure_before_training_refunds_the_create_fee(make_api) -> None:
    async with make_api(credits=100) as api:  # enough to create, not to train
        r = await api.create_lora()
        assert r.status_code == 202
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED"
        assert "insufficient credits" in lora["error"] and "255" in lora["error"]
        assert lora["startedAt"] is None
        assert await ledger(api) == [(-2, "lora_create"), (2, "lora_create_refund")]
        assert await api.credits() == 100
        assert await attempts(api, "lora", lora["id"]) == []


async def test_generation_failure_refunds_in_full(make_api) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 0.1, "queue_seconds": 0, "fail_prompts_containing": "FAILME"}}) as api:
        lora = await api.ready_lora()
        before = await api.credits()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json={
            "prompt": "FAILME please", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 3}})
        assert r.status_code == 202
        assert await api.credits() == before - 6  # charged at POST
        job = await api.wait_job(r.json()["jobId"])
        assert job["status"] == "FAILED" and job["creditCost"] == 0 and job["result"] is None
        assert job["error"]
        assert await api.credits() == before
        kinds = [k for _, k in await ledger(api)]
        assert kinds.count("job") == 1 and kinds.count("job_refund") == 1


async def test_refund_and_charge_never_happen_twice(api: Api) -> None:
    async with api.gw.db.tx() as conn:
        assert await ledger_store.apply_credits(conn, api.team_id, -5, reason="x", ref="r1", kind="job")
        assert not await ledger_store.apply_credits(conn, api.team_id, -5, reason="x", ref="r1", kind="job")
        assert await ledger_store.refund(conn, api.team_id, ref="r1", charge_kind="job", reason="y")
        assert not await ledger_store.refund(conn, api.team_id, ref="r1", charge_kind="job", reason="y")
        assert not await ledger_store.refund(conn, api.team_id, ref="never-charged", charge_kind="job", reason="y")
    assert await ledger(api) == [(-5, "job"), (5, "job_refund")]


async def test_ledger_is_append_only(api: Api) -> None:
    with pytest.raises(Exception, match="append-only"):
        async with api.gw.db.tx() as conn:
            await conn.execute("UPDATE ledger SET amount = 0")
    with pytest.raises(Exception, match="append-only"):
        async with api.gw.db.tx() as conn:
            await conn.execute("DELETE FROM ledger")


async def test_balance_never_goes_negative(api: Api) -> None:
    with pytest.raises(ledger_store.InsufficientBalance):
        async with api.gw.db.tx() as conn:
            await ledger_store.apply_credits(conn, api.team_id, -10**9, reason="x", ref="big", kind="job")
    assert await api.credits() == 10_000
    assert await ledger(api) == []  # the failed debit was rolled back whole


async def test_cap_holds_under_30_parallel_creates(make_api) -> None:
    async with make_api(max_trainings=10, providers={"sandbox": {"training_seconds": 60}}) as api:
        results = await asyncio.gather(*(api.create_lora() for _ in range(30)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(202) == 10 and codes.count(429) == 20, codes
        for r in results:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0
                assert "limit is 10" in r.json()["error"]
        assert await api.credits() == 10_000 - 10 * 2
        listed = await api.client.get("/v2/loras?limit=100", headers=api.h())
        assert len(listed.json()["items"]) == 10


async def test_archived_lora_frees_a_cap_slot_and_cancels_training(make_api) -> None:
    async with make_api(max_trainings=1, providers={"sandbox": {"training_seconds": 60, "queue_seconds": 0}}) as api:
        first = (await api.create_lora()).json()["id"]
        assert (await api.create_lora()).status_code == 429
        # wait until it is training at the provider
        for _ in range(1200):
            body = (await api.client.get(f"/v2/loras/{first}", headers=api.h())).json()
            if body["status"] == "TRAINING":
                break
            await asyncio.sleep(0.05)
        assert body["status"] == "TRAINING"
        assert (await api.client.delete(f"/v2/loras/{first}", headers=api.h())).status_code == 204
        tries = await attempts(api, "lora", first)
        assert tries[-1].state == "cancelled"
        await wait_cancels_done(api, "lora", first)  # the cancel is a durable request the engine works through
        sandbox = api.gw.providers["sandbox"]
        status = await sandbox.training_status(tries[-1].provider_ref)
        assert status.state == "failed" and status.error == "cancelled"
        assert (await api.create_lora()).status_code == 202


class FlakyProvider(SandboxProvider):
    """A second provider for routing tests: every submission fails with a retryable error."""

    name = "flaky"

    async def start_training(self, spec, dataset):  # type: ignore[override]
        self.submit_calls += 1
        raise ProviderUnavailable("flaky: 503 from upstream")


class FlakyPlugin:
    @hookimpl
    def register_providers(self, register):
        register(FlakyProvider)


async def test_fallback_moves_to_the_next_provider_keeping_id_word_and_credits(make_api) -> None:
    async with make_api(
        plugins=(FlakyPlugin(),),
        providers={"flaky": {}, "sandbox": {"training_seconds": 0.1, "queue_seconds": 0}},
        routing={"training": {"providers": ["flaky", "sandbox"]}, "inference": {"providers": ["sandbox"]}},
    ) as api:
        lora = await api.ready_lora()
        tries = await attempts(api, "lora", lora["id"])
        assert [(a.provider, a.state) for a in tries] == [("flaky", "failed"), ("sandbox", "succeeded")]
        assert "503" in tries[0].error
        assert await ledger(api) == [(-2, "lora_create"), (-255, "lora_training")]
        assert api.gw.providers["flaky"].submit_calls == 1


async def test_cheapest_strategy_prefers_the_lower_declared_cost(make_api) -> None:
    async with make_api(
        plugins=(FlakyPlugin(),),
        providers={"flaky": {"cost_per_training": 5.0}, "sandbox": {"training_seconds": 0.1, "queue_seconds": 0, "cost_per_training": 1.0}},
        routing={"training": {"providers": ["flaky", "sandbox"], "strategy": "cheapest"}, "inference": {"providers": ["sandbox"]}},
    ) as api:
        lora = await api.ready_lora()
        tries = await attempts(api, "lora", lora["id"])
        assert [a.provider for a in tries] == ["sandbox"]
        assert tries[0].cost == 1.0
        assert api.gw.providers["flaky"].submit_calls == 0


async def test_no_eligible_provider_fails_and_refunds(make_api) -> None:
    # steps above the sandbox's declared maximum: nobody can train it
    async with make_api(providers={"sandbox": {}}) as api:
        sandbox = api.gw.providers["sandbox"]
        from providers.base import Capabilities, TrainingCapabilities

        sandbox.capabilities = Capabilities(training=TrainingCapabilities(max_steps=900), inference=sandbox.capabilities.inference)
        r = await api.create_lora(steps=1000)
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED" and "no configured provider" in lora["error"]
        assert await ledger(api) == [(-2, "lora_create"), (2, "lora_create_refund")]


async def test_a_dead_workers_lease_is_taken_over(api: Api) -> None:
    """A row leased by a worker that died is picked up once its lease expires."""
    r = await api.create_lora()
    lora_id = r.json()["id"]
    # pretend another process leased it just now and then died: lease in the past
    async with api.gw.db.tx() as conn:
        await loras_store.update_lora(conn, lora_id, lease_owner="dead-host:1:x", lease_expires=0.0)
    api.gw.wake()
    body = await api.wait_lora(lora_id)
    assert body["status"] == "READY"


class CrashAfterSend(SandboxProvider):
    """Submits for real, then the connection drops before the answer arrives (first call only)."""

    name = "crashy"
    crashes_left = 1
    lookups = 0

    async def start_training(self, spec, dataset):  # type: ignore[override]
        result = await super().start_training(spec, dataset)
        if CrashAfterSend.crashes_left:
            CrashAfterSend.crashes_left -= 1
            raise RuntimeError("connection reset after the request was sent")
        return result

    async def lookup_training(self, attempt_id):  # type: ignore[override]
        CrashAfterSend.lookups += 1
        return await super().lookup_training(attempt_id)


class CrashyPlugin:
    @hookimpl
    def register_providers(self, register):
        register(CrashAfterSend)


async def test_ambiguous_submission_is_reconciled_not_resubmitted(make_api) -> None:
    CrashAfterSend.crashes_left, CrashAfterSend.lookups = 1, 0
    async with make_api(
        plugins=(CrashyPlugin(),),
        engine={"crash_backoff_s": 0.05},
        providers={"crashy": {"training_seconds": 0.1, "queue_seconds": 0}},
        routing={"training": {"providers": ["crashy"]}, "inference": {"providers": ["crashy"]}},
    ) as api:
        lora = await api.ready_lora()
        provider = api.gw.providers["crashy"]
        tries = await attempts(api, "lora", lora["id"])
        assert [(a.provider, a.state) for a in tries] == [("crashy", "succeeded")]
        assert CrashAfterSend.lookups == 1  # it asked instead of resubmitting
        assert provider.submissions() == [tries[0].id]  # one training at the vendor
        assert provider.submit_calls == 1
        assert await ledger(api) == [(-2, "lora_create"), (-255, "lora_training")]


class TimeoutNoLookup(SandboxProvider):
    """Times out on submit after the request arrived, and cannot look jobs up."""

    name = "blind"

    def __init__(self, config, setup):  # type: ignore[no-untyped-def]
        super().__init__(config, setup)
        c = self.capabilities
        from providers.base import Capabilities

        self.capabilities = Capabilities(training=c.training, inference=c.inference, cost=c.cost,
                                         can_lookup=False, can_cancel=False)

    async def start_training(self, spec, dataset):  # type: ignore[override]
        await super().start_training(spec, dataset)  # it arrived ...
        from providers.base import ProviderOutcomeUnknown

        raise ProviderOutcomeUnknown("read timeout after sending")  # ... but we never heard back


class TimeoutThenLookup(SandboxProvider):
    """Times out on the first submit after the request arrived; can look jobs up."""

    name = "lookup"
    timeouts = 1

    async def start_training(self, spec, dataset):  # type: ignore[override]
        result = await super().start_training(spec, dataset)
        if TimeoutThenLookup.timeouts:
            TimeoutThenLookup.timeouts -= 1
            from providers.base import ProviderOutcomeUnknown

            raise ProviderOutcomeUnknown("read timeout after sending")
        return result


class FlakyFetch(SandboxProvider):
    """Training works; copying the weights fails twice first."""

    name = "flakyfetch"
    failures = 2

    async def fetch_file(self, url, dest, *, max_bytes):  # type: ignore[override]
        if FlakyFetch.failures:
            FlakyFetch.failures -= 1
            raise ProviderUnavailable("CDN answered 503")
        await super().fetch_file(url, dest, max_bytes=max_bytes)


class MorePlugins:
    @hookimpl
    def register_providers(self, register):
        register(TimeoutNoLookup)
        register(TimeoutThenLookup)
        register(FlakyFetch)


def _route(*names: str, **sandbox_opts) -> dict:
    opts = {"training_seconds": 0.1, "queue_seconds": 0, **sandbox_opts}
    return dict(
        plugins=(MorePlugins(),),
        providers={n: dict(opts) for n in names},
        routing={"training": {"providers": list(names)}, "inference": {"providers": ["sandbox"] if "sandbox" in names else [names[0]]}},
        engine={"min_poll_interval_s": 0.05, "max_poll_interval_s": 0.1, "poll_interval_s": 0.05},
    )


async def test_ambiguous_submit_without_lookup_is_never_resent_to_that_provider(make_api) -> None:
    async with make_api(**_route("blind", "sandbox")) as api:
        lora = await api.ready_lora()
        tries = await attempts(api, "lora", lora["id"])
        assert [(a.provider, a.state) for a in tries] == [("blind", "unknown"), ("sandbox", "succeeded")]
        assert api.gw.providers["blind"].submit_calls == 1
    async with make_api(**_route("blind")) as api:  # nowhere else to go: it fails, refunded
        r = await api.create_lora()
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED" and "outcome unknown" in lora["error"]
        assert api.gw.providers["blind"].submit_calls == 1


async def test_ambiguous_submit_with_lookup_is_reconciled(make_api) -> None:
    TimeoutThenLookup.timeouts = 1
    async with make_api(**_route("lookup")) as api:
        lora = await api.ready_lora()
        provider = api.gw.providers["lookup"]
        tries = await attempts(api, "lora", lora["id"])
        assert [(a.provider, a.state) for a in tries] == [("lookup", "succeeded")]
        assert provider.submit_calls == 1 and provider.submissions() == [tries[0].id]


async def test_artifact_copy_is_retried_before_retraining(make_api) -> None:
    FlakyFetch.failures = 2
    async with make_api(**_route("flakyfetch")) as api:
        lora = await api.ready_lora()
        tries = await attempts(api, "lora", lora["id"])
        assert [a.state for a in tries] == ["succeeded"]  # no second training
        assert api.gw.providers["flakyfetch"].submit_calls == 1
        assert lora["hasWeights"]


async def test_polls_are_batched_and_lost_leases_are_respected(make_api) -> None:
    """poll_many writes every "still running" answer in one go, and only for rows it leases."""
    import anyio

    from gateway.engine.attempts import Runner
    from gateway.engine.loras import TRAINING

    async with make_api(providers={"sandbox": {"training_seconds": 600, "queue_seconds": 0}},
                        engine={"min_poll_interval_s": 300, "max_poll_interval_s": 300, "poll_interval_s": 0.05}) as api:
        ids = [(await api.create_lora()).json()["id"] for _ in range(3)]
        for lora_id in ids:  # wait until each is training at the sandbox
            for _ in range(1200):
                async with api.gw.db.read() as conn:
                    row = await loras_store.get_lora(conn, lora_id)
                if row.stage == "poll" and row.lease_owner is None:
                    break
                await asyncio.sleep(0.02)
        async with api.gw.db.tx() as conn:  # lease them by hand, as a claim would
            for lora_id in ids:
                await loras_store.update_lora(conn, lora_id, lease_owner="me", lease_expires=10**12)
            rows = [await loras_store.get_lora(conn, i) for i in ids]
            await loras_store.update_lora(conn, ids[2], lease_owner="someone-else")  # lost meanwhile
            before = {a.owner_id: a for a in await attempts_store.current_attempts(conn, "lora", ids)}
        rest = await Runner(api.gw, TRAINING, "me").poll_many(rows, anyio.CapacityLimiter(8))
        assert rest == []  # every answer was "running": nothing needs a full step
        async with api.gw.db.read() as conn:
            after = {i: await loras_store.get_lora(conn, i) for i in ids}
            tries = {a.owner_id: a for a in await attempts_store.current_attempts(conn, "lora", ids)}
        for lora_id in ids[:2]:
            assert after[lora_id].lease_owner is None  # released until its next poll
            assert after[lora_id].next_run_at > time.time() + 200  # the next poll, one interval away
            assert tries[lora_id] != before[lora_id]  # the answer was recorded
            assert tries[lora_id].state == "running" and tries[lora_id].progress is not None
        assert after[ids[2]].lease_owner == "someone-else"  # untouched
        assert tries[ids[2]] == before[ids[2]]
