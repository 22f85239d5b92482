"""Dataset preparation: normalise images, caption each, and zip them with ``.txt`` captions.

``normalise_image`` is pure CPU work (run it in a worker thread); ``prepare_dataset`` is the async
orchestrator the engine calls while a LoRA is ``UPLOADING``. Output layout::

    out_dir/images/001.jpg, 001.txt, 002.jpg, ...   (input order)
    out_dir/dataset.zip                             (the same files at the zip root)
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import msgspec
from PIL import Image, ImageOps

from gateway.engine.errors import StepError
from plugins.captioners.base import Captioner, CaptionContext, CaptionError
from plugins.captioners.template import ensure_trigger

__all__ = [
    "DatasetError",
    "PrepConfig",
    "PreparedDataset",
    "normalise_image",
    "plain_normalise_image",
    "prepare_dataset",
]

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so a re-run writes a byte-identical zip
_CONCURRENCY = 2


class PrepConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_side: int = 1024
    jpeg_quality: int = 92


class PreparedDataset(msgspec.Struct, frozen=True, kw_only=True):
    directory: Path  # out_dir / "images"
    zip_path: Path  # out_dir / "dataset.zip"
    image_count: int
    captions: list[str]


class DatasetError(StepError):
    """An input image could not be turned into a dataset image."""


class _Log(Protocol):
    def warning(self, event: str, **fields: Any) -> Any: ...


# --------------------------------------------------------------------------- normalisation


def _target_size(size: tuple[int, int], orientation: int, max_side: int) -> tuple[int, int]:
    """Final (displayed, upright) size: long side ≤ ``max_side``, never upscaled."""
    w, h = (size[1], size[0]) if orientation in _SWAPS_AXES else size
    long_side = max(w, h)
    if long_side <= max_side:
        return w, h
    scale = max_side / long_side
    return max(1, round(w * scale)), max(1, round(h * scale))


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited onto white."""
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit greyscale PNG: scale, don't clip
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _save_jpeg_atomic(img: Image.Image, dest: Path, quality: int, icc_profile: bytes | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            extra = {"icc_profile": icc_profile} if icc_profile else {}
            img.save(fh, format="JPEG", quality=quality, progressive=False, **extra)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _normalise(src: Path, dest: Path, max_side: int, quality: int, use_draft: bool) -> tuple[int, int]:
    with Image.open(src) as img:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
        target = _target_size(img.size, orientation, max_side)
        if use_draft and img.format in ("JPEG", "MPO"):
            # the draft size is in stored (pre-rotation) axes; libjpeg picks the largest
            # 1/2, 1/4 or 1/8 scale whose result is still >= the requested size
            draft = (target[1], target[0]) if orientation in _SWAPS_AXES else target
            img.draft("RGB", draft)
        # an ICC profile only makes sense on the output when the source was already RGB
        icc = img.info.get("icc_profile") if img.mode in ("RGB", "RGBA") else None
        ImageOps.exif_transpose(img, in_place=True)
        out = _flatten_to_rgb(img)
        if out.size != target:
            out = out.resize(target, Image.Resampling.LANCZOS)
        _save_jpeg_atomic(out, dest, quality, icc)
        return out.size


def normalise_image(src: Path, dest: Path, max_side: int, quality: int) -> tuple[int, int]:
    """Write ``src`` as an upright baseline RGB JPEG with long side ≤ ``max_side``; return (w, h).

    JPEG sources are decoded at a reduced DCT scale (``Image.draft``) that is still at least the
    final size, so a 12-megapixel photo is never fully decoded just to be shrunk.
    """
    return _normalise(Path(src), Path(dest), max_side, quality, use_draft=True)


def plain_normalise_image(src: Path, dest: Path, max_side: int, quality: int) -> tuple[int, int]:
    """``normalise_image`` without the draft decode (full-size decode, then resize). Benchmark baseline."""
    return _normalise(Path(src), Path(dest), max_side, quality, use_draft=False)


# --------------------------------------------------------------------------- orchestration


def _write_zip(zip_path: Path, files: list[Path]) -> None:
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in files:
                info = zipfile.ZipInfo(path.name, date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_STORED if path.suffix == ".jpg" else zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
        os.replace(tmp, zip_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


async def _caption_one(
    index: int, image: Path, ctx: CaptionContext, captioner: Captioner, fallback: Captioner, log: _Log
) -> str:
    try:
        text = " ".join((await captioner.caption(image, ctx)).split())
        if not text:
            raise CaptionError("empty caption")
    except Exception as exc:  # any captioner bug must not fail the dataset: fall back
        log.warning(
            "caption_failed", captioner=captioner.name, image=index, error=str(exc) or type(exc).__name__
        )
        text = " ".join((await fallback.caption(image, ctx)).split())
    return ensure_trigger(text, ctx.trigger_word)


async def prepare_dataset(
    images: list[Path],
    out_dir: Path,
    ctx: CaptionContext,
    captioner: Captioner,
    fallback: Captioner,
    cfg: PrepConfig,
    log: _Log,
) -> PreparedDataset:
    """Normalise, caption and zip ``images`` into ``out_dir``; idempotent for the same inputs.

    Images are processed two at a time. A captioner failure (of any kind) is logged as
    ``caption_failed`` and that image gets ``fallback``'s caption instead. An unreadable image
    raises ``DatasetError``.
    """
    if not images:
        raise DatasetError("no images to prepare")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    await anyio.to_thread.run_sync(_reset_dir, images_dir)

    width = max(3, len(str(len(images))))
    captions: list[str] = [""] * len(images)
    failures: dict[int, BaseException] = {}
    limiter = anyio.CapacityLimiter(_CONCURRENCY)

    async def one(index: int, src: Path, cancel: anyio.CancelScope) -> None:
        stem = images_dir / f"{index:0{width}d}"
        jpg = stem.with_suffix(".jpg")
        async with limiter:
            try:
                normalise = functools.partial(normalise_image, src, jpg, cfg.max_side, cfg.jpeg_quality)
                await anyio.to_thread.run_sync(normalise)
            except Exception as exc:
                failures[index] = DatasetError(f"image {index} could not be normalised: {exc}")
                cancel.cancel()
                return
            try:
                text = await _caption_one(index, jpg, ctx, captioner, fallback, log)
                await anyio.to_thread.run_sync(stem.with_suffix(".txt").write_bytes, text.encode("utf-8"))
            except Exception as exc:  # only if the fallback itself fails, or the disk does
                failures[index] = DatasetError(f"image {index} could not be captioned: {exc}")
                cancel.cancel()
                return
            captions[index - 1] = text

    async with anyio.create_task_group() as tg:
        for i, src in enumerate(images, start=1):
            tg.start_soon(one, i, Path(src), tg.cancel_scope)
    if failures:
        raise failures[min(failures)]

    files = sorted(p for p in images_dir.iterdir() if p.suffix in (".jpg", ".txt") and not p.name.startswith("."))
    zip_path = out_dir / "dataset.zip"
    await anyio.to_thread.run_sync(_write_zip, zip_path, files)
    return PreparedDataset(directory=images_dir, zip_path=zip_path, image_count=len(images), captions=captions)
