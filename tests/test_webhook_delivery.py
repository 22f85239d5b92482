"""How deliveries are sent, over real HTTP to receivers on 127.0.0.1: one deadline per try (a
receiver dripping a byte at a time is cut off), deliveries independent of each other, leases
renewed while sending (a second process never sends one in flight), the loop surviving database
errors, admin replay during a try, and Standard Webhooks signatures (checked by an independent
implementation of the spec)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from gateway.store import deliveries as deliveries_store
from gateway import webhooks
from gateway.webhooks import Deliverer
from tests.conftest import Api
from tests.receiver import Received, Receiver, serving

ADMIN = {"Authorization": "Bearer admin-secret"}


def config(**webhook_settings: Any) -> dict[str, Any]:
    return {
        "webhooks": {"allow_hosts": ["127.0.0.1"], "base_delay_s": 0.05, "max_delay_s": 0.2, "timeout_s": 1,
                     **webhook_settings},
        "server": {"admin_token": "admin-secret"},
    }


@dataclass
class SlowReceiver(Receiver):
    """Paths starting ``/drip`` answer 200 at once, then one byte every ``drip_s`` for
    ``drip_for_s`` (a per-read timeout never fires); ``/hold`` paths answer once ``release`` is
    set; other paths answer at once. Counts the requests in progress per delivery id."""

    drip_s: float = 0.2
    drip_for_s: float = 8.0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    active: dict[str, int] = field(default_factory=dict)
    most_at_once: dict[str, int] = field(default_factory=dict)
    cut: int = 0  # drips ended by the sender hanging up

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        delivery = headers.get("x-webhook-delivery", "")
        self.requests.append(Received(scope["path"], headers, body))
        self.active[delivery] = self.active.get(delivery, 0) + 1
        self.most_at_once[delivery] = max(self.most_at_once.get(delivery, 0), self.active[delivery])
        try:
            if scope["path"].startswith("/drip"):
                await self._drip(receive, send)
                return
            if scope["path"].startswith("/hold"):
                await self.release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            self.active[delivery] -= 1

    async def _drip(self, receive: Any, send: Any) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            end = asyncio.get_running_loop().time() + self.drip_for_s
            while asyncio.get_running_loop().time() < end:
                await send({"type": "http.response.body", "body": b".", "more_body": True})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), self.drip_s)
                if gone.is_set():
                    self.cut += 1
                    return
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


async def key_id(api: Api) -> str:
    return (await api.client.get("/v2/me", headers=api.h())).json()["apiKey"]["id"]


async def queue(api: Api, url: str, owner_id: str, payload: dict[str, Any] | None = None) -> str:
    """Queue one delivery (as a state change would) and return its id."""
    async with api.gw.db.tx() as conn:
        await webhooks.enqueue(conn, team_id=api.team_id, key_id=await key_id(api), kind="lora", owner_id=owner_id,
                               url=url, event="completed", payload=payload or {"id": owner_id}, terminal=True)
        rows = await conn.execute_fetchall("SELECT id FROM deliveries WHERE owner_id = ?", (owner_id,))
    api.gw.wake()
    return rows[0][0]


async def detail(api: Api, delivery_id: str) -> dict[str, Any]:
    r = await api.client.get(f"/admin/deliveries/{delivery_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_status(api: Api, delivery_id: str, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d = await detail(api, delivery_id)
        if d["status"] == status:
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery still {d['status']} after {timeout} s: {d}")
        await asyncio.sleep(0.02)


async def test_a_dripping_receiver_is_cut_off_at_the_deadline(make_api) -> None:
    """One byte every 0.2 s never trips a per-read timeout; the try's 1 s deadline does."""
    async with serving(SlowReceiver()) as rx, make_api(**config(timeout_s=1, max_attempts=2)) as api:
        delivery_id = await queue(api, f"{rx.base_url}/drip", "obj-drip")
        started = time.monotonic()
        d = await wait_status(api, delivery_id, "failed", timeout=6)
        assert time.monotonic() - started < 4
        assert [a["error"] for a in d["log"]] == ["timed out", "timed out"]  # retried, then given up
        assert all(900 <= a["durationMs"] < 2000 for a in d["log"]), d["log"]
        assert d["attempts"] == 2 and d["lastError"] == "timed out"
        assert len(rx.requests) == 2
        for _ in range(100):  # the receiver notices the hang-up a moment later
            if rx.cut == 2:
                break
            await asyncio.sleep(0.02)
        assert rx.cut == 2


