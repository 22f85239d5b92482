"""Benchmark: ``POST /v2/images/generate`` throughput and latency: a bare endpoint, the gateway with the engine off, the gateway as configured by default.

    python bench/generate.py [--concurrency 1,16] [--rounds 2] [--duration 10] [--warmup 2] [--drain 5]
                             [--loadgen auto|wrk|httpx] [--strict]

Three servers, each in its own process on 127.0.0.1, loaded one at a time with the same JSON body
(prompt, model ``flux-lora``, ``fluxLoraParams`` {loraId, num_outputs 1, aspect_ratio 1:1,
output_format png}) and the same ``X-API-Key`` header:

* ``bare``: a Litestar app defined in this file, under uvicorn with the gateway's uvicorn
  settings, whose ``POST /v2/images/generate`` decodes the body with msgspec into an equivalent
  Struct (same fields and constraints) and answers 202 ``{"jobId": <uuid4>, "status": "QUEUED"}``
  (no auth, no database);
* ``engine off``: the gateway (``python -m gateway.cli serve``) with ``server.run_workers: false``:
  only the request path (auth, validation, the LoRA lookup, the credit charge and the job insert
  in one transaction); jobs stay QUEUED;
* ``default``: the gateway with its default configuration: the engine runs in the API process
  and the sandbox provider draws every image (1024x1024 png) right away, which the engine then
  checks, re-encodes and stores, while the requests keep coming. This is what a user gets.

A generate needs a READY LoRA of the caller's team: a first gateway (workers on, sandbox
training of 1 s) creates one from 15 small JPEGs through the API and waits for READY, then
stops; its data dir (database, blobs, sandbox state) is copied for ``engine off`` and, fresh
for every measured window, for ``default``, so each default window starts with an empty queue
and its engine's leftover work never runs while another server is measured. The config has no
rate limit and 10^9 bootstrap credits (2 per image), so no request is refused.

For each ``--concurrency`` level (default 1 and 16 clients, keep-alive), after a ``--warmup``
of each server, ``--rounds`` windows of ``--duration`` seconds per server, interleaved (the
order flips every round). Prints median req/s, p50/p99 latency and the server CPU time
(user+sys) per request; the ratios engine-off/bare (goal >= 0.4) and default/engine-off
(goal >= 0.5) of the median req/s; and for ``default`` the engine's backlog: jobs QUEUED or
PROCESSING (not yet COMPLETED or FAILED), counted in its database at the start and at the end
of the window and again ``--drain`` seconds after the load stopped -- is it growing, does it
drain -- with the jobs completed per second during the window and during the drain.

Load generator: ``wrk`` when installed (``apt-get install -y wrk``), with a Lua script for the
method, body and Content-Type; else (or ``--loadgen httpx``) an asyncio + httpx generator in a
separate process, far more expensive per request, which compresses the ratios toward 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _loadgen  # noqa: E402
from bench._common import (  # noqa: E402
    run_main,
    Server, ServerError, copy_data_dir, count_by_status, create_small_lora, database_path,
    add_set_argument, free_port, median, merge, parse_sets, start_gateway, table, temp_dir,
    verdict, wait_lora,
)

OFF_GOAL = 0.4  # engine off / bare
DEFAULT_GOAL = 0.5  # default / engine off
PROMPT = "a portrait in a sunlit garden, soft light, 85mm"
#: every gateway of this benchmark: no rate limit, credits for any number of requests
COMMON: dict[str, Any] = {"teams": {"rate_limit_per_minute": 0, "bootstrap_credits": 10**9}}
#: the gateway that trains the LoRA: a 1 s sandbox training
SEED: dict[str, Any] = {"providers": {"sandbox": {"training_seconds": 1, "queue_seconds": 0}}}
NAMES = {"bare": "bare", "off": "engine off", "default": "default"}


# --------------------------------------------------------------------------- the baseline server


def serve_baseline(port: int) -> None:
    import uvicorn

    # the gateway's own request Struct: the same decode and checks, without anything else
    from gateway.services.jobs import GenerateImageRequest

    @post("/v2/images/generate", status_code=202, request_max_body_size=64 * 1024)
    async def generate(request: Request) -> Response:
        try:
            msgspec.json.decode(await request.body(), type=GenerateImageRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return Response({"error": str(e)}, status_code=400)
        return Response({"jobId": str(uuid.uuid4()), "status": "QUEUED"}, status_code=202)

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app = Litestar(route_handlers=[generate, healthz], debug=False)
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="on", access_log=False, log_level="warning")


# --------------------------------------------------------------------------- the benchmark


class Load:
    """How to send the benchmark's request with the chosen load generator."""

    def __init__(self, loadgen: str, tmp: Path, body: bytes, key: str) -> None:
        self.loadgen, self.key = loadgen, key
        self.headers = {"Content-Type": "application/json"}
        self.body_file = tmp / "body.json"
        self.body_file.write_bytes(body)
        self.script = _loadgen.write_wrk_script(tmp / "generate.lua", method="POST", body=body, headers=self.headers)

    def __call__(self, server: Server, clients: int, duration: float) -> dict[str, Any]:
        url = f"{server.base_url}/v2/images/generate"
        cpu0 = server.cpu_seconds()
        if self.loadgen == "wrk":
            res = _loadgen.run_wrk(url, self.key, clients, duration, script=self.script)
        else:
            res = _loadgen.run_httpx(url, self.key, clients, duration, method="POST", body_file=self.body_file,
                                     headers=self.headers)
        res["cpu_s"] = server.cpu_seconds() - cpu0
        res["cpu_us_per_req"] = res["cpu_s"] / res["requests"] * 1e6 if res["requests"] else float("nan")
        return res


