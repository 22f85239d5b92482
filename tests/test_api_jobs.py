"""CONTRACTS.md §1.4/§1.5: POST /v2/images/generate, GET /v2/jobs/{id}, GET /v2/jobs, signed files."""

from __future__ import annotations

import base64
import io
import re
import time
import uuid
from typing import Any, AsyncIterator, Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from gateway.imaging import SIZES
from gateway.keys import display_prefix, generate_key, key_digest
from gateway.services import accounts
from gateway.store import teams as teams_store
from gateway.timeutil import iso
from tests.conftest import Api

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
JOB_FIELDS = {
    "id", "status", "model", "progress", "result", "error", "creditCost", "webhookStatus",
    "createdAt", "completedAt", "expired", "input",
    "gateway",  # the extension object: {ignoredParams}
}
FAIL_WORD = "PLEASEFAIL"
FAST = {"sandbox": {"training_seconds": 0.2, "queue_seconds": 0, "fail_prompts_containing": FAIL_WORD}}
PIL_NAME = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def fast(make_api: Callable[..., Any]) -> AsyncIterator[Api]:
    async with make_api(providers=FAST) as api:
        yield api


@pytest.fixture
async def ready(fast: Api) -> tuple[Api, dict[str, Any]]:
    return fast, await fast.ready_lora()


