"""Output images: check what a provider returned and re-encode it to the requested format."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
FORMAT_FROM_PIL = {v: k for k, v in PIL_FORMAT.items()}

#: aspect_ratio -> (width, height): exact ratios, multiples of 16, about one megapixel
SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1280, 720),
    "9:16": (720, 1280),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
}


class OutputInvalid(Exception):
    pass


def finalise_image(src: Path, dest: Path, output_format: str, max_pixels: int = 64_000_000) -> tuple[int, int]:
    """Decode a provider's image fully; write it to ``dest`` in ``output_format``.

    Bytes already in the right format are kept as they are; others are re-encoded.
    """
    try:
        with Image.open(src, formats=["PNG", "JPEG", "WEBP"]) as img:
            if img.width * img.height > max_pixels:
                raise OutputInvalid("image has too many pixels")
            img.load()
            fmt = FORMAT_FROM_PIL.get(img.format or "")
            size = img.size
            if fmt == output_format:
                dest.write_bytes(src.read_bytes())
                return size
            out = img.convert("RGB") if output_format == "jpg" or img.mode not in ("RGB", "RGBA") else img
            buf = io.BytesIO()
            opts = {"quality": 92} if output_format in ("jpg", "webp") else {}
            out.save(buf, format=PIL_FORMAT[output_format], **opts)
            dest.write_bytes(buf.getvalue())
            return size
    except OutputInvalid:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OutputInvalid(f"provider returned an unreadable image: {e}") from None
