"""The safetensors format: the one header parser every part of the gateway uses."""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsInvalid(ValueError):
    """Not a whole safetensors file."""


def read_header(path: Path) -> dict:
    """Parse and check the header; raise SafetensorsInvalid for anything that is not a whole file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsInvalid("file is too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsInvalid("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SafetensorsInvalid("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsInvalid("not a safetensors file (header is not an object)")
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SafetensorsInvalid(f"tensor {name!r} has no data_offsets") from None
        end = max(end, stop)
        if not (0 <= start <= stop):
            raise SafetensorsInvalid(f"tensor {name!r} has bad offsets")
    if end > data_len:
        raise SafetensorsInvalid(f"file is truncated ({data_len} data bytes, header needs {end})")
    return header