def body_for(lora_id: str, prompt: str = "a portrait in a garden", **params: Any) -> dict[str, Any]:
    return {"prompt": prompt, "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id, **params}}


async def generate(api: Api, body: Any, key: str | None = None) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return await api.client.post("/v2/images/generate", headers={**api.h(key), "content-type": "application/json"}, content=body)
    return await api.client.post("/v2/images/generate", headers=api.h(key), json=body)


async def run_job(api: Api, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    r = await generate(api, body, key)
    assert r.status_code == 202, r.text
    return await api.wait_job(r.json()["jobId"], key=key)


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


async def download(api: Api, url: str) -> httpx.Response:
    return await api.client.get(path_of(url))  # no API key


def assert_400(r: httpx.Response, path: str) -> list[str]:
    assert r.status_code == 400, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    assert path in body.get("details", {}), body
    msgs = body["details"][path]
    assert isinstance(msgs, list) and msgs and all(isinstance(m, str) and m for m in msgs)
    return msgs


def check_job_shape(job: dict[str, Any]) -> None:
    assert set(job) == JOB_FIELDS, set(job) ^ JOB_FIELDS
    assert UUID_RE.match(job["id"])
    assert job["status"] in ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED")
    assert job["model"] == "flux-lora"
    assert job["progress"] is None or (type(job["progress"]) is int and 0 <= job["progress"] <= 100)
    assert job["error"] is None or isinstance(job["error"], str)
    assert job["creditCost"] is None or type(job["creditCost"]) is int
    assert job["webhookStatus"] in (None, "pending", "delivered", "failed")
    assert ISO_RE.match(job["createdAt"]), job["createdAt"]
    assert job["completedAt"] is None or ISO_RE.match(job["completedAt"])
    assert type(job["expired"]) is bool
    assert job["input"] is None or isinstance(job["input"], dict)


async def second_user_key(api: Api) -> str:
    """A key for a second user of the same team (create_key reuses the owner)."""
    key = generate_key()
    async with api.gw.db.tx() as conn:
        user = await teams_store.create_user(conn, team_id=api.team_id, email="second@example.com")
        await teams_store.insert_key(
            conn, team_id=api.team_id, user_id=user.id, name="second", prefix=display_prefix(key), digest=key_digest(key)
        )
    return key


async def job_count(api: Api) -> int:
    r = await api.client.get("/v2/jobs?scope=team&limit=100", headers=api.h())
    return len(r.json()["jobs"])


# --------------------------------------------------------------------------- request validation


BAD_BODIES: list[tuple[str, Callable[[str], Any], str]] = [
    ("prompt-missing", lambda lid: {"model": "flux-lora", "fluxLoraParams": {"loraId": lid}}, "prompt"),
    ("prompt-empty", lambda lid: body_for(lid, prompt=""), "prompt"),
    ("prompt-blank", lambda lid: body_for(lid, prompt="   "), "prompt"),
    ("prompt-2001", lambda lid: body_for(lid, prompt="x" * 2001), "prompt"),
    ("prompt-number", lambda lid: body_for(lid, prompt=5), "prompt"),
    ("model-missing", lambda lid: {"prompt": "p", "fluxLoraParams": {"loraId": lid}}, "model"),
    ("model-other", lambda lid: {**body_for(lid), "model": "midjourney"}, "model"),
    ("params-missing", lambda lid: {"prompt": "p", "model": "flux-lora"}, "fluxLoraParams"),
    ("params-null", lambda lid: {"prompt": "p", "model": "flux-lora", "fluxLoraParams": None}, "fluxLoraParams"),
    ("params-not-object", lambda lid: {"prompt": "p", "model": "flux-lora", "fluxLoraParams": "x"}, "fluxLoraParams"),
    ("loraId-missing", lambda lid: {"prompt": "p", "model": "flux-lora", "fluxLoraParams": {}}, "fluxLoraParams.loraId"),
    ("loraId-not-uuid", lambda lid: body_for("lora_8a4d2c"), "fluxLoraParams.loraId"),
    ("loraId-number", lambda lid: body_for(12), "fluxLoraParams.loraId"),
    ("num_outputs-0", lambda lid: body_for(lid, num_outputs=0), "fluxLoraParams.num_outputs"),
    ("num_outputs-5", lambda lid: body_for(lid, num_outputs=5), "fluxLoraParams.num_outputs"),
    ("num_outputs-1.5", lambda lid: body_for(lid, num_outputs=1.5), "fluxLoraParams.num_outputs"),
    ("aspect_ratio-5:4", lambda lid: body_for(lid, aspect_ratio="5:4"), "fluxLoraParams.aspect_ratio"),
    ("output_format-gif", lambda lid: body_for(lid, output_format="gif"), "fluxLoraParams.output_format"),
    ("output_format-jpeg", lambda lid: body_for(lid, output_format="jpeg"), "fluxLoraParams.output_format"),
    ("lora_strength--0.1", lambda lid: body_for(lid, lora_strength=-0.1), "fluxLoraParams.lora_strength"),
    ("lora_strength-1.6", lambda lid: body_for(lid, lora_strength=1.6), "fluxLoraParams.lora_strength"),
    ("guidance_scale-0.5", lambda lid: body_for(lid, guidance_scale=0.5), "fluxLoraParams.guidance_scale"),
    ("guidance_scale-11", lambda lid: body_for(lid, guidance_scale=11), "fluxLoraParams.guidance_scale"),
    ("steps-3", lambda lid: body_for(lid, num_inference_steps=3), "fluxLoraParams.num_inference_steps"),
    ("steps-51", lambda lid: body_for(lid, num_inference_steps=51), "fluxLoraParams.num_inference_steps"),
    ("seed-x", lambda lid: body_for(lid, seed="x"), "fluxLoraParams.seed"),
    ("seed-float", lambda lid: body_for(lid, seed=1.5), "fluxLoraParams.seed"),
    ("extra-top", lambda lid: {**body_for(lid), "extra": 1}, "extra"),
    ("extra-params", lambda lid: body_for(lid, loras=[{"path": "x"}]), "fluxLoraParams.loras"),
    ("webhookEvents-empty", lambda lid: {**body_for(lid), "webhookEvents": []}, "webhookEvents"),
    ("webhookEvents-bogus", lambda lid: {**body_for(lid), "webhookEvents": ["bogus"]}, "webhookEvents[0]"),
    ("webhookEvents-2nd-bogus", lambda lid: {**body_for(lid), "webhookEvents": ["failed", "done"]}, "webhookEvents[1]"),
    ("webhookEvents-string", lambda lid: {**body_for(lid), "webhookEvents": "completed,failed"}, "webhookEvents"),
    ("webhookUrl-http", lambda lid: {**body_for(lid), "webhookUrl": "http://example.com/h"}, "webhookUrl"),
    ("webhookUrl-garbage", lambda lid: {**body_for(lid), "webhookUrl": "nope"}, "webhookUrl"),
]


@pytest.mark.parametrize(("make", "path"), [(m, p) for _, m, p in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES])
async def test_generate_rejects(api: Api, make: Callable[[str], Any], path: str) -> None:
    before = await api.credits()
    r = await generate(api, make(str(uuid.uuid4())))
    assert_400(r, path)
    assert await api.credits() == before and await job_count(api) == 0


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"null", b"[]", b'"prompt"', b'{"prompt": "p",}', "{\"prompt\": \"\xff\"}".encode("latin-1")],
    ids=["broken", "empty", "null", "array", "string", "trailing-comma", "bad-utf8"],
)
async def test_generate_rejects_non_object_json(api: Api, raw: bytes) -> None:
    r = await generate(api, raw)
    assert r.status_code == 400, r.text
    assert r.json()["details"], r.json()
    assert await job_count(api) == 0


