"""Tests for gateway.uploads: streaming multipart receive, limits, image validation, cleanup."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from gateway.uploads import ReceivedUpload, UploadLimits, UploadRejected, receive_upload
from tests.images import image_set, make_image

BOUNDARY = "----loraBoundary7MA4YWxkTrZu0gW"
CT = f"multipart/form-data; boundary={BOUNDARY}"
SMALL = UploadLimits(min_images=1, max_images=5)

Part = tuple[str, str | None, bytes]  # (field name, filename or None, content)


def encode(parts: list[Part], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """Hand-encode a multipart/form-data body (so tests can also produce broken ones)."""
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disp}\r\n".encode())
        if filename is not None:
            out.write(b"Content-Type: image/jpeg\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    if close:
        out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def images(blobs: list[bytes], ext: str = "jpg") -> list[Part]:
    return [("images", f"photo{i:02d}.{ext}", b) for i, b in enumerate(blobs)]


class Feed:
    """An async chunk source over ``body`` that counts how many chunks were pulled."""

    def __init__(self, body: bytes, size: int = 64 * 1024) -> None:
        self.body, self.size, self.pulled = body, size, 0

    @property
    def total(self) -> int:
        return -(-len(self.body) // self.size)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), self.size):
            self.pulled += 1
            yield self.body[i : i + self.size]


async def receive(body: bytes, tmp: Path, limits: UploadLimits = SMALL, size: int = 64 * 1024,
                  ct: str | None = CT) -> ReceivedUpload:
    return await receive_upload(Feed(body, size).__aiter__(), ct, limits, tmp_root=tmp)


async def rejected(body: bytes, tmp: Path, limits: UploadLimits = SMALL, size: int = 64 * 1024,
                   ct: str | None = CT) -> UploadRejected:
    with pytest.raises(UploadRejected) as info:
        await receive(body, tmp, limits, size, ct)
    assert list(tmp.iterdir()) == [], "temp files left behind"
    return info.value


def noise_png(size: tuple[int, int], seed: int = 0) -> bytes:
    """An incompressible (random-pixel) PNG, for size-limit tests."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(buf, format="PNG")
    return buf.getvalue()


def mixed(n: int) -> list[bytes]:
    fmts = ("JPEG", "PNG", "WEBP")
    return [make_image(fmts[i % 3], (40 + i, 30), seed=i) for i in range(n)]


# --- success -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,size", [(15, 7), (30, 64 * 1024), (15, 1)])
async def test_success_mixed_formats(tmp_path: Path, n: int, size: int) -> None:
    blobs = mixed(n)
    body = encode([("name", None, "my lora".encode()), *images(blobs), ("trigger", None, b"zqx")])
    up = await receive(body, tmp_path, UploadLimits(), size)
    try:
        assert up.fields == {"name": "my lora", "trigger": "zqx"}
        assert [im.index for im in up.images] == list(range(n))
        assert [im.format for im in up.images] == [("JPEG", "PNG", "WEBP")[i % 3] for i in range(n)]
        assert up.total_bytes == sum(map(len, blobs))
        for im, blob in zip(up.images, blobs):
            assert im.path.read_bytes() == blob and im.size == len(blob)
            assert im.path.parent == up.tmp_dir and up.tmp_dir.parent == tmp_path
            assert (im.width, im.height) == (40 + im.index, 30)
            assert im.filename == f"photo{im.index:02d}.jpg"
    finally:
        up.cleanup()
    up.cleanup()  # idempotent
    assert list(tmp_path.iterdir()) == []


async def test_exif_orientation_swaps_size(tmp_path: Path) -> None:
    body = encode(images([make_image("JPEG", (64, 48), exif_orientation=6), make_image("JPEG", (64, 48), exif_orientation=3)]))
    up = await receive(body, tmp_path)
    assert [(i.width, i.height) for i in up.images] == [(48, 64), (64, 48)]
    up.cleanup()
    assert list(tmp_path.iterdir()) == []


async def test_content_sniffing_png_named_jpg_ok(tmp_path: Path) -> None:
    up = await receive(encode([("images", "selfie.jpg", make_image("PNG"))]), tmp_path)
    assert up.images[0].format == "PNG" and up.images[0].filename == "selfie.jpg"
    up.cleanup()


async def test_part_without_filename_and_preamble_epilogue(tmp_path: Path) -> None:
    body = b"preamble\r\n" + encode([("images", None, make_image("WEBP"))]) + b"epilogue"
    up = await receive(body, tmp_path, size=3)
    assert up.images[0].filename is None and up.images[0].format == "WEBP"
    up.cleanup()


# --- counts ----------------------------------------------------------------------------------


async def test_too_few_images(tmp_path: Path) -> None:
    err = await rejected(encode(images(image_set(14))), tmp_path, UploadLimits())
    assert err.message == "at least 15 images are required, got 14" and err.path == "images"