async def test_a_slow_receiver_does_not_hold_up_other_deliveries(make_api) -> None:
    async with serving(SlowReceiver()) as rx, make_api(**config(timeout_s=3, max_attempts=1)) as api:
        slow = await queue(api, f"{rx.base_url}/drip/team-a", "obj-slow")
        await rx.wait_for(1)  # its try is under way
        started = time.monotonic()
        fast = [await queue(api, f"{rx.base_url}/fast/{i}", f"obj-fast-{i}") for i in range(3)]
        for delivery_id in fast:
            d = await wait_status(api, delivery_id, "delivered", timeout=2)
            assert [a["statusCode"] for a in d["log"]] == [200]
        assert time.monotonic() - started < 1.5
        assert rx.active[slow] == 1  # still in its try
        d = await detail(api, slow)
        assert d["status"] == "pending" and d["log"] == []


async def test_two_processes_never_send_one_delivery_at_once(make_api) -> None:
    """Two gateways on one database file. A try lasts 1 s and the lease 0.6 s: only the lease's
    renewal keeps the other process from taking the delivery over and sending it again."""
    cfg = {**config(timeout_s=1, max_attempts=2), "engine": {"poll_interval_s": 0.02, "lease_s": 0.6}}
    async with serving(SlowReceiver()) as rx, make_api(**cfg) as api, make_api(**cfg):
        ids = [await queue(api, f"{rx.base_url}/drip/{i}", f"obj-{i}") for i in range(3)]
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            if all(d["status"] == "failed" for d in [await detail(api, i) for i in ids]):
                break
            await asyncio.sleep(0.05)
        assert all(rx.most_at_once[i] == 1 for i in ids), rx.most_at_once
        for delivery_id in ids:
            d = await detail(api, delivery_id)
            assert d["status"] == "failed"
            assert [(a["attempt"], a["error"]) for a in d["log"]] == [(1, "timed out"), (2, "timed out")]
        await asyncio.sleep(0.3)  # nothing more may come
        assert len(rx.requests) == 6


async def test_deliverers_of_two_owners_share_the_work_and_renew_their_leases(make_api) -> None:
    """Two Deliverers (two owners, as two processes would be) on one database, with a lease far
    shorter than a try: each delivery is sent once, never by both, slow ones beside fast ones."""
    cfg = {**config(timeout_s=1, max_attempts=1), "server": {"admin_token": "admin-secret", "run_workers": False}}
    async with serving(SlowReceiver()) as rx, make_api(**cfg) as api:
        settings = api.gw.settings.webhooks
        # (0.6 s: renewed every 0.2 s, so a busy 2-core machine's loop stalls do not lose a lease)
        pair = [Deliverer(api.gw.db, settings, api.gw.webhook_client, owner, lease_s=0.6, poll_interval_s=0.02)
                for owner in ("process-a", "process-b")]
        async with anyio.create_task_group() as tg:
            for deliverer in pair:
                await tg.start(deliverer.run)
            slow = [await queue(api, f"{rx.base_url}/drip/{i}", f"slow-{i}") for i in range(4)]
            for deliverer in pair:
                deliverer.notify()
            await rx.wait_for(4)
            started = time.monotonic()
            fast = [await queue(api, f"{rx.base_url}/fast/{i}", f"fast-{i}") for i in range(8)]
            for deliverer in pair:
                deliverer.notify()
            for delivery_id in fast:
                await wait_status(api, delivery_id, "delivered", timeout=1)
            assert time.monotonic() - started < 0.8  # while the slow ones are in their tries
            assert all(rx.active[i] == 1 for i in slow)
            assert {i for deliverer in pair for i in deliverer.inflight} == set(slow)
            for delivery_id in slow:
                d = await wait_status(api, delivery_id, "failed", timeout=4)
                assert [a["error"] for a in d["log"]] == ["timed out"]
            await asyncio.sleep(1.8)  # three lease lengths: nothing is sent again
            tg.cancel_scope.cancel()
        assert len(rx.requests) == 12
        assert all(n == 1 for n in rx.most_at_once.values())
        async with api.gw.db.read() as conn:
            leased = await conn.execute_fetchall("SELECT COUNT(*) FROM deliveries WHERE lease_owner IS NOT NULL")
        assert leased[0][0] == 0


