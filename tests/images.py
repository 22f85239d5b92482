"""Real image files for tests, made with Pillow (no fixtures on disk)."""

from __future__ import annotations

import io
import random

from PIL import Image


def make_image(
    fmt: str = "JPEG",
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
    exif_orientation: int | None = None,
    quality: int = 85,
) -> bytes:
    """A small, non-uniform RGB image encoded as ``fmt`` (JPEG, PNG or WEBP)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    # a gradient + a block so orientation changes are visible in the pixels
    px = img.load()
    w, h = size
    for x in range(0, w, max(1, w // 16)):
        for y in range(h):
            px[x, y] = ((x * 255) // max(1, w - 1), (y * 255) // max(1, h - 1), seed % 256)
    for x in range(min(8, w)):
        for y in range(min(8, h)):
            px[x, y] = (255, 0, 0)
    buf = io.BytesIO()
    kwargs: dict = {}
    if fmt == "JPEG":
        kwargs["quality"] = quality
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def image_set(n: int, fmt: str = "JPEG", size: tuple[int, int] = (64, 48)) -> list[bytes]:
    return [make_image(fmt, size, seed=i) for i in range(n)]


def multipart_files(images: list[bytes], ext: str = "jpg") -> list[tuple[str, tuple[str, bytes, str]]]:
    """``files=`` for httpx: the ``images`` field repeated once per image."""
    mime = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[ext]
    return [("images", (f"photo{i:02d}.{ext}", data, mime)) for i, data in enumerate(images)]