async def test_zero_images(tmp_path: Path) -> None:
    err = await rejected(encode([("name", None, b"x")]), tmp_path, UploadLimits())
    assert err.message == "at least 15 images are required, got 0"


async def test_too_many_images_rejected_when_31st_starts(tmp_path: Path) -> None:
    blobs = image_set(31) + image_set(10)
    feed = Feed(encode(images(blobs)), 512)
    with pytest.raises(UploadRejected) as info:
        await receive_upload(feed.__aiter__(), CT, UploadLimits(), tmp_root=tmp_path)
    assert "at most 30 images are allowed" in info.value.message
    assert 'image 31 ("photo30.jpg")' in info.value.message
    assert feed.pulled < feed.total - 10
    assert list(tmp_path.iterdir()) == []


async def test_too_many_parts(tmp_path: Path) -> None:
    parts = [(f"f{i}", None, b"v") for i in range(10)]
    err = await rejected(encode(parts), tmp_path, UploadLimits(max_parts=5))
    assert err.message == "at most 5 parts are allowed in the body" and err.path == "body"


# --- sizes -----------------------------------------------------------------------------------


async def test_image_over_per_part_limit_stops_reading(tmp_path: Path) -> None:
    big = noise_png((100, 100))
    assert len(big) > 20_000
    blobs = [make_image("JPEG"), make_image("JPEG", seed=1), big, *image_set(5)]
    feed = Feed(encode(images(blobs, "png")), 1024)
    limits = UploadLimits(min_images=1, max_image_bytes=20_000)
    with pytest.raises(UploadRejected) as info:
        await receive_upload(feed.__aiter__(), CT, limits, tmp_root=tmp_path)
    assert info.value.message == 'image 3 ("photo02.png") is larger than the 20000 bytes limit per image'
    assert info.value.path == "images"
    assert feed.pulled < feed.total
    assert list(tmp_path.iterdir()) == []


async def test_mb_limit_message(tmp_path: Path) -> None:
    big = noise_png((620, 620))
    assert len(big) > 1024 * 1024
    err = await rejected(encode(images([big])), tmp_path, UploadLimits(min_images=1, max_image_bytes=1024 * 1024))
    assert err.message == 'image 1 ("photo00.jpg") is larger than the 1 MB limit per image'


async def test_total_over_limit(tmp_path: Path) -> None:
    blobs = image_set(10)
    limit = sum(map(len, blobs[:4])) + 10
    feed = Feed(encode(images(blobs)), 7)
    with pytest.raises(UploadRejected) as info:
        await receive_upload(feed.__aiter__(), CT, UploadLimits(min_images=1, max_total_bytes=limit), tmp_root=tmp_path)
    assert info.value.message == f'the images total more than {limit} bytes (at image 5 ("photo04.jpg"))'
    assert feed.pulled < feed.total
    assert list(tmp_path.iterdir()) == []


async def test_body_over_limit(tmp_path: Path) -> None:
    body = encode([(f"notes{i}", None, b"x" * 1000) for i in range(3)] + images(image_set(3)))
    feed = Feed(body, 100)
    with pytest.raises(UploadRejected) as info:
        await receive_upload(feed.__aiter__(), CT, UploadLimits(min_images=1, max_body_bytes=2000), tmp_root=tmp_path)
    assert info.value.message == "the request body is larger than the 2000 bytes limit"
    assert info.value.path == "body" and feed.pulled == 21  # 21 x 100 bytes is the first count over 2000
    assert list(tmp_path.iterdir()) == []


# --- content validation -------------------------------------------------------------------------


def _other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("blob", [_other_format("GIF"), _other_format("BMP"), b"just some text\n" * 20, b""],
                         ids=["gif", "bmp", "text", "empty"])
async def test_not_an_allowed_image(tmp_path: Path, blob: bytes) -> None:
    err = await rejected(encode([*images([make_image("JPEG")]), ("images", "cat.jpg", blob)]), tmp_path, size=7)
    assert err.message == 'image 2 ("cat.jpg"): not a JPEG, PNG or WebP image' and err.path == "images"


async def test_decompression_bomb(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (4_000, 4_000), 0).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    err = await rejected(encode([("images", "bomb.png", buf.getvalue())]), tmp_path,
                         UploadLimits(min_images=1, max_image_pixels=1_000_000))
    assert err.message.startswith('image 1 ("bomb.png"): 4000x4000 is more than the 1,000,000 pixel limit')


async def test_pillow_bomb_error_is_the_same_rejection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises DecompressionBombError in open()
    err = await rejected(encode([("images", "x.png", make_image("PNG", (64, 48)))]), tmp_path)
    assert err.message == 'image 1 ("x.png"): too many pixels (possible decompression bomb)'


