"""Upload check, pixel data: an image that does not fully decode is a 400; a legitimate one never is.

The corrupt files here are the ones that look whole from their structure alone (a JPEG cut short
with its EOI marker appended, a WebP whose RIFF size is right but whose frame data is zeroed, a
PNG whose IDAT was damaged and its CRC fixed up) and that Pillow itself decodes without an error.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image, ImageDraw, ImageFilter

from gateway.uploads import UploadLimits
from tests.images import make_image
from tests.test_uploads import encode, receive, rejected

ONE = UploadLimits(min_images=1, max_images=5)
CORRUPT = 'image 1 ("x.img"): the file is truncated or corrupt'


def photo(size: tuple[int, int] = (320, 240), seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photo-like image: smooth gradients, soft shapes, edges and a little sensor noise."""
    rng = random.Random(seed)
    w, h = size
    base = Image.merge("RGB", [Image.linear_gradient("L").rotate(rng.randrange(360)).resize(size) for _ in range(3)])
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(4, max(5, w // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    base = base.filter(ImageFilter.GaussianBlur(1.5))
    noise = Image.effect_noise(size, 12).convert("RGB")
    img = Image.blend(base, noise, 0.08)
    return img.convert(mode) if mode != "RGB" else img


def save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


async def accepted(blob: bytes, tmp, expect_format: str | None = None) -> None:
    up = await receive(encode([("images", "x.img", blob)]), tmp, ONE)
    try:
        assert len(up.images) == 1
        if expect_format:
            assert up.images[0].format == expect_format
    finally:
        up.cleanup()


async def refused(blob: bytes, tmp) -> None:
    err = await rejected(encode([("images", "x.img", blob)]), tmp, ONE)
    assert err.message == CORRUPT and err.path == "images"


# --- helpers to find the parts of a file to damage -----------------------------------------------


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the entropy-coded data of each scan of a JPEG written by Pillow."""
    scans, pos = [], 2
    while data[pos + 1] != 0xD9:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
        if data[pos - length - 1] == 0xDA:
            end = pos
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((pos, end))
            pos = end
    return scans


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG from its chunks, every CRC computed (so ``verify()`` passes whatever the data)."""
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def png_with_idat(data: bytes, idat: bytes) -> bytes:
    chunks = [c for c in png_chunks(data) if c[0] != b"IDAT"]
    return png_build([*chunks[:-1], (b"IDAT", idat), chunks[-1]])


def png_raw(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG from raw scanlines (each with its filter byte): for streams Pillow won't write."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return png_build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"".join(rows))), (b"IEND", b"")])


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def adam7_png(img: Image.Image) -> bytes:
    """An interlaced (Adam7) 8-bit RGB PNG of ``img``: Pillow reads these but does not write them."""
    w, h = img.size
    px = img.convert("RGB").tobytes()
    raw = bytearray()
    for x0, y0, dx, dy in ADAM7:
        xs = range(x0, w, dx)
        if not xs:
            continue
        for y in range(y0, h, dy):
            raw.append(0)
            for x in xs:
                raw += px[(y * w + x) * 3 : (y * w + x) * 3 + 3]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return png_build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(bytes(raw))), (b"IEND", b"")])


def webp_vp8(data: bytes) -> tuple[int, int]:
    """(offset, length) of the payload of the ``VP8 `` chunk of a WebP."""
    pos = 12
    while data[pos : pos + 4] != b"VP8 ":
        pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little") + 1 & ~1
    return pos + 8, int.from_bytes(data[pos + 4 : pos + 8], "little")


# --- legitimate images always pass -----------------------------------------------------------------


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _mpo() -> bytes:
    return save(photo(seed=1), "MPO", save_all=True, append_images=[photo(seed=2)])


def _palette_png() -> bytes:
    img = photo(seed=3).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    img.info["transparency"] = 0
    return save(img, "PNG")