async def test_generate_body_too_large_is_a_json_error(api: Api) -> None:
    r = await generate(api, body_for(str(uuid.uuid4()), prompt="x" * 70_000))
    assert r.status_code in (400, 413), r.text
    assert isinstance(r.json()["error"], str)


async def test_unknown_and_other_teams_lora_read_the_same(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=FAST) as api:
        _, other_key = await api.new_team()
        r = await api.create_lora(15, key=other_key)
        theirs = await api.wait_lora(r.json()["id"], key=other_key)
        assert theirs["status"] == "READY"
        unknown = await generate(api, body_for(str(uuid.uuid4())))
        other = await generate(api, body_for(theirs["id"]))
        assert_400(unknown, "fluxLoraParams.loraId")
        assert_400(other, "fluxLoraParams.loraId")
        assert other.json() == unknown.json()
        assert await job_count(api) == 0
        # the owner can use it
        assert (await generate(api, body_for(theirs["id"]), key=other_key)).status_code == 202


async def test_lora_not_ready_is_400(make_api: Callable[..., Any]) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 30, "queue_seconds": 0}}) as api:
        lora_id = (await api.create_lora(15)).json()["id"]
        before = await api.credits()
        r = await generate(api, body_for(lora_id))
        assert_400(r, "fluxLoraParams.loraId")
        assert await api.credits() == before and await job_count(api) == 0


