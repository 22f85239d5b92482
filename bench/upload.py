"""Benchmark: ``POST /v2/loras`` with 30 photos (~99 MiB) over loopback vs a bare streaming endpoint.

    python bench/upload.py [--repeats 5] [--warmup 1] [--images 30] [--image-mib 3.3] [--settle-timeout 300]

Generates ``--images`` JPEGs of about ``--image-mib`` MiB each ONCE (random noise saved at
quality 95, so they do not compress; the total is checked to stay within the gateway's
100 MiB limit), builds ONE multipart body on disk (fields name/subjectKind/gender/ethnicity
plus one ``images`` part per photo) and sends that same body, streamed from the file with
httpx and an explicit Content-Length, to three servers, each in its own process under uvicorn:

* ``engine off``: the gateway (``python -m gateway.cli serve``, fresh data dir,
  ``server.run_workers: false``): the engine does not run, so no dataset preparation happens
  after the 202, only the request path is measured and every LoRA stays PENDING. The goals
  were set on this figure;
* ``default``: the gateway with its default configuration (fresh data dir, the engine in the
  API process): after each 202 the engine prepares the dataset in the same process (decodes,
  resizes and re-encodes the 30 photos, captions, zips) and submits the training to the
  sandbox, where it stays in flight (an hour-long training; the team's cap is 1000). This is
  what a user gets;
* a baseline: a bare Litestar app defined in this file whose only POST endpoint streams the
  request body to a temp file (``async for chunk in request.stream()``) and answers 202.

Requests are sent one at a time, alternating between the servers (the order flips every
repeat) after ``--warmup`` unmeasured requests to each. After each request to ``default`` the
benchmark waits (at most ``--settle-timeout`` s) until that LoRA is TRAINING, so its
background preparation never overlaps another server's (or its own next) request; that wait
is reported as "prep s" and the CPU the gateway spent in it as "bg CPU s".

Prints the median time-to-response of each, the ratio gateway/baseline for each gateway (goal
<= 1.5), the server CPU time (user+sys) per upload (less sensitive to a busy machine than
wall time), and each gateway's peak RSS growth during the measured uploads over its RSS just
before them (goal <= 64 MiB), sampled every 5 ms with psutil: for ``default`` this includes
the dataset preparation. ``--strict`` checks the goals on the engine-off figures; the default
ones are shown against the same goals for reference.
"""

from __future__ import annotations

import argparse
import io
import json
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
    run_main,
    LORA_FIELDS, MiB, RssSampler, Server, ServerError, add_set_argument, free_port, median,
    merge, mib, parse_sets, start_gateway, table, temp_dir, verdict, wait_lora,
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


