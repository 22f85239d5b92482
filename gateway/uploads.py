"""Streaming receiver for the multipart body of ``POST /v2/loras``.

The body is parsed incrementally with :class:`multipart.PushMultipartParser`: each
image part is written straight to its own temp file and every limit is enforced
while the bytes arrive, so an oversized or malformed upload is rejected without
reading the rest of it. Each finished image is then checked with Pillow in a worker
thread: its type is sniffed from the content, its pixel count is checked before
anything is decoded, and it is fully decoded to catch truncated or corrupt files.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio.to_thread
import msgspec
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_FIELD = "images"
#: image checks (a full decode each) that run at once, in threads, while the body streams
CHECKS_AT_ONCE = 2
_MB = 1024 * 1024
_EXIF_ORIENTATION = 0x0112
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}


class UploadLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Limits enforced on one upload; sizes are in bytes."""

    min_images: int = 15
    max_images: int = 30
    max_image_bytes: int = 10 * 1024 * 1024  # per image part
    max_total_bytes: int = 100 * 1024 * 1024  # sum of image part sizes
    max_body_bytes: int = 105 * 1024 * 1024  # whole body incl. multipart overhead and fields
    max_image_pixels: int = 40_000_000  # width * height (decompression-bomb limit)
    max_field_bytes: int = 4096  # each non-file field
    max_parts: int = 64  # files + fields
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


class UploadRejected(Exception):
    """A 400: ``message`` says which part broke which rule; ``path`` is the details key."""

    def __init__(self, message: str, path: str = "images") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class ReceivedImage(msgspec.Struct, kw_only=True):
    """One validated image part, stored as uploaded in a temp file."""

    index: int  # 0-based order of the image part in the body
    filename: str | None  # client's filename: informational only, never trusted
    path: Path
    size: int
    format: str  # as decided by Pillow from the content
    width: int  # after applying EXIF orientation
    height: int
    sha256: str  # of the bytes as uploaded (hashed while streaming)


