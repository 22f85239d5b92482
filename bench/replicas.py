"""Benchmark: PostgreSQL vs SQLite, one and two replicas: ``GET /v2/loras/{id}`` throughput at 64
connections, and claims per second.

    python bench/replicas.py [--rounds 3] [--duration 8] [--connections 64] [--claims 3000]

**GET.** Starts four ``lora-gateway serve`` processes in the default configuration (the engine
in the API process): two on one SQLite file (one data dir) and two on one PostgreSQL database
(a throwaway server from ``tests/pgserver.py``, on a RAM disk where there is one, fsync off,
so the figures are of the gateway, not of a disk). Each backend gets one LoRA, fetched while it
is TRAINING (an hour-long sandbox training in flight: the engines are in their steady state).
Four targets are loaded with ``wrk`` (else the httpx load generator), interleaved over
``--rounds``: ``sqlite x1`` and ``postgresql x1`` (all connections to the first replica), and
``sqlite x2`` and ``postgresql x2`` (half the connections to each replica, two load generators
at once, the requests added up). All of it, the load generator included, shares this machine's
cores: on a 2-core machine a second replica adds processes, not cores, so ``x2`` shows what
the database lets through, not what two machines would.

**Claims.** In this process, for each backend: ``--claims`` LoRA rows due now; 8 workers (tasks,
with a connection each on PostgreSQL) claim them 16 at a time (``queue.claim_due``, the
engine's own claim) and hand each row back far in the future (``queue.update_row``, one
transaction per row, as a step does), until every row was claimed. Prints claims per second
and the rows claimed more than once (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _loadgen  # noqa: E402
from bench._common import (  # noqa: E402
    create_small_lora, median, postgres_database, run_main, start_gateway, table, temp_dir, wait_lora,
)

WORKERS = 8
BATCH = 16


# --------------------------------------------------------------------------- GET /v2/loras/{id}


def load(targets: list[tuple[str, str]], connections: int, duration: float, loadgen: str) -> dict[str, Any]:
    """Load every (url, key) at once with ``connections`` split between them; the sum."""
    share = max(1, connections // len(targets))

    def one(t: tuple[str, str]) -> dict[str, Any]:
        url, key = t
        return (_loadgen.run_wrk if loadgen == "wrk" else _loadgen.run_httpx)(url, key, share, duration)

    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        parts = list(pool.map(one, targets))
    return {"rps": sum(p["rps"] for p in parts), "p50": max(p["p50"] for p in parts),
            "p99": max(p["p99"] for p in parts), "errors": sum(p["non2xx"] + p["socket_errors"] for p in parts)}


def get_benchmark(args: argparse.Namespace, tmp: Path, pg_url: str) -> dict[str, list[dict[str, Any]]]:
    targets: dict[str, list[tuple[str, str]]] = {}
    with start_gateway(tmp / "s1", name="sqlite-1") as s1, \
            start_gateway(tmp / "p1", name="pg-1", database={"url": pg_url}) as p1:
        lora_s, lora_p = create_small_lora(s1, 15), create_small_lora(p1, 15)
        wait_lora(s1, lora_s["id"], ["TRAINING"])
        wait_lora(p1, lora_p["id"], ["TRAINING"])
        with start_gateway(tmp / "s2", name="sqlite-2", key=s1.key, data_dir=str(tmp / "s1" / "data")) as s2, \
                start_gateway(tmp / "p2", name="pg-2", key=p1.key, database={"url": pg_url}) as p2:
            path_s, path_p = f"/v2/loras/{lora_s['id']}", f"/v2/loras/{lora_p['id']}"
            targets = {
                "sqlite x1": [(s1.base_url + path_s, s1.key)],
                "sqlite x2": [(s1.base_url + path_s, s1.key), (s2.base_url + path_s, s1.key)],
                "postgresql x1": [(p1.base_url + path_p, p1.key)],
                "postgresql x2": [(p1.base_url + path_p, p1.key), (p2.base_url + path_p, p1.key)],
            }
            for name, t in targets.items():  # warm-up; and every replica answers
                res = load(t, args.connections, 2, args.loadgen)
                if res["errors"]:
                    raise RuntimeError(f"{name}: {res['errors']} errors in the warm-up")
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for i in range(args.rounds):
                order = list(targets) if i % 2 == 0 else list(reversed(targets))
                for name in order:
                    res = load(targets[name], args.connections, args.duration, args.loadgen)
                    results[name].append(res)
                    print(f"  round {i + 1} {name:14s} {res['rps']:7.0f} req/s  p50 {res['p50']:6.1f} ms  "
                          f"p99 {res['p99']:6.1f} ms  errors {res['errors']}", flush=True)
    return results


# --------------------------------------------------------------------------- claims per second


async def claims_benchmark(settings: Any, n: int) -> tuple[float, int]:
    from gateway.context import open_gateway
    from gateway.services import accounts
    from gateway.store import queue as queue_store
    from gateway.timeutil import new_id, now
    from plugins.manager import make_plugin_manager

    async with open_gateway(settings, pm=make_plugin_manager(load_entrypoints=False)) as gw:
        _, new = await accounts.create_team(gw.db, name="claims", credits=0, max_concurrent_trainings=n)
        async with gw.db.read() as conn:
            (team_id, user_id) = list(await conn.execute_fetchall(
                "SELECT team_id, user_id FROM api_keys WHERE id = ?", (new.record.id,)))[0]
        t = now() - 1
        rows = [(new_id(), team_id, user_id, new.record.id, f"c{i}", "object", "TRAINING", 15, 1000, 16,
                 f"C{i:05d}", "poll", t, t, t, t) for i in range(n)]
        async with gw.db.tx() as conn:
            await conn.executemany(
                """INSERT INTO loras (id, team_id, user_id, key_id, name, subject_kind, status, image_count, steps,
                     lora_rank, trigger_word, stage, next_run_at, created_at, started_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", rows)
        claimed: list[str] = []
        far = now() + 10**7

        async def worker(w: int) -> None:
            owner = f"bench-{w}"
            while True:
                async with gw.db.tx() as conn:
                    batch = await queue_store.claim_due(conn, "lora", owner=owner, lease_s=60, limit=BATCH)
                if not batch:
                    return
                for row in batch:
                    claimed.append(row.id)
                    async with gw.db.tx() as conn:
                        await queue_store.update_row(conn, "lora", row.id, lease=owner, next_run_at=far,
                                                     lease_owner=None, lease_expires=None)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(WORKERS)))
        elapsed = time.perf_counter() - t0
    return len(claimed) / elapsed, len(claimed) - len(set(claimed))


