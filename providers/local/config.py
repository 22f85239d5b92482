"""Configuration of the ``local`` provider and of one training run. Plain msgspec, no torch.

``LocalConfig`` is the ``providers.local`` section of the gateway config. ``TrainConfig`` is
what the trainer takes (and what the provider writes into a job's ``job.json`` for the worker
subprocess): one training's settings, already resolved against the request.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

DType = Literal["auto", "float32", "bfloat16"]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
#: the environment every process of this provider runs with: never reach the Hugging Face hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def _check_side(what: str, value: int) -> None:
    if value % 16:
        raise ValueError(f"`{what}` must be a multiple of 16 (FLUX packs 2x2 patches of 8x latents), got {value}")


class LocalConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``providers.local``: train and generate on this machine's GPUs (or CPU) with diffusers."""

    #: a diffusers FLUX directory (``model_index.json``, ``transformer/``, ``vae/``, ...)
    model_dir: str
    #: training slots: one training at a time on each (``auto`` = ``cuda`` if present, else ``cpu``)
    devices: list[str] = msgspec.field(default_factory=lambda: ["auto"])
    #: devices that keep a warm pipeline for generation (default: the same as ``devices``)
    inference_devices: list[str] | None = None
    #: ``auto`` = bfloat16 on CUDA, float32 on CPU
    dtype: DType = "auto"
    #: training images are centre-cropped and resized to this square side (multiple of 16)
    resolution: Annotated[int, msgspec.Meta(ge=16, le=2048)] = 512
    #: cap on the steps actually run (the API asks for >= 500; tests set e.g. 4)
    max_steps: PosInt | None = None
    learning_rate: PosFloat = 1e-4
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    gradient_checkpointing: bool = True
    #: save LoRA weights + optimizer state + step every N steps (resume point after a restart)
    checkpoint_every: PosInt = 100
    target_modules: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    seed: int = 0
    #: the guidance value fed to guidance-distilled transformers (FLUX.1-dev) while training (the
    #: diffusers recipe's default; some trainers use 1.0)
    train_guidance_scale: NonNeg = 3.5
    #: T5 tokens per prompt (FLUX.1-dev uses 512; smaller is faster)
    max_sequence_length: Annotated[int, msgspec.Meta(ge=1, le=512)] = 512
    #: LoRA adapters kept loaded per inference pipeline (least recently used are deleted)
    adapter_cache: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    #: interpreter for the training subprocess (default: the gateway's own ``sys.executable``)
    python: str | None = None
    #: on shutdown, how long a training may take to write its checkpoint before it is killed
    shutdown_grace_s: NonNeg = 30.0
    cost_per_training: NonNeg = 0.0
    cost_per_image: NonNeg = 0.0

    def __post_init__(self) -> None:
        _check_side("resolution", self.resolution)
        if not self.devices:
            raise ValueError("`devices` must name at least one device")
        if self.inference_devices is not None and not self.inference_devices:
            raise ValueError("`inference_devices` must name at least one device (or be left out)")
        if not self.target_modules:
            raise ValueError("`target_modules` must not be empty")
        for d in [*self.devices, *(self.inference_devices or [])]:
            if not (d in ("auto", "cpu", "cuda", "mps") or d.startswith("cuda:")):
                raise ValueError(f"unknown device {d!r} (auto, cpu, cuda, cuda:N, mps)")


class TrainConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One training run. ``alpha`` is the rank (``None``), as in the diffusers recipe."""

    steps: PosInt
    rank: PosInt = 16
    alpha: float | None = None
    resolution: int = 512
    learning_rate: PosFloat = 1e-4
    batch_size: PosInt = 1
    gradient_checkpointing: bool = False
    dtype: DType = "auto"
    device: str = "auto"
    seed: int = 0
    checkpoint_every: PosInt = 100
    target_modules: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    guidance_scale: NonNeg = 1.0
    max_sequence_length: Annotated[int, msgspec.Meta(ge=1, le=512)] = 512
    max_grad_norm: PosFloat = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    #: checkpoints kept on disk (the newest ones)
    keep_checkpoints: PosInt = 2

    def __post_init__(self) -> None:
        _check_side("resolution", self.resolution)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with a run to be resumed by it."""
        return {k: v for k, v in msgspec.structs.asdict(self).items()
                if k not in ("device", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing")}
