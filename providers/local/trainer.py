"""Flow-matching LoRA training for FLUX, as plain functions (diffusers' DreamBooth LoRA recipe).

The recipe is ``examples/dreambooth/train_dreambooth_lora_flux.py`` from diffusers, trimmed to
what a personal LoRA needs (no prior preservation, no text-encoder training):

* the VAE latent distribution of every image and the text embeddings of every caption are
  computed **once** (``encode_dataset``), then the VAE and both text encoders are freed;
* peft ``LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=...)``
  on the transformer's attention projections; only the LoRA weights train (kept in float32;
  the frozen base runs in the run's dtype);
* each step: sample latents from the cached distribution, ``x0 = (z - shift) * scale``; draw
  ``u ~ U[0, 1)``, ``t = scheduler.timesteps[u * 1000]``, ``σ = scheduler.sigmas[...]``;
  ``noisy = (1 - σ)·x0 + σ·noise``; pack 2x2 patches; the transformer (guidance embedding
  when it has one, ``img_ids`` from ``_prepare_latent_image_ids``, ``txt_ids``) predicts the
  velocity; ``loss = mean((pred - (noise - x0))²)`` (uniform weighting, the recipe's default);
  AdamW, gradient clipping at ``max_grad_norm``, constant learning rate;
* saved with ``FluxPipeline.save_lora_weights`` from ``get_peft_model_state_dict`` as
  ``pytorch_lora_weights.safetensors`` (keys ``transformer.<module>.lora_A/lora_B.weight``).

Randomness is counter-based: the batch order of an epoch, the latent sample, the noise and
the timesteps of step ``n`` all come from generators seeded by ``(seed, n)``. A run resumed
from a checkpoint (LoRA weights + optimizer state + step + RNG state) therefore continues
exactly as the uninterrupted run would have.

Device and dtype are picked at run time (``auto``: bfloat16 on CUDA, float32 on CPU) and the
code path is the same on both.

Optional, all off by default: aspect-ratio ``buckets`` (batches drawn within one bucket), and the
speed switches ``gradient_checkpointing: auto``, ``compile`` (regional ``torch.compile`` of the
repeated blocks), ``attention_backend``, ``lora_bf16`` (autocast LoRA math, float32 masters),
``sync_every`` (no host syncs inside a step) and ``fused_adamw``. :func:`train_resilient` wraps
:func:`train` with the out-of-memory fallbacks (gradient checkpointing, then a lower resolution).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import json
import math
import os
import shutil
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import msgspec

from providers.local.config import OFFLINE_ENV, TrainConfig

for _k, _v in OFFLINE_ENV.items():  # before diffusers / transformers / huggingface_hub are imported
    os.environ[_k] = _v

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ProgressFn = Callable[[str, int, int, "float | None"], None]  # (phase, step, total, loss)
StepHook = Callable[[int, TrainConfig], None]  # called before each step (tests: simulated OOM)
#: aspect ratios (width / height) of the buckets made for each side in ``buckets``
BUCKET_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
#: rough activation memory of one transformer block without checkpointing, in elements per
#: (token x inner dim): Korthikanti et al.'s 34 bytes/elem-pair for 16-bit (flash attention, no
#: dropout masks), rounded up for the LoRA inputs and the second stream of the double blocks
ACTIVATION_ELEMENTS_PER_TOKEN_DIM = 20
#: ``auto`` checkpointing turns on when the estimate exceeds this share of the free memory
AUTO_CHECKPOINTING_HEADROOM = 0.8


class DatasetError(ValueError):
    """The dataset directory cannot be trained on (not retryable)."""


class TrainConfigError(ValueError):
    """A setting this machine cannot honour (unknown attention backend ...): not retryable."""


class PersistentOutOfMemory(RuntimeError):
    """Out of device memory even after the fallbacks: not retryable (same job, same OOM)."""


class TrainingInterrupted(Exception):
    """Stopped on request after writing a checkpoint at ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step