async def test_load_truncated_images_set_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        await receive(encode(images(image_set(1))), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
async def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    blob = make_image(fmt, (200, 150), seed=5)
    err = await rejected(encode([("images", "half.jpg", blob[: len(blob) // 2])]), tmp_path)
    assert err.message == 'image 1 ("half.jpg"): the file is truncated or corrupt'


# --- fields ----------------------------------------------------------------------------------------


async def test_field_too_long(tmp_path: Path) -> None:
    err = await rejected(encode([("description", None, b"a" * 101), *images(image_set(1))]), tmp_path,
                         UploadLimits(min_images=1, max_field_bytes=100), size=1)
    assert err.message == 'field "description" is longer than the 100 bytes limit' and err.path == "description"


async def test_unexpected_file_field(tmp_path: Path) -> None:
    err = await rejected(encode([*images(image_set(1)), ("avatar", "me.png", make_image("PNG"))]), tmp_path)
    assert err.path == "avatar"
    assert err.message == 'unexpected file field "avatar" ("me.png"): files are only accepted as "images"'


async def test_repeated_text_field(tmp_path: Path) -> None:
    err = await rejected(encode([("name", None, b"a"), *images(image_set(1)), ("name", None, b"b")]), tmp_path)
    assert err.message == 'field "name" was sent more than once' and err.path == "name"


async def test_field_not_utf8(tmp_path: Path) -> None:
    err = await rejected(encode([("name", None, b"\xff\xfe"), *images(image_set(1))]), tmp_path)
    assert err.message == 'field "name" is not valid UTF-8' and err.path == "name"


# --- malformed / content type ------------------------------------------------------------------------


@pytest.mark.parametrize("ct", [None, "", "application/json", "multipart/form-data", "multipart/mixed; boundary=x",
                                'multipart/form-data; boundary=""'])
async def test_bad_content_type(tmp_path: Path, ct: str | None) -> None:
    err = await rejected(encode(images(image_set(1))), tmp_path, ct=ct)
    assert err.message == "Content-Type must be multipart/form-data with a boundary" and err.path == "body"


@pytest.mark.parametrize(
    "body,size",
    [
        (encode(images(image_set(2)), close=False), 7),  # no closing boundary
        (encode(images(image_set(2)))[:-200], 64 * 1024),  # truncated mid-part
        (b"\x00garbage\xff" * 500, 64 * 1024),  # not multipart at all
        (encode(images(image_set(2)), boundary="otherBoundary"), 1),  # wrong boundary
        (b"", 1),  # empty body
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Big: {'y' * 5000}\r\n\r\nv\r\n"
         f"--{BOUNDARY}--\r\n".encode(), 64 * 1024),  # header too large
        (f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nv\r\n--{BOUNDARY}--\r\n".encode(), 7),  # no disposition
    ],
    ids=["no-closing-boundary", "truncated", "garbage", "wrong-boundary", "empty", "header-too-large", "no-disposition"],
)
async def test_malformed_body(tmp_path: Path, body: bytes, size: int) -> None:
    err = await rejected(body, tmp_path, size=size)
    assert err.message.startswith("malformed multipart body: ") and err.path == "body"
    assert len(err.message) > len("malformed multipart body: ")


# --- cancellation ----------------------------------------------------------------------------------------


async def test_cancellation_mid_stream_cleans_up(tmp_path: Path) -> None:
    body = encode(images(image_set(3)))
    pulled = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]  # partway through the images: temp files exist
        pulled.set()
        await asyncio.Event().wait()  # the client stalls
        yield body[len(body) // 2 :]

    task = asyncio.create_task(receive_upload(stalled(), CT, SMALL, tmp_root=tmp_path))
    await asyncio.wait_for(pulled.wait(), 5)
    await asyncio.sleep(0.01)
    assert len(list(tmp_path.iterdir())) == 1  # the temp dir exists while receiving
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(tmp_path.iterdir()) == []


async def test_source_error_cleans_up(tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield encode(images(image_set(2)))[:500]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await receive_upload(broken(), CT, SMALL, tmp_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_jpeg_layout_finds_the_primary_image_end() -> None:
    from gateway.uploads import _jpeg_layout

    base = make_image("JPEG", (120, 90), seed=3)
    buf = io.BytesIO()
    Image.open(io.BytesIO(base)).save(buf, format="JPEG", progressive=True)
    progressive = buf.getvalue()
    assert _jpeg_layout(base) == (len(base) - 2, True)  # one pass: done after the last MCU row
    assert _jpeg_layout(progressive) == (len(progressive) - 2, False)  # done at EOI only
    assert _jpeg_layout(base + base) == (len(base) - 2, True)  # the first image of two (as in an MPO)
    assert _jpeg_layout(base[: len(base) * 2 // 3]) is None  # no EOI
