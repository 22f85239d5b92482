"""Benchmark: ``GET /v2/loras/{id}`` throughput under 64 concurrent loopback clients vs a bare Litestar endpoint.

    python bench/get_lora.py [--rounds 3] [--duration 10] [--connections 64] [--loadgen auto|wrk|httpx]
                             [--profile gateway.svg]

Starts two gateways (``python -m gateway.cli serve``, each on a fresh data dir) and creates one
LoRA from 15 small JPEGs (as the tests do) on each:

* ``engine off``: ``server.run_workers: false``, so no engine work runs during the load and the
  LoRA stays PENDING; only the request path is measured. The goal was set on this figure.
* ``default``: the default configuration, the engine running in the API process. Its LoRA is
  fetched once it is TRAINING (dataset prepared, sandbox training of an hour in flight), so
  the engine is in its steady state: idle claims every 0.5 s and a status poll of that
  training every <= 30 s. This is what a user gets.

A baseline is then started in its own process under uvicorn with the gateway's uvicorn
settings: a bare Litestar app defined in this file whose ``GET /v2/loras/{lora_id}`` returns
the JSON document the gateway returned for that id (no auth, no database); it is loaded with
the engine-off LoRA's id (the default one's document differs only in its status and startedAt).

Each target is loaded ``--rounds`` times, interleaved (the order flips every round), after a
short warm-up; prints the median requests/s of each, the ratio gateway/baseline for each
gateway (goal >= 0.6 for engine off; the default-config ratio is shown against the same goal
for reference, ``--strict`` checks the engine-off one), median p50/p99 latencies and the server
CPU time per request (user+sys of the server process over the run / requests; less sensitive
to a noisy machine than req/s).

Load generator: ``wrk`` when installed (``apt-get install -y wrk`` on Debian/Ubuntu), run as
``wrk -t 1 -c 64 -d 10s --latency --timeout 10s -H "X-API-Key: ..." URL``; it is cheap, which
matters because the servers and the load generator share the machine's cores. Without it
(or with ``--loadgen httpx``) an asyncio + httpx load generator runs in a separate process
with 64 concurrent workers for the same duration; it costs far more CPU per request, so its
absolute figures are lower and the ratio is compressed toward 1.

``--profile FILE`` (needs ``py-spy``: ``pip install py-spy``) records the engine-off gateway
with py-spy during one extra load run after the measured ones: ``.svg`` = flame graph,
``.txt`` = collapsed stacks, ``.json`` = speedscope.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litestar import Litestar, Response, get  # noqa: E402

from bench import _loadgen  # noqa: E402
from bench._common import (  # noqa: E402
    run_main,
    Gateway, Server, ServerError, create_small_lora, free_port, median, start_gateway, table,
    temp_dir, verdict, wait_lora,
)

RATIO_GOAL = 0.6


# --------------------------------------------------------------------------- the baseline server


def serve_baseline(port: int, payload_file: str) -> None:
    import uvicorn

    #: lora id -> the JSON document the gateway returned for it
    payloads: dict[str, Any] = json.loads(Path(payload_file).read_text(encoding="utf-8"))
    first = next(iter(payloads.values()))

    @get("/v2/loras/{lora_id:str}")
    async def get_lora(lora_id: str) -> Response:
        return Response(payloads.get(lora_id, first))

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app = Litestar(route_handlers=[get_lora, healthz], debug=False)
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="on", access_log=False, log_level="warning")


# --------------------------------------------------------------------------- the benchmark


def load(server: Server, url: str, key: str, args: argparse.Namespace, duration: float) -> dict[str, Any]:
    cpu0 = server.cpu_seconds()
    if args.loadgen == "wrk":
        res = _loadgen.run_wrk(url, key, args.connections, duration)
    else:
        res = _loadgen.run_httpx(url, key, args.connections, duration)
    res["cpu_s"] = server.cpu_seconds() - cpu0
    res["cpu_us_per_req"] = res["cpu_s"] / res["requests"] * 1e6 if res["requests"] else float("nan")
    return res


def profile(gw: Server, url: str, key: str, args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("--profile: py-spy not found (pip install py-spy); skipped", file=sys.stderr)
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


LABELS = {"off": "engine off", "default": "default", "baseline": "baseline"}


def fetch_lora(gw: Gateway, lora_id: str) -> Any:
    import httpx

    url = f"{gw.base_url}/v2/loras/{lora_id}"
    r = httpx.get(url, headers={"X-API-Key": gw.key}, timeout=30)
    if r.status_code != 200:
        raise ServerError(f"GET {url} answered {r.status_code}: {r.text[:500]}\n{gw.tail()}")
    return r


def run(args: argparse.Namespace) -> int:
    import httpx

    args.loadgen = _loadgen.choose(args.loadgen)

    with temp_dir("bench-get-") as tmp:
        (tmp / "engine-off").mkdir()
        (tmp / "default").mkdir()
        port = free_port()
        payload_file = tmp / "payload.json"
        baseline = Server("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", str(port),
                                       "--payload", str(payload_file)], port)
        with baseline, start_gateway(tmp / "engine-off", name="engine-off", server={"run_workers": False}) as off, \
                start_gateway(tmp / "default", name="default") as dflt:
            lora_off = create_small_lora(off, 15)
            lora_def = create_small_lora(dflt, 15)
            # the default gateway's engine prepares the dataset and submits the (hour-long) training
            wait_lora(dflt, lora_def["id"], ["TRAINING"], timeout=120)
            r_off, r_def = fetch_lora(off, lora_off["id"]), fetch_lora(dflt, lora_def["id"])
            payload_file.write_text(json.dumps({lora_off["id"]: r_off.json(), lora_def["id"]: r_def.json()}),
                                    encoding="utf-8")
            baseline.start()
            base_url = f"{baseline.base_url}/v2/loras/{lora_off['id']}"
            rb = httpx.get(base_url, timeout=30)
            if rb.status_code != 200 or rb.json() != r_off.json():
                raise ServerError(f"baseline GET answered {rb.status_code}: {rb.text[:300]}\n{baseline.tail()}")
            print(f"load generator: {args.loadgen}, {args.connections} connections, {args.duration:g}s per run, "
                  f"{args.rounds} rounds interleaved; response bodies: engine off {len(r_off.content)} bytes "
                  f"(lora {r_off.json().get('status')}), default {len(r_def.content)} bytes "
                  f"(lora {r_def.json().get('status')}), baseline = the engine-off JSON", flush=True)

            targets = {
                "off": (off, f"{off.base_url}/v2/loras/{lora_off['id']}"),
                "default": (dflt, f"{dflt.base_url}/v2/loras/{lora_def['id']}"),
                "baseline": (baseline, base_url),
            }
            if args.warmup > 0:
                for name, (server, url) in targets.items():
                    load(server, url, off.key if name != "default" else dflt.key, args, args.warmup)
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for i in range(args.rounds):
                order = list(targets) if i % 2 == 0 else list(reversed(targets))
                for name in order:
                    server, url = targets[name]
                    res = load(server, url, dflt.key if name == "default" else off.key, args, args.duration)
                    results[name].append(res)
                    print(f"  round {i + 1} {LABELS[name]:10s} {res['rps']:8.0f} req/s  p50 {res['p50']:7.1f} ms  "
                          f"p99 {res['p99']:7.1f} ms  cpu {res['cpu_us_per_req']:6.0f} us/req  "
                          f"non-2xx {res['non2xx']}  socket errors {res['socket_errors']}", flush=True)
            if args.profile:
                profile(off, targets["off"][1], off.key, args)
            alive = {"engine off": off.alive(), "default": dflt.alive()}
            logs = {"engine off": off.tail(20), "default": dflt.tail(20)}
            status_def = fetch_lora(dflt, lora_def["id"]).json().get("status")

        rows = []
        for name, runs in results.items():
            rows.append([
                LABELS[name], len(runs), f"{median([x['rps'] for x in runs]):.0f}",
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
        b = median([x["rps"] for x in results["baseline"]])
        b_cpu = median([x["cpu_us_per_req"] for x in results["baseline"]])
        ratios = {}
        for name in ("off", "default"):
            ratios[name] = median([x["rps"] for x in results[name]]) / b if b else float("nan")
            cpu_ratio = median([x["cpu_us_per_req"] for x in results[name]]) / b_cpu
            note = "" if name == "off" else "  (for reference: the goal was set on engine off)"
            print(f"throughput ratio {LABELS[name]}/baseline (medians): {ratios[name]:.2f}   (goal >= {RATIO_GOAL}) -> "
                  f"{verdict(ratios[name] >= RATIO_GOAL)}{note};   server CPU per request {cpu_ratio:.2f}x the baseline's")
        problems = [f"{LABELS[name]}: {x['non2xx']} non-2xx responses, {x['socket_errors']} socket errors"
                    for name, runs in results.items() for x in runs if x["non2xx"] or x["socket_errors"]]
        for name, ok in alive.items():
            if not ok:
                problems.append(f"the {name} gateway exited during the benchmark:\n{logs[name]}")
        if status_def != "TRAINING":
            problems.append(f"the default gateway's LoRA ended the run {status_def}, not TRAINING:\n{logs['default']}")
        if problems:
            print("\nPROBLEMS:\n  " + "\n  ".join(problems))
            return 1
        return 0 if ratios["off"] >= RATIO_GOAL or not args.strict else 1


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
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline, args.payload)
        return 0
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