# --------------------------------------------------------------------------- device, dtype, seeds


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword. ``torch_dtype`` works in every diffusers < 1.0 (newer
    ones also take ``dtype`` and warn about ``torch_dtype``; that warning is silenced here)."""
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated.*", category=FutureWarning)
    return {"torch_dtype": dtype}


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers / transformers (logs stay readable)."""
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def read_dataset(dataset_dir: Path) -> list[Example]:
    """``NNN.jpg`` (or png/webp) images with optional ``NNN.txt`` captions, sorted by name."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DatasetError(f"dataset directory {d} does not exist")
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise DatasetError(f"dataset directory {d} holds no images")
    out = []
    for p in images:
        cap = p.with_suffix(".txt")
        out.append(Example(p, cap.read_text("utf-8", errors="replace").strip() if cap.is_file() else ""))
    return out


def image_tensor(path: Path, resolution: int, height: int | None = None) -> torch.Tensor:
    """Resize to cover ``resolution`` x ``height`` (default: a square) and centre-crop; a
    ``[3, H, W]`` float tensor in [-1, 1]."""
    size = (resolution, resolution if height is None else height)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, size, method=Image.Resampling.LANCZOS)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{Path(path).name} is not a readable image: {e}") from None
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF rotation."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{Path(path).name} is not a readable image: {e}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def bucket_shapes(side: int) -> list[tuple[int, int]]:
    """``(width, height)`` buckets of about ``side**2`` pixels, both multiples of 16, one per ratio."""
    out: list[tuple[int, int]] = []
    for r in BUCKET_RATIOS:
        w = max(16, round(side * math.sqrt(r) / 16) * 16)
        h = max(16, round(side / math.sqrt(r) / 16) * 16)
        if (w, h) not in out:
            out.append((w, h))
    return out


def assign_bucket(width: int, height: int, sides: list[int]) -> tuple[int, int]:
    """The bucket of an image: the largest side whose area the image reaches (the smallest side if
    none; images are not upscaled past a smaller bucket), then the ratio nearest the image's."""
    ordered = sorted(set(sides))
    side = next((s for s in reversed(ordered) if width * height >= s * s), ordered[0])
    target = math.log(width / height)
    return min(bucket_shapes(side), key=lambda wh: (abs(math.log(wh[0] / wh[1]) - target), wh))


# --------------------------------------------------------------------------- encoding (once)


@dataclass
class Encoded:
    """What training needs from the VAE and text encoders, computed once per run."""

    latent_mean: torch.Tensor  # [N, C, h, w] float32, on the device
    latent_std: torch.Tensor  # [N, C, h, w] float32
    prompt_embeds: torch.Tensor  # [N, S, D] run dtype (T5)
    pooled_embeds: torch.Tensor  # [N, P] run dtype (CLIP pooled)
    text_ids: torch.Tensor  # [S, 3]
    img_ids: torch.Tensor  # [(h/2)*(w/2), 3]
    shift_factor: float
    scaling_factor: float

    @property
    def count(self) -> int:
        return self.latent_mean.shape[0]

    @property
    def image_tokens(self) -> int:
        return self.img_ids.shape[0]


@dataclass
class Bucketed:
    """The encoded dataset split by aspect-ratio bucket: ``parts[b]`` holds the examples
    ``members[b]`` (dataset indices) at ``sizes[b]`` = (width, height) pixels."""

    parts: list[Encoded]
    members: list[list[int]]
    sizes: list[tuple[int, int]]

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)

    @property
    def image_tokens(self) -> int:
        return max(p.image_tokens for p in self.parts)


EncodedData = Union[Encoded, Bucketed]


