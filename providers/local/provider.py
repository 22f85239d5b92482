"""``LocalProvider``: FLUX LoRA training in subprocesses and generation on warm pipelines.

No torch at import time: the trainer runs in ``python -m providers.local.worker`` processes
(started by :class:`~providers.local.runner.TrainingRunner`), and the inference module, which
imports torch and diffusers, is imported on the first ``generate``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog

from providers.base import (
    Capabilities, Cost, Dataset, GeneratedImage, GenerationSpec, GenerationStatus, InferenceCapabilities,
    LoraHandle, Provider, ProviderError, ProviderRejected, ProviderSetup, ProviderUnavailable,
    TrainingCapabilities, TrainingSpec, TrainingStatus, TrainingSubmission,
)
from providers.local.config import LocalConfig, TrainConfig
from providers.local.runner import TrainingRunner, _Job, read_json

log = structlog.get_logger()

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # (also trainer.WEIGHTS_NAME; no torch import here)
_REF_RE = re.compile(r"loc-t-[0-9a-f]{24}")
_ARTIFACT_RE = re.compile(r"local://trainings/(loc-t-[0-9a-f]{24})/" + re.escape(WEIGHTS_NAME))
_FORMATS = frozenset({"png", "jpg", "webp"})
_IMAGE_RE = re.compile(r"\d{3,}\.(jpg|jpeg|png|webp)", re.IGNORECASE)
_TRAINING = TrainingCapabilities(dataset_input="directory", produces_artifact=True, min_steps=1, max_steps=100_000,
                                 min_rank=1, max_rank=256)
_INFERENCE = InferenceCapabilities(accepts_lora_file=True, max_outputs=4, weights_access="local_file")


def _ref(kind: str, attempt_id: str) -> str:
    return f"loc-{kind}-" + hashlib.sha256(attempt_id.encode()).hexdigest()[:24]


def _seed_from(attempt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"seed\x1f{attempt_id}".encode()).digest()[:4], "big")


def train_config(cfg: LocalConfig, spec: TrainingSpec) -> TrainConfig:
    """One training's settings: the request's steps (capped by ``max_steps``) and rank, the rest from config."""
    steps = min(spec.steps, cfg.max_steps) if cfg.max_steps else spec.steps
    return TrainConfig(
        steps=steps, rank=spec.lora_rank, resolution=cfg.resolution, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing, dtype=cfg.dtype,
        device="auto", seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
        target_modules=list(cfg.target_modules), guidance_scale=cfg.train_guidance_scale,
        max_sequence_length=cfg.max_sequence_length, save_dtype=cfg.save_dtype,
        buckets=list(cfg.buckets) if cfg.buckets is not None else None,
        compile=cfg.compile, compile_backend=cfg.compile_backend, compile_cache_dir=cfg.compile_cache_dir,
        attention_backend=cfg.attention_backend, lora_bf16=cfg.lora_bf16, sync_every=cfg.sync_every,
        fused_adamw=cfg.fused_adamw, oom_fallback_resolution=cfg.oom_fallback_resolution,
    )


class LocalProvider(Provider):
    """Trains FLUX LoRAs on this machine's devices and generates with them (or with imported ones)."""

    name = "local"
    config_type = LocalConfig

    def __init__(self, config: LocalConfig, setup: ProviderSetup) -> None:
        super().__init__(config, setup)
        self.config: LocalConfig = config
        self.root = self.state_dir()
        self.model_dir = Path(config.model_dir).expanduser().absolute()
        cost = Cost(per_training=config.cost_per_training, per_image=config.cost_per_image)
        self.capabilities = Capabilities(training=_TRAINING, inference=_INFERENCE, cost=cost,
                                         can_lookup=True, can_cancel=True, webhooks_in=False)
        self.runner = TrainingRunner(self.root / "trainings", list(config.devices), python=config.python,
                                     grace_s=config.shutdown_grace_s)
        self.submit_calls = 0
        self.hosts: list[Any] | None = None  # PipelineHost per inference device, made on first generate
        self._host_locks: list[anyio.Lock] | None = None
        self._host_slots: anyio.Semaphore | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Run trainings in this process (the engine calls this): take the runner directory if no
        other live process owns it, resuming its unfinished trainings; else stand by."""
        await anyio.to_thread.run_sync(self.runner.start)

    @property
    def recovered(self) -> list[str]:
        """Unfinished trainings this process resumed when it took the runner directory."""
        return self.runner.recovered

    # ------------------------------------------------------------------ training

    def _check_model(self) -> None:
        if not (self.model_dir / "model_index.json").is_file():
            raise ProviderUnavailable(f"local: model_dir {self.model_dir} is not a diffusers FLUX directory")

    async def start_training(self, spec: TrainingSpec, dataset: Dataset) -> TrainingSubmission:
        self.submit_calls += 1
        ref = _ref("t", spec.attempt_id)
        if await anyio.to_thread.run_sync(self.runner.load, ref) is not None:
            return TrainingSubmission(ref=ref)  # idempotent on the attempt id
        caps = _TRAINING
        if spec.subject_kind not in caps.subject_kinds:
            raise ProviderRejected(f"local: subject kind {spec.subject_kind!r} not supported")
        for what, v, lo, hi in (("steps", spec.steps, caps.min_steps, caps.max_steps),
                                ("rank", spec.lora_rank, caps.min_rank, caps.max_rank)):
            if not lo <= v <= hi:
                raise ProviderRejected(f"local: {what} {v} outside {lo}..{hi}")
        await anyio.to_thread.run_sync(self._check_model)
        cfg = train_config(self.config, spec)
        job = _Job(
            ref=ref, attempt_id=spec.attempt_id, lora_id=spec.lora_id, team_id=spec.team_id,
            trigger_word=spec.trigger_word, seq=self.runner.next_seq(), submitted_at=time.time(),
            requested_steps=spec.steps, steps=cfg.steps, rank=spec.lora_rank, image_count=dataset.image_count,
        )
        created = await anyio.to_thread.run_sync(self._create_job, job, cfg, Path(dataset.directory))
        if created:
            self.runner.enqueue(job)
            log.info("local_training_queued", provider_ref=ref, steps=cfg.steps, rank=cfg.rank, team_id=spec.team_id)
        return TrainingSubmission(ref=ref)

    def _create_job(self, job: _Job, cfg: TrainConfig, source: Path) -> bool:
        """Copy the dataset and write the job's files in a temp dir, then rename it into place."""
        final = self.runner.job_dir(job.ref)
        if final.exists() and (final / "job.json").is_file():
            return False
        tmp = final.with_name(f".tmp-{job.ref}-{time.time_ns()}")
        try:
            tmp.mkdir(parents=True)
            dataset = tmp / "dataset"
            dataset.mkdir()
            if not source.is_dir():
                raise ProviderRejected(f"local: dataset directory {source} does not exist")
            images = sorted(p for p in source.iterdir() if _IMAGE_RE.fullmatch(p.name))
            if not images or len(images) != job.image_count:
                raise ProviderRejected(f"local: dataset holds {len(images)} NNN.jpg images, expected {job.image_count}")
            for img in images:
                caption = img.with_suffix(".txt")
                if not caption.is_file():
                    raise ProviderRejected(f"local: caption {caption.name} missing for {img.name}")
                shutil.copyfile(img, dataset / img.name)
                shutil.copyfile(caption, dataset / caption.name)
            train = {"model_dir": str(self.model_dir.resolve()), "dataset_dir": str(final / "dataset"),
                     "config": msgspec.to_builtins(cfg)}
            (tmp / "train.json").write_bytes(msgspec.json.encode(train))
            (tmp / "job.json").write_bytes(msgspec.json.encode(job))
            if final.exists():
                if (final / "job.json").is_file():
                    return False  # a concurrent submit of the same attempt won
                shutil.rmtree(final)  # a dir without job.json: an interrupted earlier submit
            try:
                tmp.rename(final)
            except OSError:
                if (final / "job.json").is_file():
                    return False
                raise
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def lookup_training(self, attempt_id: str) -> TrainingSubmission | None:
        ref = _ref("t", attempt_id)
        return TrainingSubmission(ref=ref) if await anyio.to_thread.run_sync(self.runner.load, ref) else None

    async def _job(self, ref: str) -> _Job:
        if not _REF_RE.fullmatch(ref):
            raise ProviderRejected(f"local: unknown training {ref!r}")
        job = await anyio.to_thread.run_sync(self.runner.load, ref)
        if job is None:
            raise ProviderRejected(f"local: unknown training {ref!r}")
        return job

    async def training_status(self, ref: str) -> TrainingStatus:
        job = await self._job(ref)
        if job.state == "cancelled":
            return TrainingStatus(state="failed", error="cancelled", retryable=False)
        if job.state == "failed":
            return TrainingStatus(state="failed", error=job.error or "local: training failed", retryable=job.retryable)
        if job.state == "succeeded":
            return TrainingStatus(state="succeeded", progress=1.0,
                                  artifact_url=f"local://trainings/{ref}/{WEIGHTS_NAME}")
        prog = await anyio.to_thread.run_sync(self.runner.progress, ref) or {}
        step, total = prog.get("step") or 0, prog.get("total") or job.steps
        fraction = max(0.0, min(0.99, step / total)) if total else 0.0
        if job.state == "queued":
            return TrainingStatus(state="queued", progress=fraction)
        return TrainingStatus(state="running", progress=fraction)

    async def cancel_training(self, ref: str) -> None:
        await self._job(ref)
        await anyio.to_thread.run_sync(self.runner.cancel, ref)

    async def fetch_file(self, url: str, dest: Path, *, max_bytes: int) -> None:
        match = _ARTIFACT_RE.fullmatch(url)
        if not match:
            raise ProviderRejected(f"local: cannot fetch {url!r}")
        job = await self._job(match.group(1))
        if job.state != "succeeded":
            raise ProviderError(f"local: no artifact at {url!r} ({job.state})", retryable=False)
        src = self.runner.job_dir(job.ref) / "output" / WEIGHTS_NAME

        def copy() -> None:
            try:
                size = src.stat().st_size
            except FileNotFoundError:
                raise ProviderError(f"local: the weights of {job.ref} are gone", retryable=False) from None
            if size > max_bytes:
                raise ProviderError(f"local: {url} is {size} bytes, limit {max_bytes}", retryable=False)
            dest_path = Path(dest)
            dest_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest_path.with_name(f".{dest_path.name}.partial")
            shutil.copyfile(src, tmp)
            tmp.replace(dest_path)

        await anyio.to_thread.run_sync(copy)

    # ------------------------------------------------------------------ inference

    def _lora_path(self, lora: LoraHandle) -> Path:
        if lora.artifact_path is not None:
            path = Path(lora.artifact_path)
            if not path.is_file():
                raise ProviderRejected(f"local: LoRA file {path} does not exist", retryable=True)
            return path
        if lora.trained_by == self.name and lora.trained_ref and _REF_RE.fullmatch(lora.trained_ref):
            path = self.runner.job_dir(lora.trained_ref) / "output" / WEIGHTS_NAME
            if path.is_file():
                return path
        raise ProviderRejected("local: generating needs the LoRA's weights file", retryable=True)

    def _ensure_hosts(self) -> None:
        if self.hosts is None:
            from providers.local.inference import PipelineHost  # torch + diffusers: only now

            devices = self.config.inference_devices or self.config.devices
            self.hosts = [PipelineHost(self.model_dir, d, self.config.dtype, adapter_cache=self.config.adapter_cache,
                                       max_sequence_length=self.config.max_sequence_length)
                          for d in dict.fromkeys(devices)]

    async def generate(self, spec: GenerationSpec, lora: LoraHandle) -> GenerationStatus:
        if not 1 <= spec.num_outputs <= _INFERENCE.max_outputs:
            raise ProviderRejected(f"local: num_outputs {spec.num_outputs} outside 1..{_INFERENCE.max_outputs}")
        if spec.output_format not in _FORMATS:
            raise ProviderRejected(f"local: output format {spec.output_format!r} not supported")
        if spec.width % 16 or spec.height % 16 or not (16 <= spec.width <= 4096 and 16 <= spec.height <= 4096):
            raise ProviderRejected(f"local: size {spec.width}x{spec.height} must be multiples of 16 within 16..4096")
        path = await anyio.to_thread.run_sync(self._lora_path, lora)
        await anyio.to_thread.run_sync(self._check_model)
        await anyio.to_thread.run_sync(self._ensure_hosts)
        from providers.local.inference import GenerateRequest, LoraLoadError

        req = GenerateRequest(
            prompt=spec.prompt, width=spec.width, height=spec.height,
            seed=spec.seed if spec.seed is not None else _seed_from(spec.attempt_id),
            num_outputs=spec.num_outputs, guidance_scale=spec.guidance_scale,
            num_inference_steps=spec.num_inference_steps, lora_strength=spec.lora_strength,
            output_format=spec.output_format,
        )
        try:
            datas = await self.run_on_host(lambda host: host.generate(req, path))
        except LoraLoadError as e:
            raise ProviderRejected(f"local: {e}", retryable=True) from None
        except (FileNotFoundError, OSError) as e:
            raise ProviderUnavailable(f"local: the model could not be loaded ({type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - torch errors (OOM, device) are the provider's, not the request's
            name = type(e).__name__
            if "OutOfMemory" in name or "out of memory" in str(e).lower():
                raise ProviderUnavailable("local: out of device memory while generating") from None
            log.warning("local_generation_failed", error=f"{name}: {str(e)[:300]}")
            raise ProviderError(f"local: generation failed ({name})", retryable=True) from None
        return GenerationStatus(state="succeeded", ref=_ref("g", spec.attempt_id), progress=1.0,
                                images=[GeneratedImage(data=d) for d in datas])

    async def run_on_host(self, fn: Any) -> Any:
        """Run ``fn(host)`` in a worker thread on a free device's pipeline (one call per device at a time)."""
        await anyio.to_thread.run_sync(self._ensure_hosts)
        assert self.hosts is not None
        if self._host_locks is None or self._host_slots is None:  # made on the event loop
            self._host_locks = [anyio.Lock() for _ in self.hosts]
            self._host_slots = anyio.Semaphore(len(self.hosts))
        async with self._host_slots:
            for host, lock in zip(self.hosts, self._host_locks):
                if not lock.locked():
                    async with lock:
                        return await anyio.to_thread.run_sync(fn, host)
        raise RuntimeError("no free pipeline")  # pragma: no cover - the semaphore guarantees one

    async def generation_status(self, ref: str) -> GenerationStatus:
        raise ProviderRejected(f"local: generations finish inline; no job {ref!r}")

    # ------------------------------------------------------------------ shutdown

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.runner.stop)
        if self.hosts:
            for host in self.hosts:
                await anyio.to_thread.run_sync(host.close)


__all__ = ["LocalProvider", "LocalConfig", "train_config", "read_json"]
