"""Fallback across provider instances: every routing strategy × every failure kind.

Each case routes a LoRA (training) or a job (inference) over two instances, A then B in the
strategy's order, where A fails in one way: its submit answers 5xx, its submit times out, it
reports a retryable or a final failure, it gets stuck, its breaker is open, or it sends a
callback after it was superseded. A and B are real adapters talking to the fake WaveSpeed and
Vimmerse servers (in-process ASGI, their documented wire format) or sandbox instances.

Every case checks the final state, the attempts (``GET .../attempts``), the ledger (charged
once, refunded at most once) and how often each fake was asked to start work (never more than
its share of the attempt budget).

Strategies put A first by different means: ``priority`` lists it first; ``cheapest`` lists it
last but declares it cheaper; ``weighted`` lists it last with 1000 times B's weight. Weighted
order is a hash of the object's id, so in about one run in a thousand B comes first: the
case then checks that B served it directly (A never asked), which is also right.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import httpx
import pytest

from gateway.store import attempts as attempts_store
from gateway.store import loras as loras_store
from gateway.engine.routing import rendezvous
from tests.conftest import Api
from tests.fakes.vimmerse import FakeVimmerse
from tests.fakes.wavespeed import FakeWaveSpeed, sign

STRATEGIES = ["priority", "cheapest", "weighted"]
ENGINE = {"min_poll_interval_s": 0.05, "max_poll_interval_s": 0.2, "poll_interval_s": 0.05,
          "retry_backoff_s": 0.05, "reconcile_wait_s": 0.3}
PUBLIC = "http://gateway.test"


class ManualClock:
    """A fake vendor's clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Instance:
    name: str
    kind: str  # ws | vm | sb
    config: dict[str, Any]
    fake: FakeWaveSpeed | FakeVimmerse | None = None

    def submits(self, operation: str) -> int:
        """Requests that started work at the fake."""
        if isinstance(self.fake, FakeWaveSpeed):
            return len(self.fake.of_kind("train" if operation == "training" else "generate"))
        if isinstance(self.fake, FakeVimmerse):
            return len(self.fake.of_kind("finetune" if operation == "training" else "generate"))
        raise AssertionError("a sandbox has no fake: count its attempts")


def make_instance(name: str, kind: str, cost: float, **fake_kw: Any) -> Instance:
    costs = {"cost_per_training": cost, "cost_per_image": cost}
    if kind == "ws":
        fake = FakeWaveSpeed(queue_s=0.05, training_s=0.3, generation_s=0.05, **fake_kw)
        cfg = {"type": "wavespeed", "api_key": fake.api_key, "base_url": f"http://{name}.test", "timeout_s": 5,
               "poll_backoff_s": 0.0, **costs}
        return Instance(name, kind, cfg, fake)
    if kind == "vm":
        fake = FakeVimmerse(queue_s=0.05, training_s=0.3, generation_s=0.05, seed=3, **fake_kw)
        cfg = {"type": "vimmerse", "api_key": fake.api_key, "base_url": f"http://{name}.test", "timeout_s": 5,
               "poll_backoff_s": 0.0, **costs}
        return Instance(name, kind, cfg, fake)
    cfg = {"type": "sandbox", "training_seconds": 0.3, "queue_seconds": 0.05, **costs, **fake_kw}
    return Instance(name, kind, cfg)


def route(strategy: str, a: Instance, b: Instance) -> dict[str, Any]:
    if strategy == "priority":
        return {"strategy": "priority", "providers": [a.name, b.name]}
    if strategy == "cheapest":  # listed last, but A declares the lower cost
        return {"strategy": "cheapest", "providers": [b.name, a.name]}
    return {"strategy": "weighted", "providers": [b.name, a.name], "weights": {a.name: 1000, b.name: 1}}


@dataclass
class Setup:
    """How A fails, and what the test does around it."""

    a: Instance
    b: Instance
    config: dict[str, Any] = field(default_factory=dict)
    public: bool = False
    prompt: str = "a portrait in a garden"


