"""Artifact checks: whole safetensors files pass, truncated or foreign files do not."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from gateway.artifacts import ArtifactInvalid, inspect_artifact, key_format
from providers.sandbox import build_lora_safetensors


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_whole_file_passes(tmp_path: Path) -> None:
    data = build_lora_safetensors(seed=1, ref="r", rank=8, meta={"format": "pt"})
    info = inspect_artifact(write(tmp_path / "a.safetensors", data))
    assert info.format == "diffusers" and info.tensors == 12 and info.size == len(data)
    assert len(info.sha256) == 64


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[: len(d) // 2],  # truncated data
        lambda d: d[:6],  # shorter than the length prefix
        lambda d: b"PK\x03\x04" + d[4:],  # a zip, not safetensors
        lambda d: struct.pack("<Q", 10**12) + d[8:],  # absurd header length
        lambda d: struct.pack("<Q", 4) + b"[1] " + d[12:],  # header is not an object
    ],
)
def test_broken_files_are_rejected(tmp_path: Path, mutate) -> None:
    data = build_lora_safetensors(seed=1, ref="r", rank=8, meta={"format": "pt"})
    with pytest.raises(ArtifactInvalid):
        inspect_artifact(write(tmp_path / "b.safetensors", mutate(data)))


def test_empty_tensor_set_is_rejected(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {}}).encode()
    with pytest.raises(ArtifactInvalid, match="no tensors"):
        inspect_artifact(write(tmp_path / "c.safetensors", struct.pack("<Q", len(header)) + header))


def test_key_layouts() -> None:
    assert key_format(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "kohya"
    assert key_format(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]) == "diffusers"
