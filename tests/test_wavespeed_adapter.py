"""The WaveSpeed adapter against ``FakeWaveSpeed`` in-process: wire format both ways, uploads,
polling, errors, artifacts and signed callbacks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import msgspec
import pytest
from PIL import Image

from gateway.imaging import SIZES
from plugins import manager as plugin_manager
from plugins.storage.local import LocalStorage, LocalStorageConfig
from providers.base import (
    Dataset, GenerationSpec, LoraHandle, ProviderAuthError, ProviderError, ProviderRateLimited,
    ProviderOutcomeUnknown, ProviderRejected, ProviderSetup, ProviderTimeout, ProviderUnavailable, TrainingSpec,
)
from providers.sandbox import build_lora_safetensors
from providers.wavespeed import WaveSpeedAdapter, WaveSpeedConfig, _Prediction
from tests.fakes.wavespeed import FakeWaveSpeed, check_zip, sign
from tests.images import make_image

WORD = "K7XQZ"
BASE = "http://wavespeed.test"
PUBLIC = "https://gw.example.com"


@pytest.fixture
async def fake() -> AsyncIterator[FakeWaveSpeed]:
    f = FakeWaveSpeed()
    yield f
    await f.aclose()


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
async def make(tmp_path: Path, fake: FakeWaveSpeed) -> AsyncIterator[Callable[..., WaveSpeedAdapter]]:
    """Build an adapter whose clients reach ``fake`` the way the gateway injects transports."""
    made: list[WaveSpeedAdapter] = []

    def build(*, public_base_url: str | None = None, transport: httpx.AsyncBaseTransport | None = None,
              **cfg: Any) -> WaveSpeedAdapter:
        def http_client(**kwargs: Any) -> httpx.AsyncClient:
            kwargs.setdefault("transport", transport or fake.transport())
            return httpx.AsyncClient(**kwargs)

        setup = ProviderSetup(storage=LocalStorage(LocalStorageConfig(), tmp_path), data_dir=tmp_path,
                              public_base_url=public_base_url, http_client=http_client)
        config = msgspec.convert({"api_key": fake.api_key, "base_url": BASE, **cfg}, WaveSpeedConfig)
        adapter = WaveSpeedAdapter(config, setup)
        adapter.sleep = Sleeps()
        made.append(adapter)
        return adapter

    yield build
    for adapter in made:
        await adapter.aclose()


def make_zip(root: Path, n: int = 4, word: str = WORD, pad: int = 0, caption: str | None = None) -> Dataset:
    """A dataset zip laid out as the gateway writes it (``NNN.jpg`` + ``NNN.txt``)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(1, n + 1):
            zf.writestr(f"{i:03d}.jpg", make_image(seed=i))
            zf.writestr(f"{i:03d}.txt", caption if caption is not None else f"a photo of {word}, smiling")
        if pad:
            zf.writestr("padding.bin", os.urandom(pad), compress_type=zipfile.ZIP_STORED)
    return Dataset(zip_path=path, directory=root, image_count=n)


def tspec(**kw: Any) -> TrainingSpec:
    base = dict(attempt_id="att-1", lora_id="lora-1", name="Ada", subject_kind="person", steps=1000,
                lora_rank=16, trigger_word=WORD)
    return TrainingSpec(**{**base, **kw})


def gspec(**kw: Any) -> GenerationSpec:
    base = dict(attempt_id="att-g", job_id="job-1", prompt=f"{WORD} in a garden", num_outputs=2, aspect_ratio="3:4",
                width=864, height=1152, output_format="webp", lora_strength=0.8, seed=42)
    return GenerationSpec(**{**base, **kw})


def handle(**kw: Any) -> LoraHandle:
    return LoraHandle(**{"lora_id": "lora-1", "trigger_word": WORD, **kw})


async def trained(adapter: WaveSpeedAdapter, fake: FakeWaveSpeed, tmp_path: Path) -> str:
    sub = await adapter.start_training(tspec(), make_zip(tmp_path / "ds"))
    fake.advance(10)
    return sub.ref


# --------------------------------------------------------------------------- pure conversions