async def test_generate_validation_is_checked_before_the_lora(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    assert_400(await generate(api, body_for(lora["id"], num_outputs=9)), "fluxLoraParams.num_outputs")


# --------------------------------------------------------------------------- 202, 402, credits


async def test_generate_202_body_and_charge(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    before = await api.credits()
    r = await generate(api, body_for(lora["id"], num_outputs=3))
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"jobId", "status"} and UUID_RE.match(body["jobId"]) and body["status"] == "QUEUED"
    assert await api.credits() == before - 6
    job = await api.wait_job(body["jobId"])
    assert job["status"] == "COMPLETED" and job["creditCost"] == 6
    assert await api.credits() == before - 6


async def test_generate_accepts_all_bounds(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    for params in (
        {"num_outputs": 1, "lora_strength": 0, "guidance_scale": 1, "num_inference_steps": 4, "seed": 0},
        {"lora_strength": 1.5, "guidance_scale": 10, "num_inference_steps": 50, "seed": 2_147_483_647},
        {"lora_strength": 1, "guidance_scale": 3},  # integers for numbers
    ):
        r = await generate(api, body_for(lora["id"], prompt="p" * 2000, **params))
        assert r.status_code == 202, (params, r.text)
    r = await generate(api, {**body_for(lora["id"], prompt="x"), "webhookUrl": "https://example.com/h",
                             "webhookEvents": ["progress", "completed", "failed"]})
    assert r.status_code == 202, r.text
    job = (await api.client.get(f"/v2/jobs/{r.json()['jobId']}", headers=api.h())).json()
    assert job["webhookStatus"] in ("pending", "delivered", "failed")


async def test_402_insufficient_credits(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    await accounts.add_credits(api.gw.db, api.team_id, 3 - await api.credits(), "test")
    assert await api.credits() == 3
    r = await generate(api, body_for(lora["id"], num_outputs=2))
    assert r.status_code == 402, r.text
    body = r.json()
    assert body["error"] == "Insufficient credits"
    assert body["creditsRequired"] == 4 and body["creditsAvailable"] == 3
    assert type(body["creditsRequired"]) is int and type(body["creditsAvailable"]) is int
    assert await api.credits() == 3 and await job_count(api) == 0
    # one image (2 credits) still fits
    r = await generate(api, body_for(lora["id"], num_outputs=1))
    assert r.status_code == 202
    assert await api.credits() == 1


async def test_failed_job_is_refunded(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    before = await api.credits()
    job = await run_job(api, body_for(lora["id"], prompt=f"{FAIL_WORD} portrait", num_outputs=2))
    check_job_shape(job)
    assert job["status"] == "FAILED"
    assert isinstance(job["error"], str) and job["error"]
    assert job["result"] is None and job["creditCost"] == 0
    assert job["completedAt"] is not None
    assert await api.credits() == before


# --------------------------------------------------------------------------- GET /v2/jobs/{id}


async def test_job_shape_queued_and_completed(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    request = body_for(lora["id"], num_outputs=2, aspect_ratio="16:9", output_format="jpg", seed=7)
    r = await generate(api, request)
    job_id = r.json()["jobId"]
    first = (await api.client.get(f"/v2/jobs/{job_id}", headers=api.h())).json()
    check_job_shape(first)
    assert first["id"] == job_id and first["status"] in ("QUEUED", "PROCESSING", "COMPLETED")
    job = await api.wait_job(job_id)
    check_job_shape(job)
    assert job["status"] == "COMPLETED" and job["progress"] == 100 and job["error"] is None
    assert job["creditCost"] == 4 and job["webhookStatus"] is None and job["expired"] is False
    assert job["createdAt"] <= job["completedAt"]
    assert set(job["result"]) == {"images"} and len(job["result"]["images"]) == 2
    assert job["input"]["prompt"] == request["prompt"] and job["input"]["model"] == "flux-lora"
    assert job["input"]["fluxLoraParams"]["loraId"] == lora["id"]
    assert job["input"]["fluxLoraParams"]["aspect_ratio"] == "16:9"
    assert job["input"]["fluxLoraParams"]["seed"] == 7
    for url in job["result"]["images"]:
        assert url.startswith(("http://", "https://"))
        got = await download(api, url)
        assert got.status_code == 200
        img = Image.open(io.BytesIO(got.content))
        assert img.format == "JPEG" and img.size == SIZES["16:9"]


@pytest.mark.parametrize("bad", ["not-a-uuid", "123", "00000000000000000000000000000000"])
async def test_get_job_non_uuid_is_400(api: Api, bad: str) -> None:
    assert_400(await api.client.get(f"/v2/jobs/{bad}", headers=api.h()), "id")


async def test_get_job_unknown_and_other_team_404(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    job_id = (await generate(api, body_for(lora["id"]))).json()["jobId"]
    _, other_key = await api.new_team()
    unknown = await api.client.get(f"/v2/jobs/{uuid.uuid4()}", headers=api.h())
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
    other = await api.client.get(f"/v2/jobs/{job_id}", headers=api.h(other_key))
    assert other.status_code == 404 and other.json() == unknown.json()
    listed = (await api.client.get("/v2/jobs?scope=team", headers=api.h(other_key))).json()
    assert listed["jobs"] == [] and listed["hasMore"] is False
    assert (await api.client.get(f"/v2/jobs/{job_id}", headers=api.h())).status_code == 200


# --------------------------------------------------------------------------- images and signed URLs


async def test_formats_and_sizes_for_every_aspect_ratio(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    formats = ["png", "jpg", "webp"]
    for i, ratio in enumerate(SIZES):
        fmt = formats[i % 3]
        job = await run_job(api, body_for(lora["id"], aspect_ratio=ratio, output_format=fmt, num_inference_steps=4))
        assert job["status"] == "COMPLETED", job
        (url,) = job["result"]["images"]
        got = await download(api, url)
        assert got.status_code == 200
        assert got.headers["content-type"].startswith(MIME[fmt])
        assert urlsplit(url).path.endswith("." + fmt)
        img = Image.open(io.BytesIO(got.content))
        assert img.format == PIL_NAME[fmt] and img.size == SIZES[ratio], (ratio, fmt, img.size)
        img.load()


async def test_defaults_png_square(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    job = await run_job(api, body_for(lora["id"]))
    assert len(job["result"]["images"]) == 1 and job["creditCost"] == 2
    img = Image.open(io.BytesIO((await download(api, job["result"]["images"][0])).content))
    assert img.format == "PNG" and img.size == SIZES["1:1"]


async def test_four_outputs_are_distinct(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    job = await run_job(api, body_for(lora["id"], num_outputs=4, aspect_ratio="9:16", output_format="webp", seed=3))
    urls = job["result"]["images"]
    assert len(urls) == 4 and len(set(urls)) == 4
    datas = [(await download(api, u)).content for u in urls]
    assert len(set(datas)) == 4


async def test_same_seed_same_bytes_different_seed_different(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready

    async def image(seed: int) -> bytes:
        job = await run_job(api, body_for(lora["id"], prompt="a cat", seed=seed, aspect_ratio="16:9", output_format="png"))
        got = await download(api, job["result"]["images"][0])
        assert got.status_code == 200
        return got.content

    a, b, c = await image(42), await image(42), await image(43)
    assert a == b
    assert a != c


async def test_forged_urls_are_403_expired_ones_410_missing_files_404(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    job = await run_job(api, body_for(lora["id"]))
    (url,) = job["result"]["images"]
    assert (await download(api, url)).status_code == 200
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert set(q) == {"expires", "sig"}
    key = parts.path.removeprefix("/files/")
    flipped = q["sig"][:-1] + ("0" if q["sig"][-1] != "0" else "1")
    bad = [
        f"{parts.path}?expires={q['expires']}&sig={flipped}",  # tampered signature
        f"{parts.path}?expires={int(q['expires']) + 1}&sig={q['sig']}",  # tampered expiry
        f"{parts.path}?expires={q['expires']}",  # no signature
        parts.path,  # nothing
        f"{parts.path}?expires=abc&sig={q['sig']}",
        f"{parts.path.rsplit('/', 1)[0]}/other.png?expires={q['expires']}&sig={q['sig']}",  # another key
        f"{parts.path}?expires={'9' * 40}&sig={q['sig']}",  # an absurd expiry
    ]
    for p in bad:
        r = await api.client.get(p)
        assert r.status_code == 403, (p, r.status_code)
        assert "signature" in r.json()["error"] and "use the URL exactly" in r.json()["error"]
    # expired, correctly signed: 410, saying when, and what gives a fresh link
    expired_at = int(time.time() - 3600) + 10
    r = await api.client.get(path_of(api.gw.signer.sign(key, 10, at=time.time() - 3600)))
    assert r.status_code == 410 and r.json()["code"] == "gone"
    assert iso(expired_at) in r.json()["error"] and "GET the job" in r.json()["error"]
    # a correctly signed URL for a key that does not exist, or cannot exist
    for missing in ("jobs/nope/1.png", "jobs/../../etc/passwd", "jobs/a/../b.png", "jobs/a/./b.png"):
        # dots escaped, so that the client sends them as they are (httpx would resolve them)
        r = await api.client.get(path_of(api.gw.signer.sign(missing, 60)).replace("/.", "/%2E").replace("%2E.", "%2E%2E"))
        assert r.status_code == 404, (missing, r.status_code, r.text)
        assert "File not found" in r.json()["error"]
    # a fresh signature for the real key works without an API key
    assert (await api.client.get(path_of(api.gw.signer.sign(key, 60)))).status_code == 200


# --------------------------------------------------------------------------- GET /v2/jobs


async def test_list_jobs_shape_order_paging(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    ids = []
    for i in range(3):
        r = await generate(api, body_for(lora["id"], prompt=f"p{i}"))
        ids.append(r.json()["jobId"])
    for j in ids:
        await api.wait_job(j)
    r = await api.client.get("/v2/jobs", headers=api.h())
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"jobs", "nextCursor", "hasMore"}
    assert [j["id"] for j in body["jobs"]] == ids[::-1]
    assert body["nextCursor"] is None and body["hasMore"] is False
    for j in body["jobs"]:
        check_job_shape(j)
        assert j["status"] == "COMPLETED" and len(j["result"]["images"]) == 1
    page1 = (await api.client.get("/v2/jobs?limit=2", headers=api.h())).json()
    assert [j["id"] for j in page1["jobs"]] == [ids[2], ids[1]]
    assert page1["hasMore"] is True and isinstance(page1["nextCursor"], str) and page1["nextCursor"]
    page2 = (await api.client.get(f"/v2/jobs?limit=2&cursor={page1['nextCursor']}", headers=api.h())).json()
    assert [j["id"] for j in page2["jobs"]] == [ids[0]]
    assert page2["hasMore"] is False and page2["nextCursor"] is None
    exact = (await api.client.get("/v2/jobs?limit=3", headers=api.h())).json()
    assert len(exact["jobs"]) == 3 and exact["hasMore"] is False and exact["nextCursor"] is None
    assert "models" not in body


async def test_list_jobs_default_limit_is_20(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    ids = []
    for _ in range(21):
        r = await generate(api, body_for(lora["id"], prompt=f"{FAIL_WORD}"))  # fails fast, no images drawn
        ids.append(r.json()["jobId"])
    page = (await api.client.get("/v2/jobs", headers=api.h())).json()
    assert len(page["jobs"]) == 20 and page["hasMore"] is True
    assert [j["id"] for j in page["jobs"]] == ids[:0:-1]
    rest = (await api.client.get(f"/v2/jobs?cursor={page['nextCursor']}", headers=api.h())).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]] and rest["hasMore"] is False
    assert len((await api.client.get("/v2/jobs?limit=100", headers=api.h())).json()["jobs"]) == 21


async def test_list_jobs_filters(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    ok = await run_job(api, body_for(lora["id"]))
    failed = await run_job(api, body_for(lora["id"], prompt=FAIL_WORD))
    assert ok["status"] == "COMPLETED" and failed["status"] == "FAILED"

    async def ids(q: str) -> list[str]:
        r = await api.client.get(f"/v2/jobs?{q}", headers=api.h())
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["jobs"]]

    assert await ids("status=COMPLETED") == [ok["id"]]
    assert await ids("status=FAILED") == [failed["id"]]
    assert await ids("status=QUEUED") == []
    assert await ids("model=flux-lora") == [failed["id"], ok["id"]]
    assert await ids("model=other") == []
    assert await ids(f"search={ok['id']}") == [ok["id"]]
    assert await ids(f"search={uuid.uuid4()}") == []
    assert await ids(f"search={failed['id']}&status=COMPLETED") == []
    body = (await api.client.get("/v2/jobs?include_models=true", headers=api.h())).json()
    assert body["models"] == ["flux-lora"]
    assert "models" not in (await api.client.get("/v2/jobs?include_models=false", headers=api.h())).json()


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("status=DONE", "status"),
        ("status=completed", "status"),
        ("cursor=!!!", "cursor"),
        ("cursor=abc", "cursor"),
        ("cursor=" + "YWJj", "cursor"),  # base64 of "abc"
        *[("cursor=" + base64.urlsafe_b64encode(f"{t}|{uuid.UUID(int=7)}".encode()).decode().rstrip("="), "cursor")
          for t in ("nan", "1e999", "inf", "-1", "1_000", " 12", "12e3", "0x10")],  # float() takes all of these
        ("scope=everyone", "scope"),
        ("search=nope", "search"),
        ("include_models=yes", "include_models"),
    ],
)
async def test_list_jobs_bad_query_is_400(api: Api, query: str, path: str) -> None:
    assert_400(await api.client.get(f"/v2/jobs?{query}", headers=api.h()), path)


async def test_list_jobs_scope_user_vs_team(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    same_owner = await accounts.create_key(api.gw.db, api.team_id, "k2")  # same (owner) user
    other_user = await second_user_key(api)
    mine = (await generate(api, body_for(lora["id"]))).json()["jobId"]
    owner2 = (await generate(api, body_for(lora["id"]), key=same_owner.key)).json()["jobId"]
    theirs = (await generate(api, body_for(lora["id"]), key=other_user)).json()["jobId"]

    async def ids(key: str, q: str = "") -> list[str]:
        r = await api.client.get(f"/v2/jobs{q}", headers=api.h(key))
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["jobs"]]

    # default scope is the caller's user: both keys of the owner see the owner's jobs only
    assert await ids(api.key) == [owner2, mine]
    assert await ids(api.key, "?scope=user") == [owner2, mine]
    assert await ids(same_owner.key) == [owner2, mine]
    assert await ids(other_user) == [theirs]
    # scope=team: everything in the team
    assert await ids(api.key, "?scope=team") == [theirs, owner2, mine]
    assert await ids(other_user, "?scope=team") == [theirs, owner2, mine]
    # another team sees none of it, whatever the scope
    _, other_team_key = await api.new_team()
    assert await ids(other_team_key, "?scope=team") == []
    assert await ids(other_team_key) == []


async def test_list_jobs_cursor_survives_new_jobs(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    first = [(await generate(api, body_for(lora["id"], prompt=FAIL_WORD))).json()["jobId"] for _ in range(3)]
    page1 = (await api.client.get("/v2/jobs?limit=2", headers=api.h())).json()
    newer = (await generate(api, body_for(lora["id"], prompt=FAIL_WORD))).json()["jobId"]
    page2 = (await api.client.get(f"/v2/jobs?limit=2&cursor={page1['nextCursor']}", headers=api.h())).json()
    assert [j["id"] for j in page2["jobs"]] == [first[0]] and newer not in [j["id"] for j in page2["jobs"]]


async def test_uuids_are_case_insensitive(ready: tuple[Api, dict[str, Any]]) -> None:
    api, lora = ready
    r = await generate(api, body_for(lora["id"].upper()))
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    got = await api.client.get(f"/v2/jobs/{job_id.upper()}", headers=api.h())
    assert got.status_code == 200 and got.json()["id"] == job_id
    listed = (await api.client.get(f"/v2/jobs?search={job_id.upper()}", headers=api.h())).json()
    assert [j["id"] for j in listed["jobs"]] == [job_id]
    got = await api.client.get(f"/v2/loras/{lora['id'].upper()}", headers=api.h())
    assert got.status_code == 200 and got.json()["id"] == lora["id"]


@pytest.mark.parametrize(
    ("params", "path", "message"),
    [
        ({"aspect_ratio": "5:4"}, "fluxLoraParams.aspect_ratio", "Must be one of 16:9, 1:1, 2:3, 3:2, 3:4, 4:3, 9:16"),
        ({"num_outputs": 5}, "fluxLoraParams.num_outputs", "Must be between 1 and 4"),
        ({"num_outputs": "two"}, "fluxLoraParams.num_outputs", "Must be an integer between 1 and 4"),
        ({"guidance_scale": 0.5}, "fluxLoraParams.guidance_scale", "Must be between 1 and 10"),
        ({"output_format": "gif"}, "fluxLoraParams.output_format", "Must be one of jpg, png, webp"),
        ({"lora_scale": 1}, "fluxLoraParams.lora_scale", "Unknown field"),
    ],
)
async def test_generation_errors_speak_like_the_upload_side(api: Api, params: dict[str, Any], path: str,
                                                          message: str) -> None:
    """The same wording as form fields and query parameters: allowed values and ranges, not msgspec's."""
    msgs = assert_400(await generate(api, body_for(str(uuid.uuid4()), **params)), path)
    assert msgs == [message]
    assert "Invalid enum value" not in str(msgs) and "Expected `" not in str(msgs)


async def test_body_level_errors_are_worded_too(api: Api) -> None:
    assert assert_400(await generate(api, body_for(str(uuid.uuid4()), prompt="x" * 2001)), "prompt") == \
        ["Must be at most 2000 characters"]
    assert assert_400(await generate(api, {**body_for(str(uuid.uuid4())), "webhookEvents": []}), "webhookEvents") == \
        ["Must not be empty"]
    assert assert_400(await generate(api, [1, 2]), "body") == ["Must be an object"]
