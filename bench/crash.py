"""Crash script: many LoRAs and jobs through a real gateway process that is SIGKILLed at random
moments and restarted; prints the objects, kills and the count of anomalies (goal: 0).

    python bench/crash.py --loras 100 --jobs-per-lora 1 --kills 50

Objects = LoRAs + jobs (the default, 100 + 100, is the issue's "200 objects, 50 kills").

    python bench/crash.py --database postgresql --replicas 3

runs three replicas (``serve`` processes, each with its engine) on one throwaway PostgreSQL
database and one data dir; each kill takes a random replica, and the clients move on to the
next replica while one is down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import postgres_database  # noqa: E402
from tests.crash_harness import HarnessConfig, run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loras", type=int, default=100)
    p.add_argument("--jobs-per-lora", type=int, default=1)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16, help="LoRAs driven at once")
    p.add_argument("--every", type=float, nargs=2, default=(0.5, 2.5), metavar=("MIN", "MAX"),
                   help="seconds between kills (uniform)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    p.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--replicas", type=int, default=1, help="serve processes on the one database")
    args = p.parse_args()
    if args.replicas > 1 and args.database == "sqlite":
        p.error("--replicas > 1 needs --database postgresql")
    workdir = Path(tempfile.mkdtemp(prefix="lora-crash-"))
    t0 = time.monotonic()
    with postgres_database(args.database) as url:
        hc = HarnessConfig(workdir=workdir, loras=args.loras, jobs_per_lora=args.jobs_per_lora, kills=args.kills,
                           seed=args.seed, concurrency=args.concurrency, kill_every=tuple(args.every),
                           timeout_s=3600, replicas=args.replicas, database_url=url)
        report = asyncio.run(run(hc))
    print(f"objects     {report.loras + report.jobs}  ({report.loras} LoRAs, {report.jobs} jobs)")
    print(f"replicas    {args.replicas} on {args.database}")
    print(f"kills       {report.kills}  (SIGKILL, then restart)")
    print(f"attempts    {report.attempts}  provider attempts recorded")
    print(f"resubmits   {report.resubmissions}  attempts sent to the sandbox twice")
    print(f"webhooks    {report.webhook_deliveries} deliveries, {report.webhook_duplicates} received more than once (de-duplicated by id)")
    print(f"retries     {report.client_retries}  client requests retried across restarts")
    print(f"anomalies   {len(report.anomalies)}")
    for line in report.anomalies[:20]:
        print("  -", line)
    print(f"wall        {time.monotonic() - t0:.0f} s   work dir: {workdir if args.keep else '(removed)'}")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