def test_training_to_wire() -> None:
    cfg = WaveSpeedConfig(api_key="k", learning_rate=0.0002)
    body = WaveSpeedAdapter.training_to_wire(tspec(steps=1500, lora_rank=32), "https://x/d.zip", cfg)
    assert msgspec.to_builtins(body) == {"data": "https://x/d.zip", "trigger_word": WORD, "steps": 1500,
                                         "lora_rank": 32, "learning_rate": 0.0002}
    with pytest.raises(ProviderRejected):
        WaveSpeedAdapter.training_to_wire(tspec(steps=3500), "https://x", WaveSpeedConfig(api_key="k", max_steps=3000))


def test_generation_to_wire() -> None:
    body = msgspec.to_builtins(WaveSpeedAdapter.generation_to_wire(gspec(output_format="jpg", seed=None), "https://l"))
    assert body == {"prompt": f"{WORD} in a garden", "loras": [{"path": "https://l", "scale": 0.8}], "size": "864*1152",
                    "num_images": 2, "seed": -1, "guidance_scale": 3.5, "num_inference_steps": 28, "output_format": "jpeg"}
    assert WaveSpeedAdapter.generation_to_wire(gspec(), "p").seed == 42
    for w, h in ((1000, 1024), (1024, 1552), (240, 256)):
        with pytest.raises(ProviderRejected):
            WaveSpeedAdapter.generation_to_wire(gspec(width=w, height=h), "p")


@pytest.mark.parametrize("ratio", sorted(SIZES))
def test_every_gateway_size_fits_wavespeed(ratio: str) -> None:
    w, h = SIZES[ratio]
    body = WaveSpeedAdapter.generation_to_wire(gspec(aspect_ratio=ratio, width=w, height=h), "p")
    assert body.size == f"{w}*{h}" and all(v % 16 == 0 and 256 <= v <= 1536 for v in (w, h))


@pytest.mark.parametrize(("status", "state", "retryable"), [
    ("created", "queued", False), ("processing", "running", False),
    ("failed", "failed", False),  # "boom": nothing says the vendor was at fault, so it would fail again
    ("timeout", "failed", True), ("cancelled", "failed", False), ("deleted", "failed", False),
    ("warming-up", "running", False),  # an unknown word is treated as still running
])
def test_training_from_wire(status: str, state: str, retryable: bool) -> None:
    got = WaveSpeedAdapter.training_from_wire(_Prediction(id="p1", status=status, error="boom"))
    assert (got.state, got.retryable) == (state, retryable)
    if state == "failed":
        assert "boom" in (got.error or "") and status in (got.error or "")


def test_from_wire_completed() -> None:
    done = WaveSpeedAdapter.training_from_wire(_Prediction(id="p", status="completed", outputs=["https://cdn/x.safetensors"]))
    assert (done.state, done.artifact_url) == ("succeeded", "https://cdn/x.safetensors")
    empty = WaveSpeedAdapter.training_from_wire(_Prediction(id="p", status="completed", outputs=[]))
    assert empty.state == "failed" and empty.retryable
    gen = WaveSpeedAdapter.generation_from_wire(_Prediction(id="g", status="completed", outputs=["u1", "u2"]))
    assert gen.state == "succeeded" and gen.ref == "g" and [i.url for i in gen.images] == ["u1", "u2"]
    assert WaveSpeedAdapter.generation_from_wire(_Prediction(id="g", status="processing")).state == "running"


def test_config_and_capabilities(make: Callable[..., WaveSpeedAdapter]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({}, WaveSpeedConfig)  # api_key is required
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"api_key": "k", "nope": 1}, WaveSpeedConfig)
    cfg = WaveSpeedConfig(api_key="sk-secret", webhook_secret="whsec_x")
    assert "sk-secret" not in repr(cfg) and "whsec_x" not in repr(cfg)
    assert (cfg.base_url, cfg.learning_rate, cfg.default_rank, cfg.max_steps) == ("https://api.wavespeed.ai", 0.0004, 16, 4000)
    caps = make().capabilities
    assert caps.training and caps.inference
    assert (caps.training.min_steps, caps.training.max_steps, caps.training.min_rank, caps.training.max_rank) == (500, 4000, 1, 64)
    assert caps.training.dataset_input == "zip" and caps.training.produces_artifact  # it uploads the zip itself
    assert caps.inference.max_outputs == 4 and len(caps.inference.aspect_ratios) == 7
    assert caps.inference.output_formats == {"png", "jpg", "webp"}
    assert (caps.cost.per_image, caps.cost.per_training) == (0.015, 1.0)
    assert caps.can_cancel and not caps.can_lookup and not caps.webhooks_in
    assert make(public_base_url=PUBLIC, webhook_secret="whsec_x").capabilities.webhooks_in