def check_post(server: Server, key: str, body: bytes) -> None:
    import httpx

    r = httpx.post(f"{server.base_url}/v2/images/generate", content=body, timeout=30,
                   headers={"X-API-Key": key, "Content-Type": "application/json"})
    if r.status_code != 202 or r.json().get("status") != "QUEUED" or "jobId" not in r.json():
        raise ServerError(f"{server.name}: POST /v2/images/generate answered {r.status_code}: {r.text[:300]}\n{server.tail()}")


def backlog(counts: dict[str, int]) -> int:
    return counts.get("QUEUED", 0) + counts.get("PROCESSING", 0)


def measure_default(tmp: Path, seed_tmp: Path, key: str, body: bytes, load: Load, clients: int, run_no: int,
                    args: argparse.Namespace) -> dict[str, Any]:
    """One window on a fresh default-config gateway (copied seed data), then ``--drain`` s idle."""
    gw_tmp = tmp / f"default-{clients}-{run_no}"
    copy_data_dir(seed_tmp, gw_tmp)
    try:
        with start_gateway(gw_tmp, key=key, name="default", **merge(COMMON, args.overrides)) as gw:
            db = database_path(gw)
            check_post(gw, key, body)
            if args.warmup > 0:
                load(gw, clients, args.warmup)
            c0 = count_by_status(db, "jobs")
            res = load(gw, clients, args.duration)
            c1 = count_by_status(db, "jobs")
            cpu1, t1 = gw.cpu_seconds(), time.perf_counter()
            time.sleep(args.drain)
            c2 = count_by_status(db, "jobs")
            drain_s, drain_cpu = time.perf_counter() - t1, gw.cpu_seconds() - cpu1
            alive, log_tail = gw.alive(), gw.tail(20)
            t_stop = time.perf_counter()
        stop_s = time.perf_counter() - t_stop
    finally:
        shutil.rmtree(gw_tmp, ignore_errors=True)
    done = lambda c: c.get("COMPLETED", 0)  # noqa: E731
    res.update(
        backlog=(backlog(c0), backlog(c1), backlog(c2)), failed=c2.get("FAILED", 0),
        done_window=done(c1) - done(c0), done_drain=done(c2) - done(c1), drain_s=drain_s,
        drain_cpu_s=drain_cpu, alive=alive, stop_rc=gw.proc.returncode if gw.proc else None, stop_s=stop_s,
        log_tail=log_tail,
    )
    return res


