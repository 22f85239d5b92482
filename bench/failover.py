"""Benchmark: time to COMPLETED with the first inference instance hard down (connection refused) vs both healthy.

    python bench/failover.py [--requests 100] [--rounds 3] [--poll-ms 25] [--job-timeout 60] [--all]
                             [--strict] [--set KEY=VALUE ...]

Two ``lora-gateway serve`` runs (default configuration: the engine in the API process), one
after the other, each on a copy of the same data dir with a READY LoRA of the bootstrap team
(trained once on the sandbox through the API by a seed gateway, 1 s training; the LoRA is
portable: its weights are stored by the gateway). Generation goes to WaveSpeed instances
(the real ``WaveSpeedAdapter``, which uploads the stored weights through WaveSpeed's media API)
pointing at a ``FakeWaveSpeed`` (``tests/fakes/wavespeed.py``) served over loopback in a child
process (0.02 s queued + 0.05 s processing per generation; it answers the upload ticket and
PUT, the submit, the result polls and the image downloads, and counts them):

* ``failover``: ``routing.inference`` = priority [ws-down, ws-up]. ws-down's ``base_url`` is
  ``http://127.0.0.1:PORT`` with nothing listening on PORT (a socket bound to a free port,
  then closed; checked to refuse connections before each run): its upload ticket / submit
  fails with "could not connect", a retryable, provider-side error, so the job falls back to
  ws-up at once, and after ``routing.breaker.failures`` (default 5) such failures in a row
  ws-down's breaker opens and later jobs go straight to ws-up (until ``cooldown_s``, default
  30 s, when one job probes ws-down again);
* ``healthy``: priority [ws-up-1, ws-up-2], both at the fake (the same route shape).

Each run sends ``--requests`` generations (default 100) one after another: POST
``/v2/images/generate`` (1 image, 1:1, jpg), then GET ``/v2/jobs/{id}`` every ``--poll-ms``
(default 25 ms, one keep-alive connection) until COMPLETED (or FAILED); the time from the POST
to the first GET that sees COMPLETED is that request's time. After each job (outside the
timing) its attempts are read from the extension endpoint ``GET /v2/jobs/{id}/attempts``, or,
where the gateway does not have it, read-only from the ``attempts`` table of its database.

Prints per-request times of both runs (requests 1-12, then every 10th and the last; ``--all``:
every one) with the ratio failover/healthy and each job's attempts (provider:state), then the
ratio for request 1, request 10, request N and the ratio of the medians of requests 10..N,
against the goal "about 1.0 from the 10th request on" (median of 10..N within 1.25); the
attempt patterns per run (which requests went ws-down -> ws-up, which straight to ws-up), the
breaker rows of the failover run's database at the end, the fake's request counts and the
gateway's CPU per request. ``--rounds`` (default 3) repeats both runs, interleaved (the order
flips every round; a fresh gateway and data dir each time), and each request index's time is
the median over the rounds (its attempts column shows the last round).

One benchmark setting differs from the gateway's defaults: ``engine.generation.min_poll_interval_s``
is 0.1 (the default first status poll after a submit is 1 s, which would make every job about
1 s long and hide what failover costs); ``--set`` overrides it (and anything else, labelled as a
tuned run), e.g. ``--set engine.generation.min_poll_interval_s=1``. ``--strict`` exits 1 when the
goal is missed or the attempts are not as described above. Every process is stopped and the
temp dir removed on every exit path.
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import socket
import sqlite3
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench._common import (  # noqa: E402
    CountingApp, FakeVendor, Server, ServerError, add_set_argument, copy_data_dir, create_small_lora, database_path, handle_sigterm,
    median, merge, parse_sets, run_main, start_gateway, table, temp_dir, verdict, wait_lora,
)
from gateway.config import BreakerSettings  # noqa: E402

GOAL = 1.25  # failover / healthy, median of requests 10..N
FROM_REQUEST = 10
FAKE_API_KEY = "ws-bench-key"
FAKE_QUEUE_S = 0.02
FAKE_GENERATION_S = 0.05
PROMPT = "a portrait in a sunlit garden, soft light, 85mm"
#: every gateway of this benchmark: no rate limit, credits for any number of requests
COMMON: dict[str, Any] = {"teams": {"rate_limit_per_minute": 0, "bootstrap_credits": 10**9}}
#: the gateway that trains the LoRA: a 1 s sandbox training
SANDBOX = {"sandbox": {"training_seconds": 1, "queue_seconds": 0}}
#: what the benchmark needs on top of the defaults: a first status poll 0.1 s after a submit
BENCH: dict[str, Any] = {"engine": {"generation": {"min_poll_interval_s": 0.1}}}
RUNS = ("failover", "healthy")
#: instances per run, in priority order; "down" is the dead port, "up" the fake
ROUTES = {"failover": [("ws-down", "down"), ("ws-up", "up")],
          "healthy": [("ws-up-1", "up"), ("ws-up-2", "up")]}


# --------------------------------------------------------------------------- the fake vendor (child process)


def serve_fake() -> None:
    """The child process: a FakeWaveSpeed with short generations, served until SIGTERM."""
    from tests.fakes.wavespeed import FakeWaveSpeed, serve_on_loopback

    handle_sigterm()
    fake = FakeWaveSpeed(api_key=FAKE_API_KEY, queue_s=FAKE_QUEUE_S, generation_s=FAKE_GENERATION_S)
    fake.requests = deque(maxlen=100)  # type: ignore[assignment]  # keep the recent ones only
    try:
        with serve_on_loopback(CountingApp(fake)) as base_url:
            print(f"FAKE_WAVESPEED {base_url} ready", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- the dead instance


def dead_port() -> int:
    """A port on 127.0.0.1 with nothing listening: bound to a free port, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_refused(port: int) -> None:
    """Connecting to ``port`` must be refused (nothing started listening there since)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    except ConnectionRefusedError:
        return
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return
        raise ServerError(f"127.0.0.1:{port} (the 'down' instance) did not refuse the connection: {e}") from None
    raise ServerError(f"something listens on 127.0.0.1:{port}, the port chosen for the 'down' instance")


# --------------------------------------------------------------------------- one run


def run_config(name: str, fake_url: str, down_url: str, overrides: dict[str, Any]) -> dict[str, Any]:
    providers: dict[str, Any] = dict(SANDBOX)
    for inst, where in ROUTES[name]:
        providers[inst] = {"type": "wavespeed", "api_key": FAKE_API_KEY,
                           "base_url": down_url if where == "down" else fake_url}
    cfg = {"providers": providers,
           "routing": {"training": {"strategy": "priority", "providers": ["sandbox"]},
                       "inference": {"strategy": "priority", "providers": [i for i, _ in ROUTES[name]]}}}
    return merge(merge(merge(COMMON, BENCH), cfg), overrides)


def wait_ready(gw: Server, timeout: float = 30.0) -> None:
    """``/readyz`` 200: the database answers and the in-process engine runs."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5, trust_env=False) as client:
        while True:
            r = client.get(gw.base_url + "/readyz")
            if r.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise ServerError(f"{gw.name}: /readyz answered {r.status_code} for {timeout:.0f}s: {r.text[:300]}\n"
                                  f"{gw.tail()}")
            time.sleep(0.1)


