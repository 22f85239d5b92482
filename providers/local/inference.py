"""Generation with a warm ``FluxPipeline`` per device and an LRU of loaded LoRA adapters.

:class:`PipelineHost` is synchronous and thread-safe (one generation at a time per host); the
provider runs it in a worker thread (``anyio.to_thread``) so the gateway's event loop never
blocks. The pipeline is loaded on first use and kept. LoRA files are loaded with
``load_lora_weights(dir, weight_name=..., adapter_name=...)`` -- diffusers converts kohya /
sd-scripts keys (``lora_unet_...lora_down/lora_up/alpha``) to its own layout itself -- and
selected with ``set_adapters([name], adapter_weights=[strength])``. At most ``adapter_cache``
adapters stay loaded; the least recently used is removed with ``delete_adapters``.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from providers.local.config import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():  # before diffusers / transformers / huggingface_hub are imported
    os.environ[_k] = _v

import torch  # noqa: E402

from providers.local.trainer import (  # noqa: E402
    dtype_kwargs, free_memory, quiet_libraries, resolve_device, resolve_dtype,
)

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class LoraLoadError(ValueError):
    """The LoRA file cannot be applied to this pipeline."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    width: int
    height: int
    seed: int
    num_outputs: int = 1
    guidance_scale: float = 3.5
    num_inference_steps: int = 28
    lora_strength: float = 1.0
    output_format: str = "png"


def encode_image(img: Any, output_format: str) -> bytes:
    fmt = _PIL_FORMATS[output_format]
    buf = io.BytesIO()
    opts: dict[str, Any] = {}
    if fmt == "JPEG":
        img = img.convert("RGB")
        opts = {"quality": 95}
    elif fmt == "WEBP":
        opts = {"quality": 95}
    img.save(buf, format=fmt, **opts)
    return buf.getvalue()


def adapter_name_for(path: Path) -> str:
    """A name that changes whenever the file does (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return "lora_" + hashlib.sha256(f"{p}\x1f{st.st_size}\x1f{st.st_mtime_ns}".encode()).hexdigest()[:16]


class PipelineHost:
    """One device's pipeline, loaded lazily and kept warm, with an LRU of LoRA adapters."""

    def __init__(self, model_dir: Path, device: str = "auto", dtype: str = "auto", *, adapter_cache: int = 4,
                 max_sequence_length: int = 512) -> None:
        self.model_dir = Path(model_dir)
        self.device_name = device
        self.dtype_name = dtype
        self.adapter_cache = adapter_cache
        self.max_sequence_length = max_sequence_length
        self.lock = threading.Lock()
        self.pipe: Any = None
        self.device: torch.device | None = None
        self.adapters: OrderedDict[str, Path] = OrderedDict()
        self.loads = 0  # pipeline loads (1 while warm)

    # ------------------------------------------------------------------ loading

    def _ensure_pipeline(self) -> Any:
        if self.pipe is None:
            from diffusers import FluxPipeline

            quiet_libraries()
            device = resolve_device(self.device_name)
            dtype = resolve_dtype(self.dtype_name, device)
            pipe = FluxPipeline.from_pretrained(self.model_dir, local_files_only=True, **dtype_kwargs(dtype))
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            self.pipe, self.device = pipe, device
            self.loads += 1
        return self.pipe

    def _use_adapter(self, lora: Path) -> str:
        """Load ``lora`` (if not loaded) as the most recently used adapter; evict beyond the cache."""
        pipe = self.pipe
        name = adapter_name_for(lora)
        if name in self.adapters:
            self.adapters.move_to_end(name)
            return name
        lora = Path(lora)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=name,
                                       local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loader error means the file does not fit
            self._drop_adapter(name)
            raise LoraLoadError(f"cannot load LoRA {lora.name}: {type(e).__name__}: {str(e)[:200]}") from None
        if name not in self._loaded_names():
            self._drop_adapter(name)
            raise LoraLoadError(f"LoRA {lora.name} has no weights for this model's transformer")
        self.adapters[name] = lora
        while len(self.adapters) > self.adapter_cache:
            old, _ = self.adapters.popitem(last=False)
            self._drop_adapter(old)
        return name

    def _loaded_names(self) -> set[str]:
        try:
            return {n for names in self.pipe.get_list_adapters().values() for n in names}
        except Exception:  # noqa: BLE001
            return set()

    def _drop_adapter(self, name: str) -> None:
        if name in self._loaded_names():
            try:
                self.pipe.delete_adapters(name)
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.adapters.pop(name, None)

    # ------------------------------------------------------------------ generation

    def generate(self, req: GenerateRequest, lora: Path | None) -> list[bytes]:
        """Images for ``req`` with ``lora`` at ``req.lora_strength`` (``None``: the base model); the
        pipeline runs under ``self.lock``, the images are encoded after it is released."""
        with self.lock:
            pipe = self._ensure_pipeline()
            if lora is not None:
                name = self._use_adapter(Path(lora))
                pipe.enable_lora()
                pipe.set_adapters([name], adapter_weights=[float(req.lora_strength)])
            elif self.adapters:
                pipe.disable_lora()
            generator = torch.Generator(device=self.device).manual_seed(int(req.seed))
            with torch.inference_mode():
                out = pipe(
                    prompt=req.prompt, height=req.height, width=req.width,
                    num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                    num_images_per_prompt=req.num_outputs, generator=generator,
                    max_sequence_length=self.max_sequence_length, output_type="pil",
                )
            images = out.images
        # PNG / JPEG encoding is CPU work: done after the device lock is released, so the next
        # generation on this device starts meanwhile
        return [encode_image(img, req.output_format) for img in images]

    def close(self) -> None:
        with self.lock:
            self.pipe = None
            self.adapters.clear()
            free_memory()