class FlakyDb:
    """The gateway's database, with write transactions that fail while ``failures`` lasts."""

    def __init__(self, db: Any, failures: int) -> None:
        self.db, self.failures, self.calls = db, failures, 0

    @contextlib.asynccontextmanager
    async def tx(self) -> Any:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        async with self.db.tx() as conn:
            yield conn

    def read(self) -> Any:
        return self.db.read()


async def test_the_delivery_loop_survives_database_errors(make_api, capsys) -> None:
    cfg = {**config(), "server": {"admin_token": "admin-secret", "run_workers": False}, "logging": {"level": "info"}}
    async with serving(Receiver()) as rx, make_api(**cfg) as api:
        db = FlakyDb(api.gw.db, failures=3)
        deliverer = Deliverer(db, api.gw.settings.webhooks, api.gw.webhook_client, "me",
                              lease_s=5, poll_interval_s=0.02)
        deliverer.error_backoff_s = 0.05
        delivery_id = await queue(api, f"{rx.base_url}/x", "obj-1")
        async with anyio.create_task_group() as tg:
            await tg.start(deliverer.run)
            (got,) = await rx.wait_for(1, timeout=5)
            await wait_status(api, delivery_id, "delivered", timeout=2)
            assert db.calls >= 4
            tg.cancel_scope.cancel()
        assert got.headers["x-webhook-delivery"] == delivery_id
    out = capsys.readouterr()
    failures = re.findall(r"webhook_loop_failed +owner=me retry_in_s=([0-9.]+)", out.out + out.err)
    assert [float(x) for x in failures] == [0.05, 0.1, 0.2]  # logged, backing off, then carrying on


async def test_replay_during_a_try_keeps_its_record_and_sends_again_afterwards(make_api) -> None:
    async with serving(SlowReceiver()) as rx, make_api(**config(timeout_s=5)) as api:
        delivery_id = await queue(api, f"{rx.base_url}/hold", "obj-held")
        await rx.wait_for(1)  # the first try is waiting for its answer
        r = await api.client.post(f"/admin/deliveries/{delivery_id}/replay", headers=ADMIN)
        assert r.status_code == 202 and r.json() == {"id": delivery_id, "status": "pending"}
        await asyncio.sleep(0.3)
        assert len(rx.requests) == 1  # not sent again while the first try is in flight
        rx.release.set()
        got = await rx.wait_for(2)
        d = await wait_status(api, delivery_id, "delivered", timeout=3)
        for _ in range(50):
            if len(d["log"]) == 2:
                break
            await asyncio.sleep(0.02)
            d = await detail(api, delivery_id)
        assert [(a["attempt"], a["statusCode"]) for a in d["log"]] == [(1, 200), (2, 200)]
        assert d["attempts"] == 2
        assert [g.headers["x-webhook-delivery"] for g in got] == [delivery_id] * 2
        assert rx.most_at_once[delivery_id] == 1
        await asyncio.sleep(0.2)
        assert len(rx.requests) == 2  # one replay, one extra send