LEGIT = {
    "jpeg-baseline": lambda: save(photo(), "JPEG", quality=85),
    "jpeg-progressive": lambda: save(photo(seed=1), "JPEG", quality=90, progressive=True),
    "jpeg-progressive-optimized": lambda: save(photo(seed=2), "JPEG", quality=75, progressive=True, optimize=True),
    "jpeg-444-q100": lambda: save(photo(seed=3), "JPEG", quality=100, subsampling=0),
    "jpeg-422": lambda: save(photo(seed=4), "JPEG", quality=90, subsampling=1),
    "jpeg-grey": lambda: save(photo(seed=5, mode="L"), "JPEG"),
    "jpeg-cmyk": lambda: save(photo(seed=6, mode="CMYK"), "JPEG"),
    "jpeg-restart-markers": lambda: save(photo(seed=7), "JPEG", restart_marker_blocks=3),
    "jpeg-exif-orientation": lambda: make_image("JPEG", (200, 150), seed=8, exif_orientation=6),
    "jpeg-progressive-exif": lambda: save(photo(seed=9), "JPEG", progressive=True, exif=_exif(orientation=8)),
    "jpeg-1x1": lambda: save(photo((1, 1)), "JPEG"),
    "jpeg-odd-size": lambda: save(photo((37, 11)), "JPEG", progressive=True),
    "jpeg-flat-grey": lambda: save(Image.new("RGB", (640, 480), (128, 128, 128)), "JPEG"),
    "jpeg-noise": lambda: save(Image.frombytes("RGB", (300, 200), random.Random(1).randbytes(300 * 200 * 3)),
                               "JPEG", quality=95),
    "jpeg-trailing-data": lambda: save(photo(seed=10), "JPEG") + b"\x00" * 100 + b"trailer",
    "mpo": _mpo,
    "png-rgb": lambda: save(photo(seed=11), "PNG"),
    "png-rgba": lambda: save(photo(seed=12, mode="RGBA"), "PNG", optimize=True),
    "png-palette": _palette_png,
    "png-16bit-grey": lambda: save(photo(seed=13, mode="L").convert("I;16"), "PNG"),
    "png-1bit": lambda: save(photo(seed=14, mode="1"), "PNG"),
    "png-interlaced": lambda: adam7_png(photo((45, 29), seed=15)),
    "png-1x1": lambda: save(photo((1, 1)), "PNG"),
    "webp-lossy": lambda: save(photo(seed=16), "WEBP", quality=80),
    "webp-lossy-alpha": lambda: save(photo(seed=17, mode="RGBA"), "WEBP", quality=60),
    "webp-lossless": lambda: save(photo(seed=18), "WEBP", lossless=True),
    "webp-flat": lambda: save(Image.new("RGB", (1500, 1500), (128, 128, 128)), "WEBP"),
    "webp-1x1": lambda: save(photo((1, 1)), "WEBP", quality=0),
}


@pytest.mark.parametrize("make", LEGIT.values(), ids=LEGIT.keys())
async def test_legitimate_image_is_accepted(tmp_path, make) -> None:
    await accepted(make(), tmp_path)


# --- JPEG ------------------------------------------------------------------------------------------


async def test_jpeg_first_700_bytes_plus_eoi(tmp_path) -> None:
    data = save(photo((640, 480)), "JPEG", quality=90)
    assert jpeg_scans(data)[0][0] < 700  # the cut is inside the scan
    cut = data[:700] + b"\xff\xd9"
    with Image.open(io.BytesIO(cut)) as im:
        im.load()  # Pillow decodes it without an error: the missing part is mid-grey
        assert im.getpixel((639, 479)) == (128, 128, 128)
    await refused(cut, tmp_path)


