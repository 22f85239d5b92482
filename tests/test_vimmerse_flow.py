"""The whole Apiframe flow with ``vimmerse`` as the provider, against FakeVimmerse served on
127.0.0.1 and reached over real HTTP: training with Vimmerse's own trigger word (the client only
ever sees the gateway's), samples instead of weights, generation with the word swapped in,
re-encoding to the requested format, ignored parameters reported on the job, callbacks as hints,
and image-URL dataset delivery."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
from PIL import Image
from gateway.store import attempts as attempts_store
from gateway.store import loras as loras_store
from gateway.triggers import contains_word
from tests.conftest import Api
from tests.fakes.vimmerse import FakeVimmerse, serve_on_loopback
from tests.test_wavespeed_flow import serve_here

ENGINE = {"min_poll_interval_s": 0.05, "max_poll_interval_s": 0.2, "poll_interval_s": 0.05}
ROUTING = {"training": {"providers": ["vimmerse"]}, "inference": {"providers": ["vimmerse"]}}


@pytest.fixture
def vendor() -> Iterator[tuple[FakeVimmerse, str]]:
    fake = FakeVimmerse(queue_s=0.05, training_s=0.3, generation_s=0.2, seed=9)
    with serve_on_loopback(fake.app) as base_url:
        yield fake, base_url


@contextlib.asynccontextmanager
async def gateway(make_api: Callable[..., Any], fake: FakeVimmerse, base_url: str, *, public: bool = False,
                  routing: dict[str, Any] | None = None, extra: dict[str, Any] | None = None, **cfg: Any) -> AsyncIterator[Api]:
    provider = {"api_key": fake.api_key, "base_url": base_url, "timeout_s": 10, "poll_backoff_s": 0.05, **cfg}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        server = {"public_base_url": f"http://127.0.0.1:{sock.getsockname()[1]}"} if public else {}
        async with make_api(providers={"vimmerse": provider, **(extra or {})}, routing=routing or ROUTING,
                            engine=ENGINE, server=server) as api:
            if not public:
                yield api
                return
            async with serve_here(api.app, sock):
                yield api


async def generate(api: Api, lora_id: str, **params: Any) -> dict[str, Any]:
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={
        "prompt": "a portrait in a garden", "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id, **params}})
    assert r.status_code == 202, r.text
    return await api.wait_job(r.json()["jobId"])


async def fetch_image(api: Api, url: str) -> Image.Image:
    got = await api.client.get("/" + url.split("://", 1)[1].split("/", 1)[1])
    assert got.status_code == 200
    return Image.open(io.BytesIO(got.content))


async def test_flow_with_vimmerse(make_api: Callable[..., Any], vendor: tuple[FakeVimmerse, str]) -> None:
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url) as api:
        start = await api.credits()
        r = await api.create_lora(15)
        assert r.status_code == 202, r.text
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "READY", lora
        ft = fake.last_finetune
        # the client sees the gateway's word; Vimmerse made its own from it
        assert lora["triggerWord"] and lora["triggerWord"] != ft.trigger_word
        assert ft.trigger_word.startswith(lora["triggerWord"] + "_") and ft.image_count == 15
        assert ft.finetune_type == "Character" and ft.num_iterations == 0 and ft.option == "FluxProFinetune"
        assert not lora["hasWeights"] and lora["gateway"]["portable"] is False
        weights = await api.client.get(f"/v2/loras/{lora['id']}/weights", headers=api.h())
        assert weights.status_code == 409 and "stay with the provider" in weights.json()["error"]
        samples = lora["gateway"]["samples"]
        assert len(samples) == 2 and all("/files/loras/" in u for u in samples)  # copied into gateway storage
        assert (await fetch_image(api, samples[0])).format == "PNG"
        async with api.gw.db.read() as conn:
            row = await loras_store.get_lora(conn, lora["id"])
            (attempt,) = await attempts_store.attempts_for(conn, "lora", lora["id"])
        assert row.trained_attempt_id == attempt.id and attempt.provider_trigger_word == ft.trigger_word
        assert attempt.provider_ref == ft.trigger_word

        job = await generate(api, lora["id"], num_outputs=2, aspect_ratio="16:9", output_format="webp",
                             seed=7, lora_strength=0.8)
        assert job["status"] == "COMPLETED", job
        asset = fake.last_asset
        assert asset.prompt == f"{ft.trigger_word} a portrait in a garden"  # the vendor's word, swapped in
        assert not contains_word(asset.prompt, lora["triggerWord"])
        assert asset.quantity == 2 and asset.aspect_ratio == "16:9"
        assert job["gateway"]["ignoredParams"] == ["lora_strength", "seed"]  # set by the client, ignored here
        assert job["input"]["fluxLoraParams"] == {"loraId": lora["id"], "num_outputs": 2, "aspect_ratio": "16:9",
                                                  "output_format": "webp", "seed": 7, "lora_strength": 0.8}
        for url in job["result"]["images"]:
            img = await fetch_image(api, url)
            assert img.format == "WEBP" and img.size == (1344, 768)  # Vimmerse's png, re-encoded
        plain = await generate(api, lora["id"])  # only what the client set counts
        assert plain["status"] == "COMPLETED" and plain["gateway"]["ignoredParams"] == []
        assert (await fetch_image(api, plain["result"]["images"][0])).format == "PNG"  # kept as it came
        assert await api.credits() == start - 2 - 255 - 4 - 2


async def test_callbacks_are_hints_and_image_urls_delivery(make_api: Callable[..., Any],
                                                           vendor: tuple[FakeVimmerse, str]) -> None:
    """With a public URL the fake gets signed gateway URLs of each image, and a callback URL naming
    the attempt; its unsigned callbacks only make that attempt's poll due now."""
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, public=True, dataset_delivery="image_urls") as api:
        public = api.gw.settings.server.public_base_url
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        assert lora["status"] == "READY", lora
        form = fake.last_finetune.form
        assert form.file_count == 0 and len(form.image_urls) == 15
        assert all(u.startswith(f"{public}/files/loras/{lora['id']}/dataset/") for u in form.image_urls)
        async with api.gw.db.read() as conn:
            (attempt,) = await attempts_store.attempts_for(conn, "lora", lora["id"])
        assert form.value("webhook_url") == f"{public}/hooks/vimmerse?attempt={attempt.id}"
        for _ in range(100):  # the fake delivers from its own thread
            if fake.deliveries:
                break
            await asyncio.sleep(0.05)
        (delivery,) = fake.deliveries
        assert delivery.status == 200 and delivery.url.endswith(f"?attempt={attempt.id}")
        forged = await api.client.post(f"/hooks/vimmerse?attempt={attempt.id}", json={"status": "fail"})
        assert forged.status_code == 200 and forged.json() == {"received": True, "applied": False}  # READY already
        assert (await api.client.post("/hooks/vimmerse", json={})).status_code == 401  # names no attempt