async def test_replay_during_a_try_at_the_store(make_api) -> None:
    """The store's rules: the in-flight try's attempt is logged, and its outcome leaves the
    delivery due again; a sender that lost its lease still logs its attempt, and changes nothing."""
    cfg = {**config(), "server": {"admin_token": "admin-secret", "run_workers": False}}
    async with make_api(**cfg) as api:
        delivery_id = await queue(api, "http://127.0.0.1:9/x", "obj-1")
        async with api.gw.db.tx() as conn:
            assert await deliveries_store.claim_deliveries(conn, owner="a", lease_s=30, limit=10) == [delivery_id]
            d = await deliveries_store.get_delivery(conn, delivery_id)
            assert await deliveries_store.replay_delivery(conn, delivery_id, api.team_id)
            assert await deliveries_store.claim_deliveries(conn, owner="b", lease_s=30, limit=10) == []  # still a's
            rec = await deliveries_store.record_delivery_attempt(
                conn, d, owner="a", status_code=200, error=None, duration_ms=5, outcome="delivered", next_try_at=0)
            assert rec == (1, "replayed")
            after = await deliveries_store.get_delivery(conn, delivery_id)
            assert after.status == "pending" and after.lease_owner is None and after.attempts == 1
            assert after.next_try_at <= time.time() and after.delivered_at is not None
            rec = await deliveries_store.record_delivery_attempt(
                conn, d, owner="a", status_code=500, error="HTTP 500", duration_ms=5, outcome="pending", next_try_at=0)
            assert rec == (2, None)  # no lease: logged, not applied
            assert (await deliveries_store.get_delivery(conn, delivery_id)).status == "pending"
            assert await deliveries_store.claim_deliveries(conn, owner="b", lease_s=30, limit=10) == [delivery_id]
            d = await deliveries_store.get_delivery(conn, delivery_id)
            rec = await deliveries_store.record_delivery_attempt(
                conn, d, owner="b", status_code=200, error=None, duration_ms=5, outcome="delivered", next_try_at=0)
            assert rec == (3, "delivered")
            assert [a.attempt for a in await deliveries_store.delivery_attempts(conn, delivery_id)] == [1, 2, 3]
            assert (await deliveries_store.get_delivery(conn, delivery_id)).status == "delivered"


def standard_webhooks_verify(secret: str, headers: dict[str, str], body: bytes, *, now: float,
                             tolerance_s: int = 300) -> bool:
    """Standard Webhooks verification, written from the spec independently of the gateway."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


async def test_standard_webhooks_signature(make_api) -> None:
    async with serving(Receiver(fail_times=1)) as rx, make_api(**config()) as api:
        await queue(api, f"{rx.base_url}/std", "obj-std", {"event": "completed", "id": "obj-std"})
        got = await rx.wait_for(2)  # a failure, then the retry
        secret = "whsec_" + base64.b64encode(hashlib.sha256(api.key.encode()).digest()).decode()
        for g in got:
            assert g.headers["webhook-id"] == g.headers["x-webhook-delivery"] == got[0].headers["webhook-id"]
            assert abs(int(g.headers["webhook-timestamp"]) - time.time()) < 30
            assert standard_webhooks_verify(secret, g.headers, g.body, now=time.time())
            assert not standard_webhooks_verify(secret, g.headers, g.body + b" ", now=time.time())
            ts = int(g.headers["webhook-timestamp"])
            assert not standard_webhooks_verify(secret, g.headers, g.body, now=ts + 301)  # too old: a replay attack
            assert not standard_webhooks_verify(secret, g.headers, g.body, now=ts - 301)
            forged = {**g.headers, "webhook-id": "another-id"}
            assert not standard_webhooks_verify(secret, forged, g.body, now=time.time())
            other = "whsec_" + base64.b64encode(hashlib.sha256(b"another key").digest()).decode()
            assert not standard_webhooks_verify(other, g.headers, g.body, now=time.time())
            assert json.loads(g.body)["event"] == "completed"
