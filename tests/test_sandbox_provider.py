"""The sandbox provider: dataset checks, simulated training, real artifacts, rendered images."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
from PIL import Image

from plugins.storage.local import LocalStorage, LocalStorageConfig
from providers import sandbox as sandbox_mod
from providers.base import (
    Dataset, GenerationSpec, LoraHandle, ProviderError, ProviderRejected, ProviderSetup, TrainingSpec,
)
from providers.sandbox import SandboxConfig, SandboxProvider
from tests.images import make_image

WORD = "K7XQZ"


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(tmp_path: Path, clock: FakeClock) -> Any:
    """Build a provider over ``tmp_path`` (call again to simulate a gateway restart)."""

    def build(**cfg: Any) -> SandboxProvider:
        setup = ProviderSetup(
            storage=LocalStorage(LocalStorageConfig(), tmp_path), data_dir=tmp_path,
            public_base_url=None, http_client=lambda **kw: None,
        )
        p = SandboxProvider(SandboxConfig(**cfg), setup)
        p.clock = clock
        return p

    return build


def make_dataset(root: Path, n: int = 3, word: str = WORD) -> Dataset:
    d = root / "ds"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        (d / f"{i:03d}.jpg").write_bytes(make_image(seed=i))
        (d / f"{i:03d}.txt").write_text(f"a photo of {word}, smiling", "utf-8")
    return Dataset(zip_path=root / "ds.zip", directory=d, image_count=n)


def tspec(attempt_id: str = "att-1", word: str = WORD, rank: int = 16) -> TrainingSpec:
    return TrainingSpec(attempt_id=attempt_id, lora_id="lora-1", name="me", subject_kind="person",
                        steps=1000, lora_rank=rank, trigger_word=word)


def gspec(**kw: Any) -> GenerationSpec:
    base: dict[str, Any] = dict(attempt_id="g-1", job_id="job-1", prompt=f"{WORD} on a beach",
                                width=96, height=64, seed=42)
    return GenerationSpec(**{**base, **kw})


LORA = LoraHandle(lora_id="lora-1", trigger_word=WORD)


def parse_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


async def train_to_end(p: SandboxProvider, clock: FakeClock, ds: Dataset, **kw: Any) -> str:
    sub = await p.start_training(tspec(**kw), ds)
    clock.advance(p.config.training_seconds)
    assert (await p.training_status(sub.ref)).state == "succeeded"
    return sub.ref


# --------------------------------------------------------------------------- config + wiring


def test_config_defaults_and_validation() -> None:
    cfg = msgspec.convert({}, SandboxConfig)
    assert (cfg.training_seconds, cfg.queue_seconds, cfg.generation_seconds) == (3.0, 0.5, 0.0)
    assert cfg.fail_trigger_words == [] and cfg.fail_prompts_containing is None
    for bad in ({"bogus": 1}, {"training_failure_rate": 1.5}, {"training_seconds": -1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, SandboxConfig)


def test_capabilities_and_hook(make: Any) -> None:
    p = make(cost_per_training=1.5, cost_per_image=0.01)
    caps = p.capabilities
    assert caps.training and caps.training.dataset_input == "directory" and caps.training.produces_artifact
    t = caps.training
    assert (t.min_steps, t.max_steps, t.min_rank, t.max_rank) == (500, 3000, 8, 64)
    assert caps.inference and caps.inference.accepts_lora_file and caps.inference.max_outputs == 4
    assert caps.can_lookup and caps.can_cancel and not caps.webhooks_in
    assert (caps.cost.per_training, caps.cost.per_image) == (1.5, 0.01)
    got: list[type] = []
    sandbox_mod.register_providers(got.append)
    assert got == [SandboxProvider] and SandboxProvider.name == "sandbox"


# --------------------------------------------------------------------------- training


async def test_start_is_idempotent_and_lookup(make: Any, tmp_path: Path) -> None:
    p, ds = make(), make_dataset(tmp_path)
    assert await p.lookup_training("att-1") is None
    a = await p.start_training(tspec(), ds)
    b = await p.start_training(tspec(), ds)
    assert a.ref == b.ref and a.ref.startswith("sbx-t-")
    assert p.submissions() == ["att-1"] and p.submit_calls == 2
    assert (await p.lookup_training("att-1")) == a
    c = await p.start_training(tspec("att-2"), ds)
    assert c.ref != a.ref and p.submissions() == ["att-1", "att-2"]
    assert (tmp_path / "sandbox" / "trainings" / f"{a.ref}.json").is_file()


def _drop_caption(d: Path) -> None:
    (d / "002.txt").unlink()


def _no_word(d: Path) -> None:
    (d / "002.txt").write_text(f"a photo of {WORD}Z, not the word", "utf-8")


def _bad_jpg(d: Path) -> None:
    (d / "003.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


def _png_as_jpg(d: Path) -> None:
    (d / "001.jpg").write_bytes(make_image("PNG"))


def _extra_image(d: Path) -> None:
    (d / "004.jpg").write_bytes(make_image())


@pytest.mark.parametrize(
    "damage, needle",
    [(_drop_caption, "002.txt missing"), (_no_word, "lacks trigger word"), (_bad_jpg, "003.jpg"),
     (_png_as_jpg, "001.jpg"), (_extra_image, "holds 4")],
)
async def test_dataset_checks(make: Any, tmp_path: Path, damage: Any, needle: str) -> None:
    p, ds = make(), make_dataset(tmp_path)
    damage(ds.directory)
    with pytest.raises(ProviderRejected, match=needle) as info:
        await p.start_training(tspec(), ds)
    assert info.value.retryable is False
    assert p.submissions() == [] and await p.lookup_training("att-1") is None


async def test_spec_ranges_rejected(make: Any, tmp_path: Path) -> None:
    p, ds = make(), make_dataset(tmp_path)
    with pytest.raises(ProviderRejected, match="rank"):
        await p.start_training(tspec(rank=128), ds)
    with pytest.raises(ProviderRejected):
        await p.start_training(msgspec.structs.replace(tspec(), subject_kind="car"), ds)


async def test_status_sequence(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p = make(training_seconds=10, queue_seconds=2)
    ref = (await p.start_training(tspec(), make_dataset(tmp_path))).ref
    assert (await p.training_status(ref)).state == "queued"
    clock.advance(1.9)
    assert (await p.training_status(ref)).state == "queued"
    progress = []
    for _ in range(4):
        clock.advance(2)
        st = await p.training_status(ref)
        assert st.state == "running" and st.artifact_url is None
        progress.append(st.progress)
    assert progress == sorted(progress) and progress[0] == pytest.approx(0.39) and progress[-1] < 1
    clock.advance(0.2)
    st = await p.training_status(ref)
    assert st.state == "succeeded" and st.progress == 1.0
    assert st.artifact_url == f"sandbox://artifacts/{ref}.safetensors"


async def test_unknown_ref(make: Any) -> None:
    p = make()
    for ref in ("sbx-t-" + "0" * 24, "../../etc/passwd", "nope"):
        with pytest.raises(ProviderRejected):
            await p.training_status(ref)


async def test_artifact_is_real_safetensors(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p = make(seed=7)
    ref = await train_to_end(p, clock, make_dataset(tmp_path), rank=64)
    dest = tmp_path / "got" / "lora.safetensors"
    await p.fetch_file(f"sandbox://artifacts/{ref}.safetensors", dest, max_bytes=1 << 20)
    data = dest.read_bytes()
    assert len(data) < 200 * 1024
    header, body = parse_safetensors(data)
    assert header.pop("__metadata__") == {"format": "pt", "trigger_word": WORD, "steps": "1000", "rank": "64"}
    key = "transformer.single_transformer_blocks.0.attn.to_q.lora_{}.weight"
    assert header[key.format("A")]["shape"] == [64, 64] and header[key.format("A")]["dtype"] == "F32"
    for proj in ("to_q", "to_k", "to_v"):
        assert header[f"transformer.transformer_blocks.0.attn.{proj}.lora_B.weight"]["shape"] == [64, 64]
    ends = sorted(t["data_offsets"][1] for t in header.values())
    assert ends[-1] == len(body) and len(header) == 12
    start, end = header[key.format("A")]["data_offsets"]
    values = struct.unpack(f"<{(end - start) // 4}f", body[start:end])
    assert any(values) and all(abs(v) <= 0.02 for v in values)
    # deterministic: the same seed/ref rebuilds the same bytes
    meta = {"format": "pt", "trigger_word": WORD, "steps": "1000", "rank": "64"}
    assert sandbox_mod.build_lora_safetensors(seed=7, ref=ref, rank=64, meta=meta) == data
    assert sandbox_mod.build_lora_safetensors(seed=8, ref=ref, rank=64, meta=meta) != data


async def test_artifact_shapes_follow_rank(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p = make()
    ref = await train_to_end(p, clock, make_dataset(tmp_path), rank=8)
    header, _ = parse_safetensors((tmp_path / "sandbox" / "artifacts" / f"{ref}.safetensors").read_bytes())
    assert header["transformer.single_transformer_blocks.0.attn.to_v.lora_A.weight"]["shape"] == [8, 64]
    assert header["transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"]["shape"] == [64, 8]


async def test_fetch_file_errors(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p = make()
    sub = await p.start_training(tspec(), make_dataset(tmp_path))
    url = f"sandbox://artifacts/{sub.ref}.safetensors"
    with pytest.raises(ProviderError) as info:  # not trained yet
        await p.fetch_file(url, tmp_path / "x", max_bytes=1 << 20)
    assert info.value.retryable is False
    clock.advance(3)
    with pytest.raises(ProviderError) as info:
        await p.fetch_file(url, tmp_path / "x", max_bytes=100)
    assert info.value.retryable is False and not (tmp_path / "x").exists()
    for bad in ("https://example.com/a.safetensors", "sandbox://artifacts/../../x", "sandbox://other/a"):
        with pytest.raises(ProviderRejected):
            await p.fetch_file(bad, tmp_path / "x", max_bytes=1 << 20)


async def test_cancel(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p, ds = make(), make_dataset(tmp_path)
    ref = (await p.start_training(tspec(), ds)).ref
    clock.advance(1)
    await p.cancel_training(ref)
    clock.advance(10)
    st = await p.training_status(ref)
    assert (st.state, st.error, st.retryable) == ("failed", "cancelled", False)
    assert (await make().training_status(ref)).error == "cancelled"  # persisted
    done = await train_to_end(p, clock, ds, attempt_id="att-2")
    await p.cancel_training(done)  # finished: left alone
    assert (await p.training_status(done)).state == "succeeded"


async def test_fail_trigger_words(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p = make(fail_trigger_words=["FA1LZ"])
    ref = (await p.start_training(tspec(word="FA1LZ"), make_dataset(tmp_path, word="FA1LZ"))).ref
    clock.advance(1)
    assert (await p.training_status(ref)).state == "running"  # failures show once time is up
    clock.advance(2)
    st = await p.training_status(ref)
    assert st.state == "failed" and st.retryable is False and "simulated failure" in (st.error or "")


@pytest.mark.parametrize("rate, state", [(1.0, "failed"), (0.0, "succeeded")])
async def test_failure_rate(make: Any, tmp_path: Path, clock: FakeClock, rate: float, state: str) -> None:
    p, ds = make(training_failure_rate=rate), make_dataset(tmp_path)
    refs = [(await p.start_training(tspec(f"att-{i}"), ds)).ref for i in range(5)]
    clock.advance(3)
    for ref in refs:
        st = await p.training_status(ref)
        assert st.state == state and st.retryable is (rate == 1.0)


async def test_failure_rate_is_deterministic(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    ds = make_dataset(tmp_path)
    p = make(training_failure_rate=0.5, seed=3)
    refs = [(await p.start_training(tspec(f"a{i}"), ds)).ref for i in range(20)]
    clock.advance(3)
    states = [(await p.training_status(r)).state for r in refs]
    assert 0 < states.count("failed") < 20
    assert [(await make(training_failure_rate=0.5, seed=3).training_status(r)).state for r in refs] == states


async def test_state_survives_restart(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    ds = make_dataset(tmp_path)
    ref = (await make().start_training(tspec(), ds)).ref
    clock.advance(1.5)
    p2 = make()
    st = await p2.training_status(ref)
    assert st.state == "running" and st.progress == pytest.approx(0.5)
    assert (await p2.start_training(tspec(), ds)).ref == ref
    assert p2.submissions() == ["att-1"] and p2.submit_calls == 1
    assert (await p2.lookup_training("att-1")) is not None
    clock.advance(2)
    assert (await make().training_status(ref)).state == "succeeded"


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
async def test_generate_formats_and_sizes(make: Any, fmt: str, pil: str) -> None:
    st = await make().generate(gspec(output_format=fmt, num_outputs=3, width=120, height=80), LORA)
    assert st.state == "succeeded" and st.ref and len(st.images) == 3
    for im in st.images:
        assert im.data is not None
        with Image.open(io.BytesIO(im.data)) as img:
            assert (img.format, img.size) == (pil, (120, 80))
    assert len({im.data for im in st.images}) == 3  # each output differs


async def test_generate_is_deterministic_in_seed(make: Any) -> None:
    p = make()
    a = await p.generate(gspec(seed=1), LORA)
    b = await make().generate(gspec(seed=1, attempt_id="other"), LORA)
    c = await p.generate(gspec(seed=2, attempt_id="g-seed2"), LORA)
    assert a.images[0].data == b.images[0].data != c.images[0].data
    d = await p.generate(gspec(seed=None, attempt_id="g-none"), LORA)
    e = await p.generate(gspec(seed=None, attempt_id="g-none"), LORA)
    f = await p.generate(gspec(seed=None, attempt_id="g-2"), LORA)
    assert d.images[0].data == e.images[0].data != f.images[0].data
    g = await p.generate(gspec(seed=1, lora_strength=0.5, attempt_id="g-half"), LORA)
    assert g.images[0].data != a.images[0].data


async def test_generate_rejects_bad_requests(make: Any) -> None:
    p = make()
    for kw in ({"num_outputs": 5}, {"output_format": "gif"}, {"width": 0}):
        with pytest.raises(ProviderRejected):
            await p.generate(gspec(**kw), LORA)


async def test_delayed_generation(make: Any, clock: FakeClock) -> None:
    p = make(generation_seconds=4)
    st = await p.generate(gspec(num_outputs=2), LORA)
    assert st.state == "queued" and st.ref and not st.images
    clock.advance(2)
    mid = await make(generation_seconds=4).generation_status(st.ref)  # survives a restart
    assert mid.state == "running" and mid.progress == pytest.approx(0.5)
    clock.advance(2)
    done = await p.generation_status(st.ref)
    assert done.state == "succeeded" and len(done.images) == 2
    immediate = await make().generate(gspec(num_outputs=2), LORA)
    assert [i.data for i in done.images] == [i.data for i in immediate.images]
    with pytest.raises(ProviderRejected):
        await p.generation_status("sbx-g-" + "f" * 24)


async def test_failing_generation(make: Any, clock: FakeClock) -> None:
    st = await make(fail_prompts_containing="forbidden").generate(gspec(prompt=f"{WORD} forbidden"), LORA)
    assert st.state == "failed" and st.retryable is False and st.error and not st.images
    st = await make(generation_failure_rate=1.0).generate(gspec(attempt_id="g-rate1"), LORA)
    assert st.state == "failed" and st.retryable is True
    assert (await make(generation_failure_rate=0.0).generate(gspec(attempt_id="g-rate0"), LORA)).state == "succeeded"
    p = make(generation_failure_rate=1.0, generation_seconds=1)
    q = await p.generate(gspec(attempt_id="g-delayed"), LORA)
    assert q.state == "queued" and q.ref
    clock.advance(1)
    st = await p.generation_status(q.ref)
    assert st.state == "failed" and st.retryable is True


async def test_artifact_path_is_checked(make: Any, tmp_path: Path, clock: FakeClock) -> None:
    p = make()
    with pytest.raises(ProviderRejected, match="unusable"):
        await p.generate(gspec(), msgspec.structs.replace(LORA, artifact_path=tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ProviderRejected):
        await p.generate(gspec(), msgspec.structs.replace(LORA, artifact_path=junk))
    ref = await train_to_end(p, clock, make_dataset(tmp_path))
    real = tmp_path / "real.safetensors"
    await p.fetch_file(f"sandbox://artifacts/{ref}.safetensors", real, max_bytes=1 << 20)
    st = await p.generate(gspec(), msgspec.structs.replace(LORA, artifact_path=real))
    assert st.state == "succeeded"


async def test_generation_is_idempotent_and_can_be_looked_up(make: Any) -> None:
    p = make()
    assert await p.lookup_generation("g-look") is None
    first = await p.generate(gspec(attempt_id="g-look"), LORA)
    again = await p.generate(gspec(attempt_id="g-look", prompt="something else"), LORA)
    assert again.images[0].data == first.images[0].data  # the job of that attempt, not a new one
    found = await p.lookup_generation("g-look")
    assert found is not None and found.state == "succeeded" and found.images[0].data == first.images[0].data
    # every call is logged, so a test can tell a resubmission from a lookup
    assert p.calls() == [("generation", "g-look"), ("generation-again", "g-look")]


async def test_every_training_submit_call_is_logged(make: Any, tmp_path: Path) -> None:
    p = make()
    ds = make_dataset(tmp_path / "ds")
    await p.start_training(tspec(attempt_id="att-log"), ds)
    await p.start_training(tspec(attempt_id="att-log"), ds)
    assert p.calls() == [("training", "att-log"), ("training-again", "att-log")]
    assert p.submissions() == ["att-log"]
