"""Benchmark: ``POST /v2/loras`` with 30 photos (~99 MiB) over loopback vs a bare streaming endpoint.

    python bench/upload.py [--repeats 5] [--warmup 1] [--images 30] [--image-mib 3.3]

Generates ``--images`` JPEGs of about ``--image-mib`` MiB each ONCE (random noise saved at
quality 95, so they do not compress; the total is checked to stay within the gateway's
100 MiB limit), builds ONE multipart body on disk (fields name/subjectKind/gender/ethnicity
plus one ``images`` part per photo) and sends that same body, streamed from the file with
httpx and an explicit Content-Length, to two servers, each in its own process under uvicorn:

* the gateway (``python -m gateway.cli serve``, fresh data dir, ``server.run_workers: false``),
* a baseline: a bare Litestar app defined in this file whose only POST endpoint streams the
  request body to a temp file (``async for chunk in request.stream()``) and answers 202.

Requests alternate gateway/baseline (the order flips every repeat) after ``--warmup``
unmeasured requests to each. Prints the median time-to-response of each, the ratio
gateway/baseline (goal <= 1.5), the server CPU time (user+sys) per upload of each (less
sensitive to a busy machine than wall time) and the gateway's peak RSS growth during the measured
uploads over its RSS just before them (goal <= 64 MiB), sampled every 5 ms with psutil.

With ``run_workers: false`` the gateway's engine does not run, so no dataset preparation
(image decoding/resizing) happens in the background after each 202: only the request path
is measured. Each measured request creates one PENDING LoRA (the team's concurrency cap is
raised to 1000 for that).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from litestar import Litestar, Request, Response, get, post

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    LORA_FIELDS, MiB, RssSampler, Server, ServerError, free_port, handle_sigterm, median, mib,
    start_gateway, table, temp_dir, verdict,
)

RATIO_GOAL = 1.5
RSS_GOAL_MIB = 64
CHUNK = 256 * 1024


# --------------------------------------------------------------------------- the baseline server


def serve_baseline(port: int, spool_dir: str) -> None:
    """Run the bare Litestar app under uvicorn with the gateway's uvicorn settings."""
    import uvicorn

    @post("/v2/loras", status_code=202, request_max_body_size=None)
    async def upload(request: Request) -> Response:
        fd, name = tempfile.mkstemp(dir=spool_dir)
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
                    size += len(chunk)
        finally:
            os.unlink(name)
        return Response({"status": "ok", "bytes": size}, status_code=202)

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app = Litestar(route_handlers=[upload, healthz], debug=False)
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="on", access_log=False, log_level="warning")


# --------------------------------------------------------------------------- the request body


