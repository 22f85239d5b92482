"""The Vimmerse fake itself (tests/fakes/vimmerse.py): its wire format, state machine, knobs and
faults, in-process through ``httpx.ASGITransport`` and over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from typing import Any, AsyncIterator

import httpx
import pytest
from PIL import Image

from tests.fakes.vimmerse import SIZES, FakeVimmerse, serve_on_loopback
from tests.images import make_image
from tests.receiver import Receiver, serving

BASE = "https://api.vimmerse.net"
KEY = "vm-test-key"
WORD_RE = re.compile(r"MYLORA_[A-Z0-9]{6}")


@pytest.fixture
async def fake() -> AsyncIterator[FakeVimmerse]:
    f = FakeVimmerse(seed=7)
    yield f
    await f.aclose()


@pytest.fixture
async def client(fake: FakeVimmerse) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers={"X-Api-Key": KEY}) as c:
        yield c


def photos(n: int = 3, fmt: str = "JPEG") -> list[tuple[str, tuple[str, bytes, str]]]:
    mime = {"JPEG": "image/jpeg", "PNG": "image/png"}[fmt]
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    return [("image_files", (f"p{i}.{ext}", make_image(fmt, seed=i), mime)) for i in range(n)]


async def create(client: httpx.AsyncClient, n: int = 3, **data: Any) -> httpx.Response:
    return await client.post("/finetune", data={k: str(v) for k, v in data.items()}, files=photos(n) if n else None)


async def trained(fake: FakeVimmerse, client: httpx.AsyncClient, **data: Any) -> str:
    r = await create(client, **data)
    assert r.status_code == 200, r.text
    word = fake.last_finetune.trigger_word
    fake.advance(fake.queue_s + fake.training_s)
    return word


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


# --------------------------------------------------------------------------- POST /finetune


async def test_create_returns_the_word_in_results_and_records_the_form(fake: FakeVimmerse,
                                                                       client: httpx.AsyncClient) -> None:
    r = await create(client, option="FluxProFinetune", finetune_type="Character", num_iterations=300,
                     webhook_url="http://127.0.0.1:9/hook")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    [word] = data["results"]
    assert WORD_RE.fullmatch(word)
    uuid.UUID(data["id"])
    assert data["customer_id"] == fake.customer_id and data["app_name"] == "finetune" and data["status"] == "success"
    assert data["thumbnails"] == [] and data["history"] == [] and data["created_at"] == data["updated_at"]
    assert data["args"]["option"] == "FluxProFinetune" and data["args"]["num_iterations"] == 300
    ft = fake.finetunes[word]
    assert (ft.option, ft.finetune_type, ft.num_iterations, ft.image_count) == ("FluxProFinetune", "Character", 300, 3)
    form = fake.of_kind("finetune")[0].form
    assert form is not None
    assert form.file_count == 3 and form.filenames == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert form.content_types == ["image/jpeg"] * 3
    assert form.value("finetune_type") == "Character" and form.value("webhook_url") == "http://127.0.0.1:9/hook"
    assert [f.image for f in form.image_files] == [("JPEG", 64, 48)] * 3
    assert fake.finetune_status(word) == "queued"


@pytest.mark.parametrize("variant", ["id", "bare", "field", "missing", "url"])
async def test_create_variants_put_the_word_elsewhere(variant: str) -> None:
    fake = FakeVimmerse(create_variant=variant)
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers={"X-Api-Key": KEY}) as c:
        r = await create(c, lora_prefix="ADA")
    assert r.status_code == 200, r.text
    word = fake.last_finetune.trigger_word
    assert re.fullmatch(r"ADA_[A-Z0-9]{6}", word)
    body = r.json()
    if variant == "bare":
        assert body == word
    elif variant == "field":
        assert body == {"trigger_word": word}
    else:
        data = body["data"]
        assert word not in r.text or variant == "id"
        if variant == "id":
            assert data["id"] == word and data["results"] == []
        elif variant == "missing":
            uuid.UUID(data["id"])
            assert data["results"] == []
        else:
            [url] = data["results"]
            assert url.startswith(f"{BASE}/media/") and not WORD_RE.search(url)


def test_an_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeVimmerse(create_variant="nope")


async def test_words_are_deterministic_with_a_seed_and_unique() -> None:
    words = []
    for _ in range(2):
        fake = FakeVimmerse(seed=42)
        async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers={"X-Api-Key": KEY}) as c:
            for _ in range(3):
                assert (await create(c, n=1)).status_code == 200
        words.append(list(fake.finetunes))
    assert words[0] == words[1] and len(set(words[0])) == 3


async def test_finetune_validation(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    r = await create(client, option="FluxDev")
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["type"] == "enum" and err["loc"] == ["body", "option"] and err["input"] == "FluxDev"
    assert "'FluxFinetune', 'FluxProFinetune' or 'FluxKontextFinetune'" in err["msg"]

    r = await create(client, finetune_type="Person", num_iterations="lots")
    assert r.status_code == 422
    assert [(e["type"], e["loc"][-1]) for e in r.json()["detail"]] == [("enum", "finetune_type"),
                                                                       ("int_parsing", "num_iterations")]
    r = await create(client, num_iterations=-1)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "greater_than_equal"

    r = await client.post("/finetune", data={"image_files": "not a file"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_files", 0]

    r = await create(client, n=0, option="FluxFinetune")
    assert (r.status_code, r.json()) == (400, {"message": "NO_IMAGES"})
    r = await client.post("/finetune", files=[("images", ("a.jpg", make_image(), "image/jpeg"))])  # wrong field name
    assert (r.status_code, r.json()) == (400, {"message": "NO_IMAGES"})
    r = await client.post("/finetune", json={"image_urls": ["http://x.test/a.png"]})  # not a form: reads as empty
    assert (r.status_code, r.json()) == (400, {"message": "NO_IMAGES"})

    r = await client.post("/finetune", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"})
    assert (r.status_code, r.json()) == (400, {"detail": "There was an error parsing the body"})

    files = photos(2) + [("image_files", ("bad.jpg", b"\xff\xd8 truncated", "image/jpeg"))]
    r = await client.post("/finetune", files=files)
    assert (r.status_code, r.json()) == (400, {"message": "INVALID_IMAGE"})
    assert fake.finetunes == {} and fake.of_kind("finetune")[-1].form.file_count == 3


async def test_image_urls_are_fetched_and_checked(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fetched: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        if request.url.path == "/ok.png":
            return httpx.Response(200, content=make_image("PNG"))
        if request.url.path == "/junk.png":
            return httpx.Response(200, content=b"<html>not an image</html>")
        return httpx.Response(404)

    fake.fetch_client = httpx.AsyncClient(transport=httpx.MockTransport(serve))
    ok = "http://cdn.test/ok.png"
    r = await client.post("/finetune", data={"image_urls": [ok, ok]})
    assert r.status_code == 200, r.text
    assert fake.last_finetune.image_count == 2 and fetched == [ok, ok]
    assert fake.of_kind("finetune")[-1].form.image_urls == [ok, ok]

    r = await client.post("/finetune", data={"image_urls": [ok, "http://cdn.test/junk.png"]})
    assert (r.status_code, r.json()) == (400, {"message": "INVALID_IMAGE"})
    r = await client.post("/finetune", data={"image_urls": ["http://cdn.test/gone.png"]})
    assert (r.status_code, r.json()) == (400, {"message": "INVALID_IMAGE_URL"})

    fetched.clear()  # with files, the URLs are not used at all
    r = await client.post("/finetune", data={"image_urls": ["http://cdn.test/gone.png"]}, files=photos(1))
    assert r.status_code == 200 and fetched == []

    # the fake's own URLs are served in-process (here: a finished finetune's sample)
    fake.advance(1)
    r = await client.get(f"/finetune/{fake.last_finetune.trigger_word}")
    sample = r.json()["data"][0]["URL"]
    r = await client.post("/finetune", data={"image_urls": sample})
    assert r.status_code == 200, r.text
    await fake.fetch_client.aclose()


async def test_credits_run_out(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.credits = 12
    assert (await create(client)).status_code == 200
    r = await create(client)
    assert (r.status_code, r.json()) == (402, {"message": "INSUFFICIENT_CREDIT"})
    assert fake.credits == 2 and len(fake.finetunes) == 1


# --------------------------------------------------------------------------- GET /finetune/{word}


@pytest.mark.parametrize("variant", ["empty", "status", "media"])
async def test_status_moves_from_queued_to_samples(variant: str) -> None:
    fake = FakeVimmerse(status_variant=variant, queue_s=1, training_s=4)
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers={"X-Api-Key": KEY}) as c:
        word = (await create(c)).json()["data"]["results"][0]
        seen = []
        for step in (0, 2, 2):
            fake.advance(step)
            r = await c.get(f"/finetune/{word}")
            assert r.status_code == 200
            seen.append(r.json())
        expected = {
            "empty": [{"data": []}] * 3,
            "status": [{"data": {"status": "processing"}}] * 3,
            "media": [{"data": {"processing_status": "queue_bullet", "progress_percentage": 0}},
                      {"data": {"processing_status": "processing_bullet", "progress_percentage": 25}},
                      {"data": {"processing_status": "processing_bullet", "progress_percentage": 75}}],
        }[variant]
        assert seen == expected
        sample_paths = fake.last_finetune.sample_paths
        r = await c.get(sample_paths[0])  # not served before the finetune is done
        assert (r.status_code, r.json()) == (404, {"message": "NOT_FOUND"})

        fake.advance(1)
        r = await c.get(f"/finetune/{word}")
        ft = fake.finetunes[word]
        assert r.json() == {"data": [{"URL": f"{BASE}/media/{fake.customer_id}/ai_images/{ft.id}/sample-{i}.png"}
                                     for i in (1, 2)]}
        assert fake.finetune_status(word) == "success"
        r = await c.get(r.json()["data"][1]["URL"], headers={"X-Api-Key": ""})  # no auth needed
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert png_size(r.content) == (1024, 1024)
        assert fake.images[sample_paths[1]].trigger_word == word


@pytest.mark.parametrize("variant", ["status", "http"])
async def test_failed_finetunes(variant: str) -> None:
    fake = FakeVimmerse(failure_variant=variant, fail_finetunes="TRAINING_FAILED")
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers={"X-Api-Key": KEY}) as c:
        word = (await create(c)).json()["data"]["results"][0]  # accepted: it fails later
        assert (await c.get(f"/finetune/{word}")).json() == {"data": {"status": "processing"}}
        fake.advance(1)
        r = await c.get(f"/finetune/{word}")
        if variant == "status":
            assert (r.status_code, r.json()) == (200, {"data": {"status": "fail", "message": "TRAINING_FAILED"}})
        else:
            assert (r.status_code, r.json()) == (400, {"message": "TRAINING_FAILED"})
        assert fake.finetune_status(word) == "fail"
        assert (await c.get(fake.last_finetune.sample_paths[0])).status_code == 404


async def test_unknown_words_and_other_customers(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.other_keys["vm-other"] = "cus_other"
    word = await trained(fake, client)
    r = await client.get("/finetune/MYLORA_NOPE00")
    assert (r.status_code, r.json()) == (404, {"message": "NOT_FOUND"})
    r = await client.get(f"/finetune/{word}", headers={"X-Api-Key": "vm-other"})
    assert (r.status_code, r.json()) == (404, {"message": "NOT_FOUND"})


async def test_unknown_shape(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.unknown_shape = {"status"}
    word = (await create(client)).json()["data"]["results"][0]
    r = await client.get(f"/finetune/{word}")
    assert (r.status_code, r.json()) == (200, {"weird": True})
    fake.unknown_shape, fake.unknown_body = True, {"data": {"something": "else"}}
    r = await create(client)
    assert (r.status_code, r.json()) == (200, {"data": {"something": "else"}})
    assert len(fake.finetunes) == 2  # processed all the same


# --------------------------------------------------------------------------- text-2-image and assets


async def test_sync_generation_with_a_finetune(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    word = await trained(fake, client)
    prompt = f"a photo of {word}, smiling, at the beach"
    r = await client.post("/v2/image/text-2-image", json={"prompt": prompt, "option": "FluxFinetuned", "quantity": 2,
                                                          "aspect_ratio": "3:4", "creativity_strength": 7})
    assert r.status_code == 200, r.text
    asset = r.json()
    assert "data" not in asset  # v2: not wrapped
    assert asset["status"] == "success" and asset["app_name"] == "text-to-image" and asset["quantity"] == 2
    assert asset["mime_type"] == "image/png" and asset["customer_id"] == fake.customer_id
    assert asset["args"]["prompt"] == prompt and asset["args"]["aspect_ratio"] == "3:4"
    assert len(asset["results"]) == 2
    for url in asset["results"]:
        img = await client.get(url, headers={"X-Api-Key": ""})
        assert img.status_code == 200 and png_size(img.content) == SIZES["3:4"] == (896, 1152)
        made = fake.images[httpx.URL(url).path]
        assert (made.trigger_word, made.prompt, made.kind) == (word, prompt, "generation")
    assert fake.assets[asset["id"]].trigger_word == word

    r = await client.post("/v2/image/text-2-image", json={"prompt": "a cat"})  # defaults: Auto, 16:9, 1 image
    assert r.status_code == 200
    [url] = r.json()["results"]
    assert fake.images[httpx.URL(url).path].trigger_word is None
    assert png_size((await client.get(url)).content) == (1344, 768)


async def test_finetune_not_found_rule(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.other_keys["vm-other"] = "cus_other"
    word = await trained(fake, client)
    fake.fail_finetunes = "BOOM"
    failed = (await create(client)).json()["data"]["results"][0]
    fake.fail_finetunes = None
    fake.advance(1)
    assert fake.finetune_status(failed) == "fail"
    running = (await create(client)).json()["data"]["results"][0]
    fake.advance(fake.queue_s)
    assert fake.finetune_status(running) == "running"

    async def gen(prompt: str, key: str = KEY) -> httpx.Response:
        return await client.post("/v2/image/text-2-image", json={"prompt": prompt, "option": "FluxFinetuned"},
                                 headers={"X-Api-Key": key})

    for prompt in ("a portrait", f"x{word}", f"{word}X", f"{word}_2", word.lower(), running, failed):
        r = await gen(prompt)
        assert (r.status_code, r.json()) == (400, {"message": "FINETUNE_NOT_FOUND"}), prompt
    r = await gen(word, key="vm-other")
    assert (r.status_code, r.json()) == (400, {"message": "FINETUNE_NOT_FOUND"})
    for prompt in (word, f"({word})", f"photo of {word}.", f"{word}, in the rain"):
        assert (await gen(prompt)).status_code == 200, prompt
    r = await client.post("/v2/image/text-2-image", json={"prompt": f"photo of {running}"})  # not FluxFinetuned
    assert r.status_code == 200 and fake.last_asset.trigger_word is None


@pytest.mark.parametrize(("body", "errors"), [
    ({}, [("missing", "prompt")]),
    ({"prompt": 3}, [("string_type", "prompt")]),
    ({"prompt": "x", "quantity": 5}, [("less_than_equal", "quantity")]),
    ({"prompt": "x", "quantity": 0, "creativity_strength": 11}, [("greater_than_equal", "quantity"),
                                                                 ("less_than_equal", "creativity_strength")]),
    ({"prompt": "x", "quantity": 1.5}, [("int_from_float", "quantity")]),
    ({"prompt": "x", "aspect_ratio": "5:4"}, [("enum", "aspect_ratio")]),
    ({"prompt": "x", "option": "FluxFinetune"}, [("enum", "option")]),
    ({"prompt": "x", "async_mode": "maybe", "enhance_image": []}, [("bool_type", "enhance_image"),
                                                                   ("bool_parsing", "async_mode")]),
])
async def test_generation_validation(client: httpx.AsyncClient, body: dict[str, Any],
                                     errors: list[tuple[str, str]]) -> None:
    r = await client.post("/v2/image/text-2-image", json=body)
    assert r.status_code == 422, r.text
    assert [(e["type"], e["loc"][-1]) for e in r.json()["detail"]] == errors
    assert all(e["loc"][0] == "body" and "msg" in e and "input" in e for e in r.json()["detail"])


async def test_generation_bodies_fastapi_would_refuse(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    url = "/v2/image/text-2-image"
    r = await client.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = await client.post(url, data={"prompt": "x"})  # a form: FastAPI keeps it as bytes
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "model_attributes_type"
    r = await client.post(url, json=["prompt"])
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "model_attributes_type"
    r = await client.post(url)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "missing"
    r = await client.post(url, json={"prompt": "  "})
    assert (r.status_code, r.json()) == (400, {"message": "BAD_REQUEST"})
    r = await client.post(url, json={"prompt": "x", "async_mode": "true", "quantity": "2", "extra": 1})  # lax, extras ignored
    assert r.status_code == 200 and r.json()["status"] == "processing" and r.json()["quantity"] == 2
    fake.generate_options = None
    assert (await client.post(url, json={"prompt": "x", "option": "Whatever"})).status_code == 200


@pytest.mark.parametrize("wrapped", [True, False])
async def test_async_generation_and_assets(wrapped: bool) -> None:
    fake = FakeVimmerse(asset_wrapped=wrapped, generation_s=2)
    async with httpx.AsyncClient(transport=fake.transport(), base_url=BASE, headers={"X-Api-Key": KEY}) as c:
        word = await trained(fake, c)
        r = await c.post("/v2/image/text-2-image", json={"prompt": f"{word} on a horse", "option": "FluxFinetuned",
                                                         "async_mode": True, "quantity": 3, "aspect_ratio": "9:21"})
        asset = r.json()
        assert (asset["status"], asset["results"], asset["quantity"]) == ("processing", [], 3)

        def unwrap(resp: httpx.Response) -> dict[str, Any]:
            assert resp.status_code == 200
            return resp.json()["data"] if wrapped else resp.json()

        got = unwrap(await c.get(f"/asset/{asset['id']}"))
        assert (got["id"], got["status"], got["results"]) == (asset["id"], "processing", [])
        assert (await c.get(fake.assets[asset["id"]].image_paths[0])).status_code == 404
        fake.advance(2)
        got = unwrap(await c.get(f"/asset/{asset['id']}"))
        assert got["status"] == "success" and len(got["results"]) == 3
        assert png_size((await c.get(got["results"][2])).content) == (640, 1536)
        assert fake.asset_status(asset["id"]) == "success"

        r = await c.get(f"/asset/{uuid.uuid4()}")
        assert (r.status_code, r.json()) == (404, {"message": "NOT_FOUND"})
        r = await c.get(f"/asset/{fake.finetunes[word].id}")  # finetunes are not assets here
        assert r.status_code == 404


async def test_failed_generations(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.fail_generations = "GENERATION_FAILED"
    r = await client.post("/v2/image/text-2-image", json={"prompt": "x"})
    assert (r.status_code, r.json()) == (400, {"message": "GENERATION_FAILED"})
    r = await client.post("/v2/image/text-2-image", json={"prompt": "x", "async_mode": True})
    aid = r.json()["id"]
    fake.advance(1)
    got = (await client.get(f"/asset/{aid}")).json()["data"]
    assert (got["status"], got["results"], got["message"]) == ("fail", [], "GENERATION_FAILED")


# --------------------------------------------------------------------------- auth, routes, faults


async def test_auth_and_routes(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.forbidden_keys.add("vm-readonly")
    fake.other_keys["vm-readonly"] = "cus_ro"
    for headers, status, detail in (({"X-Api-Key": ""}, 401, "Not authenticated"),
                                    ({"X-Api-Key": "wrong"}, 401, "Invalid API key"),
                                    ({"X-Api-Key": "vm-readonly"}, 403, "Not enough permissions")):
        for method, path in (("POST", "/finetune"), ("GET", "/finetune/W"), ("POST", "/v2/image/text-2-image"),
                             ("GET", "/asset/x")):
            r = await client.request(method, path, headers=headers)
            assert (r.status_code, r.json()) == (status, {"detail": detail}), (method, path)
    r = await client.get("/v1/nothing")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = await client.get("/finetune")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
    assert fake.of_kind("finetune")[0].headers["x-api-key"] == ""


@pytest.mark.parametrize(("status", "body", "ctype"), [
    (400, {"message": "BAD_REQUEST"}, "application/json"),
    (401, {"detail": "Invalid API key"}, "application/json"),
    (402, {"message": "INSUFFICIENT_CREDIT"}, "application/json"),
    (403, {"detail": "Not enough permissions"}, "application/json"),
    (404, {"message": "NOT_FOUND"}, "application/json"),
    (500, "Internal Server Error", "text/plain"),
    (503, "Service Unavailable", "text/plain"),
])
async def test_scripted_default_bodies(fake: FakeVimmerse, client: httpx.AsyncClient, status: int, body: Any,
                                       ctype: str) -> None:
    fake.script("generate", status)
    r = await client.post("/v2/image/text-2-image", json={"prompt": "x"})
    assert r.status_code == status and r.headers["content-type"].startswith(ctype)
    assert (r.json() if ctype == "application/json" else r.text) == body
    assert fake.assets == {}
    assert (await client.post("/v2/image/text-2-image", json={"prompt": "x"})).status_code == 200  # once only


async def test_scripted_faults(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.script("finetune", 422)
    r = await create(client)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error"

    fake.script("status", 500, times=2, body={"message": "BUSY"})
    assert [(await client.get("/finetune/X")).status_code for _ in range(3)] == [500, 500, 404]

    fake.script("/asset/", 502, body="bad gateway")
    r = await client.get("/asset/x")
    assert (r.status_code, r.text) == (502, "bad gateway")

    fake.script("finetune", 504, accept=True)  # accepted upstream, the proxy answers 504
    r = await create(client)
    assert r.status_code == 504 and len(fake.finetunes) == 1

    word = await trained(fake, client)
    fake.script("media", 500)
    url = (await client.get(f"/finetune/{word}")).json()["data"][0]["URL"]
    assert (await client.get(url)).status_code == 500
    assert (await client.get(url)).status_code == 200

    with pytest.raises(ValueError):
        fake.script("train", 500)


async def test_scripted_delay_times_out_in_process(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    fake.script("generate", None, delay=1)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v2/image/text-2-image", json={"prompt": "x"}, timeout=httpx.Timeout(5, read=0.05))
    fake.script("generate", None, delay=0.01)  # under the limit: answered normally
    r = await client.post("/v2/image/text-2-image", json={"prompt": "x"}, timeout=httpx.Timeout(5, read=2))
    assert r.status_code == 200


# --------------------------------------------------------------------------- webhooks


async def test_webhooks_in_process(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    async with serving(Receiver()) as rx:
        hook = f"{rx.base_url}/hooks/vimmerse"
        r = await create(client, webhook_url=hook)
        fid = r.json()["data"]["id"]
        fake.fail_finetunes = "NOPE"
        failed_id = (await create(client, webhook_url=hook + "?n=2")).json()["data"]["id"]
        fake.fail_finetunes = None
        r = await client.post("/v2/image/text-2-image", json={"prompt": "x", "webhook_url": hook})  # sync: no hook
        r = await client.post("/v2/image/text-2-image", json={"prompt": "x", "async_mode": True, "webhook_url": hook})
        aid = r.json()["id"]
        await asyncio.sleep(0.05)
        assert rx.requests == []  # nothing ends before the fake's clock moves
        fake.advance(1)
        got = await rx.wait_for(3)
        await asyncio.sleep(0.05)
        assert len(rx.requests) == 3
    bodies = sorted((r.path, r.body) for r in got)
    assert sorted(json.loads(b)["media_id"] for _, b in bodies) == sorted([fid, failed_id, aid])
    by_id = {json.loads(b)["media_id"]: json.loads(b) for _, b in bodies}
    assert by_id[fid] == {"customer_id": fake.customer_id, "media_id": fid, "status": "success"}
    assert by_id[failed_id]["status"] == "fail" and by_id[aid]["status"] == "success"
    assert all(r.headers["content-type"] == "application/json" and "signature" not in " ".join(r.headers)
               for r in got)
    assert sorted(d.status for d in fake.deliveries) == [200, 200, 200]
    assert {d.url for d in fake.deliveries} == {hook, hook + "?n=2"}


async def test_webhook_failures_are_recorded(fake: FakeVimmerse, client: httpx.AsyncClient) -> None:
    async with serving(Receiver(status=500)) as rx:
        await create(client, webhook_url=rx.base_url)
        fake.advance(1)
        await rx.wait_for(1)
        for _ in range(100):
            if fake.deliveries:
                break
            await asyncio.sleep(0.01)
    assert [d.status for d in fake.deliveries] == [500]  # one attempt by default
    await create(client, webhook_url="http://127.0.0.1:9/closed")  # nothing listens there
    fake.advance(1)
    for _ in range(200):
        if len(fake.deliveries) == 2:
            break
        await asyncio.sleep(0.01)
    assert fake.deliveries[1].status is None and "ConnectError" in (fake.deliveries[1].error or "")


# --------------------------------------------------------------------------- over real HTTP


async def test_the_whole_flow_over_loopback() -> None:
    fake = FakeVimmerse(queue_s=0.05, training_s=0.2, generation_s=0.1)
    async with serving(Receiver()) as rx:
        with serve_on_loopback(fake.app) as base_url:
            async with httpx.AsyncClient(base_url=base_url, headers={"X-Api-Key": KEY}, timeout=10) as c:
                r = await create(c, webhook_url=f"{rx.base_url}/ft")
                assert r.status_code == 200, r.text
                word = r.json()["data"]["results"][0]
                assert (await c.get(f"/finetune/{word}")).json() == {"data": {"status": "processing"}}
                fake.advance(1)
                samples = (await c.get(f"/finetune/{word}")).json()["data"]
                assert all(s["URL"].startswith(f"{base_url}/media/") for s in samples)
                assert png_size((await c.get(samples[0]["URL"])).content) == (1024, 1024)

                r = await c.post("/v2/image/text-2-image", json={"prompt": f"{word} portrait", "option": "FluxFinetuned",
                                                                 "async_mode": True, "aspect_ratio": "1:1",
                                                                 "webhook_url": f"{rx.base_url}/gen"})
                aid = r.json()["id"]
                fake.advance(1)
                asset = (await c.get(f"/asset/{aid}")).json()["data"]
                assert asset["status"] == "success"
                assert png_size((await c.get(asset["results"][0])).content) == (1024, 1024)
                got = await rx.wait_for(2)
                assert sorted(r.path for r in got) == ["/ft", "/gen"]

                fake.script("status", None, delay=0.3)
                with pytest.raises(httpx.ReadTimeout):
                    await c.get(f"/finetune/{word}", timeout=httpx.Timeout(5, read=0.05))
                fake.script("generate", 500)
                r = await c.post("/v2/image/text-2-image", json={"prompt": "x"})
                assert (r.status_code, r.text) == (500, "Internal Server Error")
    assert [r.kind for r in fake.requests][:3] == ["finetune", "status", "status"]