def setup_for(kind: str, operation: str) -> Setup:
    cheap, dear = 0.5, 2.0
    training = operation == "training"
    if kind == "submit_5xx":  # WaveSpeed's own 500 envelope: a refusal, the next instance takes it
        a = make_instance("ws-a", "ws", cheap)
        a.fake.script("train" if training else "generate", 500, times=10)
        return Setup(a, make_instance("vm-b", "vm", dear) if training else make_instance("ws-b", "ws", dear))
    if kind == "submit_timeout":  # no answer in time: it may be at WaveSpeed, which cannot be asked
        a = make_instance("ws-a", "ws", cheap)
        a.config["timeout_s"] = 0.3
        a.fake.script("train" if training else "generate", None, delay=5, times=10)
        return Setup(a, make_instance("sb-b", "sb", dear))
    if kind == "failed_retryable":
        if training:
            a = make_instance("vm-a", "vm", cheap, fail_finetunes="worker lost: GPU out of memory")
        else:
            a = make_instance("sb-a", "sb", cheap, generation_failure_rate=1.0)
        return Setup(a, make_instance("ws-b", "ws", dear))
    if kind == "failed_nonretryable":
        if training:
            a = make_instance("ws-a", "ws", cheap, fail_trainings="invalid dataset: no faces found")
            return Setup(a, make_instance("vm-b", "vm", dear))
        a = make_instance("sb-a", "sb", cheap, fail_prompts_containing="forbidden")
        return Setup(a, make_instance("ws-b", "ws", dear), prompt="a forbidden portrait")
    if kind == "stuck":  # WaveSpeed keeps saying "created"
        a = make_instance("ws-a", "ws", cheap)
        a.fake.queue_s = 3600
        op = "training" if training else "generation"
        return Setup(a, make_instance("sb-b", "sb", dear),
                     config={"engine": {"providers": {"ws-a": {op: {"stuck_after_s": 0.5}}}}})
    if kind == "breaker_open":
        a = make_instance("vm-a", "vm", cheap) if training else make_instance("ws-a", "ws", cheap)
        return Setup(a, make_instance("sb-b", "sb", dear))
    if kind == "late_callback":
        # a proxy's 502 after WaveSpeed accepted: ambiguous; no callback within reconcile_wait_s,
        # so it counts as unknown and B takes over; then WaveSpeed's signed callback arrives
        a = make_instance("ws-a", "ws", cheap, clock=ManualClock())
        a.config["webhook_secret"] = a.fake.webhook_secret
        a.fake.script("train" if training else "generate", 502, body=b"<html>502 Bad Gateway</html>", accept=True)
        return Setup(a, make_instance("sb-b", "sb", dear), public=True)
    raise AssertionError(kind)


@asynccontextmanager
async def gateway(make_api: Callable[..., Any], s: Setup, strategy: str, operation: str) -> AsyncIterator[Api]:
    # the sandbox trains the LoRAs the inference cases use; a LoRA can always run where it was
    # trained, so it is an inference candidate too: the dearest, so it never comes first
    instances = {"sandbox": {"training_seconds": 0.3, "queue_seconds": 0.05, "cost_per_image": 10.0},
                 **{i.name: i.config for i in (s.a, s.b)}}
    r = route(strategy, s.a, s.b)
    routing = {"training": r, "inference": {"providers": ["sandbox"]}} if operation == "training" else \
        {"training": {"providers": ["sandbox"]}, "inference": r}
    transports = {i.name: i.fake.transport() for i in (s.a, s.b) if i.fake is not None}
    engine = {**ENGINE, **s.config.get("engine", {})}
    server = {"public_base_url": PUBLIC} if s.public else {}
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(make_api(
            providers=instances, routing=routing, engine=engine, server=server, transports=transports))
        for i in (s.a, s.b):
            if i.fake is not None:
                stack.push_async_callback(i.fake.aclose)
                # the fake's callbacks reach the gateway in-process
                if isinstance(i.fake, FakeWaveSpeed):
                    i.fake.fetch_transport = httpx.ASGITransport(app=api.app)
        yield api


async def ledger(api: Api, ref: str) -> dict[str, int]:
    async with api.gw.db.read() as conn:
        rows = await conn.execute_fetchall("SELECT kind, amount FROM ledger WHERE ref = ? ORDER BY id", (ref,))
    out: dict[str, int] = {}
    for kind, amount in rows:
        assert kind not in out, f"{kind} written twice for {ref}"  # (the table is unique on it, too)
        out[kind] = amount
    return out