def run(args: argparse.Namespace) -> int:
    from gateway.config import settings_from_mapping

    from gateway.logging import configure_logging

    configure_logging("console", "warning")
    args.loadgen = _loadgen.choose(args.loadgen)
    with temp_dir("bench-replicas-") as tmp, postgres_database() as pg_url:
        assert pg_url is not None
        print(f"load generator: {args.loadgen}, {args.connections} connections in all, {args.duration:g}s per run, "
              f"{args.rounds} rounds interleaved; default configuration (engine in the API process)", flush=True)
        results = get_benchmark(args, tmp, pg_url) if args.rounds else {}
        claims = {}
        for backend in ("sqlite", "postgresql"):
            url = None
            if backend == "postgresql":
                url = pg_url.rsplit("/", 1)[0] + "/claims"
                import asyncpg

                async def make() -> None:
                    conn = await asyncpg.connect(pg_url)
                    await conn.execute("CREATE DATABASE claims")
                    await conn.close()

                asyncio.run(make())
            cfg = {"data_dir": str(tmp / f"claims-{backend}"), "logging": {"level": "warning"},
                   **({"database": {"url": url, "pool_size": WORKERS + 2}} if url else {})}
            rate, dupes = asyncio.run(claims_benchmark(settings_from_mapping(cfg, env={}), args.claims))
            claims[backend] = (rate, dupes)
            print(f"  claims {backend:10s} {rate:7.0f} claims/s  claimed twice {dupes}", flush=True)

    if results:
        rows = [[name, len(runs), f"{median([x['rps'] for x in runs]):.0f}",
                 f"{min(x['rps'] for x in runs):.0f}-{max(x['rps'] for x in runs):.0f}",
                 f"{median([x['p50'] for x in runs]):.1f}", f"{median([x['p99'] for x in runs]):.1f}",
                 sum(x["errors"] for x in runs)] for name, runs in results.items()]
        print()
        print(f"GET /v2/loras/{{id}}, {args.connections} connections, default configuration, load generator {args.loadgen}")
        print(table(rows, ["target", "runs", "median req/s", "range", "p50 ms", "p99 ms", "errors"]))
        s1 = median([x["rps"] for x in results["sqlite x1"]])
        for name in ("sqlite x2", "postgresql x1", "postgresql x2"):
            print(f"  {name} / sqlite x1: {median([x['rps'] for x in results[name]]) / s1:.2f}")
    print()
    print(f"claims ({args.claims} due rows, {WORKERS} workers, {BATCH} per claim, one transaction per step)")
    print(table([[b, f"{r:.0f}", d] for b, (r, d) in claims.items()], ["backend", "claims/s", "claimed twice"]))
    problems = [f"{b}: {d} rows claimed twice" for b, (r, d) in claims.items() if d]
    problems += [f"{name}: {sum(x['errors'] for x in runs)} errors" for name, runs in results.items()
                 if sum(x["errors"] for x in runs)]
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--rounds", type=int, default=3, help="measured GET runs per target, interleaved (0: claims only)")
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto")
    p.add_argument("--claims", type=int, default=3000, help="due rows for the claims benchmark")
    return run_main(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
