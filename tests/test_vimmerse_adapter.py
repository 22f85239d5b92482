"""The Vimmerse adapter against FakeVimmerse in-process (httpx.ASGITransport): every place the
trigger word may sit in the create answer, each status shape, sync and async generation, and
each error kind mapped onto the provider error tree with the right ``retryable``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import msgspec
import pytest

from plugins.storage.local import LocalStorage, LocalStorageConfig
from providers.base import (
    Dataset, GenerationSpec, LoraHandle, ProviderAuthError, ProviderError, ProviderOutcomeUnknown,
    ProviderRateLimited, ProviderRejected, ProviderSetup, ProviderTimeout, ProviderUnavailable, TrainingSpec,
)
from providers.vimmerse import VimmerseAdapter, VimmerseConfig, read_trigger_word, training_from_wire
from tests.fakes.vimmerse import FakeVimmerse
from tests.images import make_image

BASE = "https://api.vimmerse.net"
WORD = "K7XQZ"
PUBLIC = "https://gw.example.com"


@pytest.fixture
async def fake() -> AsyncIterator[FakeVimmerse]:
    f = FakeVimmerse(seed=3)
    yield f
    await f.aclose()


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
async def make(tmp_path: Path, fake: FakeVimmerse) -> AsyncIterator[Callable[..., VimmerseAdapter]]:
    made: list[VimmerseAdapter] = []

    def build(*, public_base_url: str | None = None, **cfg: Any) -> VimmerseAdapter:
        def http_client(**kwargs: Any) -> httpx.AsyncClient:
            kwargs.setdefault("transport", fake.transport())
            return httpx.AsyncClient(**kwargs)

        setup = ProviderSetup(storage=LocalStorage(LocalStorageConfig(), tmp_path), data_dir=tmp_path,
                              public_base_url=public_base_url, http_client=http_client)
        adapter = VimmerseAdapter(msgspec.convert({"api_key": fake.api_key, "base_url": BASE, **cfg}, VimmerseConfig),
                                  setup)
        adapter.sleep = Sleeps()
        made.append(adapter)
        return adapter

    yield build
    for adapter in made:
        await adapter.aclose()


def dataset(root: Path, n: int = 4, urls: list[str] | None = None) -> Dataset:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(1, n + 1):
        (images / f"{i:03d}.jpg").write_bytes(make_image(seed=i))
        (images / f"{i:03d}.txt").write_text(f"a photo of {WORD}")
        files.append(images / f"{i:03d}.jpg")
    return Dataset(zip_path=root / "dataset.zip", directory=images, image_count=n, files=files, image_urls=urls or [])


def tspec(**kw: Any) -> TrainingSpec:
    base = dict(attempt_id=str(uuid.uuid4()), lora_id="lora-1", name="Ada", subject_kind="person", steps=1200,
                lora_rank=16, trigger_word=WORD)
    return TrainingSpec(**{**base, **kw})


def gspec(prompt: str, **kw: Any) -> GenerationSpec:
    base = dict(attempt_id=str(uuid.uuid4()), job_id="job-1", prompt=prompt, num_outputs=2, aspect_ratio="3:4",
                width=864, height=1152, output_format="png", seed=42, lora_strength=0.7)
    return GenerationSpec(**{**base, **kw})


async def trained(adapter: VimmerseAdapter, fake: FakeVimmerse, tmp_path: Path) -> str:
    sub = await adapter.start_training(tspec(), dataset(tmp_path / "ds"))
    fake.advance(10)
    assert (await adapter.training_status(sub.ref)).state == "succeeded"
    return sub.ref


# --------------------------------------------------------------------------- the trigger word


@pytest.mark.parametrize("variant", ["results", "id", "bare", "field"])
async def test_the_trigger_word_is_found_wherever_it_sits(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse,
                                                          tmp_path: Path, variant: str) -> None:
    fake.create_variant = variant
    sub = await make().start_training(tspec(), dataset(tmp_path / "ds"))
    assert sub.ref == sub.trigger_word == fake.last_finetune.trigger_word
    assert sub.trigger_word.startswith(f"{WORD}_")  # built from the gateway's word as lora_prefix


@pytest.mark.parametrize("variant", ["missing", "url"])
async def test_no_trigger_word_fails_the_attempt_retryably(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse,
                                                           tmp_path: Path, variant: str) -> None:
    fake.create_variant = variant
    with pytest.raises(ProviderError) as e:
        await make().start_training(tspec(), dataset(tmp_path / "ds"))
    assert e.value.retryable and "no trigger word" in e.value.message
    assert not isinstance(e.value, ProviderOutcomeUnknown)


@pytest.mark.parametrize(("body", "word"), [
    (b'{"trigger_word": "ABC_12"}', "ABC_12"),
    (b'"ABC_12"', "ABC_12"),
    (b'{"data": {"id": "5f0c9d3e-7a1b-4c2d-9e8f-0a1b2c3d4e5f", "results": ["ABC_12"]}}', "ABC_12"),
    (b'{"data": {"id": "ABC_12", "results": []}}', "ABC_12"),
    (b'{"data": {"trigger_word": "ABC_12", "id": "other"}}', "ABC_12"),
    (b'{"data": {"id": "5f0c9d3e-7a1b-4c2d-9e8f-0a1b2c3d4e5f", "results": []}}', None),  # a UUID is an asset id
    (b'{"data": {"results": ["https://cdn.vimmerse.net/x.png"]}}', None),
    (b'"has a space"', None), (b"not json", None), (b"[]", None), (b'{"data": null}', None),
])
def test_read_trigger_word(body: bytes, word: str | None) -> None:
    assert read_trigger_word(body) == word


# --------------------------------------------------------------------------- training


async def test_training_request_on_the_wire(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path) -> None:
    spec = tspec(subject_kind="object")
    await make(public_base_url=PUBLIC).start_training(spec, dataset(tmp_path / "ds", n=5))
    (req,) = fake.of_kind("finetune")
    form = req.form
    assert req.headers["x-api-key"] == fake.api_key and req.path == "/finetune"
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert form.value("option") == "FluxProFinetune" and form.value("finetune_type") == "Product"
    assert form.value("num_iterations") == "0" and form.value("lora_prefix") == WORD  # iterations: auto
    assert form.file_count == 5 and all(f.image and f.image[0] == "JPEG" for f in form.image_files)
    assert form.value("webhook_url") == f"{PUBLIC}/hooks/vimmerse?attempt={spec.attempt_id}"


@pytest.mark.parametrize(("kind", "ftype"), [("person", "Character"), ("object", "Product"), ("style", "Style")])
async def test_subject_kind_maps_to_finetune_type(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse,
                                                  tmp_path: Path, kind: str, ftype: str) -> None:
    await make(iterations="steps", option="FluxFinetune").start_training(tspec(subject_kind=kind), dataset(tmp_path / kind))
    form = fake.of_kind("finetune")[-1].form
    assert form.value("finetune_type") == ftype and form.value("num_iterations") == "1200"
    assert form.value("option") == "FluxFinetune" and form.value("webhook_url") is None  # no public URL: no callbacks


async def test_image_urls_delivery(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path) -> None:
    adapter = make(dataset_delivery="image_urls", public_base_url=PUBLIC)
    assert adapter.capabilities.training.dataset_input == "image_urls"
    with pytest.raises(ProviderRejected) as e:  # the gateway had no public URL to sign
        await adapter.start_training(tspec(), dataset(tmp_path / "a"))
    assert e.value.retryable and "public_base_url" in e.value.message
    images = [f"https://img.example.com/{i}.jpg" for i in range(3)]

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=make_image(seed=int(request.url.path[1])), headers={"content-type": "image/jpeg"})

    fake.fetch_client = httpx.AsyncClient(transport=httpx.MockTransport(serve))
    await adapter.start_training(tspec(), dataset(tmp_path / "b", n=3, urls=images))
    req = fake.of_kind("finetune")[-1]
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")  # as documented
    assert req.form.image_urls == images and req.form.file_count == 0
    await fake.fetch_client.aclose()


@pytest.mark.parametrize("variant", ["empty", "status", "media"])
async def test_status_shapes_until_samples(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path,
                                           variant: str) -> None:
    fake.status_variant = variant
    adapter = make()
    sub = await adapter.start_training(tspec(), dataset(tmp_path / "ds"))
    fake.advance(fake.queue_s + fake.training_s / 2)
    st = await adapter.training_status(sub.ref)
    assert st.state in ("queued", "running") and not st.sample_urls
    if variant == "media":
        assert st.progress is not None and 0 < st.progress < 1
    fake.advance(10)
    done = await adapter.training_status(sub.ref)
    assert done.state == "succeeded" and len(done.sample_urls) == 2 and done.artifact_url is None
    assert fake.of_kind("status")[-1].path == f"/finetune/{sub.ref}"


@pytest.mark.parametrize("variant", ["status", "http"])
async def test_explicit_failures(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path,
                                 variant: str) -> None:
    fake.failure_variant = variant
    adapter = make()
    fake.fail_finetunes = "content policy violation in image 3"
    sub = await adapter.start_training(tspec(), dataset(tmp_path / "a"))
    fake.advance(10)
    st = await adapter.training_status(sub.ref)
    assert st.state == "failed" and not st.retryable
    assert "content policy" not in (st.error or "")  # the vendor's text stays in the log
    fake.fail_finetunes = "GPU worker crashed, please try again"
    sub = await adapter.start_training(tspec(), dataset(tmp_path / "b"))
    fake.advance(10)
    assert (await adapter.training_status(sub.ref)).retryable  # the vendor's own trouble: try again


async def test_an_unknown_shape_is_never_success(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path) -> None:
    adapter = make()
    sub = await adapter.start_training(tspec(), dataset(tmp_path / "ds"))
    fake.advance(10)
    fake.unknown_shape = {"status"}
    assert (await adapter.training_status(sub.ref)).state == "running"
    fake.script("status", 200, body={"data": {"status": "success"}})  # a success word but no samples
    assert (await adapter.training_status(sub.ref)).state == "running"
    assert training_from_wire({"data": [{"nothing": 1}]}) is None


async def test_a_finetune_the_vendor_does_not_know_has_failed(make: Callable[..., VimmerseAdapter]) -> None:
    st = await make().training_status("NOPE_123456")
    assert st.state == "failed" and st.retryable


# --------------------------------------------------------------------------- inference


async def test_async_generation_with_the_vendors_word(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse,
                                                      tmp_path: Path) -> None:
    adapter = make()
    word = await trained(adapter, fake, tmp_path)
    lora = LoraHandle(lora_id="l", trigger_word=WORD, provider_trigger_word=word, trained_by="vimmerse", trained_ref=word)
    st = await adapter.generate(gspec(f"{word} on a beach"), lora)
    assert st.state in ("queued", "running") and st.ref
    req = fake.of_kind("generate")[-1].json
    assert req == {"prompt": f"{word} on a beach", "quantity": 2, "option": "FluxFinetuned", "aspect_ratio": "3:4",
                   "async_mode": True, "enhance_image": False}
    fake.advance(10)
    done = await adapter.generation_status(st.ref)
    assert done.state == "succeeded" and len(done.images) == 2
    dest = tmp_path / "img.png"
    await adapter.fetch_file(done.images[0].url, dest, max_bytes=10**8)
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fake.asset_wrapped = False  # the asset bare, as the v2 routes answer
    assert (await adapter.generation_status(st.ref)).state == "succeeded"


async def test_generation_needs_a_lora_it_trained(make: Callable[..., VimmerseAdapter]) -> None:
    adapter = make()
    with pytest.raises(ProviderRejected):
        await adapter.generate(gspec("x"), LoraHandle(lora_id="l", trigger_word=WORD, trained_by="wavespeed"))
    with pytest.raises(ProviderRejected):  # the engine always swaps in the vendor's word
        await adapter.generate(gspec(f"{WORD} x"), LoraHandle(lora_id="l", trigger_word=WORD,
                                                               provider_trigger_word="K7XQZ_AB12CD", trained_by="vimmerse"))


async def test_failed_generation(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path) -> None:
    adapter = make()
    word = await trained(adapter, fake, tmp_path)
    lora = LoraHandle(lora_id="l", trigger_word=WORD, provider_trigger_word=word, trained_by="vimmerse")
    fake.fail_generations = "NSFW content detected"
    st = await adapter.generate(gspec(f"{word} x"), lora)
    fake.advance(10)
    failed = await adapter.generation_status(st.ref)
    assert failed.state == "failed" and not failed.retryable and "NSFW" not in (failed.error or "")
    assert (await adapter.generation_status("00000000-0000-0000-0000-000000000000")).state == "failed"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("status", "error", "retryable"), [
    (402, ProviderError, True),  # {"message": "INSUFFICIENT_CREDIT"}: another provider may serve
    (400, ProviderRejected, False),  # {"message": "BAD_REQUEST"}
    (404, ProviderRejected, False),
    (422, ProviderRejected, False),  # FastAPI's {"detail": [...]}: the request's shape is wrong
    (401, ProviderAuthError, False),
    (403, ProviderAuthError, False),
    (429, ProviderRateLimited, True),
])
async def test_http_errors_map_onto_the_tree(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path,
                                             status: int, error: type, retryable: bool) -> None:
    fake.script("finetune", status)
    with pytest.raises(error) as e:
        await make().start_training(tspec(), dataset(tmp_path / "ds"))
    assert type(e.value) is error and e.value.retryable is retryable
    assert "INSUFFICIENT_CREDIT" not in e.value.message and "BAD_REQUEST" not in e.value.message  # no vendor body


@pytest.mark.parametrize(("body", "error"), [
    (b"Internal Server Error", ProviderOutcomeUnknown),  # not Vimmerse's JSON: may have been accepted
    (json.dumps({"message": "INTERNAL_ERROR"}).encode(), ProviderUnavailable),  # its own error: a refusal
])
async def test_submit_5xx(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path,
                          body: bytes, error: type) -> None:
    fake.script("finetune", 500, body=body)
    with pytest.raises(ProviderError) as e:
        await make().start_training(tspec(), dataset(tmp_path / "ds"))
    assert type(e.value) is error and e.value.retryable


async def test_timeouts(make: Callable[..., VimmerseAdapter], fake: FakeVimmerse, tmp_path: Path) -> None:
    adapter = make(timeout_s=0.05, poll_retries=2, poll_backoff_s=0.1)
    fake.script("finetune", None, delay=1)
    with pytest.raises(ProviderOutcomeUnknown):  # the billable POST: sent, no answer
        await adapter.start_training(tspec(), dataset(tmp_path / "ds"))
    assert len(fake.of_kind("finetune")) == 1
    fake.script("status", None, delay=1, times=5)
    with pytest.raises(ProviderTimeout):  # a status GET: retried, then a plain timeout
        await adapter.training_status("K7XQZ_AAAAAA")
    assert adapter.sleep == [0.1, 0.2]


async def test_callbacks_are_hints(make: Callable[..., VimmerseAdapter]) -> None:
    adapter = make(public_base_url=PUBLIC)
    assert adapter.capabilities.webhooks_in and not adapter.capabilities.callbacks_name_attempts
    attempt = str(uuid.uuid4())
    event = await adapter.verify_callback({}, b'{"status": "success", "media_id": "forged"}', {"attempt": attempt})
    assert event.hint and event.attempt_id == attempt and event.ref is None
    with pytest.raises(ProviderAuthError):
        await adapter.verify_callback({}, b"{}", {})
    assert not make().capabilities.webhooks_in  # no public URL: Vimmerse is never given one


def test_capabilities(make: Callable[..., VimmerseAdapter]) -> None:
    caps = make().capabilities
    assert caps.training.produces_artifact is False and caps.training.makes_trigger_word
    assert caps.training.rank_controllable is False and caps.training.dataset_input == "files"
    assert caps.inference.accepts_lora_file is False and caps.inference.honours == frozenset()
    assert not caps.can_lookup and not caps.can_cancel
    assert "api_key" not in repr(make().config).replace("api_key='***'", "")
