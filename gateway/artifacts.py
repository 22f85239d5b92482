"""LoRA weight files: safetensors checks, sha256 and key-layout detection."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gateway.engine.errors import StepError
from providers.safetensors import SafetensorsInvalid, read_header


class ArtifactInvalid(StepError):
    """The weights are not a whole safetensors LoRA (retryable: the copy is made again)."""

    retryable = True


class ArtifactInfo:
    def __init__(self, sha256: str, size: int, format: str, tensors: int) -> None:
        self.sha256 = sha256
        self.size = size
        self.format = format
        self.tensors = tensors


def key_format(names: list[str]) -> str:
    """``kohya`` for ``lora_unet_...``/``lora_te...`` keys, else ``diffusers``."""
    if any(n.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for n in names):
        return "kohya"
    return "diffusers"


def inspect_artifact(path: Path) -> ArtifactInfo:
    try:
        header = read_header(path)
    except SafetensorsInvalid as e:
        raise ArtifactInvalid(f"the weights are not a valid safetensors file: {e}") from None
    names = [k for k in header if k != "__metadata__"]
    if not names:
        raise ArtifactInvalid("safetensors file holds no tensors")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return ArtifactInfo(digest.hexdigest(), path.stat().st_size, key_format(names), len(names))