LABELS = {"off": "engine off", "default": "default", "baseline": "baseline"}


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
        (tmp / "engine-off").mkdir()
        (tmp / "default").mkdir()
        tuned = parse_sets(args.set)
        if tuned:
            print(f"TUNED run: both gateways with {', '.join(args.set)} (the 'default' rows are not the default config)")
        with baseline, start_gateway(tmp / "engine-off", name="engine-off",
                                     **merge(tuned, {"server": {"run_workers": False}})) as off, \
                start_gateway(tmp / "default", name="default", **tuned) as dflt:
            baseline.start()
            targets = {
                "off": (off, f"{off.base_url}/v2/loras", {"X-API-Key": off.key}),
                "default": (dflt, f"{dflt.base_url}/v2/loras", {"X-API-Key": dflt.key}),
                "baseline": (baseline, f"{baseline.base_url}/v2/loras", {"X-API-Key": off.key}),
            }
            times: dict[str, list[float]] = {name: [] for name in targets}
            cpu_req: dict[str, list[float]] = {name: [] for name in targets}  # to the response
            cpu_bg: list[float] = []  # default: after the 202 until the LoRA is TRAINING
            prep_s: list[float] = []
            failures: list[str] = []
            with httpx.Client(timeout=httpx.Timeout(300.0)) as client:

                def one(name: str, measured: bool) -> None:
                    server, url, headers = targets[name]
                    cpu0 = server.cpu_seconds()
                    elapsed, status, text = post_once(client, url, body, content_type, headers)
                    cpu1 = server.cpu_seconds()
                    if status != 202:
                        failures.append(f"{LABELS[name]}: HTTP {status}: {text[:300]}")
                        return
                    if name == "default":  # let its engine prepare the dataset before anything else runs
                        t = time.perf_counter()
                        wait_lora(dflt, json.loads(text)["id"], ["TRAINING", "READY"], timeout=args.settle_timeout)
                        if measured:
                            prep_s.append(time.perf_counter() - t)
                            cpu_bg.append(server.cpu_seconds() - cpu1)
                    if measured:
                        times[name].append(elapsed)
                        cpu_req[name].append(cpu1 - cpu0)

                for _ in range(args.warmup):
                    for name in targets:
                        one(name, False)
                if failures:
                    raise ServerError("warm-up failed:\n" + "\n".join(failures) + "\n" + off.tail() + "\n" + dflt.tail())

                rss = {name: RssSampler(server.pid) for name, (server, _, _) in targets.items()}
                with rss["off"], rss["default"], rss["baseline"]:
                    for i in range(args.repeats):
                        order = list(targets) if i % 2 == 0 else list(reversed(targets))
                        for name in order:
                            one(name, True)
            for name, server in (("engine off", off), ("default", dflt)):
                if not server.alive():
                    failures.append(f"the {name} gateway exited with code {server.proc.returncode}")
            logs = {"engine off": off.tail(20), "default": dflt.tail(20)}

        rows = []
        for name in targets:
            ts, sampler = times[name], rss[name]
            rows.append([
                LABELS[name], len(ts), f"{median(ts):.3f}" if ts else "-", f"{min(ts):.3f}" if ts else "-",
                f"{max(ts):.3f}" if ts else "-", f"{body_size / MiB / median(ts):.0f}" if ts else "-",
                f"{median(cpu_req[name]):.2f}" if cpu_req[name] else "-",
                f"{median(cpu_bg):.2f}" if name == "default" and cpu_bg else "-",
                f"{median(prep_s):.1f}" if name == "default" and prep_s else "-",
                mib(sampler.baseline), mib(sampler.peak), f"+{sampler.growth / MiB:.1f}",
            ])
        print()
        print(f"POST /v2/loras, {len(images)} images, {mib(total)} of images, {args.repeats} measured requests each "
              f"(+{args.warmup} warm-up), interleaved")
        print(table(rows, ["server", "n", "median s", "min s", "max s", "MiB/s", "CPU s/req", "bg CPU s", "prep s",
                           "RSS before", "RSS peak", "growth MiB"]))
        print()
        ok = True
        for name in ("off", "default"):
            note = "" if name == "off" else "  (for reference: the goals were set on engine off)"
            if times[name] and times["baseline"]:
                ratio = median(times[name]) / median(times["baseline"])
                print(f"time ratio {LABELS[name]}/baseline (medians): {ratio:.2f}x   (goal <= {RATIO_GOAL}) -> "
                      f"{verdict(ratio <= RATIO_GOAL)}{note}")
                if name == "off":
                    ok &= ratio <= RATIO_GOAL
            if cpu_req[name] and cpu_req["baseline"]:
                base = median(cpu_req["baseline"])
                line = f"  server CPU per upload, {LABELS[name]}/baseline: {median(cpu_req[name]) / base:.2f}x to the response"
                if name == "default" and cpu_bg:
                    line += (f", {(median(cpu_req[name]) + median(cpu_bg)) / base:.2f}x with the dataset preparation "
                             f"after it ({median(cpu_bg):.2f} s CPU over {median(prep_s):.1f} s)")
                print(line)
            growth = rss[name].growth / MiB
            print(f"  {LABELS[name]} peak RSS growth during the uploads: {growth:.1f} MiB over {mib(rss[name].baseline)} "
                  f"({rss[name].samples} samples)   (goal <= {RSS_GOAL_MIB} MiB) -> {verdict(growth <= RSS_GOAL_MIB)}{note}")
            if name == "off":
                ok &= growth <= RSS_GOAL_MIB
        print("engine off: no dataset preparation ran after the 202s; default: each upload was followed by its "
              "dataset preparation in the same process (counted in bg CPU s and in its RSS peak)")
        if failures:
            print("\nFAILURES:")
            for f in failures:
                print("  " + f)
            for name, tail in logs.items():
                print(f"{name} gateway log tail:\n{tail}")
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
    parser.add_argument("--settle-timeout", type=float, default=300,
                        help="longest wait for a default-config LoRA to be TRAINING after its 202 (default 300 s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when an engine-off goal is missed")
    add_set_argument(parser)
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--spool-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline, args.spool_dir or "/tmp")
        return 0
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