class ReceivedUpload(msgspec.Struct, kw_only=True):
    """The text fields and validated images of an upload; call :meth:`cleanup` when done."""

    fields: dict[str, str]
    images: list[ReceivedImage]
    total_bytes: int
    tmp_dir: Path

    def cleanup(self) -> None:
        """Remove the temp directory and everything in it (idempotent)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


class _Part(msgspec.Struct):
    """The part being received: an image (``file`` set) or a text field (``text`` set)."""

    name: str
    filename: str | None
    index: int = -1
    file: BinaryIO | None = None
    path: Path | None = None
    text: bytearray | None = None
    size: int = 0
    digest: Any = None  # hashlib sha256 of an image part, fed while streaming


def _size_text(n: int) -> str:
    """A byte limit for messages: ``10 MB`` for whole MiB, else ``20000 bytes``."""
    if n < _MB:
        return f"{n} bytes"
    return f"{n // _MB} MB" if n % _MB == 0 else f"{n / _MB:.1f} MB"


def _label(index: int, filename: str | None) -> str:
    """``images[3] ("x.jpg")``, or ``images[3]`` when the part has no filename."""
    return f"images[{index}] ({msgspec.json.encode(filename).decode()})" if filename else f"images[{index}]"


def _formats_text(formats: tuple[str, ...]) -> str:
    """``JPEG, PNG or WebP``."""
    names = [_FORMAT_NAMES.get(f, f) for f in formats]
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _boundary(content_type: str | None) -> str:
    """The boundary of a ``multipart/form-data`` Content-Type, else reject the request."""
    mime, options = parse_options_header(content_type or "")
    boundary = options.get("boundary", "")
    if mime != "multipart/form-data" or not boundary or "\n" in boundary or "\r" in boundary:
        raise UploadRejected("Content-Type must be multipart/form-data with a boundary", path="body")
    return boundary


class _BadImage(Exception):
    """Raised in the worker thread; the message is the rule the image breaks."""


def _looks_whole(path: Path, fmt: str) -> bool:
    """A cheap structural check that the file is complete (no pixel decoding):
    a JPEG ends with its EOI marker, a WebP's RIFF size matches the file, and a PNG's
    ``verify()`` (already run) checked every chunk's CRC up to IEND."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if fmt == "PNG":
            return True
        if fmt == "WEBP":
            head = f.read(12)
            riff = int.from_bytes(head[4:8], "little")
            return head[:4] == b"RIFF" and head[8:12] == b"WEBP" and size in (riff + 8, riff + 9)
        f.seek(max(0, size - 64))
        return f.read().rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _inspect_image(path: Path, limits: UploadLimits) -> tuple[str, int, int]:
    """Sniff, bomb-check and verify one image (blocking; run in a thread).

    A file that passes the structural check (:func:`_looks_whole`) is not decoded here: the
    dataset preparation decodes every image anyway. Anything else is fully decoded, so a
    truncated file is rejected either way. Returns ``(format, width, height)`` with the size
    after EXIF orientation.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated uploads would pass")
    formats = list(limits.allowed_formats)
    not_allowed = _BadImage(f"not a {_formats_text(limits.allowed_formats)} image")
    try:
        try:
            im = Image.open(path, formats=formats)
        except UnidentifiedImageError:
            raise not_allowed from None
        with im:
            fmt = "JPEG" if im.format == "MPO" else (im.format or "")
            if fmt not in limits.allowed_formats:
                raise not_allowed
            if im.width * im.height > limits.max_image_pixels:
                raise _BadImage(
                    f"{im.width}x{im.height} is more than the {limits.max_image_pixels:,} pixel limit"
                    " (possible decompression bomb)"
                )
            im.verify()
        with Image.open(path, formats=formats) as im:
            if not _looks_whole(path, fmt):
                im.load()  # raises for a truncated or broken file
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
    except _BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _BadImage("too many pixels (possible decompression bomb)") from None
    except Exception:
        raise _BadImage("the file is truncated or corrupt") from None
    return fmt, width, height


class _Receiver:
    """Per-request state: turns parser events into temp files, fields and rejections."""

    def __init__(self, limits: UploadLimits, tmp_dir: Path) -> None:
        self.limits = limits
        self.tmp_dir = tmp_dir
        self.fields: dict[str, str] = {}
        self.images: list[ReceivedImage] = []
        self.parts = 0
        self.image_parts = 0
        self.image_bytes = 0
        self.part: _Part | None = None
        # image checks run in threads while the body keeps streaming (at most CHECKS at once)
        self._slots = asyncio.Semaphore(CHECKS_AT_ONCE)
        self._checks: list[asyncio.Task[None]] = []
        self._failure: BaseException | None = None

    def start(self, seg: MultipartSegment) -> None:
        """A part's headers arrived: apply the count and naming rules, open its sink."""
        lim, name = self.limits, seg.name or ""
        self.parts += 1
        if self.parts > lim.max_parts:
            raise UploadRejected(f"at most {lim.max_parts} parts are allowed in the body", path="body")
        if name == IMAGE_FIELD:
            index = self.image_parts
            self.image_parts += 1
            if self.image_parts > lim.max_images:
                raise UploadRejected(
                    f"at most {lim.max_images} images are allowed; {_label(index, seg.filename)} is one too many"
                )
            path = self.tmp_dir / f"{index:04d}"
            self.part = _Part(name, seg.filename, index, file=path.open("wb"), path=path, digest=hashlib.sha256())
        elif not name:
            raise UploadRejected(f"part #{self.parts} has no field name", path="body")
        elif seg.filename is not None:
            raise UploadRejected(
                f'unexpected file field "{name}" ({msgspec.json.encode(seg.filename).decode()}):'
                f' files are only accepted as "{IMAGE_FIELD}"',
                path=name,
            )
        elif name in self.fields:
            raise UploadRejected(f'field "{name}" was sent more than once', path=name)
        else:
            self.part = _Part(name, None, text=bytearray())

    def data(self, chunk: bytes) -> None:
        """A chunk of the current part: apply the size limits, then store it."""
        part, lim = self.part, self.limits
        assert part is not None
        part.size += len(chunk)
        if part.text is not None:
            if part.size > lim.max_field_bytes:
                raise UploadRejected(
                    f'field "{part.name}" is longer than the {lim.max_field_bytes} bytes limit', path=part.name
                )
            part.text += chunk
            return
        label = _label(part.index, part.filename)
        if part.size > lim.max_image_bytes:
            raise UploadRejected(f"{label} is larger than the {_size_text(lim.max_image_bytes)} limit per image")
        self.image_bytes += len(chunk)
        if self.image_bytes > lim.max_total_bytes:
            raise UploadRejected(f"the images total more than {_size_text(lim.max_total_bytes)} (at {label})")
        assert part.file is not None
        part.file.write(chunk)
        part.digest.update(chunk)

    async def end(self) -> None:
        """The current part is complete: keep the field, or validate the image in a thread."""
        part, self.part = self.part, None
        assert part is not None
        if part.text is not None:
            try:
                self.fields[part.name] = part.text.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadRejected(f'field "{part.name}" is not valid UTF-8', path=part.name) from None
            return
        assert part.file is not None and part.path is not None
        part.file.close()
        self.raise_failure()
        await self._slots.acquire()  # back-pressure: stop reading while CHECKS_AT_ONCE run
        self._checks.append(asyncio.ensure_future(self._check(part)))

    async def _check(self, part: _Part) -> None:
        try:
            fmt, width, height = await anyio.to_thread.run_sync(_inspect_image, part.path, self.limits)
            self.images.append(ReceivedImage(index=part.index, filename=part.filename, path=part.path,
                                             size=part.size, format=fmt, width=width, height=height,
                                             sha256=part.digest.hexdigest()))
        except _BadImage as bad:
            if self._failure is None:
                self._failure = UploadRejected(f"{_label(part.index, part.filename)}: {bad}")
        except BaseException as e:  # noqa: BLE001 - re-raised by the receiving task
            if self._failure is None:
                self._failure = e
        finally:
            self._slots.release()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def finish(self) -> None:
        """Wait for every image check; raise the first failure; images in body order."""
        await self.drain()
        self.raise_failure()
        self.images.sort(key=lambda i: i.index)

    async def drain(self) -> None:
        """Wait for the checks still running (they hold files in the temp dir)."""
        if self._checks:
            await asyncio.shield(asyncio.gather(*self._checks, return_exceptions=True))

    def close(self) -> None:
        """Close the open temp file, if any (the caller removes the directory)."""
        if self.part is not None and self.part.file is not None:
            self.part.file.close()


