"""Benchmark: ``GET /v2/loras/{id}`` throughput under 64 concurrent loopback clients vs a bare Litestar endpoint.

    python bench/get_lora.py [--rounds 3] [--duration 10] [--connections 64] [--loadgen auto|wrk|httpx]
                             [--profile gateway.svg]

Starts the gateway (``python -m gateway.cli serve``, fresh data dir, ``server.run_workers:
false`` so no engine work runs during the load), creates one LoRA from 15 small JPEGs (as
the tests do) and fetches it once. A baseline is then started in its own process under
uvicorn with the gateway's uvicorn settings: a bare Litestar app defined in this file whose
``GET /v2/loras/{lora_id}`` returns that same JSON document (no auth, no database).

Each target is loaded ``--rounds`` times, interleaved (the order flips every round), after a
short warm-up; prints the median requests/s of each, the ratio gateway/baseline (goal >= 0.6),
median p50/p99 latencies and the server CPU time per request (user+sys of the server process
over the run / requests; less sensitive to a noisy machine than req/s).

Load generator: ``wrk`` when installed (``apt-get install -y wrk`` on Debian/Ubuntu), run as
``wrk -t 1 -c 64 -d 10s --latency --timeout 10s -H "X-API-Key: ..." URL``; it is cheap, which
matters because the servers and the load generator share the machine's cores. Without it
(or with ``--loadgen httpx``) an asyncio + httpx load generator runs in a separate process
with 64 concurrent workers for the same duration; it costs far more CPU per request, so its
absolute figures are lower and the ratio is compressed toward 1.

``--profile FILE`` (needs ``py-spy``: ``pip install py-spy``) records the gateway with py-spy
during one extra load run after the measured ones: ``.svg`` = flame graph, ``.txt`` =
collapsed stacks, ``.json`` = speedscope.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litestar import Litestar, Response, get  # noqa: E402

from bench._common import (  # noqa: E402
    Server, ServerError, create_small_lora, free_port, handle_sigterm, median, percentile, start_gateway,
    table, temp_dir, verdict,
)

RATIO_GOAL = 0.6


# --------------------------------------------------------------------------- the baseline server


def serve_baseline(port: int, payload_file: str) -> None:
    import uvicorn

    payload: dict[str, Any] = json.loads(Path(payload_file).read_text(encoding="utf-8"))

    @get("/v2/loras/{lora_id:str}")
    async def get_lora(lora_id: str) -> Response:
        return Response(payload)

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app = Litestar(route_handlers=[get_lora, healthz], debug=False)
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="on", access_log=False, log_level="warning")


# --------------------------------------------------------------------------- load generators

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def run_wrk(url: str, key: str, connections: int, duration: float) -> dict[str, Any]:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "--latency", "--timeout", "10s",
           "-H", f"X-API-Key: {key}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, start_new_session=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise ServerError(f"wrk failed ({out.returncode}):\n{text}")
    res: dict[str, Any] = {"raw": text}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    res["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    res["requests"] = int(m.group(1)) if m else 0
    for p in ("50", "99"):
        m = re.search(rf"^\s*{p}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        res[f"p{p}"] = _ms(m.group(1), m.group(2)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    res["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return res


async def _httpx_load(url: str, key: str, connections: int, duration: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    # one client (one keep-alive connection) per worker: a single pooled AsyncClient shared by
    # 64 tasks spends most of its time in the pool's bookkeeping and collapses to a few dozen req/s
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(limits=limits, timeout=10.0, headers={"X-API-Key": key}) for _ in range(connections)]
    start = time.perf_counter()
    deadline = start + duration

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        async with client:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    r = await client.get(url)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - start
    n = len(latencies)
    return {
        "rps": n / elapsed, "requests": n, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
        "non2xx": sum(c for s, c in statuses.items() if not 200 <= s < 400), "socket_errors": errors,
        "statuses": statuses,
    }


def run_httpx(url: str, key: str, connections: int, duration: float) -> dict[str, Any]:
    """The fallback: ``_httpx_load`` in a child process (so it does not share our GIL)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_loadgen", url, "--_key", key,
           "--connections", str(connections), "--duration", str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, start_new_session=True)
    if out.returncode != 0:
        raise ServerError(f"httpx load generator failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark


def load(server: Server, url: str, key: str, args: argparse.Namespace, duration: float) -> dict[str, Any]:
    runner = run_wrk if args.loadgen == "wrk" else run_httpx
    cpu0 = server.cpu_seconds()
    res = runner(url, key, args.connections, duration)
    res["cpu_s"] = server.cpu_seconds() - cpu0
    res["cpu_us_per_req"] = res["cpu_s"] / res["requests"] * 1e6 if res["requests"] else float("nan")
    return res


def profile(gw: Server, url: str, key: str, args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print(f"--profile: py-spy not found (pip install py-spy); skipped", file=sys.stderr)
        return
    out = Path(args.profile).resolve()
    fmt = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}.get(out.suffix, "flamegraph")
    cmd = [spy, "record", "-p", str(gw.pid), "-o", str(out), "-f", fmt, "-r", "200",
           "-d", str(int(args.duration) + 1), "--nonblocking"]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(1.0)
        res = load(gw, url, key, args, args.duration)
        spy_proc.wait(args.duration + 30)
    finally:
        if spy_proc.poll() is None:
            spy_proc.terminate()
            spy_proc.wait(10)
    print(f"profile of the gateway during one more {args.duration:g}s run ({res['rps']:.0f} req/s under py-spy): {out}")


def run(args: argparse.Namespace) -> int:
    import httpx

    if args.loadgen == "auto":
        args.loadgen = "wrk" if shutil.which("wrk") else "httpx"
    elif args.loadgen == "wrk" and not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk); using the httpx load generator", file=sys.stderr)
        args.loadgen = "httpx"

    with temp_dir("bench-get-") as tmp:
        gw_tmp = tmp / "gateway"
        gw_tmp.mkdir()
        port = free_port()
        payload_file = tmp / "payload.json"
        baseline = Server("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(port),
                                       "--payload", str(payload_file)], port)
        with baseline, start_gateway(gw_tmp, server={"run_workers": False}) as gw:
            lora = create_small_lora(gw, 15)
            gw_url = f"{gw.base_url}/v2/loras/{lora['id']}"
            r = httpx.get(gw_url, headers={"X-API-Key": gw.key}, timeout=30)
            if r.status_code != 200:
                raise ServerError(f"GET {gw_url} answered {r.status_code}: {r.text[:500]}\n{gw.tail()}")
            payload_file.write_bytes(r.content)
            baseline.start()
            base_url = f"{baseline.base_url}/v2/loras/{lora['id']}"
            rb = httpx.get(base_url, timeout=30)
            if rb.status_code != 200 or rb.json() != r.json():
                raise ServerError(f"baseline GET answered {rb.status_code}: {rb.text[:300]}\n{baseline.tail()}")
            print(f"load generator: {args.loadgen}, {args.connections} connections, {args.duration:g}s per run, "
                  f"{args.rounds} rounds interleaved; response body {len(r.content)} bytes (same JSON from both); "
                  f"lora status {r.json().get('status')} (server.run_workers=false)", flush=True)

            targets = {"gateway": (gw, gw_url), "baseline": (baseline, base_url)}
            if args.warmup > 0:
                for name, (server, url) in targets.items():
                    load(server, url, gw.key, args, args.warmup)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for i in range(args.rounds):
                order = list(targets) if i % 2 == 0 else list(reversed(targets))
                for name in order:
                    server, url = targets[name]
                    res = load(server, url, gw.key, args, args.duration)
                    results[name].append(res)
                    print(f"  round {i + 1} {name:8s} {res['rps']:8.0f} req/s  p50 {res['p50']:7.1f} ms  "
                          f"p99 {res['p99']:7.1f} ms  cpu {res['cpu_us_per_req']:6.0f} us/req  "
                          f"non-2xx {res['non2xx']}  socket errors {res['socket_errors']}", flush=True)
            if args.profile:
                profile(gw, gw_url, gw.key, args)
            alive = gw.alive()
            gw_log = gw.tail(20)

        rows = []
        for name, runs in results.items():
            rows.append([
                name, len(runs), f"{median([x['rps'] for x in runs]):.0f}",
                f"{min(x['rps'] for x in runs):.0f}-{max(x['rps'] for x in runs):.0f}",
                f"{median([x['p50'] for x in runs]):.1f}", f"{median([x['p99'] for x in runs]):.1f}",
                f"{median([x['cpu_us_per_req'] for x in runs]):.0f}",
                sum(x["non2xx"] for x in runs), sum(x["socket_errors"] for x in runs),
            ])
        print()
        print(f"GET /v2/loras/{{id}}, {args.connections} concurrent connections, load generator {args.loadgen}")
        print(table(rows, ["server", "runs", "median req/s", "range", "p50 ms", "p99 ms", "CPU us/req",
                           "non-2xx", "sock err"]))
        print()
        g = median([x["rps"] for x in results["gateway"]])
        b = median([x["rps"] for x in results["baseline"]])
        ratio = g / b if b else float("nan")
        cpu_ratio = (median([x["cpu_us_per_req"] for x in results["gateway"]])
                     / median([x["cpu_us_per_req"] for x in results["baseline"]]))
        print(f"throughput ratio gateway/baseline (medians): {ratio:.2f}   (goal >= {RATIO_GOAL}) -> {verdict(ratio >= RATIO_GOAL)}")
        print(f"server CPU per request, gateway/baseline: {cpu_ratio:.2f}x")
        problems = [f"{name}: {x['non2xx']} non-2xx responses, {x['socket_errors']} socket errors"
                    for name, runs in results.items() for x in runs if x["non2xx"] or x["socket_errors"]]
        if not alive:
            problems.append("the gateway exited during the benchmark")
        if problems:
            print("\nPROBLEMS:\n  " + "\n  ".join(problems) + "\ngateway log tail:\n" + gw_log)
            return 1
        return 0 if ratio >= RATIO_GOAL or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per server, interleaved (default 3)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load per server first (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto",
                        help="load generator (default auto: wrk when installed, else httpx)")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the gateway during one extra run (.svg/.txt/.json)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the goal is missed")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    parser.add_argument("--_loadgen", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--_key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline, args.payload)
        return 0
    if args._loadgen:
        res = asyncio.run(_httpx_load(args._loadgen, args._key or "", args.connections, args.duration))
        print(json.dumps(res))
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
