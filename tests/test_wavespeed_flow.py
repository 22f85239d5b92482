"""The whole Apiframe flow with ``wavespeed`` as the only provider, against ``FakeWaveSpeed``
served on 127.0.0.1 and reached over real HTTP (no transport injection).

For ``gateway_url`` delivery and for callbacks the fake must reach the gateway too, so the
gateway app is also served by uvicorn on 127.0.0.1, on the test's own event loop, with
``server.public_base_url`` pointing at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import pytest
import uvicorn
from litestar import Litestar
from PIL import Image

from gateway.store import attempts as attempts_store
from tests.conftest import Api
from tests.fakes.wavespeed import FakeWaveSpeed, serve_on_loopback

ENGINE = {"min_poll_interval_s": 0.05, "max_poll_interval_s": 0.2, "poll_interval_s": 0.05}
ROUTING = {"training": {"providers": ["wavespeed"]}, "inference": {"providers": ["wavespeed"]}}


@pytest.fixture
def vendor() -> Iterator[tuple[FakeWaveSpeed, str]]:
    fake = FakeWaveSpeed(queue_s=0.1, training_s=0.3, generation_s=0.1)
    with serve_on_loopback(fake.app) as base_url:
        yield fake, base_url


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # leave pytest's handlers alone
        return contextlib.nullcontext()


@contextlib.asynccontextmanager
async def serve_here(app: Litestar, sock: socket.socket) -> AsyncIterator[None]:
    """Serve an app whose lifespan already runs (``make_api``) with uvicorn on this loop."""
    server = _Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, interface="asgi3"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def gateway(make_api: Callable[..., Any], fake: FakeWaveSpeed, base_url: str, *, delivery: str,
                  public: bool, callbacks: bool = False, engine: dict[str, float] | None = None,
                  timeout_s: float = 10) -> AsyncIterator[Api]:
    cfg: dict[str, Any] = {"api_key": fake.api_key, "base_url": base_url, "dataset_delivery": delivery,
                           "timeout_s": timeout_s, "poll_backoff_s": 0.05}
    if callbacks:
        cfg["webhook_secret"] = fake.webhook_secret
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:  # proto set: TCP_NODELAY
        sock.bind(("127.0.0.1", 0))
        server = {"public_base_url": f"http://127.0.0.1:{sock.getsockname()[1]}"} if public else {}
        async with make_api(providers={"wavespeed": cfg}, routing=ROUTING,
                            engine={**ENGINE, **(engine or {})}, server=server) as api:
            if not public:
                yield api
                return
            async with serve_here(api.app, sock):
                yield api


async def run_flow(api: Api) -> dict[str, Any]:
    """create → READY → generate (2 × 3:4 webp) → COMPLETED → download from the gateway."""
    start = await api.credits()
    r = await api.create_lora(15)
    assert r.status_code == 202, r.text
    lora = await api.wait_lora(r.json()["id"])
    assert lora["status"] == "READY", lora
    assert lora["hasWeights"] and lora["triggerWord"]
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={
        "prompt": "a portrait in a garden", "model": "flux-lora",
        "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 2, "aspect_ratio": "3:4", "output_format": "webp",
                           "seed": 7, "lora_strength": 0.9}})
    assert r.status_code == 202, r.text
    job = await api.wait_job(r.json()["jobId"])
    assert job["status"] == "COMPLETED", job
    for url in job["result"]["images"]:
        got = await api.client.get("/" + url.split("://", 1)[1].split("/", 1)[1])
        assert got.status_code == 200
        img = Image.open(io.BytesIO(got.content))
        assert (img.format, img.size) == ("WEBP", (864, 1152))
    assert await api.credits() == start - 2 - 255 - 4
    return lora


def check_vendor_saw(fake: FakeWaveSpeed, lora: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (train,), (gen,) = fake.of_kind("train"), fake.of_kind("generate")
    assert train.headers["authorization"] == f"Bearer {fake.api_key}"
    assert train.json["trigger_word"] == lora["triggerWord"] and train.json["steps"] == lora["steps"]
    assert train.json["lora_rank"] == lora["loraRank"]
    assert gen.json["prompt"] == f"{lora['triggerWord']} a portrait in a garden"
    assert gen.json["size"] == "864*1152" and gen.json["num_images"] == 2 and gen.json["seed"] == 7
    assert gen.json["output_format"] == "webp" and gen.json["loras"][0]["scale"] == 0.9
    assert all(fake.status(p) == "completed" for p in fake.predictions.values())
    assert all("authorization" not in r.headers for r in fake.of_kind("cdn") + fake.of_kind("put"))
    return train.json, gen.json


async def test_flow_upload_polling(make_api: Callable[..., Any], vendor: tuple[FakeWaveSpeed, str]) -> None:
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="upload", public=False) as api:
        lora = await run_flow(api)
    train, gen = check_vendor_saw(fake, lora)
    assert fake.of_kind("ticket") and fake.of_kind("put")[0].chunks >= 1
    assert train["data"].startswith(base_url + "/media/")
    ref = next(p.id for p in fake.predictions.values() if p.kind == "training")
    # no public URL: the stored weights were uploaded through the media API (never the vendor's own URL)
    assert gen["loras"][0]["path"].startswith(f"{base_url}/media/") and ref not in gen["loras"][0]["path"]
    assert fake.of_kind("train")[0].query == {} and not fake.deliveries


async def test_flow_gateway_url_polling(make_api: Callable[..., Any], vendor: tuple[FakeWaveSpeed, str]) -> None:
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="gateway_url", public=True) as api:
        public = api.gw.settings.server.public_base_url
        lora = await run_flow(api)
    train, gen = check_vendor_saw(fake, lora)
    assert not fake.of_kind("ticket") and not fake.of_kind("binary")
    assert train["data"].startswith(f"{public}/files/loras/{lora['id']}/dataset.zip?expires=")
    assert gen["loras"][0]["path"].startswith(f"{public}/files/loras/{lora['id']}/lora.safetensors?expires=")
    assert fake.of_kind("train")[0].query == {} and not fake.deliveries  # no secret: no callbacks asked for


async def test_flow_with_callbacks(make_api: Callable[..., Any], vendor: tuple[FakeWaveSpeed, str]) -> None:
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="upload", public=True, callbacks=True) as api:
        public = api.gw.settings.server.public_base_url
        lora = await run_flow(api)
        hook = f"{public}/hooks/wavespeed"
        queries = [r.query["webhook"] for r in fake.of_kind("train") + fake.of_kind("generate")]
        assert len(queries) == 2 and all(q.startswith(hook + "?attempt=") for q in queries)
        for _ in range(100):  # deliveries run in the fake's thread
            if len({d.headers["webhook-id"] for d in fake.deliveries}) >= 2:
                break
            await asyncio.sleep(0.05)
        first = {d.headers["webhook-id"]: d for d in fake.deliveries}
        assert len(first) == 2 and all(d.url.startswith(hook + "?attempt=") and d.status == 200 for d in first.values())
        adapter = api.gw.providers["wavespeed"]
        kinds = {(await adapter.verify_callback(d.headers, d.body)).kind for d in first.values()}
        assert kinds == {"training", "generation"}
    check_vendor_saw(fake, lora)


async def test_callback_makes_the_poll_due_now(make_api: Callable[..., Any], vendor: tuple[FakeWaveSpeed, str]) -> None:
    """With polls 5 s apart, only the signed callback can bring the LoRA to READY within 4 s."""
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="gateway_url", public=True, callbacks=True,
                       engine={"min_poll_interval_s": 5, "max_poll_interval_s": 30}) as api:
        r = await api.create_lora(15)
        lora = await api.wait_lora(r.json()["id"], timeout=4)
        assert lora["status"] == "READY", lora
        assert len(fake.of_kind("result")) <= 2  # the callback's poll (+ the fetch's status check)
        delivery = fake.deliveries[0]
        assert delivery.status == 200 and json.loads(delivery.response) == {"received": True, "applied": True}
        tampered = {**delivery.headers, "webhook-signature": "v3," + "0" * 64}
        hook = f"{api.gw.settings.server.public_base_url}/hooks/wavespeed"
        async with httpx.AsyncClient(trust_env=False) as client:
            refused = await client.post(hook, content=delivery.body, headers=tampered)
        assert refused.status_code == 401


# --------------------------------------------------------------------------- ambiguity only where it is


async def _attempts(api: Api, lora_id: str) -> list[Any]:

    async with api.gw.db.read() as conn:
        return await attempts_store.attempts_for(conn, "lora", lora_id)


async def test_upload_ticket_timeout_is_retried_not_counted_unknown(make_api: Callable[..., Any],
                                                                    vendor: tuple[FakeWaveSpeed, str]) -> None:
    """Nothing billable was sent when the upload ticket times out: retry (the same provider may be
    used again), never mark the provider 'unknown' for this LoRA."""
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="upload", public=False, timeout_s=0.5) as api:
        fake.script("ticket", None, delay=1.5)  # the first ticket request hangs past the timeout
        r = await api.create_lora(15)
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "READY", lora
        tries = await _attempts(api, lora["id"])
        assert [(a.provider, a.state) for a in tries] == [("wavespeed", "failed"), ("wavespeed", "succeeded")]
        assert "upload ticket" in tries[0].error and len(fake.of_kind("train")) == 1


async def test_proxy_502_after_acceptance_is_never_resubmitted(make_api: Callable[..., Any],
                                                               vendor: tuple[FakeWaveSpeed, str]) -> None:
    """A 502 that is not WaveSpeed's own error body may follow an acceptance: the training is
    never sent again (WaveSpeed cannot be asked by attempt id); with no other provider the LoRA
    fails and the 255 comes back."""
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="upload", public=False) as api:
        start = await api.credits()
        fake.script("train", 502, body=b"<html><body>502 Bad Gateway</body></html>", accept=True)
        r = await api.create_lora(15)
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED" and "outcome unknown" in lora["error"], lora
        assert len(fake.of_kind("train")) == 1  # it was accepted once, and never sent again
        assert [a.state for a in await _attempts(api, lora["id"])] == ["unknown"]
        assert await api.credits() == start  # 255 and 2 refunded: no training is known to have begun


async def test_vendor_5xx_refusal_is_retried_with_backoff(make_api: Callable[..., Any],
                                                          vendor: tuple[FakeWaveSpeed, str]) -> None:
    """A 500 in WaveSpeed's own {code, message} envelope is a refusal: nothing was created, so
    the same provider is tried again, after the retry backoff (not at once)."""
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="upload", public=False,
                       engine={"retry_backoff_s": 0.6}) as api:
        fake.script("train", 500)  # the fake's own envelope: {"code": 500, "message": ...}
        r = await api.create_lora(15)
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "READY", lora
        tries = await _attempts(api, lora["id"])
        assert [a.state for a in tries] == ["failed", "succeeded"]
        assert tries[1].created_at - tries[0].finished_at >= 0.55  # backed off before the resend
        assert len([p for p in fake.predictions.values() if p.kind == "training"]) == 1


async def test_deterministic_vendor_failure_is_not_retrained(make_api: Callable[..., Any],
                                                             vendor: tuple[FakeWaveSpeed, str]) -> None:
    """A `failed` prediction whose error is about the request (not the vendor's trouble) would
    fail again: no second training; a transient-looking one is tried once more."""
    fake, base_url = vendor
    async with gateway(make_api, fake, base_url, delivery="upload", public=False) as api:
        fake.fail_trainings = "invalid training data: caption files do not match the images"
        r = await api.create_lora(15)
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED" and "invalid training data" in lora["error"]
        assert len(fake.of_kind("train")) == 1
        fake.fail_trainings = "CUDA out of memory on worker 3"
        r = await api.create_lora(15)
        lora = await api.wait_lora(r.json()["id"])
        assert lora["status"] == "FAILED"
        assert len(fake.of_kind("train")) == 3  # retried once on the same (only) provider