async def attempts(api: Api, what: str, obj_id: str) -> list[dict[str, Any]]:
    r = await api.client.get(f"/v2/{what}/{obj_id}/attempts", headers=api.h())
    assert r.status_code == 200, r.text
    return r.json()["attempts"]


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def order(strategy: str, s: Setup, obj_id: str, names: list[str]) -> list[str]:
    """The instances in the order the strategy ranks them (before health)."""
    if strategy != "weighted":
        return [s.a.name] + [n for n in names if n != s.a.name]  # A declared cheapest / listed first
    return rendezvous(obj_id, names, {s.a.name: 1000, s.b.name: 1})


async def open_breaker(api: Api, instance: str, operation: str) -> None:
    for _ in range(api.gw.settings.routing.breaker.failures):
        await api.gw.health.record(instance, operation, ok=False)
    assert await api.gw.health.state(instance, operation) == "open"


async def deliver_late_callback(api: Api, s: Setup, first: dict[str, Any]) -> None:
    """Let A's work finish at the fake, and wait for its real, signed callback: it names the
    superseded attempt, which must not move the object."""
    fake = s.a.fake
    assert isinstance(fake, FakeWaveSpeed) and isinstance(fake.clock, ManualClock)
    fake.clock.t += 3600  # the prediction the 502 hid completes now
    await eventually(lambda: fake.deliveries)
    d = fake.deliveries[0]
    assert d.url == f"{PUBLIC}/hooks/{s.a.name}?attempt={first['id']}"
    assert d.status == 200 and json.loads(d.response) == {"received": True, "applied": False}
    # a replayed copy a few seconds later changes nothing either
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url=PUBLIC) as client:
        again = await client.post(d.url, content=d.body, headers=d.headers)
    assert again.status_code == 200 and again.json()["applied"] is False


# --------------------------------------------------------------------------- the matrix

FAILURES = ["submit_5xx", "submit_timeout", "failed_retryable", "failed_nonretryable", "stuck", "breaker_open",
            "late_callback"]


def expected_first(kind: str) -> tuple[str, bool | None]:
    """A's attempt: (state, retryable)."""
    return {"submit_5xx": ("failed", True), "submit_timeout": ("unknown", True), "failed_retryable": ("failed", True),
            "failed_nonretryable": ("failed", False), "stuck": ("failed", True),
            "late_callback": ("unknown", True)}[kind]


@pytest.mark.parametrize("kind", FAILURES)
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_training_falls_back(make_api: Callable[..., Any], strategy: str, kind: str) -> None:
    s = setup_for(kind, "training")
    async with gateway(make_api, s, strategy, "training") as api:
        if kind == "breaker_open":
            await open_breaker(api, s.a.name, "training")
            await open_breaker(api, s.b.name, "inference")  # another operation's breaker changes nothing
        start = await api.credits()
        r = await api.create_lora(15)
        assert r.status_code == 202, r.text
        lora_id = r.json()["id"]
        ranked = order(strategy, s, lora_id, [s.b.name, s.a.name])
        tried_a = kind != "breaker_open" and ranked[0] == s.a.name
        then = next(n for n in ranked if n != s.a.name)  # (B: only two instances train)
        if kind == "late_callback" and tried_a:
            await eventually(lambda: s.a.fake.predictions)  # accepted behind the 502
        lora = await api.wait_lora(lora_id)
        got = await attempts(api, "loras", lora_id)
        if kind == "late_callback" and tried_a:
            await deliver_late_callback(api, s, got[0])
        if kind == "failed_nonretryable" and tried_a:
            assert lora["status"] == "FAILED", lora
            assert [(a["provider"], a["state"], a["retryable"]) for a in got] == [(s.a.name, "failed", False)]
            assert "no faces found" in lora["error"]
            assert s.b.submits("training") == 0  # a final failure does not fall back
            assert await ledger(api, lora_id) == {"lora_create": -2, "lora_training": -255, "lora_training_refund": 255}
            assert await api.credits() == start - 2
        else:
            assert lora["status"] == "READY", (lora, got)
            if tried_a:
                state, retryable = expected_first(kind)
                assert [(a["provider"], a["state"]) for a in got] == [(s.a.name, state), (then, "succeeded")]
                assert got[0]["retryable"] is retryable and got[0]["error"]
            else:
                assert [(a["provider"], a["state"]) for a in got] == [(then, "succeeded")]
            assert await ledger(api, lora_id) == {"lora_create": -2, "lora_training": -255}  # charged once
            assert await api.credits() == start - 2 - 255
            async with api.gw.db.read() as conn:
                row = await loras_store.get_lora(conn, lora_id)
            assert row.trained_attempt_id == got[-1]["id"]  # B's weights, whatever A said later
        # call budget: A was asked at most once (never for an open breaker), B at most once
        if s.a.fake is not None:
            assert s.a.fake and s.a.submits("training") == (1 if tried_a else 0)
        if s.b.fake is not None:
            assert s.b.submits("training") == sum(a["provider"] == s.b.name for a in got) <= 1
        assert len(got) <= api.gw.settings.engine.max_attempts
        if kind == "stuck" and tried_a:  # the superseded attempt is cancelled at the vendor
            await eventually(lambda: s.a.fake.of_kind("cancel"))
            ref = s.a.fake.of_kind("cancel")[0].path.split("/")[-2]
            assert s.a.fake.predictions[ref].cancelled