@pytest.mark.parametrize("kwargs", [{}, {"progressive": True}, {"subsampling": 0, "optimize": True},
                                    {"restart_marker_blocks": 5}],
                         ids=["baseline", "progressive", "444-optimized", "restart-markers"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
async def test_jpeg_cut_short_with_eoi_appended(tmp_path, kwargs, fraction) -> None:
    data = save(photo(seed=21), "JPEG", quality=88, **kwargs)
    first, last = jpeg_scans(data)[0][0], jpeg_scans(data)[-1][1]
    await refused(data[: first + int((last - first) * fraction)] + b"\xff\xd9", tmp_path)


@pytest.mark.parametrize("scan", [0, 1, -1], ids=["dc-scan", "second-scan", "last-scan"])
async def test_progressive_jpeg_cut_inside_a_scan(tmp_path, scan) -> None:
    data = save(photo((400, 300), seed=22), "JPEG", quality=90, progressive=True)
    start, end = jpeg_scans(data)[scan]
    await refused(data[: (start + end) // 2] + b"\xff\xd9", tmp_path)


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
async def test_jpeg_cut_short_without_a_marker(tmp_path, progressive) -> None:
    data = save(photo(seed=23), "JPEG", progressive=progressive)
    await refused(data[: len(data) * 3 // 4], tmp_path)


async def test_jpeg_with_its_scan_zeroed_from_the_middle(tmp_path) -> None:
    data = save(photo((640, 480), seed=24), "JPEG", quality=90)
    start, end = jpeg_scans(data)[0]
    mid = (start + end) // 2
    await refused(data[:mid] + bytes(end - mid) + data[end:], tmp_path)


async def test_mpo_with_a_truncated_first_frame(tmp_path) -> None:
    data = _mpo()
    start, end = jpeg_scans(data)[0]
    cut = data[: (start + end) // 2] + b"\xff\xd9"
    await refused(cut, tmp_path)


# --- WebP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [10, 60], ids=["after-frame-header", "after-60-bytes"])
async def test_webp_lossy_payload_zeroed(tmp_path, keep) -> None:
    data = save(photo(seed=31), "WEBP", quality=80)
    offset, length = webp_vp8(data)
    zeroed = data[: offset + keep] + bytes(length - keep) + data[offset + length :]
    assert len(zeroed) == len(data) and zeroed[4:8] == data[4:8]  # the RIFF size is intact
    with Image.open(io.BytesIO(zeroed)) as im:
        im.load()  # libwebp decodes zeros as valid data: a flat grey picture, no error
    await refused(zeroed, tmp_path)


async def test_webp_lossy_second_half_zeroed(tmp_path) -> None:
    data = save(photo((640, 480), seed=32), "WEBP", quality=90)
    offset, length = webp_vp8(data)
    half = offset + length // 2
    await refused(data[:half] + bytes(offset + length - half) + data[offset + length :], tmp_path)


async def test_webp_lossless_payload_zeroed(tmp_path) -> None:
    data = save(photo(seed=33), "WEBP", lossless=True)
    await refused(data[:30] + bytes(len(data) - 30), tmp_path)


async def test_webp_cut_short_with_riff_size_fixed(tmp_path) -> None:
    data = save(photo(seed=34), "WEBP", quality=80)
    cut = data[: len(data) // 2]
    await refused(cut[:4] + (len(cut) - 8).to_bytes(4, "little") + cut[8:], tmp_path)


# --- PNG (every chunk CRC fixed up, so verify() passes) ------------------------------------------------


def _png_idat() -> tuple[bytes, bytes]:
    data = save(photo(seed=41), "PNG")
    return data, b"".join(body for kind, body in png_chunks(data) if kind == b"IDAT")


async def test_png_idat_second_half_zeroed(tmp_path) -> None:
    data, idat = _png_idat()
    await refused(png_with_idat(data, idat[: len(idat) // 2] + bytes(len(idat) - len(idat) // 2)), tmp_path)


async def test_png_idat_byte_flipped(tmp_path) -> None:
    data, idat = _png_idat()
    mid = len(idat) // 2
    await refused(png_with_idat(data, idat[:mid] + bytes([idat[mid] ^ 0x5A]) + idat[mid + 1 :]), tmp_path)


async def test_png_idat_cut_short(tmp_path) -> None:
    data, idat = _png_idat()
    await refused(png_with_idat(data, idat[: len(idat) * 2 // 3]), tmp_path)


async def test_png_idat_valid_zlib_but_too_few_rows(tmp_path) -> None:
    data, idat = _png_idat()
    raw = zlib.decompress(idat)
    await refused(png_with_idat(data, zlib.compress(raw[: len(raw) * 3 // 4])), tmp_path)


async def test_png_bad_filter_type(tmp_path) -> None:
    rows = [b"\x00" + bytes(30) for _ in range(10)]
    await accepted(png_raw(10, 10, rows), tmp_path, "PNG")
    rows[6] = b"\x07" + bytes(30)  # filter types are 0..4
    await refused(png_raw(10, 10, rows), tmp_path)


async def test_png_interlaced_cut_short(tmp_path) -> None:
    data = adam7_png(photo((45, 29), seed=42))
    idat = png_chunks(data)[1][1]
    raw = zlib.decompress(idat)
    await refused(png_with_idat(data, zlib.compress(raw[:-40])), tmp_path)
