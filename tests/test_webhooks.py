"""Outbound webhooks over real HTTP to a receiver on 127.0.0.1: the signature (checked by an
independent implementation of Apiframe's recipe), payloads, events, retries with one delivery
id, the delivery log and replay, and SSRF protection for every address class."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import httpx
import pytest

from gateway.config import WebhookSettings
from gateway.netsafety import UnsafeUrl, UrlPolicy, webhook_client
from gateway.webhooks import retry_delay
from tests.conftest import Api, fake_resolver
from tests.receiver import Receiver, serving

FAST = {
    "webhooks": {"allow_hosts": ["127.0.0.1"], "base_delay_s": 0.05, "max_delay_s": 0.2, "timeout_s": 5},
    "server": {"admin_token": "admin-secret"},
}


def verify(api_key: str, body: bytes, header: str) -> bool:
    """Apiframe's recipe, written out independently of the gateway's code."""
    secret = hashlib.sha256(api_key.encode()).digest()  # raw digest, not hex
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    value = header[len("sha256="):] if header.startswith("sha256=") else header
    return hmac.compare_digest(expected, value)


async def test_lora_completed_webhook_is_signed(make_api) -> None:
    async with serving(Receiver()) as rx, make_api(**FAST) as api:
        lora = await api.ready_lora(webhookUrl=f"{rx.base_url}/hooks/lora")
        (got,) = await rx.wait_for(1)
        assert got.path == "/hooks/lora"
        assert got.headers["x-webhook-event"] == "completed"
        assert got.headers["content-type"] == "application/json"
        assert verify(api.key, got.body, got.headers["x-webhook-signature"])
        assert not verify(api.key, got.body + b" ", got.headers["x-webhook-signature"])
        body = json.loads(got.body)
        assert body == {
            "event": "completed", "id": lora["id"], "status": "READY", "imageCount": 15,
            "completedAt": lora["completedAt"], "triggerWord": lora["triggerWord"],
        }
        assert got.headers["x-webhook-delivery"]


async def test_lora_failed_webhook_and_event_filter(make_api) -> None:
    cfg = {**FAST, "providers": {"sandbox": {"training_seconds": 0.05, "queue_seconds": 0, "training_failure_rate": 1.0}}}
    async with serving(Receiver()) as rx, make_api(**cfg) as api:
        r = await api.create_lora(webhookUrl=f"{rx.base_url}/a", webhookEvents="completed")
        assert (await api.wait_lora(r.json()["id"]))["status"] == "FAILED"
        r = await api.create_lora(webhookUrl=f"{rx.base_url}/b", webhookEvents="failed")
        lora = await api.wait_lora(r.json()["id"])
        (got,) = await rx.wait_for(1)
        assert got.path == "/b"  # the first one asked only for completed
        body = json.loads(got.body)
        assert body["event"] == "failed" and body["status"] == "FAILED" and body["error"] == lora["error"]
        assert "triggerWord" not in body
        assert verify(api.key, got.body, got.headers["x-webhook-signature"])


async def test_job_webhooks_progress_completed_and_status(make_api) -> None:
    cfg = {**FAST, "providers": {"sandbox": {"training_seconds": 0.05, "queue_seconds": 0, "generation_seconds": 0.4}}}
    async with serving(Receiver()) as rx, make_api(**cfg) as api:
        lora = await api.ready_lora()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json={
            "prompt": "x", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 2},
            "webhookUrl": f"{rx.base_url}/job", "webhookEvents": ["progress", "completed", "failed"]})
        job_id = r.json()["jobId"]
        job = await api.wait_job(job_id)
        assert job["webhookStatus"] in ("pending", "delivered")
        await rx.wait_for(2)
        for _ in range(100):
            job = (await api.client.get(f"/v2/jobs/{job_id}", headers=api.h())).json()
            if job["webhookStatus"] == "delivered":
                break
            await asyncio.sleep(0.05)
        assert job["webhookStatus"] == "delivered"
        events = [json.loads(x.body) for x in rx.requests]
        assert all(verify(api.key, x.body, x.headers["x-webhook-signature"]) for x in rx.requests)
        progress = [e for e in events if e["event"] == "progress"]
        completed = [e for e in events if e["event"] == "completed"]
        assert progress and all(e["status"] == "PROCESSING" and e["jobId"] == job_id for e in progress)
        assert len(completed) == 1
        c = completed[0]
        assert c["status"] == "COMPLETED" and c["progress"] == 100 and c["creditCost"] == 4 and c["model"] == "flux-lora"
        assert len(c["result"]["images"]) == 2 and c["completedAt"] == job["completedAt"]
        ids = [x.headers["x-webhook-delivery"] for x in rx.requests]
        assert len(set(ids)) == len(ids)  # distinct events are distinct deliveries


async def test_job_failed_webhook(make_api) -> None:
    cfg = {**FAST, "providers": {"sandbox": {"training_seconds": 0.05, "queue_seconds": 0, "fail_prompts_containing": "FAIL"}}}
    async with serving(Receiver()) as rx, make_api(**cfg) as api:
        lora = await api.ready_lora()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json={
            "prompt": "FAIL", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]},
            "webhookUrl": f"{rx.base_url}/job"})
        job = await api.wait_job(r.json()["jobId"])
        (got,) = await rx.wait_for(1)
        body = json.loads(got.body)
        assert body == {"event": "failed", "jobId": job["id"], "status": "FAILED", "error": job["error"], "model": "flux-lora"}
        assert got.headers["x-webhook-event"] == "failed"


async def test_retries_keep_one_delivery_id_and_are_logged(make_api) -> None:
    async with serving(Receiver(fail_times=3)) as rx, make_api(**FAST) as api:
        lora = await api.ready_lora(webhookUrl=f"{rx.base_url}/flaky")
        got = await rx.wait_for(4)
        assert len({g.headers["x-webhook-delivery"] for g in got}) == 1
        assert len({g.body for g in got}) == 1  # the same payload every time
        delivery_id = got[0].headers["x-webhook-delivery"]
        admin = {"Authorization": "Bearer admin-secret"}
        for _ in range(200):  # the receiver may answer before the gateway records the answer
            r = await api.client.get(f"/admin/teams/{api.team_id}/deliveries", headers=admin)
            assert r.status_code == 200
            (d,) = r.json()["deliveries"]
            if d["status"] != "pending":
                break
            await asyncio.sleep(0.02)
        assert d["id"] == delivery_id and d["status"] == "delivered" and d["attempts"] == 4 and d["objectId"] == lora["id"]
        detail = (await api.client.get(f"/admin/deliveries/{delivery_id}", headers=admin)).json()
        assert [a["statusCode"] for a in detail["log"]] == [500, 500, 500, 200]
        # replay sends it again, with the same id
        r = await api.client.post(f"/admin/deliveries/{delivery_id}/replay", headers=admin)
        assert r.status_code == 202
        got = await rx.wait_for(5)
        assert got[-1].headers["x-webhook-delivery"] == delivery_id


async def test_gives_up_after_max_attempts(make_api) -> None:
    cfg = {**FAST, "webhooks": {**FAST["webhooks"], "max_attempts": 3}}
    async with serving(Receiver(fail_times=100)) as rx, make_api(**cfg) as api:
        lora = await api.ready_lora()
        r = await api.client.post("/v2/images/generate", headers=api.h(), json={
            "prompt": "x", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}, "webhookUrl": f"{rx.base_url}/j"})
        await rx.wait_for(3)
        for _ in range(100):
            job = (await api.client.get(f"/v2/jobs/{r.json()['jobId']}", headers=api.h())).json()
            if job["webhookStatus"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert job["webhookStatus"] == "failed"
        assert len(rx.requests) == 3


async def test_redirects_are_not_followed(make_api) -> None:
    rx = Receiver(status=302, extra_headers=[(b"location", b"http://169.254.169.254/latest/meta-data")])
    cfg = {**FAST, "webhooks": {**FAST["webhooks"], "max_attempts": 2}}
    async with serving(rx), make_api(**cfg) as api:
        await api.ready_lora(webhookUrl=f"{rx.base_url}/r")
        await rx.wait_for(2)
        admin = {"Authorization": "Bearer admin-secret"}
        for _ in range(100):
            (d,) = (await api.client.get(f"/admin/teams/{api.team_id}/deliveries", headers=admin)).json()["deliveries"]
            if d["status"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert d["status"] == "failed" and d["lastStatusCode"] == 302 and "redirect" in d["lastError"]
        assert all(x.path == "/r" for x in rx.requests)


def test_default_schedule_is_at_least_10_tries_over_2_hours() -> None:
    cfg = WebhookSettings()
    assert cfg.max_attempts >= 10
    shortest = sum(retry_delay(cfg, n, rng=lambda: 0.0) for n in range(1, cfg.max_attempts))
    assert shortest >= 2 * 3600
    delays = [retry_delay(cfg, n, rng=lambda: 0.5) for n in range(1, 6)]
    assert delays == sorted(delays)  # exponential


async def test_admin_endpoints_need_the_token(make_api) -> None:
    async with make_api(**FAST) as api:
        assert (await api.client.get(f"/admin/teams/{api.team_id}/deliveries")).status_code == 401
        assert (await api.client.get(f"/admin/teams/{api.team_id}/deliveries", headers=api.h())).status_code == 401
    async with make_api() as api:  # no admin token configured: the endpoints do not exist
        r = await api.client.get(f"/admin/teams/{api.team_id}/deliveries", headers={"Authorization": "Bearer x"})
        assert r.status_code == 404


BLOCKED = [
    "http://example.com/hook",  # not https
    "https://127.0.0.1/hook",  # loopback
    "https://10.0.0.1/hook",  # private
    "https://172.16.5.4/hook",
    "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data",  # link-local, cloud metadata
    "https://100.64.0.1/hook",  # CGNAT
    "https://224.0.0.1/hook",  # multicast
    "https://240.0.0.1/hook",  # reserved
    "https://0.0.0.0/hook",
    "https://[::1]/hook",
    "https://[fe80::1]/hook",
    "https://[fd00:ec2::254]/hook",  # unique local (AWS metadata over IPv6)
    "https://[ff02::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
    "https://[::ffff:10.0.0.1]/hook",
    "https://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
    "https://internal.example.com/hook",  # a name that resolves privately
    "https://mixed.example.com/hook",  # one private address among public ones
    "https://v6local.example.com/hook",
    "https://nowhere.invalid/hook",  # does not resolve
    "https://user:pw@example.com/hook",  # credentials in the URL
    "ftp://example.com/hook",
]


@pytest.mark.parametrize("url", BLOCKED)
async def test_unsafe_webhook_urls_are_refused_at_request_time(api: Api, url: str) -> None:
    r = await api.create_lora(webhookUrl=url)
    assert r.status_code == 400, (url, r.text)
    assert "webhookUrl" in r.json()["details"]
    r = await api.client.get("/v2/loras", headers=api.h())
    assert r.json()["items"] == []  # nothing half-written


@pytest.mark.parametrize("url", BLOCKED[1:6])
async def test_unsafe_urls_are_refused_for_generations_too(api: Api, url: str) -> None:
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={
        "prompt": "x", "model": "flux-lora", "fluxLoraParams": {"loraId": "00000000-0000-4000-8000-000000000000"},
        "webhookUrl": url})
    assert r.status_code == 400 and "webhookUrl" in r.json()["details"]


async def test_public_urls_are_accepted() -> None:
    policy = UrlPolicy(resolver=fake_resolver)
    await policy.check("https://example.com/hook")
    await policy.check("https://hooks.example.com:8443/x?y=1")
    await policy.check("https://93.184.215.14/hook")


async def test_dns_rebinding_is_caught_at_connect_time() -> None:
    """The name resolved to a public address when the URL was accepted, and to the metadata
    service when the delivery connects: the connection is refused."""
    answers = iter([["93.184.215.14"], ["169.254.169.254"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    policy = UrlPolicy(resolver=rebinding)
    await policy.check("https://rebind.example.com/hook")  # first answer: public
    async with webhook_client(policy, timeout_s=2) as client:
        with pytest.raises(httpx.ConnectError, match="non-public"):
            await client.post("https://rebind.example.com/hook", content=b"{}")


async def test_allow_list_lets_named_hosts_through() -> None:
    policy = UrlPolicy(["localhost", "127.0.0.1", "::1"], resolver=fake_resolver)
    await policy.check("http://localhost:8080/hook")
    await policy.check("http://127.0.0.1/hook")
    await policy.check("http://[::1]:9000/hook")  # IP literals, v6 too
    with pytest.raises(UnsafeUrl, match="webhooks.allow_hosts"):
        await policy.check("http://example.com/hook")


async def test_refusals_say_how_an_operator_allows_a_host() -> None:
    policy = UrlPolicy(["localhost"], resolver=fake_resolver)
    with pytest.raises(UnsafeUrl, match=r"webhooks.allow_hosts.*127\.0\.0\.1.*localhost. does not cover"):
        await policy.check("http://127.0.0.1:8000/hook")  # listed as a name, used as an address
    with pytest.raises(UnsafeUrl, match=r"non-public address \(10\.0\.0\.5\).*webhooks.allow_hosts"):
        await policy.check("https://internal.example.com/hook")


async def test_a_batch_of_deliveries_arrives_exactly_once_each(make_api, capsys) -> None:
    """One delivery's logging must never cancel the rest of its batch mid-send."""
    from gateway import webhooks

    async with serving(Receiver()) as rx, make_api(**FAST, logging={"level": "debug"}) as api:
        key_id = (await api.client.get("/v2/me", headers=api.h())).json()["apiKey"]["id"]
        async with api.gw.db.tx() as conn:
            for i in range(12):
                await webhooks.enqueue(conn, team_id=api.team_id, key_id=key_id, kind="lora", owner_id=f"obj-{i}",
                                       url=f"{rx.base_url}/batch", event="completed", payload={"n": i}, terminal=True)
        api.gw.wake()
        await rx.wait_for(12)
        await asyncio.sleep(0.5)  # nothing more may come
        assert sorted(json.loads(r.body)["n"] for r in rx.requests) == list(range(12))
    out = capsys.readouterr()
    assert "webhook_loop_failed" not in out.out + out.err
