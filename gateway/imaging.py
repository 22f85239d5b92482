"""Output images: check what a provider returned and re-encode it to the requested format."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

from gateway.engine.errors import StepError

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


class OutputInvalid(StepError):
    """A provider's image is unreadable or too large (retryable: another try may do better)."""

    retryable = True


def image_format(path: Path) -> str:
    """``png`` / ``jpg`` / ``webp`` by content (OutputInvalid for anything else). Blocking."""
    try:
        with Image.open(path, formats=["PNG", "JPEG", "WEBP"]) as img:
            fmt = FORMAT_FROM_PIL.get(img.format or "")
    except (OSError, ValueError, SyntaxError) as e:
        raise OutputInvalid(f"provider returned an unreadable image: {e}") from None
    if fmt is None:
        raise OutputInvalid("provider returned an image in an unsupported format")
    return fmt


def structurally_whole(path: Path, fmt: str) -> bool:
    """A cheap check that a file is complete, without decoding pixels: a JPEG ends with its EOI
    marker, a WebP's RIFF size matches the file, a PNG's chunk CRCs (``verify()``) hold."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if fmt == "png":
            with Image.open(f, formats=["PNG"]) as im:
                im.verify()  # every chunk's CRC, up to IEND
            return True
        if fmt == "webp":
            head = f.read(12)
            riff = int.from_bytes(head[4:8], "little")
            return head[:4] == b"RIFF" and head[8:12] == b"WEBP" and size in (riff + 8, riff + 9)
        f.seek(max(0, size - 64))
        return f.read().rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def finalise_image(src: Path, dest: Path, output_format: str, max_pixels: int = 64_000_000) -> tuple[int, int]:
    """Check a provider's image and write it to ``dest`` in ``output_format``; its (width, height).

    Bytes already in the requested format are kept as they are after a structural check (no
    pixel decode: that is the common case and the expensive part); anything else is decoded
    fully and re-encoded. Blocking: run it in a thread.
    """
    try:
        with Image.open(src, formats=["PNG", "JPEG", "WEBP"]) as img:
            if img.width * img.height > max_pixels:
                raise OutputInvalid("image has too many pixels")
            fmt = FORMAT_FROM_PIL.get(img.format or "")
            size = img.size
            if fmt == output_format and structurally_whole(src, fmt):
                shutil.copyfile(src, dest)
                return size
            img.load()
            out = img.convert("RGB") if output_format == "jpg" or img.mode not in ("RGB", "RGBA") else img
            buf = io.BytesIO()
            opts = {"quality": 92} if output_format in ("jpg", "webp") else {}
            out.save(buf, format=PIL_FORMAT[output_format], **opts)
            dest.write_bytes(buf.getvalue())
            return size
    except OutputInvalid:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise OutputInvalid(f"provider returned an unreadable image: {e}") from None
