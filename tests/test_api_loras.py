"""CONTRACTS.md §1.3: POST/GET/DELETE /v2/loras and the list, through the HTTP API."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import pytest
from PIL import Image

from gateway.services import accounts
from tests.conftest import Api
from tests.images import image_set, make_image, multipart_files

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
LORA_FIELDS = {
    "id", "userId", "teamId", "name", "subjectKind", "gender", "ethnicity", "age", "status", "imageCount",
    "steps", "loraRank", "isReady", "hasWeights", "triggerWord", "error", "createdAt", "startedAt", "completedAt",
    "gateway",  # the extension object: {portable, samples}
}
PERSON = {"name": "Ada", "subjectKind": "person", "gender": "female", "ethnicity": "east asian"}
SLOW = {"sandbox": {"training_seconds": 30, "queue_seconds": 0}}
FAST = {"sandbox": {"training_seconds": 0.2, "queue_seconds": 0}}
BOUNDARY = "----gatewayTestBoundary8c1f"

Part = tuple[str, str | None, bytes, str | None]  # (field, filename or None, content, content type)


# --------------------------------------------------------------------------- helpers


class Env:
    """An Api whose uploads spool into a temp dir we can inspect."""

    def __init__(self, api: Api, tmp: Path, blobs: Path) -> None:
        self.api, self.tmp, self.blobs = api, tmp, blobs
        self.start_credits = 0

    async def snapshot(self) -> None:
        self.start_credits = await self.api.credits()

    async def assert_nothing_created(self) -> None:
        """After a rejected create: no row, no charge, no temp files, no stored images."""
        api = self.api
        r = await api.client.get("/v2/loras?includeArchived=true", headers=api.h())
        assert r.status_code == 200 and r.json() == {"items": [], "nextCursor": None}, r.text
        assert await api.credits() == self.start_credits
        assert list(self.tmp.iterdir()) == [], "temp files left behind"
        stored = [p for p in (self.blobs / "loras").rglob("*") if p.is_file()] if (self.blobs / "loras").exists() else []
        assert stored == [], stored


@asynccontextmanager
async def env_for(make_api: Callable[..., Any], tmp_path: Path, **overrides: Any) -> AsyncIterator[Env]:
    tmp = tmp_path / "upload-tmp"
    tmp.mkdir(exist_ok=True)
    uploads = {"tmp_dir": str(tmp), **overrides.pop("uploads", {})}
    overrides.setdefault("providers", SLOW)
    async with make_api(uploads=uploads, **overrides) as api:
        e = Env(api, tmp, tmp_path / "data" / "blobs")
        await e.snapshot()
        yield e


@pytest.fixture
async def env(make_api: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Env]:
    async with env_for(make_api, tmp_path) as e:
        yield e


def encode(parts: list[Part], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """Hand-encode a multipart/form-data body (so tests can also produce broken ones)."""
    out = io.BytesIO()
    for name, filename, data, ctype in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disp}\r\n".encode())
        if ctype:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    if close:
        out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def field_parts(fields: dict[str, Any]) -> list[Part]:
    return [(k, None, str(v).encode(), None) for k, v in fields.items()]


def image_parts(blobs: list[bytes], ext: str = "jpg", ctype: str = "image/jpeg") -> list[Part]:
    return [("images", f"photo{i:02d}.{ext}", b, ctype) for i, b in enumerate(blobs)]


async def post_raw(api: Api, body: bytes, content_type: str | None = f"multipart/form-data; boundary={BOUNDARY}") -> httpx.Response:
    headers = api.h()
    if content_type is not None:
        headers["content-type"] = content_type
    return await api.client.post("/v2/loras", headers=headers, content=body)


def assert_400(r: httpx.Response, path: str) -> list[str]:
    assert r.status_code == 400, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    assert path in body["details"], body
    msgs = body["details"][path]
    assert isinstance(msgs, list) and msgs and all(isinstance(m, str) and m for m in msgs)
    return msgs


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="GIF")
    return buf.getvalue()


def noise_png(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(buf, format="PNG")
    return buf.getvalue()


async def asgi_post_streamed(
    api: Api, path: str, headers: dict[str, str], body: bytes, chunk: int = 64 * 1024,
    probe: Callable[[int], None] | None = None,
) -> tuple[int, bytes, int, int]:
    """POST ``body`` to the app in ``chunk``-sized ASGI messages (the test client sends one).

    Returns (status, response body, chunks pulled by the app, total chunks).
    """
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    pulled = 0
    done = asyncio.Event()
    status = 0
    out = bytearray()

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            if probe is not None:
                probe(pulled)
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.extend(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    raw_headers = [(b"host", b"testserver.local"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": raw_headers,
        "client": ("127.0.0.1", 50000), "server": ("testserver.local", 80), "state": {},
    }
    await api.app(scope, receive, send)
    return status, bytes(out), pulled, len(chunks)


def check_lora_shape(lora: dict[str, Any]) -> None:
    assert set(lora) == LORA_FIELDS, set(lora) ^ LORA_FIELDS
    for k in ("id", "userId", "teamId"):
        assert UUID_RE.match(lora[k]), (k, lora[k])
    assert isinstance(lora["name"], str) and 1 <= len(lora["name"]) <= 60
    assert lora["subjectKind"] in ("person", "style", "object")
    for k in ("gender", "ethnicity", "age", "triggerWord", "error"):
        assert lora[k] is None or isinstance(lora[k], str), k
    assert lora["status"] in ("PENDING", "UPLOADING", "TRAINING", "READY", "FAILED", "ARCHIVED")
    assert type(lora["imageCount"]) is int and lora["imageCount"] >= 0
    assert type(lora["steps"]) is int and 500 <= lora["steps"] <= 3000
    assert type(lora["loraRank"]) is int and 8 <= lora["loraRank"] <= 64
    assert type(lora["isReady"]) is bool and type(lora["hasWeights"]) is bool
    assert isinstance(lora["createdAt"], str) and ISO_RE.match(lora["createdAt"]), lora["createdAt"]
    for k in ("startedAt", "completedAt"):
        assert lora[k] is None or ISO_RE.match(lora[k]), (k, lora[k])


# --------------------------------------------------------------------------- field validation


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"name": None}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 61}, "name"),
        ({"subjectKind": "animal"}, "subjectKind"),
        ({"gender": None}, "gender"),
        ({"gender": "other"}, "gender"),
        ({"ethnicity": None}, "ethnicity"),
        ({"ethnicity": "e" * 41}, "ethnicity"),
        ({"age": "a" * 41}, "age"),
        ({"steps": 499}, "steps"),
        ({"steps": 3001}, "steps"),
        ({"steps": "abc"}, "steps"),
        ({"steps": "1000.5"}, "steps"),
        ({"loraRank": 7}, "loraRank"),
        ({"loraRank": 65}, "loraRank"),
        ({"loraRank": "x"}, "loraRank"),
        ({"webhookUrl": "http://example.com/hook"}, "webhookUrl"),
        ({"webhookUrl": "not a url"}, "webhookUrl"),
        ({"webhookEvents": "completed,bogus"}, "webhookEvents"),
        ({"webhookEvents": "progress"}, "webhookEvents"),
        ({"foo": "bar"}, "foo"),
        ({"triggerWord": "ABCDE"}, "triggerWord"),
    ],
)
async def test_create_rejects_bad_field(env: Env, fields: dict[str, Any], path: str) -> None:
    r = await env.api.create_lora(15, **fields)
    assert_400(r, path)
    await env.assert_nothing_created()


async def test_create_reports_every_bad_field_at_once(env: Env) -> None:
    r = await env.api.create_lora(15, name=None, steps=1, loraRank=99, gender="robot")
    assert r.status_code == 400
    assert {"name", "steps", "loraRank", "gender"} <= set(r.json()["details"])
    await env.assert_nothing_created()


async def test_create_rejects_a_field_sent_twice(env: Env) -> None:
    parts = field_parts(PERSON) + [("name", None, b"Bob", None)] + image_parts(image_set(15))
    assert_400(await post_raw(env.api, encode(parts)), "name")
    await env.assert_nothing_created()


async def test_create_rejects_a_file_under_another_field(env: Env) -> None:
    parts = field_parts(PERSON) + image_parts(image_set(15)) + [("photo", "x.jpg", make_image(), "image/jpeg")]
    assert_400(await post_raw(env.api, encode(parts)), "photo")
    await env.assert_nothing_created()


@pytest.mark.parametrize(
    "fields",
    [
        {"steps": 500, "loraRank": 8},
        {"steps": 3000, "loraRank": 64},
        {"webhookEvents": "failed", "webhookUrl": "https://example.com/hook"},
        {"webhookEvents": "completed, failed"},
        {"name": "n" * 60, "ethnicity": "e" * 40, "age": "a" * 40},
        {"subjectKind": "style", "gender": None, "ethnicity": None},
        {"subjectKind": "object", "gender": None, "ethnicity": None},
        {"gender": "non-binary"},
        {"gender": "male", "age": "30s"},
    ],
)
async def test_create_accepts_valid_fields(env: Env, fields: dict[str, Any]) -> None:
    api = env.api
    r = await api.create_lora(15, **fields)
    assert r.status_code == 202, r.text
    lora = (await api.client.get(f"/v2/loras/{r.json()['id']}", headers=api.h())).json()
    check_lora_shape(lora)
    expect = {**PERSON, **fields}
    assert lora["name"] == expect["name"]
    assert lora["subjectKind"] == expect["subjectKind"]
    assert lora["gender"] == expect["gender"]
    assert lora["ethnicity"] == expect["ethnicity"]
    assert lora["age"] == expect.get("age")
    assert lora["steps"] == expect.get("steps", 1000)
    assert lora["loraRank"] == expect.get("loraRank", 32)
    assert list(env.tmp.iterdir()) == []


async def test_create_defaults_in_the_get_view(env: Env) -> None:
    api = env.api
    r = await api.client.post(
        "/v2/loras", headers=api.h(),
        data={"name": "Ada", "gender": "male", "ethnicity": "x"},  # subjectKind defaults to person
        files=multipart_files(image_set(15)),
    )
    assert r.status_code == 202, r.text
    lora = (await api.client.get(f"/v2/loras/{r.json()['id']}", headers=api.h())).json()
    assert lora["subjectKind"] == "person"
    assert lora["steps"] == 1000 and lora["loraRank"] == 32 and lora["age"] is None


async def test_person_without_subject_kind_still_needs_gender(env: Env) -> None:
    r = await env.api.client.post(
        "/v2/loras", headers=env.api.h(), data={"name": "Ada"}, files=multipart_files(image_set(15))
    )
    assert r.status_code == 400
    assert {"gender", "ethnicity"} <= set(r.json()["details"])
    await env.assert_nothing_created()


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("n", [0, 1, 14, 31])
async def test_create_rejects_image_count(env: Env, n: int) -> None:
    r = await post_raw(env.api, encode(field_parts(PERSON) + image_parts(image_set(n))))
    assert_400(r, "images")
    await env.assert_nothing_created()


@pytest.mark.parametrize("n", [15, 30])
async def test_create_accepts_15_and_30_images(env: Env, n: int) -> None:
    r = await env.api.create_lora(n)
    assert r.status_code == 202, r.text
    assert r.json()["imageCount"] == n
    assert list(env.tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("bad", "filename", "ctype"),
    [
        (b"hello, this is not an image\n" * 20, "notes.txt", "text/plain"),
        (b"hello, this is not an image\n" * 20, "photo.jpg", "image/jpeg"),  # lying name and type
        (gif_bytes(), "anim.gif", "image/gif"),
        (gif_bytes(), "anim.jpg", "image/jpeg"),
        (make_image("JPEG", (256, 256))[:-600], "cut.jpg", "image/jpeg"),  # truncated
        (make_image("PNG", (128, 128))[:200], "cut.png", "image/png"),
        (b"", "empty.jpg", "image/jpeg"),
    ],
)
async def test_create_rejects_bad_image_part(env: Env, bad: bytes, filename: str, ctype: str) -> None:
    parts = field_parts(PERSON) + image_parts(image_set(15)) + [("images", filename, bad, ctype)]
    msgs = assert_400(await post_raw(env.api, encode(parts)), "images")
    assert "image 16 (" in msgs[0]  # counted from 1: the sixteenth file
    await env.assert_nothing_created()


async def test_bad_image_first_is_reported_with_its_index(env: Env) -> None:
    parts = field_parts(PERSON) + [("images", "anim.gif", gif_bytes(), "image/gif")] + image_parts(image_set(15))
    msgs = assert_400(await post_raw(env.api, encode(parts)), "images")
    assert "image 1 (\"anim.gif\")" in msgs[0]
    await env.assert_nothing_created()


async def test_png_named_jpg_and_mixed_formats_accepted(env: Env) -> None:
    pngs = [make_image("PNG", seed=i) for i in range(5)]
    webps = [make_image("WEBP", seed=10 + i) for i in range(5)]
    parts = field_parts(PERSON) + image_parts(pngs, "jpg", "image/jpeg") + image_parts(webps, "webp", "image/webp")
    parts += image_parts(image_set(5), "png", "image/png")  # JPEGs named .png
    r = await post_raw(env.api, encode(parts))
    assert r.status_code == 202, r.text
    assert r.json()["imageCount"] == 15
    assert list(env.tmp.iterdir()) == []


async def test_image_over_the_per_image_limit(make_api: Callable[..., Any], tmp_path: Path) -> None:
    async with env_for(make_api, tmp_path, uploads={"max_image_mb": 0.05}) as e:  # 52,428 bytes
        big = noise_png((160, 160))
        assert len(big) > 0.05 * 1024 * 1024
        parts = field_parts(PERSON) + image_parts(image_set(15)) + [("images", "big.png", big, "image/png")]
        msgs = assert_400(await post_raw(e.api, encode(parts)), "images")
        assert "image 16 (" in msgs[0] and "limit" in msgs[0]
        await e.assert_nothing_created()
        # just under the limit is fine
        ok = noise_png((120, 120))
        assert len(ok) < 0.05 * 1024 * 1024
        parts = field_parts(PERSON) + image_parts(image_set(14)) + [("images", "ok.png", ok, "image/png")]
        r = await post_raw(e.api, encode(parts))
        assert r.status_code == 202, r.text


async def test_images_over_the_total_limit(make_api: Callable[..., Any], tmp_path: Path) -> None:
    async with env_for(make_api, tmp_path, uploads={"max_total_mb": 0.015}) as e:  # 15,728 bytes
        images = image_set(15)
        assert sum(map(len, images)) > 0.015 * 1024 * 1024
        msgs = assert_400(await e.api.create_lora(15), "images")
        assert "total" in msgs[0]
        await e.assert_nothing_created()


async def test_default_10mb_limit_rejected_while_streaming(make_api: Callable[..., Any], tmp_path: Path) -> None:
    async with env_for(make_api, tmp_path) as e:
        big = random.Random(1).randbytes(int(10.5 * 1024 * 1024))
        parts = field_parts(PERSON) + [("images", "huge.jpg", big, "image/jpeg")] + image_parts(image_set(15))
        body = encode(parts)
        spooled: list[int] = []

        def probe(n: int) -> None:  # the part is spooled to files under uploads.tmp_dir as it arrives
            if n == 100:
                spooled.extend(p.stat().st_size for p in e.tmp.rglob("*") if p.is_file())

        status, out, pulled, total = await asgi_post_streamed(
            e.api, "/v2/loras", {**e.api.h(), "content-type": f"multipart/form-data; boundary={BOUNDARY}"}, body,
            probe=probe,
        )
        assert spooled and max(spooled) > 5 * 1024 * 1024, spooled
        assert status == 400, out
        err = json.loads(out)
        assert "images" in err["details"] and "10 MB" in err["details"]["images"][0]
        assert pulled < total, "the body was read to the end before rejecting"
        await e.assert_nothing_created()


# --------------------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),  # no boundary
        (None, encode(field_parts(PERSON) + image_parts(image_set(2)))),  # no content type
        ("application/json", b'{"name": "Ada"}'),
        ("application/x-www-form-urlencoded", b"name=Ada"),
        (f"multipart/form-data; boundary={BOUNDARY}", b"this is just garbage, no boundary anywhere" * 10),
        (f"multipart/form-data; boundary={BOUNDARY}", b""),
        (f"multipart/form-data; boundary={BOUNDARY}", encode(field_parts(PERSON) + image_parts(image_set(15)))[:-3000]),
        (f"multipart/form-data; boundary={BOUNDARY}", encode(field_parts(PERSON) + image_parts(image_set(15)), close=False)),
        (f"multipart/form-data; boundary=other", encode(field_parts(PERSON) + image_parts(image_set(15)))),
    ],
    ids=["no-boundary", "no-content-type", "json", "urlencoded", "garbage", "empty", "truncated", "unclosed", "wrong-boundary"],
)
async def test_create_rejects_malformed_multipart(env: Env, content_type: str | None, body: bytes) -> None:
    r = await post_raw(env.api, body, content_type)
    assert r.status_code == 400, r.text
    details = r.json()["details"]
    assert set(details) & {"body", "images"}, details
    await env.assert_nothing_created()


async def test_part_without_a_name_is_rejected(env: Env) -> None:
    body = encode(field_parts(PERSON) + image_parts(image_set(15)))
    body = body.replace(b'form-data; name="name"', b"form-data", 1)
    assert_400(await post_raw(env.api, body), "body")
    await env.assert_nothing_created()


# --------------------------------------------------------------------------- 202, 402, 429


async def test_create_202_body_is_exact(env: Env) -> None:
    api = env.api
    r = await api.create_lora(17)
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"id", "status", "imageCount"}
    assert UUID_RE.match(body["id"]) and body["status"] == "PENDING" and body["imageCount"] == 17
    assert await api.credits() <= env.start_credits - 2  # the 2-credit create fee (255 follows at submit)
    assert list(env.tmp.iterdir()) == []
    # the images were kept in storage (so the "nothing stored" checks elsewhere are meaningful)
    assert len([p for p in (env.blobs / "loras" / body["id"]).rglob("*") if p.is_file()]) >= 17


async def test_create_402_when_the_fee_cannot_be_paid(make_api: Callable[..., Any], tmp_path: Path) -> None:
    async with env_for(make_api, tmp_path, credits=1) as e:
        r = await e.api.create_lora(15)
        assert r.status_code == 402, r.text
        assert r.json() == {**r.json(), "error": "Insufficient credits", "creditsRequired": 2, "creditsAvailable": 1}
        await e.assert_nothing_created()


async def test_create_429_at_the_concurrent_training_cap(make_api: Callable[..., Any], tmp_path: Path) -> None:
    async with env_for(make_api, tmp_path, max_trainings=1) as e:
        api = e.api
        first = await api.create_lora(15)
        assert first.status_code == 202
        credits = await api.credits()
        r = await api.create_lora(15)
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
        assert isinstance(r.json()["error"], str)
        items = (await api.client.get("/v2/loras", headers=api.h())).json()["items"]
        assert [i["id"] for i in items] == [first.json()["id"]]
        assert await api.credits() == credits
        assert list(e.tmp.iterdir()) == []
        # archiving the one in training frees the slot
        assert (await api.client.delete(f"/v2/loras/{first.json()['id']}", headers=api.h())).status_code == 204
        assert (await api.create_lora(15)).status_code == 202


# --------------------------------------------------------------------------- GET one


async def test_get_lora_before_ready(env: Env) -> None:
    api = env.api
    me = (await api.client.get("/v2/me", headers=api.h())).json()
    r = await api.create_lora(16, age="thirties", steps=1200, loraRank=16)
    lora_id = r.json()["id"]
    got = await api.client.get(f"/v2/loras/{lora_id}", headers=api.h())
    assert got.status_code == 200
    lora = got.json()
    check_lora_shape(lora)
    assert lora["id"] == lora_id and lora["teamId"] == api.team_id and lora["userId"] == me["user"]["id"]
    assert lora["status"] in ("PENDING", "UPLOADING", "TRAINING")
    assert lora["triggerWord"] is None and lora["isReady"] is False and lora["hasWeights"] is False
    assert lora["error"] is None and lora["completedAt"] is None
    assert lora["imageCount"] == 16 and lora["steps"] == 1200 and lora["loraRank"] == 16 and lora["age"] == "thirties"
    # createdAt is close to now
    created = time.mktime(time.strptime(lora["createdAt"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(created - time.time()) < 60
    # still hidden while training
    deadline = time.monotonic() + 10
    while lora["status"] != "TRAINING" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        lora = (await api.client.get(f"/v2/loras/{lora_id}", headers=api.h())).json()
    assert lora["status"] == "TRAINING" and lora["triggerWord"] is None
    assert lora["startedAt"] is not None and ISO_RE.match(lora["startedAt"])


async def test_get_lora_after_ready(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=FAST) as api:
        lora = await api.ready_lora()
        check_lora_shape(lora)
        assert lora["status"] == "READY" and lora["isReady"] and lora["hasWeights"]
        assert isinstance(lora["triggerWord"], str) and lora["triggerWord"]
        assert lora["error"] is None
        assert ISO_RE.match(lora["startedAt"]) and ISO_RE.match(lora["completedAt"])
        assert lora["createdAt"] <= lora["startedAt"] <= lora["completedAt"]
        # weightsUrl / zipCdnPath are never exposed
        assert "weightsUrl" not in lora and "zipCdnPath" not in lora
        # trigger words are unique per LoRA
        other = await api.ready_lora(name="Bo")
        assert other["triggerWord"] != lora["triggerWord"]


@pytest.mark.parametrize("bad", ["not-a-uuid", "123", "lora_8a4d2c", "00000000000000000000000000000000", "00000000-0000-0000-0000-00000000000g"])
async def test_get_and_delete_non_uuid_is_400(api: Api, bad: str) -> None:
    r = await api.client.get(f"/v2/loras/{bad}", headers=api.h())
    assert_400(r, "id")
    r = await api.client.delete(f"/v2/loras/{bad}", headers=api.h())
    assert_400(r, "id")


async def test_get_and_delete_unknown_is_404(api: Api) -> None:
    unknown = str(uuid.uuid4())
    for method in ("GET", "DELETE"):
        r = await api.client.request(method, f"/v2/loras/{unknown}", headers=api.h())
        assert r.status_code == 404, r.text
        assert isinstance(r.json()["error"], str) and "details" not in r.json()


async def test_another_teams_lora_is_404_and_untouched(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW) as api:
        mine = (await api.create_lora(15)).json()["id"]
        other_team, other_key = await api.new_team()
        theirs = (await api.create_lora(15, key=other_key)).json()["id"]
        unknown = (await api.client.get(f"/v2/loras/{uuid.uuid4()}", headers=api.h())).json()
        for lora_id, key in ((theirs, api.key), (mine, other_key)):
            for method in ("GET", "DELETE"):
                r = await api.client.request(method, f"/v2/loras/{lora_id}", headers=api.h(key))
                assert r.status_code == 404, r.text
                assert r.json() == unknown  # reads exactly like a missing one
        for lora_id, key in ((mine, api.key), (theirs, other_key)):
            lora = (await api.client.get(f"/v2/loras/{lora_id}", headers=api.h(key))).json()
            assert lora["status"] != "ARCHIVED"
        assert [i["id"] for i in (await api.client.get("/v2/loras?includeArchived=true", headers=api.h())).json()["items"]] == [mine]
        assert [i["id"] for i in (await api.client.get("/v2/loras?includeArchived=true", headers=api.h(other_key))).json()["items"]] == [theirs]


# --------------------------------------------------------------------------- list


async def _create_n(api: Api, n: int, images: int = 15) -> list[str]:
    ids = []
    for i in range(n):
        r = await api.create_lora(images, name=f"L{i}")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


async def test_list_newest_first_and_cursor_paging(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW) as api:
        ids = await _create_n(api, 3)
        r = await api.client.get("/v2/loras", headers=api.h())
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"items", "nextCursor"}
        assert [i["id"] for i in body["items"]] == ids[::-1]
        assert body["nextCursor"] is None
        for item in body["items"]:
            check_lora_shape(item)
        page1 = (await api.client.get("/v2/loras?limit=2", headers=api.h())).json()
        assert [i["id"] for i in page1["items"]] == [ids[2], ids[1]]
        assert page1["nextCursor"] == ids[1]
        page2 = (await api.client.get(f"/v2/loras?limit=2&cursor={page1['nextCursor']}", headers=api.h())).json()
        assert [i["id"] for i in page2["items"]] == [ids[0]]
        assert page2["nextCursor"] is None
        # limit == count: no next page
        exact = (await api.client.get("/v2/loras?limit=3", headers=api.h())).json()
        assert len(exact["items"]) == 3 and exact["nextCursor"] is None
        # paging by one
        seen, cursor = [], None
        while True:
            q = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
            page = (await api.client.get("/v2/loras" + q, headers=api.h())).json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        # a cursor that is a UUID of nothing (or of another team's LoRA) gives an empty page
        other_team, other_key = await api.new_team()
        theirs = (await api.create_lora(15, key=other_key)).json()["id"]
        for c in (str(uuid.uuid4()), theirs):
            page = (await api.client.get(f"/v2/loras?cursor={c}", headers=api.h())).json()
            assert page == {"items": [], "nextCursor": None}


async def test_list_default_limit_is_24(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW, uploads={"min_images": 1}, max_trainings=100) as api:
        ids = await _create_n(api, 25, images=1)
        page = (await api.client.get("/v2/loras", headers=api.h())).json()
        assert len(page["items"]) == 24 and page["nextCursor"] == ids[1]
        rest = (await api.client.get(f"/v2/loras?cursor={page['nextCursor']}", headers=api.h())).json()
        assert [i["id"] for i in rest["items"]] == [ids[0]] and rest["nextCursor"] is None
        full = (await api.client.get("/v2/loras?limit=100", headers=api.h())).json()
        assert len(full["items"]) == 25 and full["nextCursor"] is None


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=2.5", "limit"),
        ("cursor=nope", "cursor"),
        ("cursor=12345", "cursor"),
        ("includeArchived=yes", "includeArchived"),
        ("includeArchived=1", "includeArchived"),
    ],
)
async def test_list_bad_query_is_400(api: Api, query: str, path: str) -> None:
    assert_400(await api.client.get(f"/v2/loras?{query}", headers=api.h()), path)


@pytest.mark.parametrize("limit", [1, 100])
async def test_list_limit_bounds_accepted(api: Api, limit: int) -> None:
    r = await api.client.get(f"/v2/loras?limit={limit}", headers=api.h())
    assert r.status_code == 200 and r.json() == {"items": [], "nextCursor": None}


async def test_list_include_archived(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW) as api:
        a, b = await _create_n(api, 2)
        assert (await api.client.delete(f"/v2/loras/{a}", headers=api.h())).status_code == 204
        for q in ("", "?includeArchived=false"):
            items = (await api.client.get("/v2/loras" + q, headers=api.h())).json()["items"]
            assert [i["id"] for i in items] == [b]
        items = (await api.client.get("/v2/loras?includeArchived=true", headers=api.h())).json()["items"]
        assert [(i["id"], i["status"]) for i in items][1] == (a, "ARCHIVED")
        assert [i["id"] for i in items] == [b, a]
        # paging past an archived one
        page = (await api.client.get(f"/v2/loras?cursor={b}", headers=api.h())).json()
        assert page["items"] == []
        page = (await api.client.get(f"/v2/loras?cursor={b}&includeArchived=true", headers=api.h())).json()
        assert [i["id"] for i in page["items"]] == [a]


async def test_list_never_shows_another_teams_loras(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW) as api:
        _, other_key = await api.new_team()
        await api.create_lora(15, key=other_key)
        r = await api.client.get("/v2/loras?includeArchived=true&limit=100", headers=api.h())
        assert r.json() == {"items": [], "nextCursor": None}


# --------------------------------------------------------------------------- DELETE


async def test_delete_archives_and_is_idempotent(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=FAST) as api:
        lora = await api.ready_lora()
        before = await api.credits()
        r = await api.client.delete(f"/v2/loras/{lora['id']}", headers=api.h())
        assert r.status_code == 204 and r.content == b""
        got = (await api.client.get(f"/v2/loras/{lora['id']}", headers=api.h())).json()
        check_lora_shape(got)
        assert got["status"] == "ARCHIVED" and got["isReady"] is False
        r = await api.client.delete(f"/v2/loras/{lora['id']}", headers=api.h())
        assert r.status_code == 204 and r.content == b""
        assert (await api.client.get(f"/v2/loras/{lora['id']}", headers=api.h())).json()["status"] == "ARCHIVED"
        assert await api.credits() == before
        # an archived LoRA cannot be used for generation
        r = await api.client.post(
            "/v2/images/generate", headers=api.h(),
            json={"prompt": "p", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}},
        )
        assert_400(r, "fluxLoraParams.loraId")


async def test_delete_during_training_stays_archived(make_api: Callable[..., Any]) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 0.5, "queue_seconds": 0}}) as api:
        lora_id = (await api.create_lora(15)).json()["id"]
        deadline = time.monotonic() + 10
        while (await api.client.get(f"/v2/loras/{lora_id}", headers=api.h())).json()["status"] != "TRAINING":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await api.client.delete(f"/v2/loras/{lora_id}", headers=api.h())).status_code == 204
        # well past the training time, it is still ARCHIVED and never became READY
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            got = (await api.client.get(f"/v2/loras/{lora_id}", headers=api.h())).json()
            assert got["status"] == "ARCHIVED" and got["triggerWord"] is None, got
            await asyncio.sleep(0.1)


async def test_key_of_the_same_team_sees_the_same_loras(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW) as api:
        lora_id = (await api.create_lora(15)).json()["id"]
        k2 = await accounts.create_key(api.gw.db, api.team_id, "k2")
        assert (await api.client.get(f"/v2/loras/{lora_id}", headers=api.h(k2.key))).status_code == 200
        items = (await api.client.get("/v2/loras", headers=api.h(k2.key))).json()["items"]
        assert [i["id"] for i in items] == [lora_id]


async def test_uuids_are_case_insensitive(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=SLOW) as api:
        a, b = await _create_n(api, 2)
        assert (await api.client.get(f"/v2/loras/{a.upper()}", headers=api.h())).json()["id"] == a
        page = (await api.client.get(f"/v2/loras?cursor={b.upper()}", headers=api.h())).json()
        assert [i["id"] for i in page["items"]] == [a]
        assert (await api.client.delete(f"/v2/loras/{a.upper()}", headers=api.h())).status_code == 204
        assert (await api.client.get(f"/v2/loras/{a}", headers=api.h())).json()["status"] == "ARCHIVED"


# --------------------------------------------------------------------------- FAILED and refunds


async def test_training_failure_refunds_the_training_fee(make_api: Callable[..., Any]) -> None:
    providers = {"sandbox": {"training_seconds": 0.1, "queue_seconds": 0, "training_failure_rate": 1.0}}
    async with make_api(providers=providers, engine={"max_attempts": 1}) as api:
        start = await api.credits()
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        check_lora_shape(lora)
        assert lora["status"] == "FAILED", lora
        assert isinstance(lora["error"], str) and lora["error"]
        assert lora["triggerWord"] is None and lora["isReady"] is False and lora["hasWeights"] is False
        assert lora["completedAt"] is not None
        # training had begun: the 255 comes back, the 2-credit create fee does not
        assert await api.credits() == start - 2
        r = await api.client.post(
            "/v2/images/generate", headers=api.h(),
            json={"prompt": "p", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}},
        )
        assert_400(r, "fluxLoraParams.loraId")


async def test_failure_before_training_refunds_the_create_fee_too(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=FAST, credits=2) as api:  # the 2-credit fee, but not the 255
        r = await api.create_lora(15)
        assert r.status_code == 202, r.text
        assert await api.credits() == 0
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED" and "credits" in lora["error"]
        assert lora["startedAt"] is None and lora["triggerWord"] is None
        assert await api.credits() == 2


async def test_a_configured_tmp_dir_that_does_not_exist_yet_is_created(make_api: Callable[..., Any], tmp_path: Path) -> None:
    tmp = tmp_path / "not" / "there"
    async with make_api(uploads={"tmp_dir": str(tmp)}, providers=SLOW) as api:
        r = await api.create_lora(15)
        assert r.status_code == 202, r.text
        assert tmp.is_dir() and list(tmp.iterdir()) == []