async def test_a_vimmerse_lora_generates_only_on_vimmerse(make_api: Callable[..., Any],
                                                          vendor: tuple[FakeVimmerse, str]) -> None:
    """Not portable: with the sandbox first in the inference route, the job still goes to Vimmerse."""
    fake, base_url = vendor
    routing = {"training": {"providers": ["vimmerse"]}, "inference": {"providers": ["sandbox", "vimmerse"]}}
    async with gateway(make_api, fake, base_url, routing=routing, extra={"sandbox": {}}) as api:
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        job = await generate(api, lora["id"])
        assert job["status"] == "COMPLETED"
        async with api.gw.db.read() as conn:
            (attempt,) = await attempts_store.attempts_for(conn, "job", job["id"])
        assert attempt.provider == "vimmerse"


async def test_no_trigger_word_in_the_answer_fails_the_lora_refunded(make_api: Callable[..., Any],
                                                                     vendor: tuple[FakeVimmerse, str]) -> None:
    fake, base_url = vendor
    fake.create_variant = "missing"
    async with gateway(make_api, fake, base_url) as api:
        start = await api.credits()
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        assert lora["status"] == "FAILED" and "no trigger word" in lora["error"]
        assert len(fake.of_kind("finetune")) == 2  # retryable: the same provider once more
        assert await api.credits() == start  # 255 refunded, and 2: it never trained here


async def test_generation_uses_the_attempt_that_trained(make_api: Callable[..., Any],
                                                        vendor: tuple[FakeVimmerse, str]) -> None:
    """The READY LoRA is pinned to the attempt that trained it: an attempt row written later (of
    any provider, with another vendor word) cannot change the word generation sends."""
    from gateway.engine.attempts import new_attempt

    fake, base_url = vendor
    async with gateway(make_api, fake, base_url) as api:
        lora = await api.wait_lora((await api.create_lora(15)).json()["id"])
        word = fake.last_finetune.trigger_word
        later = new_attempt("lora", lora["id"], 2, api.gw.providers["vimmerse"], 0)
        async with api.gw.db.tx() as conn:
            await attempts_store.insert_attempt(conn, later)
            await attempts_store.update_attempt(conn, later.id, state="failed", provider_trigger_word="BOGUS_WORD",
                                      provider_ref="BOGUS_WORD")
        job = await generate(api, lora["id"])
        assert job["status"] == "COMPLETED" and fake.last_asset.prompt.startswith(word + " ")


async def test_a_hint_polls_now_at_most_every_few_seconds(make_api: Callable[..., Any],
                                                          vendor: tuple[FakeVimmerse, str]) -> None:
    fake, base_url = vendor
    fake.training_s = 3600  # it trains for good; polls are minutes apart
    async with gateway(make_api, fake, base_url, public=True) as api:
        lora_id = (await api.create_lora(15)).json()["id"]

        async def training() -> Any:
            async with api.gw.db.read() as conn:
                tries = await attempts_store.attempts_for(conn, "lora", lora_id)
                row = await loras_store.get_lora(conn, lora_id)
            return tries[-1] if tries and tries[-1].state in ("queued", "running") and row.lease_owner is None else None

        for _ in range(200):
            if attempt := await training():
                break
            await asyncio.sleep(0.05)
        assert attempt
        async with api.gw.db.tx() as conn:  # the next poll far away: only a hint brings it forward
            await loras_store.update_lora(conn, lora_id, next_run_at=10**11)
        first = await api.client.post(f"/hooks/vimmerse?attempt={attempt.id}", json={"anything": 1})
        second = await api.client.post(f"/hooks/vimmerse?attempt={attempt.id}", json={"anything": 2})
        assert first.json()["applied"] is True and second.json()["applied"] is False  # rate-limited
        other = await api.client.post(f"/hooks/vimmerse?attempt={'0' * 8}-0000-0000-0000-{'0' * 12}", json={})
        assert other.status_code == 200 and other.json()["applied"] is False