@pytest.mark.parametrize("kind", FAILURES)
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_generation_falls_back(make_api: Callable[..., Any], strategy: str, kind: str) -> None:
    s = setup_for(kind, "inference")
    async with gateway(make_api, s, strategy, "inference") as api:
        lora = await api.ready_lora()  # trained on the sandbox: portable, runs on any instance taking a LoRA file
        assert lora["gateway"]["portable"] is True
        if kind == "breaker_open":
            await open_breaker(api, s.a.name, "inference")
            await open_breaker(api, s.b.name, "training")
        start = await api.credits()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json={
            "prompt": s.prompt, "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}})
        assert r.status_code == 202, r.text
        job_id = r.json()["jobId"]
        # where the LoRA was trained is a candidate too (weighted: weight 1, so it may come second)
        ranked = order(strategy, s, job_id, [s.b.name, s.a.name, "sandbox"])
        tried_a = kind != "breaker_open" and ranked[0] == s.a.name
        then = next(n for n in ranked if n != s.a.name)
        job = await api.wait_job(job_id)
        got = await attempts(api, "jobs", job_id)
        if kind == "late_callback" and tried_a:
            await deliver_late_callback(api, s, got[0])
        if kind == "failed_nonretryable" and tried_a:
            assert job["status"] == "FAILED", job
            assert [(a["provider"], a["state"], a["retryable"]) for a in got] == [(s.a.name, "failed", False)]
            assert s.b.submits("inference") == 0
            assert await ledger(api, job_id) == {"job": -2, "job_refund": 2}
            assert await api.credits() == start
        else:
            assert job["status"] == "COMPLETED", (job, got)
            if tried_a:
                state, retryable = expected_first(kind)
                assert [(a["provider"], a["state"]) for a in got] == [(s.a.name, state), (then, "succeeded")]
                assert got[0]["retryable"] is retryable
            else:
                assert [(a["provider"], a["state"]) for a in got] == [(then, "succeeded")]
            assert await ledger(api, job_id) == {"job": -2}
            assert await api.credits() == start - 2
            assert len(job["result"]["images"]) == 1
        if s.a.fake is not None:
            assert s.a.submits("inference") == (1 if tried_a else 0)
        if s.b.fake is not None:
            assert s.b.submits("inference") == sum(a["provider"] == s.b.name for a in got) <= 1
        if kind == "stuck" and tried_a:
            await eventually(lambda: s.a.fake.of_kind("cancel"))


# --------------------------------------------------------------------------- budgets


async def test_the_attempt_budget_bounds_retries_and_fallbacks(make_api: Callable[..., Any]) -> None:
    """Both instances fail retryably every time: A, B, then A again (it failed first, so it is
    retried only after B), and the LoRA fails once ``engine.max_attempts`` (3) are spent, saying
    what happened on each; no instance is asked more than twice; the 255 comes back once."""
    a = make_instance("vm-a", "vm", 1.0, fail_finetunes="GPU worker lost")
    b = make_instance("ws-b", "ws", 1.0, fail_trainings="internal server error")
    s = Setup(a, b)
    async with gateway(make_api, s, "priority", "training") as api:
        start = await api.credits()
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        assert lora["status"] == "FAILED"
        got = await attempts(api, "loras", lora["id"])
        assert [(x["provider"], x["state"]) for x in got] == [("vm-a", "failed"), ("ws-b", "failed"), ("vm-a", "failed")]
        assert lora["error"].startswith("attempt 1 (vm-a): vimmerse:") and "attempt 2 (ws-b):" in lora["error"]
        assert "attempt 3 (vm-a)" in lora["error"]
        assert a.submits("training") == 2 and b.submits("training") == 1
        assert await ledger(api, lora["id"]) == {"lora_create": -2, "lora_training": -255, "lora_training_refund": 255}
        assert await api.credits() == start - 2


async def test_an_open_breaker_is_skipped_even_after_the_healthy_instance_failed(make_api: Callable[..., Any]) -> None:
    """B failed once (retryably); A's breaker is open: B is retried before A is touched."""
    a = make_instance("vm-a", "vm", 1.0)
    b = make_instance("ws-b", "ws", 1.0)
    b.fake.script("train", 503, times=1)
    s = Setup(a, b)
    async with gateway(make_api, s, "priority", "training") as api:
        await open_breaker(api, "vm-a", "training")
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        assert lora["status"] == "READY"
        got = await attempts(api, "loras", lora["id"])
        assert [(x["provider"], x["state"]) for x in got] == [("ws-b", "failed"), ("ws-b", "succeeded")]
        assert a.submits("training") == 0


async def test_an_open_breaker_is_used_when_nothing_else_is_eligible(make_api: Callable[..., Any]) -> None:
    """Open means "skip while another instance is healthy", not "never": alone, A still serves."""
    a = make_instance("ws-a", "ws", 1.0)
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(make_api(
            providers={"ws-a": a.config}, routing={"training": {"providers": ["ws-a"]}}, engine=ENGINE,
            transports={"ws-a": a.fake.transport()}))
        stack.push_async_callback(a.fake.aclose)
        await open_breaker(api, "ws-a", "training")
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        assert lora["status"] == "READY" and a.submits("training") == 1


async def test_ambiguous_submit_resolved_by_the_callback_naming_its_attempt(make_api: Callable[..., Any]) -> None:
    """A proxy's 502 hid WaveSpeed's acceptance; the signed callback names the attempt (it is in
    the ``?webhook=`` URL), so the gateway binds the prediction to it and finishes there: one
    submit, no fallback."""
    async with AsyncExitStack() as stack:
        a = make_instance("ws-a", "ws", 1.0)
        a.config["webhook_secret"] = a.fake.webhook_secret
        a.fake.script("train", 502, body=b"", accept=True)
        api = await stack.enter_async_context(make_api(
            providers={"ws-a": a.config, "sb-b": {"type": "sandbox"}},
            routing={"training": {"providers": ["ws-a", "sb-b"]}},
            engine={**ENGINE, "reconcile_wait_s": 60}, server={"public_base_url": PUBLIC},
            transports={"ws-a": a.fake.transport()}))
        stack.push_async_callback(a.fake.aclose)
        a.fake.fetch_transport = httpx.ASGITransport(app=api.app)
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"], timeout=30)
        assert lora["status"] == "READY"
        got = await attempts(api, "loras", lora["id"])
        assert [(x["provider"], x["state"]) for x in got] == [("ws-a", "succeeded")]
        assert a.submits("training") == 1
        (delivery, *_) = a.fake.deliveries
        assert delivery.url == f"{PUBLIC}/hooks/ws-a?attempt={got[0]['id']}"
        assert json.loads(delivery.response)["applied"] is True


async def test_a_forged_callback_cannot_claim_another_attempt(make_api: Callable[..., Any]) -> None:
    """A signed callback naming an attempt binds only a ref no other attempt holds, and only to
    the current, still ambiguous attempt."""
    a = make_instance("ws-a", "ws", 1.0)
    a.config["webhook_secret"] = a.fake.webhook_secret
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(make_api(
            providers={"ws-a": a.config}, routing={"training": {"providers": ["ws-a"]}}, engine=ENGINE,
            server={"public_base_url": PUBLIC}, transports={"ws-a": a.fake.transport()}))
        stack.push_async_callback(a.fake.aclose)
        a.fake.fetch_transport = httpx.ASGITransport(app=api.app)
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        (att,) = await attempts(api, "loras", lora["id"])
        body = json.dumps({"id": uuid.uuid4().hex, "model": a.fake.trainer_model, "status": "completed",
                           "outputs": [], "input": {}}).encode()
        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": "msg_1", "webhook-timestamp": str(ts),
                   "webhook-signature": sign(a.fake.webhook_secret, "msg_1", ts, body)}
        r = await api.client.post(f"/hooks/ws-a?attempt={att['id']}", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["applied"] is False
        async with api.gw.db.read() as conn:
            again = await attempts_store.get_attempt(conn, att["id"])
        assert again.state == "succeeded" and again.provider_ref != json.loads(body)["id"]
