"""Poller cost with many trainings in flight: the sandbox in-process, or WaveSpeed over real HTTP.

Seeds N LoRAs that are TRAINING at the provider (their jobs never finish during the run, so
every poll answers "running"), runs the engine in this process with a fixed poll interval, and
measures over a window: status requests the provider received per minute (the goal: at most
one per training per interval, i.e. N / interval * 60) and this process's CPU time as a share
of one core (goal: under 25% at a 30 s interval), and the CPU time per poll.

    python bench/poller.py --trainings 10000 --interval 30 --window 90                       # sandbox
    python bench/poller.py --trainings 10000 --interval 30 --window 90 --provider wavespeed

``--provider sandbox`` (default): the sandbox provider, in this process (a subclass counts the
``training_status`` calls it answers); its job files are written under the data dir. The CPU
share is the engine plus the sandbox's own work (a stat and a cached decode per poll).

``--provider wavespeed``: the real ``WaveSpeedAdapter`` (``providers.wavespeed.base_url`` set
to a ``FakeWaveSpeed`` from ``tests/fakes/wavespeed.py``), reached over HTTP on 127.0.0.1.
The fake runs in a child process (``serve_on_loopback``, with the N predictions seeded as
"processing" for the whole run), so this process's CPU is the engine and its HTTP client
only, as with a remote vendor; the status requests (``GET /api/v3/predictions/{id}/result``)
are counted on the fake's side, and its CPU is shown too.

The engine is used as ``Engine(gw)`` from ``gateway.engine.worker`` with ``engine.run`` started
in a task group (cancelled at the end); the rows are seeded with SQL into ``loras`` and
``attempts`` (stage ``poll``, status TRAINING, attempt state ``running``). ``--strict`` exits 1
when a goal is missed. The temp dir (database, sandbox files) is removed on every exit path.

``--database postgresql`` runs it on a throwaway PostgreSQL server (started by
``tests/pgserver.py``) instead of the SQLite file; ``--replicas N`` runs the engine in N
processes on that one database (this one and N-1 children, ``--_replica``), splitting the
trainings between them through the claims, and prints each one's CPU share. The sandbox's call
counts are summed over the replicas; the fake WaveSpeed counts every replica's requests itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio  # noqa: E402
import httpx  # noqa: E402

from bench._common import (  # noqa: E402
    STATS_PATH, CountingApp, FakeVendor, handle_sigterm, postgres_database, run_main, temp_dir, verdict,
)
from gateway.config import EngineSettings, settings_from_mapping  # noqa: E402
from gateway.context import open_gateway  # noqa: E402
from gateway.engine.worker import Engine  # noqa: E402
from gateway.logging import configure_logging  # noqa: E402
from gateway.services import accounts  # noqa: E402
from gateway.timeutil import new_id, now  # noqa: E402
from plugins.hookspecs import hookimpl  # noqa: E402
from plugins.manager import make_plugin_manager  # noqa: E402
from providers import sandbox  # noqa: E402

CPU_GOAL = 25.0  # % of one core
RATE_GOAL = 1.0  # status requests per training per interval
FAKE_API_KEY = "ws-bench-key"


# --------------------------------------------------------------------------- sandbox mode


class CountingSandbox(sandbox.SandboxProvider):
    """The sandbox, counting the status requests it answers."""

    name = "counting"
    status_calls = 0

    async def training_status(self, ref):  # type: ignore[override]
        CountingSandbox.status_calls += 1
        return await super().training_status(ref)


class Plugin:
    @hookimpl
    def register_providers(self, register):
        register(CountingSandbox)


# --------------------------------------------------------------------------- wavespeed mode: the fake vendor


def fake_ref(i: int) -> str:
    return f"bench{i:06d}"


def serve_fake(trainings: int) -> None:
    """The child process of ``--provider wavespeed``: FakeWaveSpeed with ``trainings``
    predictions that stay "processing", served until SIGTERM."""
    from tests.fakes.wavespeed import FakeWaveSpeed, _Prediction, serve_on_loopback

    handle_sigterm()
    fake = FakeWaveSpeed(api_key=FAKE_API_KEY, queue_s=0.0)
    fake.requests = deque(maxlen=100)  # type: ignore[assignment]  # keep the recent ones only
    app = CountingApp(fake)
    try:
        with serve_on_loopback(app) as base_url:
            created = fake.now()
            for i in range(trainings):
                ref = fake_ref(i)
                fake.predictions[ref] = _Prediction(
                    id=ref, kind="training", model=fake.trainer_model,
                    input={"trigger_word": f"W{i:05d}", "steps": 1000, "lora_rank": 16}, created=created,
                    queue_s=0.0, run_s=10.0**9, host=base_url, created_at="2025-01-01T00:00:00.000Z",
                )
            print(f"FAKE_WAVESPEED {base_url} seeded {trainings}", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- seeding


async def seed(gw, n: int, interval: float, provider_name: str, ref_of, before_insert=None) -> None:
    """N loras TRAINING at ``provider_name`` with a running attempt (provider ref ``ref_of(i,
    attempt_id)``), their first polls spread over one interval, as in a steady state."""
    _, new = await accounts.create_team(gw.db, name="bench", credits=0, max_concurrent_trainings=n)
    async with gw.db.read() as conn:
        (team_id, user_id) = list(await conn.execute_fetchall("SELECT team_id, user_id FROM api_keys"))[0]
    t = now()
    loras, attempts = [], []
    for i in range(n):
        lora_id, attempt_id = new_id(), new_id()
        ref = ref_of(i, attempt_id)
        if before_insert is not None:
            before_insert(i, ref, attempt_id, t)
        loras.append((lora_id, team_id, user_id, new.record.id, f"bench {i}", "object", "TRAINING", 15, 1000, 16,
                      f"T{i:05d}", "poll", t + (i / n) * interval, t, t, t))
        attempts.append((attempt_id, "lora", lora_id, 1, provider_name, ref, "running", 0.1, 0, 0, t, t, t))
    async with gw.db.tx() as conn:
        await conn.executemany(
            """INSERT INTO loras (id, team_id, user_id, key_id, name, subject_kind, status, image_count, steps,
                 lora_rank, trigger_word, stage, next_run_at, created_at, started_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", loras)
        await conn.executemany(
            """INSERT INTO attempts (id, owner_kind, owner_id, seq, provider, provider_ref, state, progress,
                 retryable, polls, created_at, submitted_at, progressed_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", attempts)


# --------------------------------------------------------------------------- the benchmark


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``engine`` settings: a fixed poll interval, and trainings never declared stuck during the run."""
    return {"min_poll_interval_s": args.interval, "max_poll_interval_s": args.interval,
            "poll_interval_s": 0.5, "concurrency": args.concurrency,
            "training": {"stuck_after_s": 10**7, "deadline_s": 10**7,
                         "min_poll_interval_s": args.interval, "max_poll_interval_s": args.interval}}


def gateway_settings(args: argparse.Namespace, tmp: Path, fake_url: str | None, database_url: str | None) -> Any:
    if fake_url is None:
        name = "counting"
        providers: dict[str, Any] = {name: {"training_seconds": args.interval}}
    else:
        name = "wavespeed"
        providers = {name: {"api_key": FAKE_API_KEY, "base_url": fake_url}}
    return name, settings_from_mapping({
        "data_dir": str(tmp / "data"),
        **({"database": {"url": database_url, "pool_size": 4}} if database_url else {}),
        "providers": providers,
        "routing": {"training": {"providers": [name]}, "inference": {"providers": [name]}},
        "engine": engine_settings(args),
    }, env={})


def plugins(fake_url: str | None) -> Any:
    return make_plugin_manager(load_entrypoints=False, extra=[Plugin()] if fake_url is None else [])


async def seed_all(args: argparse.Namespace, tmp: Path, fake_url: str | None, database_url: str | None) -> float:
    name, settings = gateway_settings(args, tmp, fake_url, database_url)
    async with open_gateway(settings, pm=plugins(fake_url)) as gw:
        provider = gw.providers[name]
        t0 = time.perf_counter()
        if fake_url is None:

            def save_job(i: int, ref: str, attempt_id: str, t: float) -> None:
                provider._save(sandbox._TrainingJob(
                    ref=ref, attempt_id=attempt_id, submitted_at=t, steps=1000, rank=16,
                    trigger_word=f"W{i:04d}"[:5], image_count=15, queue_seconds=0,
                    training_seconds=10**6, outcome="succeed"))

            await seed(gw, args.trainings, args.interval, name, lambda i, a: sandbox._ref("t", a), save_job)
        else:
            await seed(gw, args.trainings, args.interval, name, lambda i, a: fake_ref(i))
        return time.perf_counter() - t0


async def replica(args: argparse.Namespace, tmp: Path, fake_url: str | None, database_url: str | None,
                  start_at: float, probe: Any = None) -> dict[str, Any]:
    """One engine process over the window, which starts at the wall-clock time ``start_at`` in
    every replica: its CPU and the status calls it answered (sandbox), plus, in the main
    process, what ``probe()`` read at the window's start and end (``probe_0``, ``probe_1``)."""
    configure_logging("console", "warning")
    _, settings = gateway_settings(args, tmp, fake_url, database_url)
    out: dict[str, Any] = {}
    async with open_gateway(settings, pm=plugins(fake_url)) as gw:
        engine = Engine(gw)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.sleep(max(0.0, start_at - time.time()))
            c0 = CountingSandbox.status_calls
            if probe is not None:
                out["probe_0"] = await probe()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await anyio.sleep(args.window)
            cpu1, wall1 = time.process_time(), time.perf_counter()
            c1 = CountingSandbox.status_calls
            if probe is not None:
                out["probe_1"] = await probe()
            tg.cancel_scope.cancel()
    return {**out, "calls": c1 - c0, "cpu": cpu1 - cpu0, "wall": wall1 - wall0}


def postgres_cpu() -> float:
    """User + system CPU of every PostgreSQL server process on this machine (the benchmark's
    own server: nothing else runs one here)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("postgres", "postmaster"):
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


async def main_async(args: argparse.Namespace, tmp: Path, fake: FakeVendor | None,
                     database_url: str | None) -> dict[str, Any]:
    configure_logging("console", "warning")
    fake_url = fake.base_url if fake else None
    seeded_s = await seed_all(args, tmp, fake_url, database_url)
    print(f"seeded {args.trainings} trainings in {seeded_s:.1f} s; poll interval {args.interval:g} s, "
          f"window {args.window:g} s after {args.warmup:g} s; {args.replicas} engine process(es) on "
          f"{'PostgreSQL' if database_url else 'SQLite'}", flush=True)
    children = []
    spec = tmp / "replica.json"
    # every replica's window starts at one moment, after the children have started and warmed up
    start_at = time.time() + args.warmup + (5.0 if args.replicas > 1 else 0.0)
    spec.write_text(json.dumps({"args": vars(args), "tmp": str(tmp), "fake_url": fake_url,
                                "database_url": database_url, "start_at": start_at}))
    for _ in range(args.replicas - 1):
        children.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_replica", str(spec)],
                                         stdout=subprocess.PIPE, text=True))
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:

        async def probe() -> dict[str, Any]:
            got: dict[str, Any] = {"db_cpu": postgres_cpu() if database_url else 0.0,
                                   "fake_cpu": fake.cpu_seconds() if fake else 0.0}
            if fake is not None:
                got["fake"] = (await client.get(fake.base_url + STATS_PATH)).json()
            return got

        mine = await replica(args, tmp, fake_url, database_url, start_at, probe=probe)
    others = []
    for child in children:
        out, _ = child.communicate(timeout=args.warmup + args.window + 120)
        line = [x for x in out.splitlines() if x.startswith("REPLICA ")]
        if child.returncode != 0 or not line:
            raise RuntimeError(f"an engine replica failed (exit {child.returncode}):\n{out[-2000:]}")
        others.append(json.loads(line[-1][len("REPLICA "):]))
    replicas = [mine, *others]
    p0, p1 = mine["probe_0"], mine["probe_1"]
    if fake is None:
        calls = sum(r["calls"] for r in replicas)
    else:
        calls = p1["fake"]["result"] - p0["fake"]["result"]
    res: dict[str, Any] = {"calls": calls, "cpu": mine["cpu"], "wall": mine["wall"],
                           "fake_cpu": p1["fake_cpu"] - p0["fake_cpu"], "db_cpu": p1["db_cpu"] - p0["db_cpu"],
                           "cpu_all": sum(r["cpu"] for r in replicas),
                           "replica_cpu": [r["cpu"] / r["wall"] * 100 for r in replicas]}
    if fake is not None:
        res["other"] = p1["fake"]["other"] - p0["fake"]["other"]
        res["non_200"] = p1["fake"]["non_200"] - p0["fake"]["non_200"]
    return res


def run(args: argparse.Namespace) -> int:
    with temp_dir("bench-poller-") as tmp:
        if args.provider == "wavespeed":
            fake = FakeVendor("fake-wavespeed", [sys.executable, str(Path(__file__).resolve()), "--_serve-fake",
                                                 "--trainings", str(args.trainings)], ready_word="seeded")
            with fake:
                fake.start(timeout=60)
                print(f"provider: wavespeed (the real WaveSpeedAdapter over HTTP to FakeWaveSpeed at {fake.base_url}, "
                      f"a child process; status requests counted there)", flush=True)
                with postgres_database(args.database) as url:
                    res = asyncio.run(main_async(args, tmp, fake, url))
                fake_alive, fake_log = fake.alive(), fake.tail(20)
        else:
            print("provider: sandbox (in this process; status calls counted by a subclass)", flush=True)
            with postgres_database(args.database) as url:
                res = asyncio.run(main_async(args, tmp, None, url))
            fake_alive, fake_log = True, ""

    calls, cpu, wall = res["calls"], res["cpu"], res["wall"]
    per_min = calls / wall * 60
    bound = args.trainings / args.interval * 60
    per_training = calls / args.trainings / (wall / args.interval)
    share = cpu / wall * 100
    print(f"mode              --provider {args.provider}")
    print(f"status requests   {per_min:,.0f} per minute  (bound: one per training per interval = {bound:,.0f})")
    print(f"per training      {per_training:.2f} requests per interval   (goal <= {RATE_GOAL:g}) -> "
          f"{verdict(per_training <= RATE_GOAL)}")
    print(f"database          {args.database}, {args.replicas} engine process(es)")
    print(f"engine CPU        {share:.1f}% of one core   (goal < {CPU_GOAL:g}%) -> {verdict(share < CPU_GOAL)}"
          + ("" if args.replicas == 1 else "   (this replica)"))
    if args.replicas > 1:
        print("CPU per replica   " + ", ".join(f"{x:.1f}%" for x in res["replica_cpu"]) + " of one core each")
    if args.database == "postgresql":
        print(f"PostgreSQL CPU    {res['db_cpu'] / wall * 100:.1f}% of one core (the server's processes; not in the engine's figure)")
    print(f"CPU per poll      {res['cpu_all'] / max(calls, 1) * 1e3:.2f} ms" + ("" if args.replicas == 1 else
                                                                               "   (all replicas)"))
    problems = []
    if args.provider == "wavespeed":
        print(f"fake vendor CPU   {res['fake_cpu'] / wall * 100:.1f}% of one core (its own process; not in the engine's "
              f"figure); other requests {res['other']}, non-200 answers {res['non_200']}")
        if res["non_200"]:
            problems.append(f"the fake answered {res['non_200']} requests with a non-200 status")
        if not fake_alive:
            problems.append(f"the fake WaveSpeed exited during the run:\n{fake_log}")
    if calls == 0:
        problems.append("no status request was made in the window")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    ok = per_training <= RATE_GOAL and share < CPU_GOAL
    return 0 if ok or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--provider", choices=["sandbox", "wavespeed"], default="sandbox",
                   help="sandbox in-process (default) or the WaveSpeed adapter over HTTP to a fake vendor")
    p.add_argument("--trainings", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=30.0, help="poll interval (min = max) in seconds")
    p.add_argument("--window", type=float, default=90.0, help="measurement window in seconds")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=EngineSettings().concurrency,
                   help=f"engine.concurrency (default: the engine's own, {EngineSettings().concurrency})")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                   help="the SQLite file (default) or a throwaway PostgreSQL server")
    p.add_argument("--replicas", type=int, default=1, help="engine processes on the one database (default 1)")
    p.add_argument("--_serve-fake", dest="serve_fake", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_replica", dest="replica_spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_fake:
        serve_fake(args.trainings)
        return 0
    if args.replica_spec:
        spec = json.loads(Path(args.replica_spec).read_text())
        res = asyncio.run(replica(argparse.Namespace(**spec["args"]), Path(spec["tmp"]), spec["fake_url"],
                                  spec["database_url"], spec["start_at"]))
        print("REPLICA " + json.dumps(res), flush=True)
        return 0
    if args.replicas > 1 and args.database == "sqlite":
        p.error("--replicas > 1 needs --database postgresql (the claims are what share the work)")
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