def make_images(directory: Path, count: int, target_bytes: int) -> list[Path]:
    """``count`` distinct incompressible JPEGs of about ``target_bytes`` each."""
    from PIL import Image

    def encode(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.frombytes("RGB", (w, h), os.urandom(w * h * 3)).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    # calibrate bytes per pixel on one 4:3 trial image, then size the real ones from it
    trial_w = 1200
    per_px = len(encode(trial_w, trial_w * 3 // 4)) / (trial_w * (trial_w * 3 // 4))
    w = int((target_bytes / per_px * 4 / 3) ** 0.5)
    h = w * 3 // 4
    paths = []
    for i in range(count):
        path = directory / f"photo{i:02d}.jpg"
        path.write_bytes(encode(w, h))
        paths.append(path)
    return paths


def build_body(path: Path, images: list[Path]) -> str:
    """Write the multipart body to ``path``; returns the Content-Type (with the boundary)."""
    boundary = "----bench" + secrets.token_hex(16)
    with path.open("wb") as out:
        for name, value in LORA_FIELDS.items():
            out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for img in images:
            out.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{img.name}"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n".encode()
            )
            out.write(img.read_bytes())
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}"


def stream_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


# --------------------------------------------------------------------------- the benchmark


def post_once(client, url: str, body: Path, content_type: str, headers: dict[str, str]) -> tuple[float, int, str]:
    """One upload; returns (seconds to the full response, status, response text)."""
    h = {**headers, "Content-Type": content_type, "Content-Length": str(body.stat().st_size)}
    start = time.perf_counter()
    r = client.post(url, content=stream_file(body), headers=h)
    elapsed = time.perf_counter() - start
    return elapsed, r.status_code, r.text


def run(args: argparse.Namespace) -> int:
    import httpx

    with temp_dir("bench-upload-") as tmp:
        t0 = time.perf_counter()
        img_dir = tmp / "images"
        img_dir.mkdir()
        images = make_images(img_dir, args.images, int(args.image_mib * MiB))
        sizes = [p.stat().st_size for p in images]
        total = sum(sizes)
        body = tmp / "body.multipart"
        content_type = build_body(body, images)
        body_size = body.stat().st_size
        print(f"generated {len(images)} JPEGs in {time.perf_counter() - t0:.1f}s: {mib(min(sizes))} .. {mib(max(sizes))} "
              f"each, {mib(total)} in all (limits: 10 MiB each, 100 MiB total); body {mib(body_size)}", flush=True)
        if max(sizes) > 10 * MiB or total > 100 * MiB:
            print("the generated images break the gateway's upload limits; lower --image-mib", file=sys.stderr)
            return 2
        for p in images:  # only the body file is needed from here on
            p.unlink()

        spool = tmp / "baseline-spool"
        spool.mkdir()
        port = free_port()
        baseline = Server("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(port),
                                       "--spool-dir", str(spool)], port)
        gw_tmp = tmp / "gateway"
        gw_tmp.mkdir()
        with baseline, start_gateway(gw_tmp, server={"run_workers": False}) as gw:
            baseline.start()
            targets = {
                "gateway": (gw, f"{gw.base_url}/v2/loras", {"X-API-Key": gw.key}),
                "baseline": (baseline, f"{baseline.base_url}/v2/loras", {"X-API-Key": gw.key}),
            }
            times: dict[str, list[float]] = {name: [] for name in targets}
            failures: list[str] = []
            with httpx.Client(timeout=httpx.Timeout(300.0)) as client:

                def one(name: str) -> float | None:
                    server, url, headers = targets[name]
                    elapsed, status, text = post_once(client, url, body, content_type, headers)
                    if status != 202:
                        failures.append(f"{name}: HTTP {status}: {text[:300]}")
                        return None
                    return elapsed

                for _ in range(args.warmup):
                    for name in targets:
                        one(name)
                if failures:
                    raise ServerError("warm-up failed:\n" + "\n".join(failures) + "\n" + gw.tail())

                gw_rss = RssSampler(gw.pid)
                base_rss = RssSampler(baseline.pid)
                cpu0 = {name: server.cpu_seconds() for name, (server, _, _) in targets.items()}
                with gw_rss, base_rss:
                    for i in range(args.repeats):
                        order = ["gateway", "baseline"] if i % 2 == 0 else ["baseline", "gateway"]
                        for name in order:
                            elapsed = one(name)
                            if elapsed is not None:
                                times[name].append(elapsed)
            cpu = {name: server.cpu_seconds() - cpu0[name] for name, (server, _, _) in targets.items() if server.alive()}
            if not gw.alive():
                failures.append(f"the gateway exited with code {gw.proc.returncode}")
            gw_log = gw.tail(20)

        rows = []
        for name, sampler in (("gateway", gw_rss), ("baseline", base_rss)):
            ts = times[name]
            rows.append([
                name, len(ts), f"{median(ts):.3f}" if ts else "-", f"{min(ts):.3f}" if ts else "-",
                f"{max(ts):.3f}" if ts else "-", f"{body_size / MiB / median(ts):.0f}" if ts else "-",
                f"{cpu[name] / args.repeats:.2f}" if name in cpu and args.repeats else "-",
                mib(sampler.baseline), mib(sampler.peak), f"+{sampler.growth / MiB:.1f}",
            ])
        print()
        print(f"POST /v2/loras, {len(images)} images, {mib(total)} of images, {args.repeats} measured requests each "
              f"(+{args.warmup} warm-up), interleaved")
        print(table(rows, ["server", "n", "median s", "min s", "max s", "MiB/s", "CPU s/req", "RSS before", "RSS peak", "growth MiB"]))
        print()
        ok = True
        if times["gateway"] and times["baseline"]:
            ratio = median(times["gateway"]) / median(times["baseline"])
            print(f"time ratio gateway/baseline (medians): {ratio:.2f}x   (goal <= {RATIO_GOAL}) -> {verdict(ratio <= RATIO_GOAL)}")
            ok &= ratio <= RATIO_GOAL
        if cpu.get("gateway") and cpu.get("baseline"):
            print(f"server CPU per upload (user+sys), gateway/baseline: {cpu['gateway'] / cpu['baseline']:.2f}x")
        growth = gw_rss.growth / MiB
        print(f"gateway peak RSS growth during the uploads: {growth:.1f} MiB over {mib(gw_rss.baseline)} "
              f"({gw_rss.samples} samples)   (goal <= {RSS_GOAL_MIB} MiB) -> {verdict(growth <= RSS_GOAL_MIB)}")
        ok &= growth <= RSS_GOAL_MIB
        print("note: server.run_workers is false, so the engine prepared no datasets in the background after each 202;"
              " with workers on, every upload is followed by decoding/resizing its images in the same process.")
        if failures:
            print("\nFAILURES:")
            for f in failures:
                print("  " + f)
            print("gateway log tail:\n" + gw_log)
            return 1
        return 0 if ok or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--repeats", type=int, default=5, help="measured requests per server (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per server first (default 1)")
    parser.add_argument("--images", type=int, default=30, help="photos per upload (default 30)")
    parser.add_argument("--image-mib", type=float, default=3.3, help="target size of each photo in MiB (default 3.3)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--spool-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline, args.spool_dir or "/tmp")
        return 0
    handle_sigterm()
    try:
        return run(args)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; servers stopped, temp files removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