def encode_dataset(model_dir: Path, examples: list[Example], cfg: TrainConfig, device: torch.device,
                   dtype: torch.dtype, *, batch: int = 4) -> EncodedData:
    """VAE latent distributions and text embeddings of every example; the models are freed after.
    With ``cfg.buckets`` the images are grouped by bucket (:class:`Bucketed`)."""
    from diffusers import AutoencoderKL, FluxPipeline

    model_dir = Path(model_dir)
    with torch.no_grad():
        text_pipe = FluxPipeline.from_pretrained(
            model_dir, transformer=None, vae=None, local_files_only=True, **dtype_kwargs(dtype),
        ).to(device)
        embeds, pooled, text_ids = [], [], None
        captions = [e.caption for e in examples]
        for i in range(0, len(captions), batch):
            chunk = captions[i:i + batch]
            pe, pp, text_ids = text_pipe.encode_prompt(
                prompt=chunk, prompt_2=chunk, device=device, num_images_per_prompt=1,
                max_sequence_length=cfg.max_sequence_length,
            )
            embeds.append(pe.to(dtype))
            pooled.append(pp.to(dtype))
        del text_pipe
        free_memory()

        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True, **dtype_kwargs(dtype))
        vae.requires_grad_(False)
        vae.to(device).eval()
        if cfg.buckets:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, e in enumerate(examples):
                groups.setdefault(assign_bucket(*image_size(e.image), list(cfg.buckets)), []).append(i)
        else:
            groups = {(cfg.resolution, cfg.resolution): list(range(len(examples)))}
        latents: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for (w, h), members in groups.items():
            means, stds = [], []
            for i in range(0, len(members), batch):
                pixels = torch.stack([image_tensor(examples[j].image, w, h) for j in members[i:i + batch]])
                dist = vae.encode(pixels.to(device, dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
            latents[(w, h)] = (torch.cat(means), torch.cat(stds))
        shift = float(vae.config.shift_factor or 0.0)
        scale = float(vae.config.scaling_factor)
        del vae
        free_memory()

    prompt_embeds, pooled_embeds = torch.cat(embeds), torch.cat(pooled)
    text_ids = text_ids.to(device, dtype)

    def part(mean: torch.Tensor, std: torch.Tensor, members: list[int]) -> Encoded:
        h, w = mean.shape[2], mean.shape[3]
        if h % 2 or w % 2:
            raise DatasetError(f"latents of {h}x{w} cannot be packed in 2x2 patches (resolution must be a multiple of 16)")
        img_ids = FluxPipeline._prepare_latent_image_ids(mean.shape[0], h // 2, w // 2, device, dtype)
        if len(members) == len(examples):
            pe, pp = prompt_embeds, pooled_embeds
        else:
            index = torch.tensor(members, device=prompt_embeds.device)
            pe, pp = prompt_embeds[index], pooled_embeds[index]
        return Encoded(latent_mean=mean, latent_std=std, prompt_embeds=pe, pooled_embeds=pp, text_ids=text_ids,
                       img_ids=img_ids, shift_factor=shift, scaling_factor=scale)

    if cfg.buckets:
        sizes = sorted(groups)
        return Bucketed(parts=[part(*latents[s], groups[s]) for s in sizes], members=[groups[s] for s in sizes],
                        sizes=sizes)
    (mean, std), = latents.values()
    return part(mean, std, list(range(len(examples))))


# --------------------------------------------------------------------------- model


def load_scheduler(model_dir: Path) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(Path(model_dir), subfolder="scheduler", local_files_only=True)


def load_lora_transformer(model_dir: Path, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """The frozen transformer in ``dtype`` with a fresh trainable LoRA adapter (float32) on it."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(
        Path(model_dir), subfolder="transformer", local_files_only=True, **dtype_kwargs(dtype),
    )
    transformer.to(device)
    return add_lora(transformer, cfg)


def add_lora(transformer: Any, cfg: TrainConfig) -> Any:
    """Freeze ``transformer`` and add the trainable LoRA adapter (float32) the recipe adds."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    if cfg.gradient_checkpointing is True:  # "auto" is decided in ``train`` once the sizes are known
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(derive_seed(cfg.seed, "lora-init"))  # peft's gaussian init draws from the global RNG
    transformer.add_adapter(LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
        target_modules=list(cfg.target_modules),
    ))
    for p in transformer.parameters():  # train the LoRA in float32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    if not any(p.requires_grad for p in transformer.parameters()):
        raise ValueError(f"target_modules {cfg.target_modules} match no module of the transformer")
    transformer.train()
    return transformer


def fused_adamw_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether this torch has a fused AdamW kernel for these parameters' device and dtype (CUDA;
    also CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        devices = {"cuda"}
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def make_optimizer(transformer: Any, cfg: TrainConfig, log: Callable[[str], None] = lambda msg: None
                   ) -> torch.optim.Optimizer:
    params = [p for p in transformer.parameters() if p.requires_grad]
    extra: dict[str, Any] = {}
    if cfg.fused_adamw:
        if fused_adamw_supported(params):
            extra["fused"] = True
        else:
            log(f"fused_adamw: no fused AdamW kernel for {params[0].device.type if params else '?'} in torch "
                f"{torch.__version__}; using the default (foreach) AdamW")
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **extra,
    )


# --------------------------------------------------------------------------- speed switches


def activation_bytes(transformer: Any, image_tokens: int, text_tokens: int, batch_size: int,
                     dtype: torch.dtype) -> int:
    """A rough estimate of the activation memory one training step keeps without gradient
    checkpointing (all blocks' saved tensors; see ``ACTIVATION_ELEMENTS_PER_TOKEN_DIM``)."""
    c = transformer.config
    inner = int(c.num_attention_heads) * int(c.attention_head_dim)
    blocks = int(c.num_layers) + int(c.num_single_layers)
    elem = torch.finfo(dtype).bits // 8
    return int(ACTIVATION_ELEMENTS_PER_TOKEN_DIM * batch_size * (image_tokens + text_tokens) * inner * blocks * elem)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: ``cudaMemGetInfo`` on CUDA, ``MemAvailable`` on CPU, else None."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def decide_checkpointing(setting: bool | str, estimate: int, free: int | None) -> bool:
    """``true``/``false`` as given; ``auto``: on when ``estimate`` exceeds the headroom share of
    ``free`` (on when the free memory is unknown, the safe choice)."""
    if setting != "auto":
        return bool(setting)
    if free is None:
        return True
    return estimate > AUTO_CHECKPOINTING_HEADROOM * free


def set_attention_backend(transformer: Any, name: str) -> None:
    """diffusers' ``set_attention_backend(name)``; a clear :class:`TrainConfigError` when the
    installed diffusers has no such method, or the backend is unknown or unusable here."""
    import diffusers

    setter = getattr(transformer, "set_attention_backend", None)
    if setter is None:
        raise TrainConfigError(f"attention_backend {name!r}: diffusers {diffusers.__version__} has no "
                               f"set_attention_backend (needs diffusers >= 0.35)")
    try:
        setter(name)
    except Exception as e:  # noqa: BLE001 - unknown name (ValueError), missing kernel package (RuntimeError ...)
        raise TrainConfigError(f"attention_backend {name!r} cannot be used: {type(e).__name__}: {str(e)[:300]}") from None


def compile_blocks(transformer: Any, cfg: TrainConfig) -> int:
    """Regional ``torch.compile`` of the repeated blocks (``transformer_blocks`` and
    ``single_transformer_blocks``) with ``cfg.compile_backend``; the inductor cache goes to
    ``cfg.compile_cache_dir`` (``TORCHINDUCTOR_CACHE_DIR``) so a later run reuses the kernels.
    Returns the number of blocks compiled."""
    if cfg.compile_cache_dir:
        Path(cfg.compile_cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cfg.compile_cache_dir)
    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
    if not blocks:
        raise TrainConfigError("compile: the transformer has no transformer_blocks / single_transformer_blocks")
    for block in blocks:  # what diffusers' compile_repeated_blocks does, without depending on its version
        block.compile(backend=cfg.compile_backend)
    return len(blocks)


def lora_autocast(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``lora_bf16``: autocast the forward to the run dtype, so the LoRA matmuls run in it while the
    adapter's parameters (and AdamW's state) stay float32. A no-op in a float32 run."""
    if cfg.lora_bf16 and dtype != torch.float32:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the loss


def batch_indices(count: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The examples of ``step``: epochs are seeded permutations, read ``batch_size`` at a time."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, count)
        perm = torch.randperm(count, generator=_generator(seed, "epoch", epoch)).tolist()
        take = min(batch_size - len(out), count - offset)
        out.extend(perm[offset:offset + take])
        pos += take
    return out


def bucket_batch(counts: list[int], step: int, batch_size: int, seed: int) -> tuple[int, list[int]]:
    """``(bucket, indices within it)`` of ``step``: each epoch, every bucket's examples are permuted
    and cut into batches (the last one of a bucket may be smaller), and the batches of all buckets
    are permuted together; all from generators seeded by (seed, epoch)."""
    per_epoch = sum(math.ceil(n / batch_size) for n in counts)
    epoch, k = divmod(step, per_epoch)
    batches: list[tuple[int, list[int]]] = []
    for b, n in enumerate(counts):
        perm = torch.randperm(n, generator=_generator(seed, "bucket", epoch, b)).tolist()
        batches.extend((b, perm[i:i + batch_size]) for i in range(0, n, batch_size))
    order = torch.randperm(len(batches), generator=_generator(seed, "batches", epoch)).tolist()
    return batches[order[k]]


def step_part(enc: EncodedData, step: int, cfg: TrainConfig) -> tuple[Encoded, list[int]]:
    """The encoded examples (one bucket) and indices into them that step ``step`` trains on."""
    if isinstance(enc, Bucketed):
        b, idx = bucket_batch([p.count for p in enc.parts], step, cfg.batch_size, cfg.seed)
        return enc.parts[b], idx
    return enc, batch_indices(enc.count, step, cfg.batch_size, cfg.seed)


def flow_matching_loss(transformer: Any, enc: Encoded, idx: list[int], x0: torch.Tensor, noise: torch.Tensor,
                       indices: torch.Tensor, scheduler: Any, guidance_scale: float) -> torch.Tensor:
    """Mean squared error of the predicted velocity ``noise - x0`` at ``scheduler.timesteps[indices]``."""
    from diffusers import FluxPipeline

    device, dtype = enc.img_ids.device, enc.prompt_embeds.dtype
    bsz, channels, h, w = x0.shape
    timesteps = scheduler.timesteps[indices].to(device=device, dtype=torch.float32)
    sigmas = scheduler.sigmas[indices].to(device=device, dtype=torch.float32).view(bsz, 1, 1, 1)
    x0 = x0.to(device)
    noise = noise.to(device)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy.to(dtype), bsz, channels, h, w)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((bsz,), float(guidance_scale), device=device, dtype=torch.float32)
    pred = transformer(
        hidden_states=packed,
        timestep=(timesteps / 1000).to(dtype),
        guidance=guidance,
        pooled_projections=enc.pooled_embeds[idx],
        encoder_hidden_states=enc.prompt_embeds[idx],
        txt_ids=enc.text_ids,
        img_ids=enc.img_ids,
        return_dict=False,
    )[0]
    # packing is a permutation, so the loss on packed tensors equals the recipe's unpacked one
    target = FluxPipeline._pack_latents(noise - x0, bsz, channels, h, w)
    return torch.mean((pred.float() - target.float()) ** 2)


def sample_step(enc: Encoded, step: int, cfg: TrainConfig, num_train_timesteps: int, *,
                idx: list[int] | None = None, on_device: bool = False
                ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s examples, clean latents, noise and timestep indices (counter-based RNG).

    ``on_device``: draw with a generator on the latents' device (seeded the same way), so no
    tensor goes through the host; on CPU that is the same stream, so the same numbers."""
    if idx is None:
        idx = batch_indices(enc.count, step, cfg.batch_size, cfg.seed)
    if on_device:
        dev = enc.latent_mean.device
        g = torch.Generator(device=dev).manual_seed(derive_seed(cfg.seed, "step", step))
        index = torch.tensor(idx)
        if dev.type == "cuda":
            index = index.pin_memory().to(dev, non_blocking=True)
        mean, std = enc.latent_mean[index], enc.latent_std[index]
    else:
        dev = torch.device("cpu")
        g = _generator(cfg.seed, "step", step)
        mean, std = enc.latent_mean[idx].cpu(), enc.latent_std[idx].cpu()
    latents = mean + std * torch.randn(mean.shape, generator=g, device=dev)
    x0 = (latents - enc.shift_factor) * enc.scaling_factor
    noise = torch.randn(x0.shape, generator=g, device=dev)
    u = torch.rand(len(idx), generator=g, device=dev)  # weighting scheme "none": uniform timesteps
    indices = (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    return idx, x0, noise, indices


def device_tables(scheduler: Any, device: torch.device) -> Any:
    """The scheduler's ``timesteps`` / ``sigmas`` on ``device`` (indexed there by ``sample_step(on_device=True)``)."""
    return types.SimpleNamespace(timesteps=scheduler.timesteps.to(device), sigmas=scheduler.sigmas.to(device),
                                 config=scheduler.config)


def train_step_tensor(transformer: Any, enc: EncodedData, step: int, cfg: TrainConfig, scheduler: Any,
                      optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                      check_finite: bool = True, on_device: bool = False,
                      autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """One optimisation step (step index ``step``, 0-based); returns the detached loss tensor.

    ``check_finite`` reads the loss on the host before the backward (a sync); without it the
    caller checks the returned tensors later (``sync_every``)."""
    part, idx = step_part(enc, step, cfg)
    idx, x0, noise, indices = sample_step(part, step, cfg, int(scheduler.config.num_train_timesteps), idx=idx,
                                          on_device=on_device)
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = flow_matching_loss(transformer, part, idx, x0, noise, indices, scheduler, cfg.guidance_scale)
    if check_finite and not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_step(transformer: Any, enc: EncodedData, step: int, cfg: TrainConfig, scheduler: Any,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """One optimisation step (step index ``step``, 0-based); returns the loss."""
    return float(train_step_tensor(transformer, enc, step, cfg, scheduler, optimizer, params))


def evaluation_loss(transformer: Any, enc: EncodedData, scheduler: Any, *, seed: int = 1234,
                    sigmas: tuple[float, ...] = (0.25, 0.5, 0.75), guidance_scale: float = 1.0) -> float:
    """Loss on a fixed set: every example's mean latent at fixed timesteps with fixed noise."""
    n = len(scheduler.timesteps)
    g = _generator(seed, "eval")
    total, count = 0.0, 0
    was_training = transformer.training
    transformer.eval()
    parts = enc.parts if isinstance(enc, Bucketed) else [enc]
    with torch.no_grad():
        for enc, i in ((p, i) for p in parts for i in range(p.count)):
            x0 = ((enc.latent_mean[i:i + 1].cpu() - enc.shift_factor) * enc.scaling_factor)
            for s in sigmas:
                noise = torch.randn(x0.shape, generator=g)
                index = torch.tensor([min(n - 1, int((1.0 - s) * n))])
                loss = flow_matching_loss(transformer, enc, [i], x0, noise, index, scheduler, guidance_scale)
                total += float(loss)
                count += 1
    transformer.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- saving, checkpoints


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def lora_state_dict(transformer: Any, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (``<module>.lora_A.weight``), on CPU in ``dtype``."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer: Any, out_dir: Path, *, weight_name: str = WEIGHTS_NAME, save_dtype: str = "fp32") -> Path:
    """``FluxPipeline.save_lora_weights`` into ``out_dir/weight_name`` in ``save_dtype`` (bf16 | fp32),
    written atomically."""
    from diffusers import FluxPipeline

    out_dir = Path(out_dir)
    tmp = out_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extra: dict[str, Any] = {}
    peft_config = getattr(transformer, "peft_config", {}).get("default")
    if peft_config is not None and "transformer_lora_adapter_metadata" in inspect.signature(
            FluxPipeline.save_lora_weights).parameters:  # diffusers >= 0.35 keeps the LoraConfig (alpha ...)
        extra["transformer_lora_adapter_metadata"] = peft_config.to_dict()
    FluxPipeline.save_lora_weights(
        tmp, transformer_lora_layers=lora_state_dict(transformer, SAVE_DTYPES[save_dtype]), weight_name=weight_name,
        **extra,
    )
    dest = out_dir / weight_name
    os.replace(tmp / weight_name, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("checkpoint-") and (p / "state.json").is_file():
            try:
                found.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return sorted(found)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def latest_checkpoint(root: Path, cfg: TrainConfig | None = None) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``root`` (one made with ``cfg``'s settings, if given)."""
    for step, path in reversed(_checkpoints(Path(root))):
        if cfg is not None:
            try:
                state = json.loads((path / "state.json").read_text())
            except (OSError, ValueError):
                continue
            if state.get("config") != _jsonable(cfg.resume_key()) or step > cfg.steps:
                continue
        return step, path
    return None


def save_checkpoint(root: Path, step: int, transformer: Any, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, *, loss: float | None = None) -> Path:
    """LoRA weights + optimizer state + step + RNG state, written to a temp dir then renamed."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(lora_state_dict(transformer), str(tmp / "lora.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    state = {"step": step, "total": cfg.steps, "loss": loss, "saved_at": time.time(), "config": cfg.resume_key()}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _checkpoints(root)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, transformer: Any, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Restore a checkpoint into ``transformer``'s adapter and ``optimizer``; return its step."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "lora.safetensors"), device=str(device))
    result = set_peft_model_state_dict(transformer, weights, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {path.name} does not fit the adapter: {unexpected[:3]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(json.loads((path / "state.json").read_text())["step"])


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    weights: Path
    steps: int
    resumed_from: int
    loss: float | None
    seconds: float
    #: what the run actually used (``auto`` resolved; the OOM fallbacks may have changed them)
    gradient_checkpointing: bool | None = None
    resolution: int | None = None
    #: out-of-memory retries :func:`train_resilient` needed (0: none)
    oom_retries: int = 0
    #: the first loss of this run (its first step), for benchmarks and tests
    first_loss: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _finished(out_dir: Path, cfg: TrainConfig) -> dict | None:
    finished = _read_json(Path(out_dir) / "done.json")
    if finished and finished.get("config") == _jsonable(cfg.resume_key()) and (Path(out_dir) / WEIGHTS_NAME).is_file():
        return finished
    return None


def train(model_dir: Path, dataset_dir: Path, cfg: TrainConfig, out_dir: Path, *,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          log: Callable[[str], None] = lambda msg: None, step_hook: StepHook | None = None) -> TrainResult:
    """:func:`_train`; with ``attention_backend`` set, diffusers' process-wide active attention
    backend (which ``set_attention_backend`` also changes) is restored afterwards."""
    if not cfg.attention_backend:
        return _train(model_dir, dataset_dir, cfg, out_dir, progress=progress, should_stop=should_stop, log=log,
                      step_hook=step_hook)
    with preserved_attention_backend():
        return _train(model_dir, dataset_dir, cfg, out_dir, progress=progress, should_stop=should_stop, log=log,
                      step_hook=step_hook)


@contextlib.contextmanager
def preserved_attention_backend() -> Any:
    """Restore diffusers' global active attention backend on exit (``set_attention_backend`` sets
    it for every model of the process, not only the one it is called on)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # pragma: no cover - diffusers without attention dispatch
        yield
        return
    previous = getattr(_AttentionBackendRegistry, "_active_backend", None)
    try:
        yield
    finally:
        if previous is not None:
            _AttentionBackendRegistry.set_active_backend(previous)


def _train(model_dir: Path, dataset_dir: Path, cfg: TrainConfig, out_dir: Path, *,
           progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
           log: Callable[[str], None] = lambda msg: None, step_hook: StepHook | None = None) -> TrainResult:
    """Train a LoRA on ``dataset_dir``; checkpoints go to ``out_dir/checkpoints``, the weights to
    ``out_dir/pytorch_lora_weights.safetensors``. Resumes from the newest fitting checkpoint.

    ``should_stop`` is polled after every step; when it says so, a checkpoint is written and
    :class:`TrainingInterrupted` raised. ``step_hook(step, cfg)`` runs before every step.

    With ``cfg.sync_every = N > 1`` the loss stays on the device: it is checked for finiteness and
    read (for progress) every N steps and before every checkpoint and the save.
    """
    started = time.monotonic()
    timings: dict[str, float] = {}
    quiet_libraries()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    report = progress or (lambda *a: None)
    done_marker = out_dir / "done.json"
    finished = _finished(out_dir, cfg)
    if finished:
        # a relaunch after the weights were saved (the process died before reporting): nothing to do
        return TrainResult(weights=out_dir / WEIGHTS_NAME, steps=cfg.steps, resumed_from=cfg.steps,
                           loss=finished.get("loss"), seconds=time.monotonic() - started,
                           resolution=cfg.resolution)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    resume = latest_checkpoint(ckpt_root, cfg)
    report("loading", resume[0] if resume else 0, cfg.steps, None)
    log(f"training on {device} in {dtype}, {cfg.steps} steps, rank {cfg.rank}, "
        + (f"buckets {list(cfg.buckets)}" if cfg.buckets else f"resolution {cfg.resolution}"))

    t = time.monotonic()
    examples = read_dataset(dataset_dir)
    enc = encode_dataset(Path(model_dir), examples, cfg, device, dtype)
    timings["encode_s"] = time.monotonic() - t
    if isinstance(enc, Bucketed):
        log("buckets: " + ", ".join(f"{w}x{h}: {len(m)}" for (w, h), m in zip(enc.sizes, enc.members)))
    t = time.monotonic()
    scheduler = load_scheduler(Path(model_dir))
    transformer = load_lora_transformer(Path(model_dir), cfg, device, dtype)
    checkpointing = cfg.gradient_checkpointing is True
    if cfg.gradient_checkpointing == "auto":
        estimate = activation_bytes(transformer, enc.image_tokens, int(enc.parts[0].prompt_embeds.shape[1]
                                    if isinstance(enc, Bucketed) else enc.prompt_embeds.shape[1]), cfg.batch_size, dtype)
        free = free_device_memory(device)
        checkpointing = decide_checkpointing("auto", estimate, free)
        log(f"gradient checkpointing auto: ~{estimate / 2**30:.2f} GiB of activations, "
            f"{'unknown' if free is None else f'{free / 2**30:.2f} GiB'} free: {'on' if checkpointing else 'off'}")
        if checkpointing:
            transformer.enable_gradient_checkpointing()
    if cfg.attention_backend:
        set_attention_backend(transformer, cfg.attention_backend)
        log(f"attention backend: {cfg.attention_backend}")
    if cfg.compile:
        n = compile_blocks(transformer, cfg)
        log(f"compile: {n} blocks with backend {cfg.compile_backend}, cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')}")
    optimizer = make_optimizer(transformer, cfg, log)
    params = [p for p in transformer.parameters() if p.requires_grad]
    start = 0
    if resume is not None:
        start = load_checkpoint(resume[1], transformer, optimizer, device)
        log(f"resumed from checkpoint at step {start}")
    timings["load_s"] = time.monotonic() - t
    last_ckpt = start
    loss_value: float | None = None
    first_loss: float | None = None
    if should_stop is not None and start < cfg.steps and should_stop():
        raise TrainingInterrupted(start)  # asked to stop while loading: the last checkpoint stands
    deferred = cfg.sync_every > 1
    tables = device_tables(scheduler, device) if deferred else scheduler
    autocast = lora_autocast(cfg, device, dtype)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not read yet (sync_every)

    def flush() -> float | None:
        """Read the pending losses (one host sync), fail on a non-finite one."""
        nonlocal first_loss
        if not pending:
            return loss_value
        values = torch.stack([v for _, v in pending]).float().cpu().tolist()
        for (s, _), v in zip(pending, values):
            if not math.isfinite(v):
                pending.clear()
                raise FloatingPointError(f"loss is {v} at step {s + 1}")
        if first_loss is None:
            first_loss = values[0]
        pending.clear()
        return values[-1]

    report("training", start, cfg.steps, None)
    t = time.monotonic()
    checkpoint_s = 0.0
    for step in range(start, cfg.steps):
        if step_hook is not None:
            step_hook(step, cfg)
        loss = train_step_tensor(transformer, enc, step, cfg, tables, optimizer, params, check_finite=not deferred,
                                 on_device=deferred, autocast=autocast)
        done = step + 1
        if deferred:
            pending.append((step, loss))
            if done % cfg.sync_every == 0 or done == cfg.steps or done % cfg.checkpoint_every == 0:
                loss_value = flush()
        else:
            loss_value = float(loss)
            if first_loss is None:
                first_loss = loss_value
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            c = time.monotonic()
            save_checkpoint(ckpt_root, done, transformer, optimizer, cfg, loss=loss_value)
            checkpoint_s += time.monotonic() - c
            last_ckpt = done
        report("training", done, cfg.steps, loss_value)
        if should_stop is not None and done < cfg.steps and should_stop():
            if last_ckpt != done:
                loss_value = flush() if deferred else loss_value
                save_checkpoint(ckpt_root, done, transformer, optimizer, cfg, loss=loss_value)
            raise TrainingInterrupted(done)
    timings["train_s"] = time.monotonic() - t - checkpoint_s
    timings["checkpoint_s"] = checkpoint_s
    report("saving", cfg.steps, cfg.steps, loss_value)
    t = time.monotonic()
    weights = save_lora(transformer, out_dir, save_dtype=cfg.save_dtype)
    done_marker.write_text(json.dumps({"steps": cfg.steps, "loss": loss_value, "config": cfg.resume_key()}))
    shutil.rmtree(ckpt_root, ignore_errors=True)
    timings["save_s"] = time.monotonic() - t
    del transformer, optimizer, enc
    free_memory()
    return TrainResult(weights=weights, steps=cfg.steps, resumed_from=start, loss=loss_value,
                       seconds=time.monotonic() - started, gradient_checkpointing=checkpointing,
                       resolution=cfg.resolution, first_loss=first_loss, timings=timings)


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(e: BaseException) -> bool:
    """A device OOM: ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) or an error whose
    message says "out of memory" (some kernels raise a plain RuntimeError)."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, oom_type) or "out of memory" in str(e).lower()


def oom_attempts(cfg: TrainConfig) -> list[tuple[TrainConfig, str]]:
    """The configurations :func:`train_resilient` tries, with what each one changes."""
    out = [(cfg, "as configured")]
    cur = cfg
    if cfg.gradient_checkpointing is not True:
        cur = msgspec.structs.replace(cur, gradient_checkpointing=True)
        out.append((cur, "with gradient checkpointing on"))
    low = cfg.oom_fallback_resolution
    top = max(cfg.buckets) if cfg.buckets else cfg.resolution
    if low is not None and low < top:
        cur = msgspec.structs.replace(cur, gradient_checkpointing=True, resolution=low,
                                      buckets=[low] if cfg.buckets else None)
        out.append((cur, f"at {low} px with gradient checkpointing on"))
    return out


def train_resilient(model_dir: Path, dataset_dir: Path, cfg: TrainConfig, out_dir: Path, *,
                    progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
                    log: Callable[[str], None] = lambda msg: None, step_hook: StepHook | None = None) -> TrainResult:
    """:func:`train`, and on an out-of-memory error: free the memory, retry once with gradient
    checkpointing on (if it was not), then once at ``oom_fallback_resolution`` (if set); an OOM
    that survives those raises :class:`PersistentOutOfMemory`. A retry with checkpointing resumes
    the checkpoints written so far (the setting is not part of the resume key); one at another
    resolution starts over (its latents differ)."""
    attempts = oom_attempts(cfg)
    for c, _ in attempts:  # finished in an earlier process with a fallback: nothing to do
        if _finished(out_dir, c):
            return train(model_dir, dataset_dir, c, out_dir, progress=progress, should_stop=should_stop, log=log)
    errors: list[str] = []
    for n, (c, what) in enumerate(attempts):
        if n:
            log(f"out of memory ({errors[-1]}): retrying {what}")
        oom: str | None = None
        try:
            result = train(model_dir, dataset_dir, c, out_dir, progress=progress, should_stop=should_stop, log=log,
                           step_hook=step_hook)
            result.oom_retries = n
            return result
        except Exception as e:  # noqa: BLE001 - only OOMs are retried, the rest propagate
            if not is_out_of_memory(e):
                raise
            oom = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        errors.append(oom)
        # out of the except block: the traceback, and the tensors its frames held, are gone
        free_memory()
    tried = "; ".join(what for _, what in attempts)
    raise PersistentOutOfMemory(f"out of device memory while training ({tried}): {errors[-1]}; not retryable "
                                f"(the same job would run out of memory again)")


def simulated_oom(attempts: int) -> StepHook:
    """Test hook: the first step of each of the first ``attempts`` runs raises a CUDA OOM (it is
    constructible without CUDA). The worker installs it from ``LOCAL_TRAINER_SIMULATE_OOM``."""
    seen: list[TrainConfig] = []

    def hook(step: int, cfg: TrainConfig) -> None:
        if not seen or seen[-1] is not cfg:
            seen.append(cfg)
            if len(seen) <= attempts:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, run {len(seen)} at step {step + 1})")

    return hook


def evaluate(model_dir: Path, dataset_dir: Path, cfg: TrainConfig, lora: Path | None = None, *, seed: int = 1234) -> float:
    """``evaluation_loss`` of the base transformer, or of the base plus a trained LoRA file."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    quiet_libraries()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    enc = encode_dataset(Path(model_dir), read_dataset(dataset_dir), cfg, device, dtype)
    scheduler = load_scheduler(Path(model_dir))
    transformer = load_lora_transformer(Path(model_dir), cfg, device, dtype)
    if lora is None:
        transformer.disable_adapters()
    else:
        weights = load_file(str(lora), device=str(device))
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
        set_peft_model_state_dict(transformer, weights, adapter_name="default")
    return evaluation_loss(transformer, enc, scheduler, seed=seed, guidance_scale=cfg.guidance_scale)


__all__ = [
    "WEIGHTS_NAME", "DatasetError", "TrainingInterrupted", "Example", "Encoded", "TrainResult",
    "resolve_device", "resolve_dtype", "derive_seed", "read_dataset", "image_tensor", "encode_dataset",
    "load_scheduler", "load_lora_transformer", "add_lora", "make_optimizer", "batch_indices", "sample_step",
    "train_step", "train_step_tensor", "TrainConfigError", "PersistentOutOfMemory", "Bucketed", "bucket_shapes",
    "assign_bucket", "bucket_batch", "activation_bytes", "decide_checkpointing", "train_resilient",
    "is_out_of_memory", "simulated_oom", "oom_attempts",
    "flow_matching_loss", "evaluation_loss", "lora_state_dict", "save_lora", "latest_checkpoint",
    "save_checkpoint", "load_checkpoint", "train", "evaluate",
]
