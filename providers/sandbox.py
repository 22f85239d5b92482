"""``sandbox``: a real provider with no vendor behind it -- deterministic, free, offline.

Everything about a job is decided when it is submitted (outcome, timings) and persisted as a
small JSON file under ``<data_dir>/sandbox/``, so state survives a gateway restart and replays
identically. Time comes from the ``clock`` attribute (``time.time`` by default; tests swap it).
Trainings produce a small but genuine FLUX LoRA ``.safetensors`` file; images are drawn with Pillow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import struct
import textwrap
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, TypeVar

import anyio.to_thread
import msgspec
from PIL import Image, ImageDraw, ImageFont

from plugins.hookspecs import hookimpl
from plugins.storage.local import atomic_write
from providers.safetensors import read_header as read_safetensors_header
from providers.base import (
    Capabilities, Cost, Dataset, GeneratedImage, GenerationSpec, GenerationStatus,
    InferenceCapabilities, LoraHandle, Provider, ProviderError, ProviderRejected, ProviderSetup,
    TrainingCapabilities, TrainingSpec, TrainingStatus, TrainingSubmission,
)

Seconds = Annotated[float, msgspec.Meta(ge=0)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_REF_RE = re.compile(r"sbx-[tg]-[0-9a-f]{24}")
_ARTIFACT_RE = re.compile(r"sandbox://artifacts/(sbx-t-[0-9a-f]{24})\.safetensors")
_LORA_DIM = 64  # width of the (imaginary) projection the LoRA matrices attach to
_TRAINING = TrainingCapabilities(dataset_input="directory", produces_artifact=True)
_INFERENCE = InferenceCapabilities(accepts_lora_file=True, max_outputs=4)  # all aspect ratios, png/jpg/webp
_Outcome = Literal["succeed", "fail_random", "fail_trigger"]


class SandboxConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    training_seconds: Seconds = 3.0  # submit -> succeeded; progress grows linearly
    queue_seconds: Seconds = 0.5  # the first part of that time is reported as "queued"
    training_failure_rate: Rate = 0.0  # share of trainings that fail (retryable), by hash
    generation_seconds: Seconds = 0.0  # 0 = images returned straight from ``generate``
    generation_failure_rate: Rate = 0.0  # share of generations that fail (retryable)
    seed: int = 0  # mixes into failure draws, artifact weights
    fail_trigger_words: list[str] = []  # trainings with these trigger words always fail
    fail_prompts_containing: str | None = None  # generations whose prompt holds this fail
    cost_per_training: float = 0.0
    cost_per_image: float = 0.0


class _TrainingJob(msgspec.Struct, kw_only=True):
    ref: str
    attempt_id: str
    submitted_at: float
    steps: int
    rank: int
    trigger_word: str
    image_count: int
    queue_seconds: float
    training_seconds: float
    outcome: _Outcome
    cancelled: bool = False


class _GenerationJob(msgspec.Struct, kw_only=True):
    ref: str
    attempt_id: str
    submitted_at: float
    duration: float
    prompt: str
    lora_id: str
    lora_strength: float
    seed: int
    num_outputs: int
    width: int
    height: int
    output_format: str
    error: str | None = None
    retryable: bool = False


_J = TypeVar("_J", _TrainingJob, _GenerationJob)


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def _ref(kind: str, attempt_id: str) -> str:
    return f"sbx-{kind}-" + hashlib.sha256(attempt_id.encode()).hexdigest()[:24]


def build_lora_safetensors(*, seed: int, ref: str, rank: int, meta: dict[str, str]) -> bytes:
    """A diffusers/peft-style FLUX LoRA in safetensors format (F32), deterministic in (seed, ref)."""
    rng = random.Random(f"{seed}:{ref}")
    blocks = ("transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0.attn")
    tensors = [(f"{b}.{p}.lora_{ab}.weight", [rank, _LORA_DIM] if ab == "A" else [_LORA_DIM, rank])
               for b in blocks for p in ("to_q", "to_k", "to_v") for ab in "AB"]
    header: dict[str, object] = {"__metadata__": meta}
    blobs, offset = [], 0
    for name, shape in sorted(tensors):
        n = shape[0] * shape[1]
        blobs.append(struct.pack(f"<{n}f", *(rng.uniform(-0.02, 0.02) for _ in range(n))))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes, as the reference does
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def check_dataset(directory: Path, image_count: int, trigger_word: str) -> None:
    """Check the ``NNN.jpg`` + ``NNN.txt`` layout; raise ``ProviderRejected`` with the reason."""
    if not directory.is_dir():
        raise ProviderRejected(f"sandbox: dataset directory {directory} does not exist")
    images = sorted(p for p in directory.iterdir() if re.fullmatch(r"\d{3,}\.jpg", p.name))
    if image_count < 1 or len(images) != image_count:
        raise ProviderRejected(f"sandbox: dataset holds {len(images)} NNN.jpg images, expected {image_count}")
    word = re.compile(rf"(?<!\w){re.escape(trigger_word)}(?!\w)")
    for img in images:
        caption = img.with_suffix(".txt")
        if not caption.is_file():
            raise ProviderRejected(f"sandbox: caption {caption.name} missing for {img.name}")
        if not word.search(caption.read_text("utf-8", errors="replace")):
            raise ProviderRejected(f"sandbox: caption {caption.name} lacks trigger word {trigger_word!r}")
        try:
            with Image.open(img) as im:
                im.load()
                if im.format != "JPEG":
                    raise ValueError(im.format)
        except Exception:  # noqa: BLE001 - any decoder error means a bad file
            raise ProviderRejected(f"sandbox: {img.name} is not a decodable JPEG") from None


def render_image(job: _GenerationJob, index: int) -> bytes:
    """Draw one picture: a hashed two-colour gradient, some shapes, the prompt. Deterministic."""
    w, h = job.width, job.height
    rng = random.Random(_digest(job.seed, job.prompt, job.lora_id, job.lora_strength, index))
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    mask = Image.linear_gradient("L").rotate(90 * rng.randrange(4)).resize((w, h))
    img = Image.composite(Image.new("RGB", (w, h), colour()), Image.new("RGB", (w, h), colour()), mask)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randrange(w // 8 + 1, w // 2 + 2), y0 + rng.randrange(h // 8 + 1, h // 2 + 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour(), outline=colour())
    size = max(10, min(w, h) // 20)
    font = ImageFont.load_default(size=size)  # a bitmap font if Pillow lacks FreeType
    text = "\n".join(textwrap.wrap(job.prompt, max(8, int(w / (size * 0.6))))[:6])
    draw.multiline_text((size // 2, size // 2), text, fill="white", font=font, stroke_width=1, stroke_fill="black")
    fmt, buf = _FORMATS[job.output_format], io.BytesIO()
    # zlib level 1: a quarter less CPU than the default for a slightly larger file (the sandbox
    # draws in the gateway's own process, unlike a real vendor)
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1} if fmt == "PNG" else {}))
    return buf.getvalue()


class SandboxProvider(Provider):
    """Trains and generates locally with simulated timing; free and reproducible."""

    name = "sandbox"
    config_type = SandboxConfig

    def __init__(self, config: SandboxConfig, setup: ProviderSetup) -> None:
        super().__init__(config, setup)
        self.config: SandboxConfig = config
        self.clock: Callable[[], float] = time.time
        self.submit_calls = 0
        self.root = self.state_dir()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int, _TrainingJob | _GenerationJob]] = {}
        cost = Cost(per_training=config.cost_per_training, per_image=config.cost_per_image)
        self.capabilities = Capabilities(training=_TRAINING, inference=_INFERENCE, cost=cost,
                                         can_lookup=True, can_cancel=True, webhooks_in=False)

    # ------------------------------------------------------------------ persistence

    def _job_path(self, ref: str) -> Path:
        if not _REF_RE.fullmatch(ref):
            raise ProviderRejected(f"sandbox: unknown job {ref!r}")
        return self.root / ("trainings" if ref[4] == "t" else "generations") / f"{ref}.json"

    def _save(self, job: _TrainingJob | _GenerationJob, *, only_new: bool = False) -> None:
        """Persist ``job`` atomically; with ``only_new`` an existing file is kept as it is."""
        path = self._job_path(job.ref)
        with self._lock:
            if not (only_new and path.exists()):
                atomic_write(path, lambda fh: fh.write(msgspec.json.encode(job)))
                self._cache[job.ref] = (path.stat().st_mtime_ns, msgspec.structs.replace(job))

    async def _load(self, ref: str, typ: type[_J]) -> _J:
        """A job from disk, decoded once and kept while its file is unchanged (a cheap stat
        checks that, so a change made by another process is still seen)."""
        path = self._job_path(ref)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise ProviderRejected(f"sandbox: unknown job {ref!r}") from None
        hit = self._cache.get(ref)
        if hit is not None and hit[0] == mtime and isinstance(hit[1], typ):
            return msgspec.structs.replace(hit[1])  # a copy: callers may change it
        try:
            job = msgspec.json.decode(await anyio.to_thread.run_sync(path.read_bytes), type=typ)
        except FileNotFoundError:
            raise ProviderRejected(f"sandbox: unknown job {ref!r}") from None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[ref] = (mtime, job)
        return msgspec.structs.replace(job)

    def _log_call(self, kind: str, attempt_id: str) -> None:
        """Append one line per submit call that reached the sandbox: ``training``/``generation``
        when it created a job, ``training-again``/``generation-again`` when the attempt id had
        one already. The jobs themselves are idempotent, so only this log shows a resubmission;
        a crash test reads it to prove that nothing was ever sent twice."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / "calls.log", "a", encoding="utf-8") as fh:
            fh.write(f"{kind} {attempt_id}\n")
            fh.flush()
            os.fsync(fh.fileno())

    def calls(self) -> list[tuple[str, str]]:
        """Every ``(kind, attempt_id)`` submit call that reached the sandbox, in order."""
        try:
            lines = (self.root / "calls.log").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [tuple(line.split(" ", 1)) for line in lines if " " in line]  # type: ignore[misc]

    def submissions(self) -> list[str]:
        """Attempt ids of every distinct training ever submitted (read from disk), oldest first."""
        folder = self.root / "trainings"
        jobs = [msgspec.json.decode(p.read_bytes(), type=_TrainingJob) for p in folder.glob("sbx-t-*.json")]
        return [j.attempt_id for j in sorted(jobs, key=lambda j: (j.submitted_at, j.ref))]

    # ------------------------------------------------------------------ training

    async def start_training(self, spec: TrainingSpec, dataset: Dataset) -> TrainingSubmission:
        self.submit_calls += 1
        ref = _ref("t", spec.attempt_id)
        if await anyio.to_thread.run_sync(self._job_path(ref).exists):
            await anyio.to_thread.run_sync(self._log_call, "training-again", spec.attempt_id)
            return TrainingSubmission(ref=ref)  # idempotent on the attempt id
        caps = _TRAINING
        if spec.subject_kind not in caps.subject_kinds:
            raise ProviderRejected(f"sandbox: subject kind {spec.subject_kind!r} not supported")
        for what, v, lo, hi in (("steps", spec.steps, caps.min_steps, caps.max_steps),
                                ("rank", spec.lora_rank, caps.min_rank, caps.max_rank)):
            if not lo <= v <= hi:
                raise ProviderRejected(f"sandbox: {what} {v} outside {lo}..{hi}")
        await anyio.to_thread.run_sync(check_dataset, Path(dataset.directory), dataset.image_count, spec.trigger_word)
        cfg = self.config
        outcome: _Outcome = "succeed"
        if spec.trigger_word in cfg.fail_trigger_words:
            outcome = "fail_trigger"
        elif _unit(cfg.seed, "training", spec.attempt_id) < cfg.training_failure_rate:
            outcome = "fail_random"
        job = _TrainingJob(
            ref=ref, attempt_id=spec.attempt_id, submitted_at=self.clock(), steps=spec.steps,
            rank=spec.lora_rank, trigger_word=spec.trigger_word, image_count=dataset.image_count,
            queue_seconds=cfg.queue_seconds, training_seconds=cfg.training_seconds, outcome=outcome,
        )
        await anyio.to_thread.run_sync(lambda: self._save(job, only_new=True))
        await anyio.to_thread.run_sync(self._log_call, "training", spec.attempt_id)
        return TrainingSubmission(ref=ref)

    async def lookup_training(self, attempt_id: str) -> TrainingSubmission | None:
        ref = _ref("t", attempt_id)
        return TrainingSubmission(ref=ref) if await anyio.to_thread.run_sync(self._job_path(ref).exists) else None

    async def training_status(self, ref: str) -> TrainingStatus:
        job = await self._load(ref, _TrainingJob)
        if job.cancelled:
            return TrainingStatus(state="failed", error="cancelled", retryable=False)
        elapsed = self.clock() - job.submitted_at
        if elapsed < job.training_seconds:
            if elapsed < job.queue_seconds:
                return TrainingStatus(state="queued", progress=0.0)
            return TrainingStatus(state="running", progress=max(0.0, min(0.99, elapsed / job.training_seconds)))
        if job.outcome != "succeed":
            return TrainingStatus(state="failed", error="sandbox: training diverged (simulated failure)",
                                  retryable=job.outcome == "fail_random")
        await anyio.to_thread.run_sync(self._write_artifact, job)
        return TrainingStatus(state="succeeded", progress=1.0, artifact_url=f"sandbox://artifacts/{ref}.safetensors")

    def _write_artifact(self, job: _TrainingJob) -> None:
        path = self.root / "artifacts" / f"{job.ref}.safetensors"
        if not path.exists():
            meta = {"format": "pt", "trigger_word": job.trigger_word, "steps": str(job.steps), "rank": str(job.rank)}
            data = build_lora_safetensors(seed=self.config.seed, ref=job.ref, rank=job.rank, meta=meta)
            atomic_write(path, lambda fh: fh.write(data))

    async def cancel_training(self, ref: str) -> None:
        """Mark a queued/running training cancelled; a finished one is left as it is."""
        job = await self._load(ref, _TrainingJob)
        if not job.cancelled and self.clock() - job.submitted_at < job.training_seconds:
            job.cancelled = True
            await anyio.to_thread.run_sync(self._save, job)

    async def fetch_file(self, url: str, dest: Path, *, max_bytes: int) -> None:
        match = _ARTIFACT_RE.fullmatch(url)
        if not match:
            raise ProviderRejected(f"sandbox: cannot fetch {url!r}")
        status = await self.training_status(match.group(1))  # (re)creates the artifact if due
        if status.state != "succeeded":
            raise ProviderError(f"sandbox: no artifact at {url!r} ({status.state})", retryable=False)
        data = await anyio.to_thread.run_sync((self.root / "artifacts" / f"{match.group(1)}.safetensors").read_bytes)
        if len(data) > max_bytes:
            raise ProviderError(f"sandbox: {url} is {len(data)} bytes, limit {max_bytes}", retryable=False)
        await anyio.to_thread.run_sync(atomic_write, Path(dest), lambda fh: fh.write(data))

    # ------------------------------------------------------------------ inference

    async def generate(self, spec: GenerationSpec, lora: LoraHandle) -> GenerationStatus:
        ref = _ref("g", spec.attempt_id)
        if await anyio.to_thread.run_sync(self._job_path(ref).exists):
            await anyio.to_thread.run_sync(self._log_call, "generation-again", spec.attempt_id)
            return await self.generation_status(ref)  # idempotent on the attempt id
        if not 1 <= spec.num_outputs <= _INFERENCE.max_outputs:
            raise ProviderRejected(f"sandbox: num_outputs {spec.num_outputs} outside 1..{_INFERENCE.max_outputs}")
        if spec.output_format not in _FORMATS:
            raise ProviderRejected(f"sandbox: output format {spec.output_format!r} not supported")
        if not (16 <= spec.width <= 4096 and 16 <= spec.height <= 4096):
            raise ProviderRejected(f"sandbox: size {spec.width}x{spec.height} outside 16..4096")
        if lora.artifact_path is not None:
            try:
                await anyio.to_thread.run_sync(read_safetensors_header, Path(lora.artifact_path))
            except (OSError, ValueError) as exc:
                raise ProviderRejected(f"sandbox: LoRA artifact {lora.artifact_path} unusable: {exc}") from None
        cfg, ref = self.config, _ref("g", spec.attempt_id)
        error, retryable = None, False
        if cfg.fail_prompts_containing and cfg.fail_prompts_containing in spec.prompt:
            error = "sandbox: prompt refused (simulated failure)"
        elif _unit(cfg.seed, "generation", spec.attempt_id) < cfg.generation_failure_rate:
            error, retryable = "sandbox: generation failed (simulated failure)", True
        seed = spec.seed if spec.seed is not None else int.from_bytes(_digest(spec.attempt_id)[:4], "big")
        job = _GenerationJob(
            ref=ref, attempt_id=spec.attempt_id, submitted_at=self.clock(), duration=cfg.generation_seconds,
            prompt=spec.prompt, lora_id=lora.lora_id, lora_strength=spec.lora_strength, seed=seed,
            num_outputs=spec.num_outputs, width=spec.width, height=spec.height,
            output_format=spec.output_format, error=error, retryable=retryable,
        )
        await anyio.to_thread.run_sync(lambda: self._save(job, only_new=True))
        await anyio.to_thread.run_sync(self._log_call, "generation", spec.attempt_id)
        if cfg.generation_seconds == 0:
            return await self._finish(job)
        return GenerationStatus(state="queued", ref=ref, progress=0.0)

    async def lookup_generation(self, attempt_id: str) -> GenerationStatus | None:
        ref = _ref("g", attempt_id)
        if not await anyio.to_thread.run_sync(self._job_path(ref).exists):
            return None
        return await self.generation_status(ref)

    async def generation_status(self, ref: str) -> GenerationStatus:
        job = await self._load(ref, _GenerationJob)
        elapsed = self.clock() - job.submitted_at
        if elapsed < job.duration:
            return GenerationStatus(state="running", ref=ref, progress=max(0.0, min(0.99, elapsed / job.duration)))
        return await self._finish(job)

    async def _finish(self, job: _GenerationJob) -> GenerationStatus:
        if job.error:
            return GenerationStatus(state="failed", ref=job.ref, error=job.error, retryable=job.retryable)
        def draw() -> list[bytes]:
            return [render_image(job, i) for i in range(job.num_outputs)]

        workers = self.setup.image_workers
        datas = await (workers.run(draw) if workers is not None else anyio.to_thread.run_sync(draw))
        images = [GeneratedImage(data=d) for d in datas]
        return GenerationStatus(state="succeeded", ref=job.ref, progress=1.0, images=images)


@hookimpl
def register_providers(register: Callable[[type], None]) -> None:
    """Register the sandbox provider (``providers.sandbox``)."""
    register(SandboxProvider)
