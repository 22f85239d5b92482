"""LoRA weight files: safetensors header checks and key-layout detection."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024


class ArtifactInvalid(Exception):
    pass


class ArtifactInfo:
    def __init__(self, sha256: str, size: int, format: str, tensors: int) -> None:
        self.sha256 = sha256
        self.size = size
        self.format = format
        self.tensors = tensors


def read_safetensors_header(path: Path) -> dict:
    """Parse and check the header; raise ArtifactInvalid for anything that is not a whole file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactInvalid("file is too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise ArtifactInvalid("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactInvalid("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactInvalid("not a safetensors file (header is not an object)")
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ArtifactInvalid(f"tensor {name!r} has no data_offsets") from None
        end = max(end, stop)
        if not (0 <= start <= stop):
            raise ArtifactInvalid(f"tensor {name!r} has bad offsets")
    if end > data_len:
        raise ArtifactInvalid(f"file is truncated ({data_len} data bytes, header needs {end})")
    return header


def key_format(names: list[str]) -> str:
    """``kohya`` for ``lora_unet_...``/``lora_te...`` keys, else ``diffusers``."""
    if any(n.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for n in names):
        return "kohya"
    return "diffusers"


def inspect_artifact(path: Path) -> ArtifactInfo:
    header = read_safetensors_header(path)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        raise ArtifactInvalid("safetensors file holds no tensors")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return ArtifactInfo(digest.hexdigest(), path.stat().st_size, key_format(names), len(names))
