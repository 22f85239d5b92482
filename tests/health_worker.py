"""A separate process using the shared breaker on a gateway's database (tests/test_health.py).

DB is a SQLite file or a postgresql:// URL.

    python -m tests.health_worker DB fail INSTANCE OPERATION N      # N provider-side failures
    python -m tests.health_worker DB succeed INSTANCE OPERATION     # one success
    python -m tests.health_worker DB state INSTANCE OPERATION       # prints the state
    python -m tests.health_worker DB probe INSTANCE OPERATION AT    # at wall time AT, claim the probe

Prints one JSON line. ``--cooldown`` sets the breaker's cooldown (default 30)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

from gateway.config import BreakerSettings
from gateway.health import ProviderHealth
from gateway.store.sqlite import SqliteDatabase as Database


async def main(args: argparse.Namespace) -> dict[str, object]:
    if args.db.startswith("postgresql://"):
        from gateway.store.postgres import PostgresDatabase

        db = PostgresDatabase(args.db, pool_size=2)
    else:
        db = Database(Path(args.db))
    await db.open()
    try:
        health = ProviderHealth(db, BreakerSettings(failures=args.threshold, cooldown_s=args.cooldown))
        if args.action == "fail":
            for _ in range(int(args.extra)):
                await health.record(args.instance, args.operation, ok=False)
        elif args.action == "succeed":
            await health.rows()
            await health.record(args.instance, args.operation, ok=True)
        elif args.action == "probe":
            while time.time() < float(args.extra):  # all racers start together
                await asyncio.sleep(0.001)
            won = await health.claim_probe(args.instance, args.operation, str(uuid.uuid4()))
            return {"won": won, "state": await health.state(args.instance, args.operation)}
        return {"state": await health.state(args.instance, args.operation)}
    finally:
        await db.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("action", choices=["fail", "succeed", "state", "probe"])
    p.add_argument("instance")
    p.add_argument("operation")
    p.add_argument("extra", nargs="?")
    p.add_argument("--cooldown", type=float, default=30.0)
    p.add_argument("--threshold", type=int, default=5)
    print(json.dumps(asyncio.run(main(p.parse_args()))), flush=True)
