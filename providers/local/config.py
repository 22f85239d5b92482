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
#: diffusers' ``train_dreambooth_lora_flux.py`` default ``--lora_layers``. peft matches each name as a
#: suffix of a module path, so the ``attn.to_q/k/v`` entries also adapt the single-stream blocks'
#: q/k/v (those blocks have no ``to_out``, and ``proj_mlp``/``proj_out`` are not in the list), and
#: the ``add_*``/``to_add_out``/``ff*`` entries only exist in the double-stream blocks.
DEFAULT_TARGET_MODULES = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
#: the attention-only set this provider used before (kept for reference / explicit configs)
ATTENTION_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
SaveDType = Literal["bf16", "fp32"]
Checkpointing = bool | Literal["auto"]
Side = Annotated[int, msgspec.Meta(ge=16, le=4096)]
#: the environment every process of this provider runs with: never reach the Hugging Face hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def _check_side(what: str, value: int) -> None:
    if value % 16:
        raise ValueError(f"`{what}` must be a multiple of 16 (FLUX packs 2x2 patches of 8x latents), got {value}")


def _check_training_knobs(cfg: "LocalConfig | TrainConfig") -> None:
    if cfg.buckets is not None:
        if not cfg.buckets:
            raise ValueError("`buckets` must list at least one side (or be null)")
        for side in cfg.buckets:
            _check_side("buckets", side)
    if cfg.oom_fallback_resolution is not None:
        _check_side("oom_fallback_resolution", cfg.oom_fallback_resolution)
    if not cfg.compile_backend:
        raise ValueError("`compile_backend` must not be empty")


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
    #: true | false | auto (auto: on only when the estimated activation memory does not fit the
    #: device's free memory; see README)
    gradient_checkpointing: Checkpointing = True
    #: dtype of the saved LoRA file (``bf16`` halves it; checkpoints stay float32)
    save_dtype: SaveDType = "bf16"
    #: aspect-ratio buckets: null = centre-crop squares of ``resolution``; a list of sides (e.g.
    #: [512, 768, 1024]) = each image goes to the bucket (w, h multiples of 16, w*h ~ side^2) nearest
    #: its aspect ratio, at the largest listed side its pixel count reaches
    buckets: list[Side] | None = None
    #: speed switches, all off by default until measured on a GPU (see README)
    compile: bool = False
    compile_backend: str = "inductor"
    #: TORCHINDUCTOR_CACHE_DIR for ``compile`` (default: ``<data_dir>/local/trainings/.inductor-cache``)
    compile_cache_dir: str | None = None
    attention_backend: str | None = None
    lora_bf16: bool = False
    sync_every: PosInt = 1
    fused_adamw: bool = False
    #: after an out-of-memory that gradient checkpointing did not cure, retry once at this side
    oom_fallback_resolution: Annotated[int, msgspec.Meta(ge=16, le=2048)] | None = None
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
        _check_training_knobs(self)
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
    gradient_checkpointing: Checkpointing = False
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
    save_dtype: SaveDType = "bf16"
    buckets: list[Side] | None = None
    #: regional ``torch.compile`` of the transformer's repeated blocks
    compile: bool = False
    compile_backend: str = "inductor"
    compile_cache_dir: str | None = None
    #: ``transformer.set_attention_backend(name)`` (diffusers >= 0.35)
    attention_backend: str | None = None
    #: LoRA matmuls in the run dtype (autocast) with float32 master weights
    lora_bf16: bool = False
    #: read the loss / check it is finite every N steps (1 = every step, today's path)
    sync_every: PosInt = 1
    fused_adamw: bool = False
    oom_fallback_resolution: int | None = None

    def __post_init__(self) -> None:
        _check_side("resolution", self.resolution)
        _check_training_knobs(self)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with a run to be resumed by it."""
        key = {k: v for k, v in msgspec.structs.asdict(self).items() if k not in RESUME_INDEPENDENT}
        if key.get("buckets") is None:  # absent as before buckets existed: older checkpoints still fit
            key.pop("buckets", None)
        return key


#: settings that do not change what a checkpoint means (speed switches, cadence, the saved file's
#: dtype): a run may resume a checkpoint written with other values of these
RESUME_INDEPENDENT = frozenset({
    "device", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing", "save_dtype", "compile",
    "compile_backend", "compile_cache_dir", "attention_backend", "lora_bf16", "sync_every", "fused_adamw",
    "oom_fallback_resolution",
})