async def receive_upload(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    limits: UploadLimits,
    tmp_root: Path | None = None,
) -> ReceivedUpload:
    """Receive and validate a ``multipart/form-data`` upload streamed as ``chunks``.

    Raises :class:`UploadRejected` the moment a rule is broken (without reading the
    rest of the body). On any exception, cancellation included, the temp directory
    is removed; on success the caller owns it and must call ``cleanup()``.
    """
    boundary = _boundary(content_type)
    if tmp_root is not None:
        tmp_root.mkdir(parents=True, exist_ok=True)  # a configured uploads.tmp_dir need not exist yet
    tmp_dir = Path(tempfile.mkdtemp(prefix="lora-upload-", dir=tmp_root))
    receiver = _Receiver(limits, tmp_dir)
    body_bytes = 0
    try:
        try:
            parser = PushMultipartParser(boundary)
            async for chunk in chunks:
                if not chunk:
                    continue  # an empty chunk would close the parser
                body_bytes += len(chunk)
                if body_bytes > limits.max_body_bytes:
                    raise UploadRejected(
                        f"the request body is larger than the {_size_text(limits.max_body_bytes)} limit", path="body"
                    )
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        receiver.start(event)
                    elif event is None:
                        await receiver.end()
                    else:
                        receiver.data(event)
                receiver.raise_failure()  # an image check failed: stop reading now
            parser.close()  # raises unless the closing boundary was seen
            await receiver.finish()
        except MultipartError as err:
            reason = str(err.args[0]) if err.args else type(err).__name__
            raise UploadRejected(f"malformed multipart body: {reason[:1].lower()}{reason[1:]}", path="body") from None
        finally:
            receiver.close()
        count = len(receiver.images)
        if count < limits.min_images:
            raise UploadRejected(f"at least {limits.min_images} images are required, got {count}")
        return ReceivedUpload(
            fields=receiver.fields, images=receiver.images, total_bytes=receiver.image_bytes, tmp_dir=tmp_dir
        )
    except BaseException:
        await receiver.drain()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
