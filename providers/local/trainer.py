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
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from providers.local.config import OFFLINE_ENV, TrainConfig

for _k, _v in OFFLINE_ENV.items():  # before diffusers / transformers / huggingface_hub are imported
    os.environ[_k] = _v

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ProgressFn = Callable[[str, int, int, "float | None"], None]  # (phase, step, total, loss)


class DatasetError(ValueError):
    """The dataset directory cannot be trained on (not retryable)."""


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


def image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``resolution``; a ``[3, H, W]`` float tensor in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.LANCZOS)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{Path(path).name} is not a readable image: {e}") from None
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


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


def encode_dataset(model_dir: Path, examples: list[Example], cfg: TrainConfig, device: torch.device,
                   dtype: torch.dtype, *, batch: int = 4) -> Encoded:
    """VAE latent distributions and text embeddings of every example; the models are freed after."""
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
        means, stds = [], []
        for i in range(0, len(examples), batch):
            pixels = torch.stack([image_tensor(e.image, cfg.resolution) for e in examples[i:i + batch]])
            dist = vae.encode(pixels.to(device, dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        shift = float(vae.config.shift_factor or 0.0)
        scale = float(vae.config.scaling_factor)
        del vae
        free_memory()

    mean = torch.cat(means)
    h, w = mean.shape[2], mean.shape[3]
    if h % 2 or w % 2:
        raise DatasetError(f"latents of {h}x{w} cannot be packed in 2x2 patches (resolution must be a multiple of 16)")
    img_ids = FluxPipeline._prepare_latent_image_ids(mean.shape[0], h // 2, w // 2, device, dtype)
    return Encoded(
        latent_mean=mean, latent_std=torch.cat(stds), prompt_embeds=torch.cat(embeds),
        pooled_embeds=torch.cat(pooled), text_ids=text_ids.to(device, dtype), img_ids=img_ids,
        shift_factor=shift, scaling_factor=scale,
    )


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
    if cfg.gradient_checkpointing:
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


def make_optimizer(transformer: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in transformer.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )


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


def sample_step(enc: Encoded, step: int, cfg: TrainConfig, num_train_timesteps: int
                ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s examples, clean latents, noise and timestep indices (counter-based RNG)."""
    idx = batch_indices(enc.count, step, cfg.batch_size, cfg.seed)
    g = _generator(cfg.seed, "step", step)
    mean, std = enc.latent_mean[idx].cpu(), enc.latent_std[idx].cpu()
    latents = mean + std * torch.randn(mean.shape, generator=g)
    x0 = (latents - enc.shift_factor) * enc.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    u = torch.rand(len(idx), generator=g)  # weighting scheme "none": uniform timesteps
    indices = (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    return idx, x0, noise, indices


def train_step(transformer: Any, enc: Encoded, step: int, cfg: TrainConfig, scheduler: Any,
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """One optimisation step (step index ``step``, 0-based); returns the loss."""
    idx, x0, noise, indices = sample_step(enc, step, cfg, int(scheduler.config.num_train_timesteps))
    loss = flow_matching_loss(transformer, enc, idx, x0, noise, indices, scheduler, cfg.guidance_scale)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def evaluation_loss(transformer: Any, enc: Encoded, scheduler: Any, *, seed: int = 1234,
                    sigmas: tuple[float, ...] = (0.25, 0.5, 0.75), guidance_scale: float = 1.0) -> float:
    """Loss on a fixed set: every example's mean latent at fixed timesteps with fixed noise."""
    n = len(scheduler.timesteps)
    g = _generator(seed, "eval")
    total, count = 0.0, 0
    was_training = transformer.training
    transformer.eval()
    with torch.no_grad():
        for i in range(enc.count):
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


def lora_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (``<module>.lora_A.weight``), float32 on CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer: Any, out_dir: Path, *, weight_name: str = WEIGHTS_NAME) -> Path:
    """``FluxPipeline.save_lora_weights`` into ``out_dir/weight_name``, written atomically."""
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
        tmp, transformer_lora_layers=lora_state_dict(transformer), weight_name=weight_name, **extra,
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


def train(model_dir: Path, dataset_dir: Path, cfg: TrainConfig, out_dir: Path, *,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          log: Callable[[str], None] = lambda msg: None) -> TrainResult:
    """Train a LoRA on ``dataset_dir``; checkpoints go to ``out_dir/checkpoints``, the weights to
    ``out_dir/pytorch_lora_weights.safetensors``. Resumes from the newest fitting checkpoint.

    ``should_stop`` is polled after every step; when it says so, a checkpoint is written and
    :class:`TrainingInterrupted` raised.
    """
    started = time.monotonic()
    quiet_libraries()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    report = progress or (lambda *a: None)
    done_marker = out_dir / "done.json"
    finished = _read_json(done_marker)
    if finished and finished.get("config") == _jsonable(cfg.resume_key()) and (out_dir / WEIGHTS_NAME).is_file():
        # a relaunch after the weights were saved (the process died before reporting): nothing to do
        return TrainResult(weights=out_dir / WEIGHTS_NAME, steps=cfg.steps, resumed_from=cfg.steps,
                           loss=finished.get("loss"), seconds=time.monotonic() - started)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    resume = latest_checkpoint(ckpt_root, cfg)
    report("loading", resume[0] if resume else 0, cfg.steps, None)
    log(f"training on {device} in {dtype}, {cfg.steps} steps, rank {cfg.rank}, resolution {cfg.resolution}")

    examples = read_dataset(dataset_dir)
    enc = encode_dataset(Path(model_dir), examples, cfg, device, dtype)
    scheduler = load_scheduler(Path(model_dir))
    transformer = load_lora_transformer(Path(model_dir), cfg, device, dtype)
    optimizer = make_optimizer(transformer, cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    start = 0
    if resume is not None:
        start = load_checkpoint(resume[1], transformer, optimizer, device)
        log(f"resumed from checkpoint at step {start}")
    last_ckpt = start
    loss_value: float | None = None
    if should_stop is not None and start < cfg.steps and should_stop():
        raise TrainingInterrupted(start)  # asked to stop while loading: the last checkpoint stands
    report("training", start, cfg.steps, None)
    for step in range(start, cfg.steps):
        loss_value = train_step(transformer, enc, step, cfg, scheduler, optimizer, params)
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt_root, done, transformer, optimizer, cfg, loss=loss_value)
            last_ckpt = done
        report("training", done, cfg.steps, loss_value)
        if should_stop is not None and done < cfg.steps and should_stop():
            if last_ckpt != done:
                save_checkpoint(ckpt_root, done, transformer, optimizer, cfg, loss=loss_value)
            raise TrainingInterrupted(done)
    report("saving", cfg.steps, cfg.steps, loss_value)
    weights = save_lora(transformer, out_dir)
    done_marker.write_text(json.dumps({"steps": cfg.steps, "loss": loss_value, "config": cfg.resume_key()}))
    shutil.rmtree(ckpt_root, ignore_errors=True)
    del transformer, optimizer, enc
    free_memory()
    return TrainResult(weights=weights, steps=cfg.steps, resumed_from=start, loss=loss_value,
                       seconds=time.monotonic() - started)


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
    "train_step",
    "flow_matching_loss", "evaluation_loss", "lora_state_dict", "save_lora", "latest_checkpoint",
    "save_checkpoint", "load_checkpoint", "train", "evaluate",
]
