"""Dataset prep: image normalisation (draft decode, EXIF, alpha) and the prepare_dataset orchestrator."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat, JpegImagePlugin

from gateway.datasets import (
    DatasetError,
    PrepConfig,
    normalise_image,
    plain_normalise_image,
    prepare_dataset,
)
from plugins.captioners.base import Captioner, CaptionContext, CaptionError
from plugins.captioners.template import TemplateCaptioner, has_word
from tests.images import make_image

CTX = CaptionContext(trigger_word="TOK3X", subject_kind="person", gender="female", age="30")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def is_red(px: tuple[int, ...]) -> bool:
    r, g, b = px[:3]
    return r > 180 and g < 90 and b < 90


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("big") / "big.jpg", make_image("JPEG", (3000, 2000), seed=3, quality=90))


# --------------------------------------------------------------------------- normalise_image


def test_big_jpeg_is_shrunk_to_max_side(big_jpeg: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.jpg"
    assert normalise_image(big_jpeg, dest, 1024, 92) == (1024, 683)
    with Image.open(dest) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (1024, 683)
        assert not img.info.get("progressive") and not img.info.get("progression")
    assert [p.name for p in tmp_path.iterdir()] == ["out.jpg"]  # no temp file left behind


def test_draft_decode_is_used(big_jpeg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Any, mode: Any, size: Any) -> Any:
        result = real(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    normalise_image(big_jpeg, tmp_path / "a.jpg", 1024, 92)
    assert calls == [((1024, 683), (1500, 1000))]  # decoded at 1/2 scale, still >= target
    plain_normalise_image(big_jpeg, tmp_path / "b.jpg", 1024, 92)
    assert len(calls) == 1  # the baseline never drafts


def test_draft_and_plain_agree(big_jpeg: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "draft.jpg", tmp_path / "plain.jpg"
    assert normalise_image(big_jpeg, a, 1024, 92) == plain_normalise_image(big_jpeg, b, 1024, 92)
    with Image.open(a) as ia, Image.open(b) as ib:
        assert mean_abs_diff(ia.convert("RGB"), ib.convert("RGB")) < 2.0


@pytest.mark.parametrize("fn", [normalise_image, plain_normalise_image])
def test_exif_orientation_6_gives_upright_portrait(fn: Any, tmp_path: Path) -> None:
    # stored 640x480 landscape with the red block top-left; orientation 6 = rotate 90° clockwise
    src = write(tmp_path / "rot.jpg", make_image("JPEG", (640, 480), exif_orientation=6, quality=95))
    dest = tmp_path / "out.jpg"
    assert fn(src, dest, 320, 92) == (240, 320)
    with Image.open(dest) as img:
        assert img.size == (240, 320)
        assert img.getexif().get(0x0112) in (None, 1)
        rgb = img.convert("RGB")
        assert is_red(rgb.getpixel((238, 1)))  # top-right corner
        assert not is_red(rgb.getpixel((1, 1)))
        assert not is_red(rgb.getpixel((1, 318)))


def test_exif_orientation_draft_size_accounts_for_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "rot.jpg", make_image("JPEG", (2400, 1600), exif_orientation=6, quality=90))
    sizes: list[Any] = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda self, m, s: (sizes.append(s), real(self, m, s))[1]
    )
    assert normalise_image(src, tmp_path / "o.jpg", 600, 90) == (400, 600)
    assert sizes == [(600, 400)]  # requested in stored (landscape) axes


def test_png_with_alpha_becomes_rgb_jpeg_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (40, 30), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    dest = tmp_path / "out.jpg"
    assert normalise_image(write(tmp_path / "a.png", buf.getvalue()), dest, 1024, 92) == (40, 30)
    with Image.open(dest) as out:
        assert out.format == "JPEG" and out.mode == "RGB"
        assert min(out.getpixel((5, 15))) > 240  # white where it was transparent
        r, g, b = out.getpixel((35, 15))
        assert b > 200 and r < 60 and g < 60


def test_webp_and_palette_sources(tmp_path: Path) -> None:
    webp = write(tmp_path / "a.webp", make_image("WEBP", (300, 200)))
    assert normalise_image(webp, tmp_path / "w.jpg", 150, 90) == (150, 100)
    pal = Image.new("P", (20, 10))
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    assert normalise_image(write(tmp_path / "p.png", buf.getvalue()), tmp_path / "p.jpg", 64, 90) == (20, 10)
    with Image.open(tmp_path / "p.jpg") as out:
        assert out.mode == "RGB" and min(out.getpixel((3, 3))) > 240


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    src = tmp_path / "g16.png"
    Image.new("I;16", (40, 30), 30000).save(src)
    assert normalise_image(src, tmp_path / "o.jpg", 1024, 92) == (40, 30)
    with Image.open(tmp_path / "o.jpg") as out:
        assert out.mode == "RGB" and 110 < out.getpixel((5, 5))[0] < 125  # 30000/256 ≈ 117


def test_small_image_is_not_upscaled(tmp_path: Path) -> None:
    src = write(tmp_path / "s.jpg", make_image("JPEG", (64, 48)))
    assert normalise_image(src, tmp_path / "o.jpg", 1024, 92) == (64, 48)
    with Image.open(tmp_path / "o.jpg") as img:
        assert img.size == (64, 48)


def test_unreadable_image_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        normalise_image(write(tmp_path / "x.jpg", b"not an image"), tmp_path / "o.jpg", 1024, 92)
    assert not (tmp_path / "o.jpg").exists()


# --------------------------------------------------------------------------- prepare_dataset


class CapturingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))


class FlakyCaptioner(Captioner):
    """Fails in two different ways on chosen images, otherwise returns a caption without the trigger."""

    name = "flaky"
    config_type = PrepConfig

    def __init__(self, fail: dict[str, Exception]) -> None:
        super().__init__(None)
        self.fail = fail

    async def caption(self, image_path: Path, ctx: CaptionContext) -> str:
        if image_path.stem in self.fail:
            raise self.fail[image_path.stem]
        return f"a woman, image {image_path.stem}\nsecond line"


def inputs(tmp_path: Path, n: int) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    return [write(src / f"in{i:02d}.jpg", make_image("JPEG", (64, 48), seed=i)) for i in range(n)]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_prepare_dataset_writes_numbered_files_and_zip(tmp_path: Path) -> None:
    template = TemplateCaptioner()
    out = tmp_path / "out"
    ds = await prepare_dataset(inputs(tmp_path, 15), out, CTX, template, template, PrepConfig(), CapturingLog())
    names = [f"{i:03d}.{ext}" for i in range(1, 16) for ext in ("jpg", "txt")]
    assert ds.directory == out / "images" and ds.zip_path == out / "dataset.zip"
    assert ds.image_count == 15 and len(ds.captions) == 15
    assert sorted(p.name for p in ds.directory.iterdir()) == names
    with zipfile.ZipFile(ds.zip_path) as zf:
        assert sorted(zf.namelist()) == names
        for name in names:
            assert zf.read(name) == (ds.directory / name).read_bytes()
            if name.endswith(".txt"):
                assert has_word(zf.read(name).decode("utf-8"), "TOK3X")
            else:
                assert zf.getinfo(name).compress_type == zipfile.ZIP_STORED
    assert (ds.directory / "001.txt").read_text("utf-8") == "a photo of TOK3X, a 30 year old woman"
    assert ds.captions[0] == "a photo of TOK3X, a 30 year old woman"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.zip", "images"]


async def test_input_order_is_kept(tmp_path: Path) -> None:
    srcs = inputs(tmp_path, 3)
    srcs[1].write_bytes(make_image("JPEG", (30, 60), seed=1))  # a portrait one in the middle
    t = TemplateCaptioner()
    ds = await prepare_dataset(srcs, tmp_path / "out", CTX, t, t, PrepConfig(), CapturingLog())
    sizes = [Image.open(ds.directory / f"{i:03d}.jpg").size for i in (1, 2, 3)]
    assert sizes == [(64, 48), (30, 60), (64, 48)]


async def test_caption_failure_falls_back_and_logs(tmp_path: Path) -> None:
    log = CapturingLog()
    flaky = FlakyCaptioner({"002": CaptionError("captioner returned HTTP 500"), "004": RuntimeError("bug")})
    ds = await prepare_dataset(inputs(tmp_path, 5), tmp_path / "out", CTX, flaky, TemplateCaptioner(), PrepConfig(), log)
    fallback = "a photo of TOK3X, a 30 year old woman"
    assert ds.captions[1] == fallback and ds.captions[3] == fallback
    assert ds.captions[0] == "TOK3X, a woman, image 001 second line"  # one line, trigger ensured
    assert (ds.directory / "002.txt").read_text("utf-8") == fallback
    failed = sorted((e[2]["image"], e[2]["error"]) for e in log.events if e[:2] == ("warning", "caption_failed"))
    assert failed == [(2, "captioner returned HTTP 500"), (4, "bug")]
    assert all(e[2]["captioner"] == "flaky" for e in log.events)


async def test_prepare_dataset_is_idempotent(tmp_path: Path) -> None:
    t = TemplateCaptioner()
    out = tmp_path / "out"
    srcs = inputs(tmp_path, 4)
    first = await prepare_dataset(srcs, out, CTX, t, t, PrepConfig(), CapturingLog())
    files, zip_bytes = snapshot(first.directory), first.zip_path.read_bytes()
    (first.directory / "099.jpg").write_bytes(b"stale")
    second = await prepare_dataset(srcs, out, CTX, t, t, PrepConfig(), CapturingLog())
    assert second == first
    assert snapshot(second.directory) == files
    assert second.zip_path.read_bytes() == zip_bytes
    # fewer images into the same directory leaves no leftovers
    third = await prepare_dataset(srcs[:2], out, CTX, t, t, PrepConfig(), CapturingLog())
    assert sorted(p.name for p in third.directory.iterdir()) == ["001.jpg", "001.txt", "002.jpg", "002.txt"]
    with zipfile.ZipFile(third.zip_path) as zf:
        assert len(zf.namelist()) == 4


async def test_bad_input_image_raises_dataset_error(tmp_path: Path) -> None:
    srcs = inputs(tmp_path, 3)
    srcs[2].write_bytes(b"garbage")
    t = TemplateCaptioner()
    with pytest.raises(DatasetError, match="image 3"):
        await prepare_dataset(srcs, tmp_path / "out", CTX, t, t, PrepConfig(), CapturingLog())


async def test_no_images_is_an_error(tmp_path: Path) -> None:
    t = TemplateCaptioner()
    with pytest.raises(DatasetError):
        await prepare_dataset([], tmp_path / "out", CTX, t, t, PrepConfig(), CapturingLog())