class Attempts:
    """A job's attempts, from ``GET /v2/jobs/{id}/attempts``, or from the database (read-only)
    when the gateway has no such endpoint."""

    def __init__(self, client: httpx.Client, db: Path) -> None:
        self.client, self.db = client, db
        self.source: str | None = None  # "api" | "database"
        self._conn: sqlite3.Connection | None = None

    def __call__(self, job_id: str) -> list[dict[str, Any]]:
        if self.source != "database":
            r = self.client.get(f"/v2/jobs/{job_id}/attempts")
            if r.status_code == 200:
                self.source = "api"
                return [{"provider": a.get("provider"), "state": a.get("state"), "error": a.get("error")}
                        for a in r.json()["attempts"]]
            if self.source == "api" or r.status_code not in (404, 405):
                raise ServerError(f"GET /v2/jobs/{job_id}/attempts answered {r.status_code}: {r.text[:300]}")
            self.source = "database"
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        rows = self._conn.execute("SELECT provider, state, error FROM attempts WHERE owner_kind = 'job' AND owner_id = ?"
                                  " ORDER BY seq", (job_id,)).fetchall()
        return [{"provider": p, "state": s, "error": e} for p, s, e in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def breaker_rows(db: Path) -> list[tuple[Any, ...]]:
    """``provider_health`` rows for inference (instance, state, failures, opened_at), read-only."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT instance, state, failures, opened_at FROM provider_health "
                                "WHERE operation = 'inference' ORDER BY instance").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        return [("(unreadable)", str(e), "", None)]


def one_request(client: httpx.Client, body: bytes, poll_s: float, timeout: float) -> dict[str, Any]:
    """POST, then GET every ``poll_s`` until COMPLETED or FAILED: the wall time from the POST."""
    t0 = time.perf_counter()
    r = client.post("/v2/images/generate", content=body)
    if r.status_code != 202:
        raise ServerError(f"POST /v2/images/generate answered {r.status_code}: {r.text[:300]}")
    job_id = r.json()["jobId"]
    gets = 0
    while True:
        time.sleep(poll_s)
        g = client.get(f"/v2/jobs/{job_id}")
        gets += 1
        if g.status_code != 200:
            raise ServerError(f"GET /v2/jobs/{job_id} answered {g.status_code}: {g.text[:300]}")
        job = g.json()
        elapsed = time.perf_counter() - t0
        if job["status"] in ("COMPLETED", "FAILED"):
            return {"id": job_id, "status": job["status"], "error": job.get("error"), "s": elapsed, "gets": gets,
                    "t_post": t0}
        if elapsed > timeout:
            return {"id": job_id, "status": job["status"] + " (timed out)", "error": job.get("error"), "s": elapsed,
                    "gets": gets, "t_post": t0}


def measure(name: str, tmp: Path, seed_tmp: Path, key: str, body: bytes, fake: FakeVendor, round_no: int,
            args: argparse.Namespace) -> dict[str, Any]:
    gw_tmp = tmp / f"{name}-{round_no}"
    copy_data_dir(seed_tmp, gw_tmp)
    port = dead_port()
    check_refused(port)
    down_url = f"http://127.0.0.1:{port}"
    cfg = run_config(name, fake.base_url, down_url, args.overrides)
    results: list[dict[str, Any]] = []
    with start_gateway(gw_tmp, key=key, name=name, **cfg) as gw:
        wait_ready(gw)
        stats0, cpu0, t_start = fake.stats(), gw.cpu_seconds(), time.perf_counter()
        with httpx.Client(base_url=gw.base_url, headers={"X-API-Key": key, "Content-Type": "application/json"},
                          timeout=30, trust_env=False) as client:
            attempts = Attempts(client, database_path(gw))
            try:
                for i in range(args.requests):
                    res = one_request(client, body, args.poll_ms / 1000, args.job_timeout)
                    res["t_post"] -= t_start
                    res["attempts"] = attempts(res["id"])
                    results.append(res)
                    if args.verbose:
                        print(f"    {name} #{i + 1}: {res['s'] * 1000:.0f} ms {res['status']} "
                              f"{pattern(res['attempts'])}", flush=True)
                    if res["status"] != "COMPLETED" and sum(r["status"] != "COMPLETED" for r in results[-3:]) >= 3:
                        break  # three in a row: the gateway is not serving this route; report what it did
            finally:
                attempts.close()
        wall, cpu, stats1 = time.perf_counter() - t_start, gw.cpu_seconds() - cpu0, fake.stats()
        breakers = breaker_rows(database_path(gw))
        alive, log_tail = gw.alive(), gw.tail(30)
    fake_counts = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1 if stats1.get(k, 0) != stats0.get(k, 0)}
    done = [r for r in results if r["status"] == "COMPLETED"]
    print(f"  round {round_no}  {name:8s}  {len(done)}/{args.requests} COMPLETED in {wall:.1f}s  "
          f"median {median([r['s'] for r in done]) * 1000:.0f} ms  gateway CPU {cpu / max(len(results), 1) * 1000:.0f} ms/req"
          f"  (down: {down_url if name == 'failover' else '-'})", flush=True)
    return {"results": results, "wall": wall, "cpu": cpu, "fake": fake_counts, "breakers": breakers, "alive": alive,
            "log_tail": log_tail, "attempts_source": attempts.source, "down_url": down_url}


# --------------------------------------------------------------------------- report


def pattern(attempts: list[dict[str, Any]]) -> str:
    return " > ".join(f"{a['provider']}:{a['state']}" for a in attempts) or "(none)"


def check_attempts(name: str, results: list[dict[str, Any]], failures: int, cooldown_s: float) -> list[str]:
    """Deviations from what the brief describes, one line each (empty: as described)."""
    out = []
    last_down: float | None = None
    for i, r in enumerate(results, 1):
        got = [(a["provider"], a["state"]) for a in r["attempts"]]
        if r["status"] != "COMPLETED":
            errors = "; ".join(f"{a['provider']}: {a['error']}" for a in r["attempts"] if a.get("error"))
            out.append(f"{name} #{i}: job {r['status']}: {r['error']} (attempt errors: {errors or 'none'})")
        if name == "healthy":
            if got != [("ws-up-1", "succeeded")]:
                out.append(f"healthy #{i}: {pattern(r['attempts'])} (expected ws-up-1:succeeded)")
            continue
        fell_over = got == [("ws-down", "failed"), ("ws-up", "succeeded")]
        straight = got == [("ws-up", "succeeded")]
        if i <= failures:
            if not fell_over:
                out.append(f"failover #{i}: {pattern(r['attempts'])} (expected ws-down:failed > ws-up:succeeded, "
                           f"breaker not open yet)")
        elif fell_over:  # allowed only as the breaker's probe, once per cooldown
            if last_down is not None and r["t_post"] - last_down < cooldown_s - 1.0:
                out.append(f"failover #{i}: {pattern(r['attempts'])} {r['t_post'] - last_down:.1f}s after the last "
                           f"ws-down attempt (the breaker should be open for {cooldown_s:g}s)")
        elif not straight:
            out.append(f"failover #{i}: {pattern(r['attempts'])} (expected ws-up:succeeded)")
        if got and got[0][0] == "ws-down":
            last_down = r["t_post"]
    return out


def spans(indices: list[int]) -> str:
    """[1,2,3,5,7,8] -> '1-3, 5, 7-8'."""
    out: list[str] = []
    for i in indices:
        if out and isinstance(out[-1], list) and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], failures: int, cooldown_s: float) -> int:
    n = args.requests
    times: dict[str, list[float]] = {}
    for name in RUNS:
        per_index = []
        for i in range(n):
            vals = [rnd["results"][i]["s"] for rnd in runs[name]
                    if i < len(rnd["results"]) and rnd["results"][i]["status"] == "COMPLETED"]
            per_index.append(median(vals))
        times[name] = per_index
    last = runs["failover"][-1]["results"], runs["healthy"][-1]["results"]

    shown = list(range(1, n + 1)) if args.all else sorted({*range(1, min(n, 12) + 1), *range(20, n + 1, 10), n})
    rows = []
    for i in shown:
        f, h = times["failover"][i - 1], times["healthy"][i - 1]
        fa = pattern(last[0][i - 1]["attempts"]) if i <= len(last[0]) else "-"
        ha = pattern(last[1][i - 1]["attempts"]) if i <= len(last[1]) else "-"
        rows.append([i, f"{f * 1000:.0f}", f"{h * 1000:.0f}", f"{ratio(f, h):.2f}", fa, ha])
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print()
    if args.overrides:
        print(f"TUNED run ({', '.join(args.set)}): not the benchmark's standard configuration")
    print(f"POST /v2/images/generate -> COMPLETED, one request at a time, GET every {args.poll_ms:g} ms{rounds}"
          f" (attempts: {'last round' if args.rounds > 1 else 'per job'}, from "
          f"{runs['failover'][-1]['attempts_source'] or '?'})")
    print(table(rows, ["request", "failover ms", "healthy ms", "ratio", "failover attempts", "healthy attempts"]))

    def at(i: int) -> float:
        return ratio(times["failover"][i - 1], times["healthy"][i - 1]) if i <= n else float("nan")

    tail_f = [t for t in times["failover"][FROM_REQUEST - 1:] if t == t]
    tail_h = [t for t in times["healthy"][FROM_REQUEST - 1:] if t == t]
    r_tail = ratio(median(tail_f), median(tail_h))
    per_req = [ratio(f, h) for f, h in zip(times["failover"][FROM_REQUEST - 1:], times["healthy"][FROM_REQUEST - 1:])]
    per_req = [r for r in per_req if r == r]
    within = sum(r <= GOAL for r in per_req)
    ok_time = r_tail <= GOAL
    print()
    print("ratio failover/healthy")
    rows = [["request 1", f"{at(1):.2f}", "", "(the fallback itself: ws-down refused, then ws-up)"],
            [f"request {FROM_REQUEST}", f"{at(FROM_REQUEST):.2f}", f"<= {GOAL}", "" if n < FROM_REQUEST else
             ("within" if at(FROM_REQUEST) <= GOAL else "outside")],
            [f"request {n}", f"{at(n):.2f}", f"<= {GOAL}", "within" if at(n) <= GOAL else "outside"],
            [f"median of {FROM_REQUEST}..{n}", f"{r_tail:.2f}", f"<= {GOAL}", verdict(ok_time)],
            [f"requests {FROM_REQUEST}..{n} within {GOAL}", f"{within}/{len(per_req)}", "", ""]]
    if n < FROM_REQUEST:
        rows = rows[:1] + [[f"(--requests {n} < {FROM_REQUEST}: no figure from the {FROM_REQUEST}th on)", "", "", ""]]
        ok_time = False
    print(table(rows, ["", "ratio", "goal", ""]))

    print()
    print(f"attempts per job (breaker: {failures} provider-side failures in a row open it, {cooldown_s:g}s cooldown)")
    rows = []
    deviations: list[str] = []
    for name in RUNS:
        for k, rnd in enumerate(runs[name], 1):
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(rnd["results"], 1):
                groups.setdefault(pattern(r["attempts"]) + ("" if r["status"] == "COMPLETED" else f" [{r['status']}]"),
                                  []).append(i)
            for pat, idx in groups.items():
                rows.append([name, k, pat, len(idx), spans(idx)])
            deviations += [f"round {k} {d}" for d in check_attempts(name, rnd["results"], failures, cooldown_s)]
    print(table(rows, ["run", "round", "attempts (provider:state)", "jobs", "requests"]))
    for k, rnd in enumerate(runs["failover"], 1):
        rows = [[inst, state, fails, f"{time.time() - opened:.0f}s ago" if opened else "-"]
                for inst, state, fails, opened in rnd["breakers"]]
        print(f"failover run, round {k}: inference breaker rows at the end "
              f"({'none' if not rows else ', '.join(f'{r[0]} {r[1]} failures={r[2]} opened {r[3]}' for r in rows)})")
    for d in deviations:
        print(f"  NOT AS DESCRIBED: {d}")
    if not deviations:
        print("  as described: the first requests fell back ws-down -> ws-up until the breaker opened, then ws-up only")

    print()
    rows = []
    for name in RUNS:
        for k, rnd in enumerate(runs[name], 1):
            c = rnd["fake"]
            rows.append([name, k, c.get("ticket", 0) + c.get("binary", 0), c.get("put", 0), c.get("generate", 0),
                         c.get("result", 0), c.get("cdn", 0), c.get("non_200", 0),
                         f"{rnd['cpu'] / max(len(rnd['results']), 1) * 1000:.0f}"])
    print("the fake vendor's requests per run, and the gateway's CPU per request")
    print(table(rows, ["run", "round", "upload", "PUT", "submit", "result", "image", "non-200",
                       "gateway CPU ms/req"]))

    problems = []
    for name in RUNS:
        for k, rnd in enumerate(runs[name], 1):
            bad = [i for i, r in enumerate(rnd["results"], 1) if r["status"] != "COMPLETED"]
            if bad or len(rnd["results"]) < n:
                first = rnd["results"][bad[0] - 1] if bad else None
                problems.append(f"{name} round {k}: {len(rnd['results']) - len(bad)}/{n} COMPLETED"
                                + (f"; request {bad[0]}: {first['status']}: {first['error']}; attempts: "
                                   + "; ".join(f"{a['provider']}:{a['state']} ({a['error']})" for a in first["attempts"])
                                   if first else "") + f"\n{rnd['log_tail']}")
            if not rnd["alive"]:
                problems.append(f"{name} round {k}: the gateway exited during the run:\n{rnd['log_tail']}")
            if rnd["fake"].get("non_200", 0):
                problems.append(f"{name} round {k}: the fake answered {rnd['fake']['non_200']} requests with a non-200")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    ok = ok_time and not deviations
    return 0 if ok or not args.strict else 1


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    cfg = merge(BENCH, args.overrides)
    breaker = {**msgspec_defaults(), **cfg.get("routing", {}).get("breaker", {})}
    with temp_dir("bench-failover-") as tmp:
        t0 = time.perf_counter()
        seed_tmp = tmp / "seed"
        seed_tmp.mkdir()
        with start_gateway(seed_tmp, name="seed", **merge(COMMON, {"providers": SANDBOX})) as seed:
            lora = create_small_lora(seed, 15)
            lora = wait_lora(seed, lora["id"], ["READY"], timeout=120)
            key = seed.key
        print(f"LoRA {lora['id']} READY in {time.perf_counter() - t0:.1f}s on a seed gateway (sandbox, 1 s training); "
              f"its data dir is copied for every run", flush=True)
        body = json.dumps({"prompt": PROMPT, "model": "flux-lora", "fluxLoraParams": {
            "loraId": lora["id"], "num_outputs": 1, "aspect_ratio": "1:1", "output_format": "jpg"}}).encode()

        fake = FakeVendor("fake-wavespeed", [sys.executable, str(Path(__file__).resolve()), "--_serve-fake"])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RUNS}
        with fake:
            fake.start(timeout=60)
            print(f"fake WaveSpeed at {fake.base_url} (child process; {FAKE_QUEUE_S:g}s queued + {FAKE_GENERATION_S:g}s "
                  f"processing per generation); {args.requests} requests per run, GET /v2/jobs/{{id}} every "
                  f"{args.poll_ms:g} ms; engine.generation.min_poll_interval_s "
                  f"{cfg['engine']['generation']['min_poll_interval_s']:g}; breaker {breaker['failures']} failures, "
                  f"{breaker['cooldown_s']:g}s cooldown", flush=True)
            for k in range(args.rounds):
                for name in (RUNS if k % 2 == 0 else RUNS[::-1]):
                    runs[name].append(measure(name, tmp, seed_tmp, key, body, fake, k + 1, args))
                    shutil.rmtree(tmp / f"{name}-{k + 1}", ignore_errors=True)  # its data dir: done with it
            if not fake.alive():
                raise ServerError(f"the fake WaveSpeed exited during the benchmark:\n{fake.tail()}")
    return report(args, runs, int(breaker["failures"]), float(breaker["cooldown_s"]))


def msgspec_defaults() -> dict[str, Any]:
    b = BreakerSettings()
    return {"failures": b.failures, "cooldown_s": b.cooldown_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--requests", type=int, default=100, help="generations per run, one at a time (default 100)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat both runs, interleaved; per-request medians over rounds (default 3)")
    parser.add_argument("--poll-ms", type=float, default=25, help="GET /v2/jobs/{id} interval in ms (default 25)")
    parser.add_argument("--job-timeout", type=float, default=60, help="seconds to wait for one job (default 60)")
    parser.add_argument("--all", action="store_true", help="print every request's row (default: 1-12, every 10th, last)")
    parser.add_argument("--verbose", action="store_true", help="print each request as it completes")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when the goal is missed or the attempts are not as described")
    add_set_argument(parser)
    parser.add_argument("--_serve-fake", dest="serve_fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake()
        return 0
    if args.requests < 1 or args.rounds < 1 or args.poll_ms <= 0:
        parser.error("--requests and --rounds must be at least 1, --poll-ms positive")
    args.overrides = parse_sets(args.set)
    if args.overrides:
        print(f"TUNED run: both gateways with {', '.join(args.set)}")
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
