"""The shared breaker: one per instance and operation, in the database, so every process sees
one state; fed only by provider-side outcomes of real calls (polls included); half-open after
its cooldown with one probe at a time, across processes too."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gateway.config import BreakerSettings
from gateway.health import ProviderHealth
from gateway.store.sqlite import SqliteDatabase as Database
from tests.fakes.wavespeed import FakeWaveSpeed
from tests.test_routing_matrix import ENGINE, attempts

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def other_process(db: Path | str, *args: str, cooldown: float = 30.0) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "tests.health_worker", str(db), *args, "--cooldown", str(cooldown)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


async def test_the_breaker_opens_half_opens_and_closes(tmp_path: Path) -> None:
    db = Database(tmp_path / "gw.db")
    await db.open()
    clock = Clock()
    changes: list[tuple[str, str, str]] = []
    health = ProviderHealth(db, BreakerSettings(failures=3, cooldown_s=10), clock=clock)
    health.on_change = lambda *a: changes.append(a)
    try:
        for _ in range(2):
            await health.record("ws-a", "training", ok=False)
        assert await health.state("ws-a", "training") == "closed"
        await health.record("ws-a", "training", ok=True)  # a success restarts the count
        for _ in range(2):
            await health.record("ws-a", "training", ok=False)
        assert await health.state("ws-a", "training") == "closed"
        await health.record("ws-a", "training", ok=False)  # three in a row
        assert await health.state("ws-a", "training") == "open"
        assert await health.state("ws-a", "inference") == "closed"  # per operation
        assert await health.state("ws-b", "training") == "closed"  # per instance
        assert not await health.claim_probe("ws-a", "training", "att-1")  # still cooling down
        clock.t += 10
        assert await health.state("ws-a", "training") == "half-open"
        assert await health.claim_probe("ws-a", "training", "att-1")
        assert not await health.claim_probe("ws-a", "training", "att-2")  # one probe at a time
        assert await health.state("ws-a", "training") == "probing"
        await health.record("ws-a", "training", ok=False)  # the probe failed: open afresh
        assert await health.state("ws-a", "training") == "open"
        clock.t += 9
        assert await health.state("ws-a", "training") == "open"
        clock.t += 1
        assert await health.claim_probe("ws-a", "training", "att-3")
        await health.record("ws-a", "training", ok=True)  # the probe worked
        assert await health.state("ws-a", "training") == "closed"
        # (claiming a probe is not a change of state; the probe's outcome is)
        assert changes == [("ws-a", "training", "open"), ("ws-a", "training", "open"), ("ws-a", "training", "closed")]
    finally:
        await db.close()


async def test_a_breaker_opened_by_another_process_routes_work_away(make_api: Callable[..., Any]) -> None:
    """Another process (a worker, say) saw sb-a fail: this process's engine skips it at once,
    and a success this process sees closes it for the other one too."""
    providers = {"sb-a": {"type": "sandbox", "training_seconds": 0.2}, "sb-b": {"type": "sandbox", "training_seconds": 0.2}}
    async with make_api(providers=providers, routing={"training": {"providers": ["sb-a", "sb-b"]}}, engine=ENGINE) as api:
        db = api.gw.settings.database.url or api.gw.settings.database_path  # either backend
        assert other_process(db, "fail", "sb-a", "training", "5") == {"state": "open"}
        await asyncio.sleep(0.6)  # this process re-reads the table at most every 0.5 s
        lora = await api.ready_lora()
        assert [(a["provider"], a["state"]) for a in await attempts(api, "loras", lora["id"])] == [("sb-b", "succeeded")]
        assert other_process(db, "state", "sb-a", "training") == {"state": "open"}
        await api.gw.health.record("sb-a", "training", ok=True)
        assert other_process(db, "state", "sb-a", "training") == {"state": "closed"}


async def test_one_probe_across_processes(tmp_path: Path) -> None:
    db_path = tmp_path / "gw.db"
    db = Database(db_path)
    await db.open()
    await db.close()
    assert other_process(db_path, "fail", "ws-a", "inference", "5", cooldown=0.2) == {"state": "open"}
    time.sleep(0.3)
    start = time.time() + 1.5
    racers = [subprocess.Popen([sys.executable, "-m", "tests.health_worker", str(db_path), "probe", "ws-a", "inference",
                                str(start), "--cooldown", "0.2"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    results = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in racers]
    assert sum(r["won"] for r in results) == 1, results
    assert other_process(db_path, "state", "ws-a", "inference", cooldown=0.2) == {"state": "probing"}


async def test_only_provider_side_outcomes_count(make_api: Callable[..., Any]) -> None:
    """A rejected request (400) or a failed job is the provider answering: no failure. Status
    polls that get 503s are failures (they open the breaker), and the next good poll closes it."""
    fake = FakeWaveSpeed(queue_s=0.05, generation_s=0.3)
    cfg = {"type": "wavespeed", "api_key": fake.api_key, "base_url": "http://ws.test", "poll_retries": 0,
           "poll_backoff_s": 0}
    async with make_api(providers={"ws": cfg},
                        routing={"inference": {"providers": ["ws"]}, "breaker": {"failures": 3, "cooldown_s": 60}},
                        engine=ENGINE, transports={"ws": fake.transport()}) as api:
        changes: list[tuple[str, str, str]] = []
        original = api.gw.health.on_change
        api.gw.health.on_change = lambda *a: (changes.append(a), original(*a))
        lora = await api.ready_lora()
        fake.script("generate", 400, times=4)
        for _ in range(4):
            r = await api.client.post("/v2/images/generate", headers=api.h(), json={
                "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}})
            job = await api.wait_job(r.json()["jobId"])
            assert job["status"] == "FAILED" and "HTTP 400" in job["error"]
        assert await api.gw.health.state("ws", "inference") == "closed" and changes == []
        rows = await api.gw.health.rows()
        assert rows.get(("ws", "inference")) is None or rows[("ws", "inference")].failures == 0

        fake.script("result", 503, times=3)
        r = await api.client.post("/v2/images/generate", headers=api.h(), json={
            "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}})
        job = await api.wait_job(r.json()["jobId"])
        assert job["status"] == "COMPLETED"  # the poll errors were retried; the job stayed on ws
        assert [c[2] for c in changes] == ["open", "closed"]
        assert len(fake.of_kind("generate")) == 5
        await api.gw.health.flush()
        recent = await api.gw.health.recent()
        calls, failures, _ = recent[("ws", "inference")]
        assert failures == 3 and calls >= 5