def run(args: argparse.Namespace) -> int:
    args.loadgen = _loadgen.choose(args.loadgen)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    with temp_dir("bench-generate-") as tmp:
        t0 = time.perf_counter()
        seed_tmp = tmp / "seed"
        seed_tmp.mkdir()
        with start_gateway(seed_tmp, name="seed", **{**COMMON, **SEED}) as seed:
            lora = create_small_lora(seed, 15)
            lora = wait_lora(seed, lora["id"], ["READY"], timeout=120)
            key = seed.key
        print(f"LoRA {lora['id']} READY in {time.perf_counter() - t0:.1f}s on a seed gateway (workers on, "
              f"1 s sandbox training); its data dir is copied for 'engine off' and for every 'default' window",
              flush=True)

        body = json.dumps({"prompt": PROMPT, "model": "flux-lora", "fluxLoraParams": {
            "loraId": lora["id"], "num_outputs": 1, "aspect_ratio": "1:1", "output_format": "png"}}).encode()
        load = Load(args.loadgen, tmp, body, key)
        off_tmp = tmp / "engine-off"
        copy_data_dir(seed_tmp, off_tmp)
        port = free_port()
        bare = Server("bare", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(port)], port)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        with bare, start_gateway(off_tmp, key=key, name="engine-off",
                                 **merge(merge(COMMON, args.overrides), {"server": {"run_workers": False}})) as off:
            bare.start()
            check_post(bare, key, body)
            check_post(off, key, body)
            print(f"load generator: {args.loadgen}; clients {','.join(map(str, levels))}; {args.duration:g}s windows, "
                  f"{args.rounds} rounds interleaved, {args.warmup:g}s warm-up; body {len(body)} bytes "
                  f"(1 image, 1:1 = 1024x1024, png)", flush=True)
            for clients in levels:
                for server in (bare, off):
                    if args.warmup > 0:
                        load(server, clients, args.warmup)
                for i in range(args.rounds):
                    order = ["bare", "off", "default"] if i % 2 == 0 else ["default", "off", "bare"]
                    for name in order:
                        if name == "default":
                            res = measure_default(tmp, seed_tmp, key, body, load, clients, i + 1, args)
                        else:
                            res = load(bare if name == "bare" else off, clients, args.duration)
                        results.setdefault((name, clients), []).append(res)
                        line = (f"  {clients:3d} clients  round {i + 1}  {NAMES[name]:10s} {res['rps']:8.1f} req/s  "
                                f"p50 {res['p50']:7.1f} ms  p99 {res['p99']:7.1f} ms  cpu {res['cpu_us_per_req']:7.0f} us/req  "
                                f"non-2xx {res['non2xx']}  sock err {res['socket_errors']}")
                        if name == "default":
                            b0, b1, b2 = res["backlog"]
                            line += f"  backlog {b0} -> {b1} -> {b2} (+{args.drain:g}s)"
                        print(line, flush=True)
            off_alive, off_log = off.alive(), off.tail(20)
            bare_alive = bare.alive()

    return report(args, levels, results, off_alive, off_log, bare_alive)


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in runs])


