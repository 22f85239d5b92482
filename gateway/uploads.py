"""Streaming receiver for the multipart body of ``POST /v2/loras``.

The body is parsed incrementally with :class:`multipart.PushMultipartParser`: each
image part is written straight to its own temp file and every limit is enforced
while the bytes arrive, so an oversized or malformed upload is rejected without
reading the rest of it. Each finished image is then checked with Pillow in a worker
thread: its type is sniffed from the content, its pixel count is checked before
anything is decoded, and all of its pixel data is decoded to catch truncated or corrupt
files (see :func:`_check_pixel_data`).

Each upload spools into its own ``lora-upload-<pid>-<start>-<host>-<random>`` directory,
named after the process that owns it, so that :func:`sweep_spool_dirs` can remove, at start-up,
the directories of a process that was killed (SIGKILL, OOM) before it could clean up.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio.to_thread
import msgspec
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from PIL import Image, ImageFile, UnidentifiedImageError

from gateway.imaging import FORMAT_FROM_PIL, structurally_whole

IMAGE_FIELD = "images"
#: image checks (a decode of all the pixel data each) that run at once, in threads, while the body streams
CHECKS_AT_ONCE = 2
_MB = 1024 * 1024
_EXIF_ORIENTATION = 0x0112
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
_CORRUPT = "the file is truncated or corrupt"
#: spool directories are ``lora-upload-<pid>-<start>-<host>-<mkdtemp's random part>``: the
#: owner's pid, its start time in clock ticks since boot (``/proc/<pid>/stat``, 0 where unknown)
#: and a hash of the host name (its pid means nothing on another host or container)
SPOOL_PREFIX = "lora-upload-"
_SPOOL_NAME = re.compile(r"lora-upload-(\d+)-(\d+)-([0-9a-f]{8})-[a-z0-9_]+")
_LEGACY_SPOOL_NAME = re.compile(r"lora-upload-[a-z0-9_]+")  # before owners were named: mkdtemp's own
#: a spool directory whose owner cannot be judged (an older gateway's, one from another host)
#: is removed by the sweep once it has not changed for this long
UNOWNED_SPOOL_MAX_AGE_S = 3600


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
    #: decode all of the pixel data at upload (a truncated or corrupt image is a 400); False:
    #: only a structural check (a file cut short with its end marker appended then passes)
    decode_pixels: bool = True


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
    """``image 4 ("x.jpg")``, or ``image 4`` when the part has no filename: counted from 1, as
    a person counts the files they chose (``index`` is 0-based)."""
    n = index + 1
    return f"image {n} ({msgspec.json.encode(filename).decode()})" if filename else f"image {n}"


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


#: JPEG markers that start a frame, and those of them that make it progressive
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
#: the end of entropy-coded data: a marker, i.e. FF followed by anything but a stuffed 00 or RSTn
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
#: fed to libjpeg in place of the EOI marker: stuffed FF 00 pairs, i.e. 128 one-bits of entropy data
_JPEG_PAD = b"\xff\x00" * 16
#: times one more FF 00 pair is fed, one at a time, to a multi-scan JPEG that took all of the pad
_JPEG_PROBES = 3
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_PIECE = 1 << 20  # inflate this much at a time: memory stays flat whatever the image size


def _jpeg_layout(data: bytes | mmap.mmap) -> tuple[int, bool] | None:
    """Walk the markers of the primary image of a JPEG (the first of an MPO, the photo of a
    file with data after it): ``(offset of its EOI marker, single pass)``, or ``None`` when the
    file ends before its EOI. *single pass* is libjpeg's one-pass mode (a sequential frame whose
    first scan has every component), in which the decoder is done after the last MCU row; any
    other image (progressive, or one scan per component) is only finished at EOI. Bytes between
    segments are skipped to the next FF, as libjpeg does."""
    pos, n = 2, len(data)
    progressive, components, single = False, -1, None
    while pos + 1 < n:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return pos, bool(single)
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
        else:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            body = data[pos + 4 : pos + 2 + length]
            pos += 2 + length
            if marker in _JPEG_SOF and components < 0 and len(body) > 5:
                progressive, components = marker in _JPEG_PROGRESSIVE, body[5]
            elif marker == 0xDA:
                if single is None:
                    single = not progressive and bool(body) and body[0] == components
                end = _JPEG_MARKER.search(data, pos)
                if end is None:
                    return None
                pos = end.start()
    return None


def _check_jpeg(im: ImageFile.ImageFile, path: Path) -> None:
    """Entropy-decode the whole primary image, at 1/8 scale, and raise unless every MCU of
    every scan had its data.

    ``load()`` is not enough: a JPEG cut short with an EOI marker appended decodes without an
    error. libjpeg only warns ("premature end of data segment"), leaves the missing blocks at
    zero (mid-grey), and Pillow drops libjpeg's warnings. Two other ideas, measured and dropped:
    decoding the file with its EOI removed rejects *every* complete file (libjpeg-turbo's bit
    reader wants 57 bits of look-ahead past the last code, and a progressive file is only done
    at EOI); and looking for the grey fill rejects a legitimate image whose last block is flat
    mid-grey, and misses a progressive file cut in a later scan (no grey, just less detail).

    What works: libjpeg *suspends* when its data runs out with no marker. So the image is fed
    up to its EOI, which is dropped, then ``_JPEG_PAD``: 16 bytes of one-bits (stuffed ``FF 00``
    pairs), the look-ahead a complete file needs, which a truncated file decodes as entropy data:

    * one-pass images (baseline photos): a complete file finishes its last MCU row, so the
      decoder is done; a truncated one still waits for data.
    * other images (progressive) are only done at EOI, so both wait; the difference is *where*.
      After its last scan the decoder waits for a marker and discards padding byte by byte as it
      comes; inside a scan the pad is entropy data, in which one-bits never form a Huffman code
      (libjpeg refuses tables with an all-ones code) and each block takes 17 or more of them.
      So a complete file takes all of the pad, and then each of ``_JPEG_PROBES`` single ``FF 00``
      pairs (8 bits) at once; a truncated one leaves some of that unused.

    Limits: the pad completes at most 3 blocks (8 in a progressive AC scan, about 150 in a DC
    refinement scan, at 1 bit a block), so a file missing no more than that passes; a
    progressive file cut exactly between two scans is a valid JPEG with fewer scans; and a
    corruption that keeps the amount of data (bits flipped inside a scan) only draws libjpeg
    warnings, so it is caught only when it changes how much data the decoder needs.

    ``draft()`` (1/8 scale, greyscale) skips the inverse DCT, colour conversion and most of the
    output, not the entropy decoding, which a truncation check cannot skip: that is most of the
    cost of a dense file (16 of 20 ms for a 3.3 MiB noise JPEG at quality 95).
    """
    im.draft("L", (1, 1))  # the largest DCT scaling (1/8); greyscale output: no chroma IDCT
    if len(im.tile) != 1 or im.tile[0][0] != "jpeg":  # not what Pillow gives a JPEG: decode it plainly
        im.load()
        return
    im.load_prepare()
    name, extents, offset, args = im.tile[0]
    decoder = Image._getdecoder(im.mode, name, args, im.decoderconfig)  # as ImageFile.Parser does
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            layout = _jpeg_layout(mapped)
            if layout is None:
                raise _BadImage(_CORRUPT)
            eoi, single_pass = layout
            decoder.setimage(im.im, extents)
            with memoryview(mapped) as view:  # the file as it is, up to its EOI ...
                consumed, err = decoder.decode(view[offset:eoi])
                tail = b"" if consumed < 0 else bytes(view[offset + consumed : eoi]) + _JPEG_PAD
            if tail:  # ... then what libjpeg left of it, and the pad instead of the EOI
                consumed, err = decoder.decode(tail)
            if consumed < 0:  # done: every scanline is out (or libjpeg raised an error)
                if err < 0:
                    raise _BadImage(_CORRUPT)
                return
            if single_pass or consumed < len(tail):
                raise _BadImage(_CORRUPT)
            for _ in range(_JPEG_PROBES):
                if decoder.decode(b"\xff\x00")[0] != 2:
                    raise _BadImage(_CORRUPT)
        finally:
            decoder.cleanup()


def _png_chunks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """``(type, length)`` of each chunk, the file positioned at its data; the caller reads it or not."""
    f.seek(8)
    while len(head := f.read(8)) == 8:
        length = int.from_bytes(head[:4], "big")
        start = f.tell()
        yield head[4:], length
        if head[4:] == b"IEND":
            return
        f.seek(start + length + 4)  # + CRC


def _check_png(path: Path) -> int | None:
    """Inflate all of the pixel data (the IDAT chunks) and raise unless the zlib stream is whole
    and valid (its Adler-32 included) and holds every scanline with a valid filter type; returns
    the EXIF orientation if the file has an ``eXIf`` chunk.

    Pillow's ``load()`` is not enough: it stops once the image is full, never reaching the end of
    the zlib stream, so damaged data that still inflates to enough bytes (an IDAT zeroed from the
    middle, with its CRC fixed up) decodes without an error. Memory stays flat: the inflated data
    is looked at (its filter bytes) and dropped, 1 MiB at a time. The CRCs were checked by
    ``verify()``.
    """
    orientation: int | None = None
    inflater = zlib.decompressobj()
    total = 0
    rows: list[tuple[int, int, int]] = []  # (offset in the inflated data, stride, count) per pass
    with path.open("rb") as f:
        for kind, length in _png_chunks(f):
            if kind == b"IHDR":
                width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", f.read(13))
                bits = depth * _PNG_CHANNELS.get(colour, 4)
                offset = 0
                for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
                    w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
                    if w > 0 and h > 0:
                        rows.append((offset, 1 + (w * bits + 7) // 8, h))
                        offset += h * (1 + (w * bits + 7) // 8)
            elif kind == b"eXIf" and length <= 1 << 20:
                exif = Image.Exif()
                exif.load(f.read(length))
                orientation = exif.get(_EXIF_ORIENTATION)
            elif kind == b"IDAT" and not inflater.eof:
                while length > 0:
                    chunk = f.read(min(length, _PNG_PIECE))
                    if not chunk:
                        raise _BadImage(_CORRUPT)
                    length -= len(chunk)
                    while chunk and not inflater.eof:
                        out = inflater.decompress(chunk, _PNG_PIECE)
                        if _bad_png_filters(out, total, rows):
                            raise _BadImage(_CORRUPT)
                        total += len(out)
                        chunk = inflater.unconsumed_tail
    expected = sum(stride * count for _, stride, count in rows)
    if not rows or not inflater.eof or total < expected:
        raise _BadImage(_CORRUPT)
    return orientation


def _bad_png_filters(out: bytes, at: int, rows: list[tuple[int, int, int]]) -> bool:
    """Whether a scanline starting in ``out`` (inflated bytes ``at`` to ``at + len(out)``) has a
    filter type byte other than 0..4."""
    end = at + len(out)
    for start, stride, count in rows:
        stop = min(end, start + stride * count)
        first = start if at <= start else at + (start - at) % stride
        if first < stop and max(out[first - at : stop - at : stride]) > 4:
            return True
    return False


def _check_webp(im: ImageFile.ImageFile, path: Path) -> None:
    """Decode the image, and refuse a lossy frame whose data ends in zero bytes for at least
    half of its length.

    libwebp decodes zero bytes as valid VP8 data: a frame zeroed after its header (the RIFF and
    chunk sizes intact) decodes without an error to flat grey, and one zeroed from the middle
    to a smear; a lossless (VP8L) frame fails to decode instead. libwebp's encoder never ends a
    frame so: its longest run of trailing zeros measured 18% of the frame data (4 bytes of a
    1x1 image) and 5% for a flat 3000x3000 one.
    """
    im.load()
    with path.open("rb") as f:
        f.seek(12)
        while len(head := f.read(8)) == 8:
            kind, length = head[:4], int.from_bytes(head[4:], "little")
            if kind == b"ANMF":
                return  # an animation: load() decoded its first frame
            if kind == b"VP8 ":
                frame = f.read(length)[10:]  # past the frame tag, start code and size
                zeros = len(frame) - len(frame.rstrip(b"\x00"))
                if zeros >= 16 and 2 * zeros >= len(frame):
                    raise _BadImage(_CORRUPT)
                return
            f.seek(length + (length & 1), os.SEEK_CUR)


def _check_pixel_data(im: ImageFile.ImageFile, path: Path, fmt: str) -> int | None:
    """Decode all of the pixel data (raises for a truncated or corrupt image); returns the EXIF
    orientation of a PNG with an ``eXIf`` chunk (which may come after the pixel data)."""
    if fmt == "JPEG":
        _check_jpeg(im, path)
    elif fmt == "PNG":
        return _check_png(path)
    else:
        _check_webp(im, path)
    return None


def _inspect_image(path: Path, limits: UploadLimits) -> tuple[str, int, int]:
    """Sniff, bomb-check and verify one image (blocking; run in a thread).

    After ``verify()`` (a PNG's chunk CRCs), all of the pixel data is decoded by
    :func:`_check_pixel_data`, so a truncated or corrupt file is rejected here, not when the
    dataset is prepared. Returns ``(format, width, height)`` with the size after EXIF orientation.
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
            width, height = im.size
            # (a PNG's getexif() is a full load(): its eXIf chunk is read by the pixel check)
            exif = Image.Image.getexif(im) if fmt == "PNG" else im.getexif()
            if limits.decode_pixels:
                orientation = _check_pixel_data(im, path, fmt) or exif.get(_EXIF_ORIENTATION)
            elif structurally_whole(path, FORMAT_FROM_PIL[fmt]):
                orientation = exif.get(_EXIF_ORIENTATION)
            else:
                raise _BadImage(_CORRUPT)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
    except _BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _BadImage("too many pixels (possible decompression bomb)") from None
    except Exception:
        raise _BadImage(_CORRUPT) from None
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
    tmp_dir = Path(tempfile.mkdtemp(prefix=_spool_prefix(), dir=tmp_root))
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


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of a process, from ``/proc/<pid>/stat``;
    ``None`` where it cannot be read (no such process, no ``/proc``, not allowed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": the name may hold anything
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _spool_prefix() -> str:
    """``lora-upload-<pid>-<start>-<host>-``: names the process that owns the spool directory.
    With the start time, a directory left by a dead process whose pid was reused is told apart."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return f"{SPOOL_PREFIX}{pid}-{stat[1] if stat else 0}-{_host_tag()}-"


def _owner_alive(pid: int, start: int) -> bool:
    """Whether the process of this host that created a spool directory may still be running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    except OverflowError:
        return False  # no such pid can exist
    stat = _proc_stat(pid)
    if stat is None:
        return True  # alive, and no way to tell whether it is the owner
    state, started = stat
    if state in ("Z", "X"):
        return False  # a zombie holds nothing
    return start == 0 or started == start  # another start time: the pid was reused


def sweep_spool_dirs(tmp_root: Path | None) -> int:
    """Remove the spool directories in ``tmp_root`` (``None``: the system temp directory) that
    no running process owns, and return how many were removed.

    Call it at start-up: an upload killed mid-body (SIGKILL, the OOM killer, a power cut) leaves
    its directory behind, as nothing of the dead process runs to remove it. Only directories named
    like the gateway's own are touched (never a file, a symlink or any other name):

    * ``lora-upload-<pid>-<start>-<host>-<random>`` of this host: removed when that pid is gone,
      is a zombie, or is a process with another start time (the pid was reused); kept while its
      owner runs (this process's own included).
    * one of another host (a ``tmp_root`` shared between hosts or containers), or
      ``lora-upload-<random>`` (an older gateway's, no owner in the name): removed once unchanged
      for ``UNOWNED_SPOOL_MAX_AGE_S`` (an hour). A spool directory lives as long as its request,
      and gets a new file at every image part.
    """
    root = Path(tempfile.gettempdir()) if tmp_root is None else tmp_root
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(SPOOL_PREFIX)]
    except OSError:  # no such directory, not one, not readable: nothing of ours to sweep
        return 0
    host, removed = _host_tag(), 0
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            owner = _SPOOL_NAME.fullmatch(entry.name)
            if owner and owner[3] == host:
                stale = not _owner_alive(int(owner[1]), int(owner[2]))
            elif owner or _LEGACY_SPOOL_NAME.fullmatch(entry.name):
                age = time.time() - entry.stat(follow_symlinks=False).st_mtime
                stale = age >= UNOWNED_SPOOL_MAX_AGE_S
            else:
                continue
        except OSError:
            continue  # gone meanwhile, or unreadable: not ours to judge
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += not os.path.lexists(entry.path)
    return removed
