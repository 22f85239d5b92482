"""Idempotency-Key: replays return the original (status may have moved on), a different body
is a 409, concurrent requests with one key create one object and charge once."""

from __future__ import annotations

import asyncio

from gateway.store import ledger as ledger_store
from tests.conftest import Api
from tests.images import image_set, multipart_files


def gen_body(lora_id: str, **params) -> dict:
    return {"prompt": "a walk", "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id, **params}}


async def charges(api: Api, kind: str) -> int:
    async with api.gw.db.read() as conn:
        return sum(1 for e in await ledger_store.ledger_for(conn, api.team_id) if e.kind == kind)


async def test_generate_replay_returns_the_original_job(api: Api) -> None:
    lora = await api.ready_lora()
    h = {**api.h(), "Idempotency-Key": "order-42"}
    first = await api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"], num_outputs=2))
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    job = await api.wait_job(first.json()["jobId"])
    again = await api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"], num_outputs=2))
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == {"jobId": job["id"], "status": "COMPLETED"}  # the status moved on
    assert await charges(api, "job") == 1


async def test_same_key_different_body_is_409(api: Api) -> None:
    lora = await api.ready_lora()
    h = {**api.h(), "Idempotency-Key": "k1"}
    assert (await api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"]))).status_code == 202
    r = await api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"], num_outputs=3))
    assert r.status_code == 409 and "different request" in r.json()["error"]
    # key order and whitespace in the JSON do not make a request different
    import json

    raw = json.dumps({"fluxLoraParams": {"loraId": lora["id"]}, "model": "flux-lora", "prompt": "a walk"}, indent=3)
    r = await api.client.post("/v2/images/generate", headers={**h, "content-type": "application/json"}, content=raw)
    assert r.status_code == 202 and r.headers["idempotent-replayed"] == "true"


async def test_concurrent_generates_with_one_key_create_one_job(api: Api) -> None:
    lora = await api.ready_lora()
    h = {**api.h(), "Idempotency-Key": "burst"}
    results = await asyncio.gather(*(api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"])) for _ in range(12)))
    assert {r.status_code for r in results} == {202}
    assert len({r.json()["jobId"] for r in results}) == 1
    assert await charges(api, "job") == 1


async def test_lora_replay_and_conflict(api: Api) -> None:
    images = image_set(15)
    data = {"name": "Ada", "subjectKind": "object"}
    h = {**api.h(), "Idempotency-Key": "upload-1"}
    first = await api.client.post("/v2/loras", headers=h, data=data, files=multipart_files(images))
    assert first.status_code == 202
    # httpx picks a new multipart boundary per request: the same request all the same
    again = await api.client.post("/v2/loras", headers=h, data=data, files=multipart_files(images))
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = await api.client.post("/v2/loras", headers=h, data=data, files=multipart_files(image_set(16)))
    assert other.status_code == 409
    listed = (await api.client.get("/v2/loras", headers=api.h())).json()["items"]
    assert [x["id"] for x in listed] == [first.json()["id"]]
    assert await charges(api, "lora_create") == 1
    # the replay's images were not kept
    raw = api.gw.settings.data_path / "blobs" / "loras"
    assert {p.name for p in raw.iterdir()} == {first.json()["id"]}


async def test_concurrent_lora_creates_with_one_key(make_api) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 30}}) as api:
        images = image_set(15)
        h = {**api.h(), "Idempotency-Key": "same"}
        results = await asyncio.gather(*(
            api.client.post("/v2/loras", headers=h, data={"name": "x", "subjectKind": "style"}, files=multipart_files(images))
            for _ in range(6)))
        assert {r.status_code for r in results} == {202}
        assert len({r.json()["id"] for r in results}) == 1
        assert await charges(api, "lora_create") == 1


async def test_replay_is_not_blocked_by_the_cap_it_fills(make_api) -> None:
    async with make_api(max_trainings=1, providers={"sandbox": {"training_seconds": 30}}) as api:
        images = image_set(15)
        h = {**api.h(), "Idempotency-Key": "capped"}
        first = await api.client.post("/v2/loras", headers=h, data={"name": "x", "subjectKind": "style"}, files=multipart_files(images))
        again = await api.client.post("/v2/loras", headers=h, data={"name": "x", "subjectKind": "style"}, files=multipart_files(images))
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert (await api.create_lora()).status_code == 429  # a new LoRA is still capped


async def test_keys_are_per_team_and_expire(api: Api) -> None:
    lora = await api.ready_lora()
    h = {**api.h(), "Idempotency-Key": "shared-name"}
    first = (await api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"]))).json()["jobId"]
    # 25 hours later the key is free again
    async with api.gw.db.tx() as conn:
        await conn.execute("UPDATE idempotency SET created_at = created_at - 25 * 3600")
    second = (await api.client.post("/v2/images/generate", headers=h, json=gen_body(lora["id"]))).json()["jobId"]
    assert second != first
    # another team may use the same key name for its own request
    _, other_key = await api.new_team()
    r = await api.client.post("/v2/images/generate", headers={"X-API-Key": other_key, "Idempotency-Key": "shared-name"},
                              json=gen_body(lora["id"]))
    assert r.status_code == 400  # its own request: our LoRA is not visible to it (no replay of ours)


async def test_key_length(api: Api) -> None:
    lora = await api.ready_lora()
    r = await api.client.post("/v2/images/generate", headers={**api.h(), "Idempotency-Key": "x" * 256}, json=gen_body(lora["id"]))
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["details"]
    r = await api.client.post("/v2/images/generate", headers={**api.h(), "Idempotency-Key": "x" * 255}, json=gen_body(lora["id"]))
    assert r.status_code == 202


async def test_money_under_concurrency(make_api) -> None:
    """Parallel generations on a small balance: never below zero, each accepted one charged once."""
    async with make_api() as api:
        lora = await api.ready_lora()
        from gateway.services import accounts

        balance = await api.credits()
        await accounts.add_credits(api.gw.db, api.team_id, -(balance - 9), "test")  # leave 9: room for 4 images
        results = await asyncio.gather(*(
            api.client.post("/v2/images/generate", headers=api.h(), json=gen_body(lora["id"])) for _ in range(20)))
        codes = [r.status_code for r in results]
        assert codes.count(202) == 4 and codes.count(402) == 16
        for r in results:
            if r.status_code == 402:
                assert r.json()["creditsRequired"] == 2 and r.json()["creditsAvailable"] in (1, 3, 5, 7, 9)
        assert await api.credits() == 1
        assert await charges(api, "job") == 4