def report(args: argparse.Namespace, levels: list[int], results: dict[tuple[str, int], list[dict[str, Any]]],
           off_alive: bool, off_log: str, bare_alive: bool) -> int:
    rows = []
    for clients in levels:
        for name in ("bare", "off", "default"):
            runs = results[(name, clients)]
            rows.append([
                NAMES[name], clients, len(runs), f"{_med(runs, 'rps'):.1f}",
                f"{min(r['rps'] for r in runs):.0f}-{max(r['rps'] for r in runs):.0f}",
                f"{_med(runs, 'p50'):.1f}", f"{_med(runs, 'p99'):.1f}", f"{_med(runs, 'cpu_us_per_req'):.0f}",
                sum(r["non2xx"] for r in runs), sum(r["socket_errors"] for r in runs),
            ])
    print()
    print(f"POST /v2/images/generate, {args.duration:g}s windows, load generator {args.loadgen}")
    print(table(rows, ["server", "clients", "runs", "median req/s", "range", "p50 ms", "p99 ms", "CPU us/req",
                       "non-2xx", "sock err"]))

    ok = True
    rows = []
    for clients in levels:
        b, o, d = (_med(results[(n, clients)], "rps") for n in ("bare", "off", "default"))
        r_off = o / b if b else float("nan")
        r_def = d / o if o else float("nan")
        ok &= r_off >= OFF_GOAL and r_def >= DEFAULT_GOAL
        cpu = {n: _med(results[(n, clients)], "cpu_us_per_req") for n in ("bare", "off", "default")}
        rows.append([clients, f"{r_off:.2f}", f">= {OFF_GOAL}", verdict(r_off >= OFF_GOAL),
                     f"{r_def:.2f}", f">= {DEFAULT_GOAL}", verdict(r_def >= DEFAULT_GOAL),
                     f"{cpu['off'] / cpu['bare']:.1f}x", f"{cpu['default'] / cpu['off']:.1f}x"])
    print()
    print("ratios of the median req/s (and of the server CPU per request)")
    print(table(rows, ["clients", "off/bare", "goal", "verdict", "default/off", "goal", "verdict",
                       "CPU off/bare", "CPU default/off"]))

    rows = []
    for clients in levels:
        for i, r in enumerate(results[("default", clients)], 1):
            b0, b1, b2 = r["backlog"]
            rows.append([clients, i, r["requests"] - r["non2xx"], b0, b1, f"{(b1 - b0) / args.duration:+.1f}", b2,
                         f"{r['done_window'] / args.duration:.1f}", f"{r['done_drain'] / r['drain_s']:.1f}",
                         f"{r['drain_cpu_s'] / r['drain_s'] * 100:.0f}%", r["failed"]])
    print()
    print(f"default config: the engine's backlog (jobs QUEUED or PROCESSING) in each window, and {args.drain:g}s "
          f"after the load stopped")
    print(table(rows, ["clients", "round", "accepted", "at start", "at end", "growth/s", f"+{args.drain:g}s",
                       "done/s (load)", "done/s (drain)", "CPU (drain)", "failed"]))
    growing = [c for c in levels if any(r["backlog"][1] > r["backlog"][0] for r in results[("default", c)])]
    if growing:
        worst = max(r["requests"] / args.duration / max(r["done_window"] / args.duration, 1e-9)
                    for c in growing for r in results[("default", c)])
        print(f"the backlog grows while the load lasts at {', '.join(map(str, growing))} client(s): the API accepts "
              f"jobs faster than the in-process engine finishes them (up to {worst:.0f}x in a window)")

    problems = [f"{NAMES[n]} ({c} clients): {r['non2xx']} non-2xx responses, {r['socket_errors']} socket errors"
                for (n, c), runs in results.items() for r in runs if r["non2xx"] or r["socket_errors"]]
    for (n, c), runs in results.items():
        for r in runs:
            # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean stop
            if n == "default" and (not r["alive"] or r["stop_rc"] not in (0, -15, None)):
                problems.append(f"default ({c} clients): the gateway {'died' if not r['alive'] else 'stopped'} with "
                                f"code {r['stop_rc']} after {r['stop_s']:.1f}s:\n{r['log_tail']}")
            if n == "default" and r["failed"]:
                problems.append(f"default ({c} clients): {r['failed']} jobs FAILED:\n{r['log_tail']}")
    if not off_alive:
        problems.append(f"the engine-off gateway exited during the benchmark:\n{off_log}")
    if not bare_alive:
        problems.append("the bare server exited during the benchmark")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    return 0 if ok or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--rounds", type=int, default=2, help="measured windows per server and level, interleaved (default 2)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per window (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load first (default 2)")
    parser.add_argument("--drain", type=float, default=5,
                        help="seconds after a default-config window before the backlog is counted again (default 5)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto",
                        help="load generator (default auto: wrk when installed, else httpx)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    add_set_argument(parser)
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.overrides = parse_sets(args.set)
    if args.overrides:
        NAMES["default"] = "tuned"
        print(f"TUNED run: both gateways with {', '.join(args.set)} (the 'default' rows are not the default config)")
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return 0
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
