"""Benchmark: dataset image normalisation with JPEG draft decoding vs a full decode.

    python bench/dataset_prep.py [--images 30] [--megapixels 12] [--repeats 3] [--max-side 1024]

Generates N photo-like JPEGs (4:3, quality 90; smooth gradients + blotchy texture + fine grain,
so they compress like photos rather than to nothing), then times ``normalise_image`` (draft) and
``plain_normalise_image`` over all of them, alternating the two each repeat, single process.
Prints the median seconds per pass and the ratio draft/plain (goal: <= 0.5).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.datasets import normalise_image, plain_normalise_image  # noqa: E402

GOAL = 0.5


def _base_image(size: tuple[int, int]) -> Image.Image:
    """One photo-like RGB image built from Pillow primitives (no numpy)."""
    w, h = size
    linear = Image.linear_gradient("L").resize(size, Image.Resampling.BILINEAR)
    radial = Image.radial_gradient("L").resize(size, Image.Resampling.BILINEAR)
    blotches = [
        Image.effect_noise((max(1, w // 24), max(1, h // 24)), 70).resize(size, Image.Resampling.BICUBIC)
        for _ in range(3)
    ]
    grain = Image.effect_noise(size, 10)
    channels = [
        ImageChops.blend(ImageChops.blend(linear, blotches[0], 0.5), grain, 0.15),
        ImageChops.blend(ImageChops.blend(radial, blotches[1], 0.5), grain, 0.15),
        ImageChops.blend(ImageChops.blend(linear.transpose(Image.Transpose.ROTATE_180), blotches[2], 0.6), grain, 0.15),
    ]
    return Image.merge("RGB", channels)


def generate(directory: Path, count: int, megapixels: float) -> list[Path]:
    """Write ``count`` distinct 4:3 JPEGs of about ``megapixels`` MP; variations are cheap shifts/swaps."""
    w = int(round(math.sqrt(megapixels * 1e6 * 4 / 3)))
    size = (w, w * 3 // 4)
    base = _base_image(size)
    bands = base.split()
    orders = [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2)]
    paths = []
    for i in range(count):
        order = orders[i % len(orders)]
        img = Image.merge("RGB", [bands[j] for j in order])
        img = ImageChops.offset(img, (i * 373) % size[0], (i * 211) % size[1])
        path = directory / f"photo{i:03d}.jpg"
        img.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def time_pass(fn: Callable[[Path, Path, int, int], tuple[int, int]], srcs: list[Path], out: Path, max_side: int) -> float:
    start = time.perf_counter()
    for src in srcs:
        fn(src, out / src.name, max_side, 92)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--megapixels", type=float, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dataset-prep-bench-") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        (root / "out").mkdir()
        t0 = time.perf_counter()
        srcs = generate(root / "src", args.images, args.megapixels)
        gen_s = time.perf_counter() - t0
        with Image.open(srcs[0]) as probe:
            w, h = probe.size
        mb = sum(p.stat().st_size for p in srcs) / len(srcs) / 1e6
        print(f"generated {len(srcs)} JPEGs {w}x{h} (~{mb:.1f} MB each) in {gen_s:.1f} s; max_side={args.max_side}")

        # one untimed warm-up of each, then alternate which variant goes first
        for fn in (normalise_image, plain_normalise_image):
            fn(srcs[0], root / "out" / "warmup.jpg", args.max_side, 92)
        times: dict[str, list[float]] = {"draft": [], "plain": []}
        variants = [("draft", normalise_image), ("plain", plain_normalise_image)]
        for r in range(args.repeats):
            for label, fn in variants if r % 2 == 0 else variants[::-1]:
                times[label].append(time_pass(fn, srcs, root / "out", args.max_side))

    draft, plain = statistics.median(times["draft"]), statistics.median(times["plain"])
    ratio = draft / plain
    n = len(srcs)
    print(f"{'variant':<8} {'median s':>9} {'per image ms':>13}  runs")
    for label, med in (("draft", draft), ("plain", plain)):
        runs = " ".join(f"{t:.3f}" for t in times[label])
        print(f"{label:<8} {med:>9.3f} {med / n * 1000:>13.1f}  {runs}")
    verdict = "OK" if ratio <= GOAL else "ABOVE GOAL"
    print(f"ratio draft/plain = {ratio:.3f}  (goal <= {GOAL}: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