def test_registered_through_the_hook() -> None:
    pm = plugin_manager.make_plugin_manager(load_entrypoints=False)  # a default plugin
    assert plugin_manager.providers(pm)["wavespeed"] is WaveSpeedAdapter


def test_fake_zip_check() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("001.jpg", make_image())
        zf.writestr("001.txt", f"{WORD}s at home")  # not a whole word
    assert "trigger word" in (check_zip(buf.getvalue(), WORD, min_images=1) or "")
    assert check_zip(b"nope", WORD) == "data is not a zip file"


# --------------------------------------------------------------------------- training over the fake


async def test_training_via_upload_ticket(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make()
    ds = make_zip(tmp_path / "ds", pad=700_000)
    sub = await adapter.start_training(tspec(steps=1200, lora_rank=8), ds)
    ticket, put, train = fake.of_kind("ticket")[0], fake.of_kind("put")[0], fake.of_kind("train")[0]
    zip_bytes = ds.zip_path.read_bytes()
    assert ticket.json == {"filename": "dataset.zip", "size": len(zip_bytes), "content_type": "application/zip"}
    assert put.method == "PUT" and put.body == zip_bytes and put.chunks > 1  # streamed from disk
    assert "authorization" not in put.headers and put.headers["x-fake-upload-token"]
    assert train.path == "/api/v3/wavespeed-ai/flux-dev-lora-trainer" and train.query == {}
    assert train.headers["authorization"] == f"Bearer {fake.api_key}"
    assert train.json["data"].startswith(BASE + "/media/") and train.json["data"].endswith("/dataset.zip")
    assert {k: train.json[k] for k in ("trigger_word", "steps", "lora_rank", "learning_rate")} == {
        "trigger_word": WORD, "steps": 1200, "lora_rank": 8, "learning_rate": 0.0004}

    assert (await adapter.training_status(sub.ref)).state == "queued"
    fake.advance(0.15)
    assert (await adapter.training_status(sub.ref)).state == "running"
    fake.advance(1)
    status = await adapter.training_status(sub.ref)
    assert status.state == "succeeded" and status.artifact_url == f"{BASE}/cdn/output/{sub.ref}.safetensors"
    dest = tmp_path / "out" / "lora.safetensors"
    dest.parent.mkdir()
    await adapter.fetch_file(status.artifact_url, dest, max_bytes=10_000_000)
    header = json.loads(dest.read_bytes()[8:8 + int.from_bytes(dest.read_bytes()[:8], "little")])
    assert header["__metadata__"]["trigger_word"] == WORD
    cdn = fake.of_kind("cdn")
    assert cdn and all("authorization" not in r.headers for r in cdn)  # the key never leaves the API host
    assert all(r.headers.get("authorization") == f"Bearer {fake.api_key}" for r in fake.of_kind("result"))
    assert list(dest.parent.iterdir()) == [dest]  # no partial file left behind


async def test_binary_upload_fallback(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    fake.ticket_upload = False
    adapter = make()
    ds = make_zip(tmp_path / "ds", pad=600_000)
    await adapter.start_training(tspec(), ds)
    await adapter.start_training(tspec(attempt_id="att-2"), ds)
    assert len(fake.of_kind("ticket")) == 1  # remembered: the second upload goes straight to binary
    binaries = fake.of_kind("binary")
    assert len(binaries) == 2 and binaries[0].chunks > 1
    assert binaries[0].headers["authorization"] == f"Bearer {fake.api_key}"
    assert list(fake.uploads.values()) == [ds.zip_path.read_bytes()] * 2
    assert fake.of_kind("train")[0].json["data"].endswith("/dataset.zip")
    fake.advance(10)
    assert all(fake.status(p) == "completed" for p in fake.predictions.values())


async def test_gateway_url_delivery(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    ds = make_zip(tmp_path / "ds")
    served: list[str] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        served.append(str(request.url))
        return httpx.Response(200, content=ds.zip_path.read_bytes())

    fake.fetch_transport = httpx.MockTransport(gateway)
    adapter = make(dataset_delivery="gateway_url", public_base_url=PUBLIC)
    signed = f"{PUBLIC}/files/loras/l1/dataset.zip?expires=1&sig=ab"
    sub = await adapter.start_training(tspec(), Dataset(zip_path=ds.zip_path, directory=ds.directory, image_count=4, zip_url=signed))
    assert fake.of_kind("train")[0].json["data"] == signed and served == [signed]
    assert not fake.of_kind("ticket") and not fake.of_kind("binary")
    fake.advance(10)
    assert (await adapter.training_status(sub.ref)).state == "succeeded"

    with pytest.raises(ProviderRejected, match="public_base_url"):
        await make(dataset_delivery="gateway_url").start_training(tspec(), ds)
    assert len(fake.of_kind("train")) == 1


async def test_bad_dataset_fails_the_training(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make()
    sub = await adapter.start_training(tspec(), make_zip(tmp_path / "ds", caption="a photo of a person"))
    fake.advance(10)
    status = await adapter.training_status(sub.ref)
    assert status.state == "failed" and "001.txt does not contain the trigger word" in (status.error or "")


async def test_failed_training(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    fake.fail_trainings = "CUDA out of memory"
    adapter = make()
    ref = await trained(adapter, fake, tmp_path)
    status = await adapter.training_status(ref)
    assert status.state == "failed" and status.retryable and "CUDA out of memory" in (status.error or "")


@pytest.mark.parametrize(("final", "retryable"), [("cancelled", False), ("timeout", True), ("deleted", False)])
async def test_other_terminal_statuses(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path,
                                       final: str, retryable: bool) -> None:
    fake.final_status = final
    adapter = make()
    status = await adapter.training_status(await trained(adapter, fake, tmp_path))
    assert (status.state, status.retryable) == ("failed", retryable) and final in (status.error or "")


async def test_cancel_is_best_effort(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make()
    sub = await adapter.start_training(tspec(), make_zip(tmp_path / "ds"))
    await adapter.cancel_training(sub.ref)
    assert fake.of_kind("cancel")[0].path == f"/api/v3/predictions/{sub.ref}/cancel"
    status = await adapter.training_status(sub.ref)
    assert status.state == "failed" and "cancelled" in (status.error or "")
    await adapter.cancel_training(sub.ref)  # already terminal: the vendor's 400 is swallowed
    fake.script("cancel", 500)
    with pytest.raises(ProviderUnavailable):
        await adapter.cancel_training(sub.ref)


# --------------------------------------------------------------------------- errors


async def test_wrong_key_is_an_auth_error(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make(api_key="ws-wrong-key")
    with pytest.raises(ProviderAuthError) as e:
        await adapter.training_status("abc123")
    assert not e.value.retryable and "401" in e.value.message
    assert fake.requests[-1].headers["authorization"] == "Bearer ws-wrong-key"
    assert "ws-wrong-key" not in e.value.message and "ws-wrong-key" not in capsys.readouterr().err


async def test_403_on_submit(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    fake.script("train", 403)
    with pytest.raises(ProviderAuthError) as e:
        await make().start_training(tspec(), make_zip(tmp_path / "ds"))
    assert not e.value.retryable and "403" in e.value.message


@pytest.mark.parametrize(("retry_after", "expected"), [("7", 7.0), ("0.5", 0.5), ("soon", None), (None, None)])
async def test_429_carries_retry_after(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed,
                                       retry_after: str | None, expected: float | None) -> None:
    fake.script("result", 429, retry_after=retry_after)
    with pytest.raises(ProviderRateLimited) as e:
        await make().training_status("abc123")
    assert e.value.retryable and e.value.retry_after == expected


async def test_429_retry_after_as_http_date(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed) -> None:
    fake.script("result", 429, retry_after=time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60)))
    with pytest.raises(ProviderRateLimited) as e:
        await make().training_status("abc123")
    assert e.value.retry_after is not None and 55 <= e.value.retry_after <= 61


@pytest.mark.parametrize(("status", "error", "retryable"), [
    (500, ProviderUnavailable, True), (503, ProviderUnavailable, True), (400, ProviderRejected, False),
    (402, ProviderError, True), (404, ProviderRejected, False),
])
async def test_http_errors_map_onto_the_tree(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path,
                                             status: int, error: type, retryable: bool) -> None:
    fake.script("generate", status)
    with pytest.raises(error) as e:
        await make().generate(gspec(), handle(artifact_url="https://gw/a.safetensors"))
    assert e.value.retryable is retryable and str(status) in e.value.message
    assert len(fake.of_kind("generate")) == 1


async def test_error_code_inside_a_200_envelope(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed) -> None:
    fake.script("result", 200, body=json.dumps({"code": 500, "message": "internal", "data": None}).encode())
    with pytest.raises(ProviderUnavailable):
        await make().training_status("abc123")


async def test_get_timeouts_are_retried(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make(timeout_s=0.05, poll_backoff_s=0.5)
    ref = await trained(adapter, fake, tmp_path)
    fake.script("result", None, delay=1, times=2)
    before = len(fake.of_kind("result"))
    assert (await adapter.training_status(ref)).state == "succeeded"
    assert len(fake.of_kind("result")) - before == 3 and adapter.sleep == [0.5, 1.0]


async def test_get_timeouts_give_up(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed) -> None:
    adapter = make(timeout_s=0.05, poll_retries=2, poll_backoff_s=0.1)
    fake.script("result", None, delay=1, times=5)
    with pytest.raises(ProviderTimeout) as e:
        await adapter.generation_status("abc123")
    assert e.value.retryable and len(fake.of_kind("result")) == 3 and adapter.sleep == [0.1, 0.2]


async def test_submit_is_never_retried(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    """A timeout after the billable submit was sent is ambiguous (it may have been accepted)."""
    adapter = make(timeout_s=0.05)
    fake.script("train", None, delay=1)
    with pytest.raises(ProviderOutcomeUnknown, match="may have been received"):
        await adapter.start_training(tspec(), make_zip(tmp_path / "ds"))
    assert len(fake.of_kind("train")) == 1 and adapter.sleep == []
    fake.script("generate", None, delay=1)
    with pytest.raises(ProviderOutcomeUnknown):
        await adapter.generate(gspec(), handle(artifact_url="https://gw/a.safetensors"))
    assert len(fake.of_kind("generate")) == 1


async def test_upload_ticket_timeout_is_not_ambiguous(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed,
                                                      tmp_path: Path) -> None:
    """Nothing billable has been sent yet: a plain retryable timeout."""
    adapter = make(timeout_s=0.05)
    fake.script("ticket", None, delay=1)
    with pytest.raises(ProviderTimeout) as e:
        await adapter.start_training(tspec(), make_zip(tmp_path / "ds"))
    assert e.value.retryable and not isinstance(e.value, ProviderOutcomeUnknown)
    assert fake.of_kind("train") == []


@pytest.mark.parametrize(("status", "body", "error"), [
    (502, b"<html>502 Bad Gateway</html>", ProviderOutcomeUnknown),  # a proxy's page: maybe accepted
    (504, b"", ProviderOutcomeUnknown),
    (500, None, ProviderUnavailable),  # WaveSpeed's own {code, message} envelope: a refusal
    (503, None, ProviderUnavailable),
])
async def test_submit_5xx_is_ambiguous_only_without_the_vendor_envelope(
        make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path,
        status: int, body: bytes | None, error: type) -> None:
    fake.script("train", status, body=body)
    with pytest.raises(ProviderError) as e:
        await make().start_training(tspec(), make_zip(tmp_path / "ds"))
    assert type(e.value) is error and e.value.retryable
    fake.script("result", status, body=body, times=4)  # a status GET is never ambiguous
    with pytest.raises(ProviderUnavailable):
        await make().training_status("abc123")


@pytest.mark.parametrize(("error", "retryable"), [
    ("CUDA out of memory", True), ("internal server error", True), ("job timed out", True),
    ("GPU worker died", True), ("invalid zip: no images", False), ("content policy violation", False), (None, False),
])
def test_failed_prediction_retryable_by_its_error(error: str | None, retryable: bool) -> None:
    got = WaveSpeedAdapter.training_from_wire(_Prediction(id="p1", status="failed", error=error))
    assert got.retryable is retryable
    assert WaveSpeedAdapter.generation_from_wire(_Prediction(id="g1", status="failed", error=error)).retryable is retryable


async def test_connect_error_on_submit_is_unavailable(make: Callable[..., WaveSpeedAdapter], tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    adapter = make(transport=httpx.MockTransport(refuse), dataset_delivery="gateway_url", public_base_url=PUBLIC)
    ds = make_zip(tmp_path / "ds")
    with pytest.raises(ProviderUnavailable, match="could not connect"):
        await adapter.start_training(tspec(), Dataset(zip_path=ds.zip_path, directory=ds.directory, image_count=4, zip_url="https://gw/z"))


# --------------------------------------------------------------------------- artifacts and images


async def test_truncated_artifact(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    fake.truncate_artifacts = True
    adapter = make()
    status = await adapter.training_status(await trained(adapter, fake, tmp_path))
    dest = tmp_path / "lora.safetensors"
    with pytest.raises(ProviderError, match="not whole") as e:
        await adapter.fetch_file(status.artifact_url or "", dest, max_bytes=10_000_000)
    assert e.value.retryable and not dest.exists() and not list(tmp_path.glob(".*.part"))


async def test_oversize_artifact_is_aborted(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make()
    status = await adapter.training_status(await trained(adapter, fake, tmp_path))
    dest = tmp_path / "lora.safetensors"
    with pytest.raises(ProviderError, match="limit") as e:
        await adapter.fetch_file(status.artifact_url or "", dest, max_bytes=1000)
    assert e.value.retryable and not dest.exists()


async def test_oversize_stream_without_length_is_aborted(make: Callable[..., WaveSpeedAdapter], tmp_path: Path) -> None:
    async def endless() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 65536

    seen: list[httpx.Request] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=endless())

    adapter = make(transport=httpx.MockTransport(cdn))
    dest = tmp_path / "lora.safetensors"
    with pytest.raises(ProviderError, match="limit") as e:
        await adapter.fetch_file("https://cdn.example/out.safetensors", dest, max_bytes=200_000)
    assert e.value.retryable and not dest.exists() and "authorization" not in seen[0].headers


async def test_download_retries_5xx(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make()
    status = await adapter.training_status(await trained(adapter, fake, tmp_path))
    fake.script("cdn", 502, times=2)
    await adapter.fetch_file(status.artifact_url or "", tmp_path / "lora.safetensors", max_bytes=10_000_000)
    assert len(fake.of_kind("cdn")) == 3 and adapter.sleep == [0.5, 1.0]
    fake.script("cdn", 404)
    with pytest.raises(ProviderError, match="404"):
        await adapter.fetch_file(status.artifact_url or "", tmp_path / "again.safetensors", max_bytes=10_000_000)


async def test_generation(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make()
    artifact = (await adapter.training_status(await trained(adapter, fake, tmp_path))).artifact_url
    status = await adapter.generate(gspec(), handle(artifact_url=artifact))
    assert status.state == "queued" and status.ref
    req = fake.of_kind("generate")[0]
    assert req.path == "/api/v3/wavespeed-ai/flux-dev-lora" and req.headers["authorization"] == f"Bearer {fake.api_key}"
    assert req.json == {"prompt": f"{WORD} in a garden", "loras": [{"path": artifact, "scale": 0.8}], "size": "864*1152",
                        "num_images": 2, "seed": 42, "guidance_scale": 3.5, "num_inference_steps": 28, "output_format": "webp"}
    fake.advance(10)
    done = await adapter.generation_status(status.ref)
    assert done.state == "succeeded" and len(done.images) == 2
    for i, img in enumerate(done.images):
        dest = tmp_path / f"raw{i}"
        await adapter.fetch_file(img.url or "", dest, max_bytes=50_000_000)  # not a .safetensors: no header check
        with Image.open(dest) as im:
            assert (im.format, im.size) == ("WEBP", (864, 1152))


async def test_generation_with_a_bad_lora_fails(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed) -> None:
    adapter = make()
    ref = (await adapter.generate(gspec(), handle(artifact_url=f"{BASE}/cdn/output/nothing.safetensors"))).ref
    fake.advance(10)
    status = await adapter.generation_status(ref or "")
    assert status.state == "failed" and "could not load LoRA" in (status.error or "")


async def test_lora_path_choice(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    """The gateway's signed URL when there is one; else the stored weights, uploaded through the
    media API once per LoRA while the upload lasts; never the vendor's own (expiring) output URL."""
    adapter = make()
    ref = await trained(adapter, fake, tmp_path)
    await adapter.generate(gspec(), handle(trained_by="wavespeed", trained_ref=ref, artifact_url="https://gw/files/x"))
    assert fake.of_kind("generate")[-1].json["loras"][0]["path"] == "https://gw/files/x"
    weights = tmp_path / "stored.safetensors"
    weights.write_bytes(build_lora_safetensors(seed=1, ref="r", rank=4, meta={}))
    stored = handle(trained_by="wavespeed", trained_ref=ref, artifact_path=weights, artifact_sha256="abc")
    tickets = len(fake.of_kind("ticket"))
    for _ in range(2):
        await adapter.generate(gspec(), stored)
    path = fake.of_kind("generate")[-1].json["loras"][0]["path"]
    assert path.startswith(f"{BASE}/media/") and f"/cdn/output/{ref}" not in path
    assert len(fake.of_kind("ticket")) == tickets + 1  # uploaded once, reused
    assert fake.of_kind("ticket")[-1].json["content_type"] == "application/octet-stream"
    adapter.clock = lambda: time.time() + 2 * 86_400  # past weights_upload_ttl_s: uploaded again
    await adapter.generate(gspec(), stored)
    assert len(fake.of_kind("ticket")) == tickets + 2
    for lora in (handle(trained_by="wavespeed", trained_ref=ref), handle()):  # nothing stored to send
        with pytest.raises(ProviderRejected, match="no stored weights"):
            await adapter.generate(gspec(), lora)


async def test_fetch_refuses_other_schemes(make: Callable[..., WaveSpeedAdapter], tmp_path: Path) -> None:
    with pytest.raises(ProviderRejected):
        await make().fetch_file("file:///etc/passwd", tmp_path / "x", max_bytes=10)


# --------------------------------------------------------------------------- callbacks


def signed(secret: str, body: bytes, *, ts: int | None = None, wid: str = "msg_1") -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, wid, ts, body)}


BODY = json.dumps({"id": "pred123", "model": "wavespeed-ai/flux-dev-lora-trainer", "status": "completed",
                   "outputs": ["https://cdn/x.safetensors"]}).encode()


async def test_callback_signature_valid(make: Callable[..., WaveSpeedAdapter]) -> None:
    adapter = make(webhook_secret="whsec_c2VjcmV0", public_base_url=PUBLIC)
    event = await adapter.verify_callback(signed("whsec_c2VjcmV0", BODY), BODY)
    assert (event.ref, event.kind) == ("pred123", "training")
    gen = BODY.replace(b"flux-dev-lora-trainer", b"flux-dev-lora")
    assert (await adapter.verify_callback(signed("whsec_c2VjcmV0", gen), gen)).kind == "generation"
    several = signed("whsec_c2VjcmV0", BODY)
    several["webhook-signature"] = "v3,00ff " + several["webhook-signature"]
    assert (await adapter.verify_callback(several, BODY)).ref == "pred123"


async def test_callback_whsec_prefix_is_stripped_not_base64_decoded(make: Callable[..., WaveSpeedAdapter]) -> None:
    adapter = make(webhook_secret="whsec_c2VjcmV0", public_base_url=PUBLIC)
    assert (await adapter.verify_callback(signed("c2VjcmV0", BODY), BODY)).ref == "pred123"  # same key without prefix
    ts, wid = int(time.time()), "msg_2"
    decoded_key = base64.b64decode("c2VjcmV0")  # the Standard Webhooks recipe, which WaveSpeed does not use
    sig = hmac.new(decoded_key, f"{wid}.{ts}.".encode() + BODY, hashlib.sha256).hexdigest()
    with pytest.raises(ProviderAuthError):
        await adapter.verify_callback({"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": f"v3,{sig}"}, BODY)
    bare = make(webhook_secret="c2VjcmV0", public_base_url=PUBLIC)  # configured without the prefix
    assert (await bare.verify_callback(signed("whsec_c2VjcmV0", BODY), BODY)).ref == "pred123"


@pytest.mark.parametrize("case", ["wrong_secret", "stale", "future", "tampered", "missing", "bad_scheme", "not_json",
                                  "no_secret", "non_ascii_signature", "unicode_digits"])
async def test_callback_rejected(make: Callable[..., WaveSpeedAdapter], case: str) -> None:
    adapter = make(webhook_secret=None if case == "no_secret" else "whsec_c2VjcmV0", public_base_url=PUBLIC)
    adapter.clock = lambda: 1_700_000_000.0
    body, headers = BODY, signed("whsec_c2VjcmV0", BODY, ts=1_700_000_000 - 100)
    if case == "wrong_secret":
        headers = signed("whsec_other", BODY, ts=1_700_000_000)
    elif case == "stale":
        headers = signed("whsec_c2VjcmV0", BODY, ts=1_700_000_000 - 301)
    elif case == "future":
        headers = signed("whsec_c2VjcmV0", BODY, ts=1_700_000_000 + 301)
    elif case == "tampered":
        body = BODY.replace(b"pred123", b"pred999")
    elif case == "missing":
        headers.pop("webhook-id")
    elif case == "bad_scheme":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v3,", "v1,")
    elif case == "non_ascii_signature":
        headers["webhook-signature"] = "v3,\u00e9\u00e9"
    elif case == "unicode_digits":
        headers["webhook-timestamp"] = "\u00b2"
    elif case == "not_json":
        body, headers = b"[1, 2", signed("whsec_c2VjcmV0", b"[1, 2", ts=1_700_000_000)
    with pytest.raises(ProviderAuthError):
        await adapter.verify_callback(headers, body)


async def test_fake_delivers_a_verifiable_webhook(make: Callable[..., WaveSpeedAdapter], fake: FakeWaveSpeed, tmp_path: Path) -> None:
    adapter = make(public_base_url=PUBLIC, webhook_secret=fake.webhook_secret)
    received: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    fake.fetch_transport = httpx.MockTransport(gateway)
    sub = await adapter.start_training(tspec(), make_zip(tmp_path / "ds"))
    assert fake.of_kind("train")[0].query == {"webhook": f"{PUBLIC}/hooks/wavespeed?attempt=att-1"}
    fake.advance(10)
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.02)
    assert len(received) == 1 and str(received[0].url) == f"{PUBLIC}/hooks/wavespeed?attempt=att-1"
    headers = {k.lower(): v for k, v in received[0].headers.items()}
    event = await adapter.verify_callback(headers, received[0].content)
    assert (event.ref, event.kind, event.attempt_id) == (sub.ref, "training", None)  # "att-1" is no attempt id
    attempt = "6f1d0c2e-5b7a-4c3d-9e8f-1a2b3c4d5e6f"
    event = await adapter.verify_callback(headers, received[0].content, {"attempt": attempt})
    assert event.attempt_id == attempt
    assert json.loads(received[0].content)["outputs"] == [f"{BASE}/cdn/output/{sub.ref}.safetensors"]
    no_cb = make(public_base_url=PUBLIC)  # no secret: no callbacks asked for
    await no_cb.start_training(tspec(), make_zip(tmp_path / "ds2"))
    assert fake.of_kind("train")[-1].query == {}
