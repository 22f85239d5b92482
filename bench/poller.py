"""Poller cost with many trainings in flight on the sandbox provider.

Seeds N LoRAs that are TRAINING at the sandbox (their jobs take hours, so every poll answers
"running"), runs the engine in this process with a fixed poll interval, and measures over a
window: status requests sent to the provider per minute (the goal: at most one per training
per interval, i.e. N / interval * 60) and the process's CPU time as a share of one core
(goal: under 25% at a 30 s interval).

    python bench/poller.py --trainings 10000 --interval 30 --window 90
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio  # noqa: E402

from gateway.config import settings_from_mapping  # noqa: E402
from gateway.context import open_gateway  # noqa: E402
from gateway.engine.worker import Engine  # noqa: E402
from gateway.logging import configure_logging  # noqa: E402
from gateway.services import accounts  # noqa: E402
from gateway.timeutil import new_id, now  # noqa: E402
from plugins.hookspecs import hookimpl  # noqa: E402
from plugins.manager import make_plugin_manager  # noqa: E402
from providers import sandbox  # noqa: E402


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


async def seed(gw, provider: CountingSandbox, n: int) -> None:
    _, new = await accounts.create_team(gw.db, name="bench", credits=0, max_concurrent_trainings=n)
    async with gw.db.read() as conn:
        (team_id, user_id) = list(await conn.execute_fetchall("SELECT team_id, user_id FROM api_keys"))[0]
    t = now()
    loras, attempts = [], []
    for i in range(n):
        lora_id, attempt_id = new_id(), new_id()
        ref = sandbox._ref("t", attempt_id)
        job = sandbox._TrainingJob(ref=ref, attempt_id=attempt_id, submitted_at=t, steps=1000, rank=16,
                                   trigger_word=f"W{i:04d}"[:5], image_count=15, queue_seconds=0,
                                   training_seconds=10**6, outcome="succeed")
        provider._save(job)
        # spread the first polls over one interval, as they would be in a steady state
        loras.append((lora_id, team_id, user_id, new.record.id, f"bench {i}", "object", "TRAINING", 15, 1000, 16,
                      f"T{i:05d}", "poll", t + (i / n) * provider.config.training_seconds, t, t, t))
        attempts.append((attempt_id, "lora", lora_id, 1, "counting", ref, "running", 0.1, 0, 0, t, t, t))
    async with gw.db.tx() as conn:
        await conn.executemany(
            """INSERT INTO loras (id, team_id, user_id, key_id, name, subject_kind, status, image_count, steps,
                 lora_rank, trigger_word, stage, next_run_at, created_at, started_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", loras)
        await conn.executemany(
            """INSERT INTO attempts (id, owner_kind, owner_id, seq, provider, provider_ref, state, progress,
                 retryable, polls, created_at, submitted_at, progressed_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", attempts)


async def main_async(args: argparse.Namespace) -> None:
    configure_logging("console", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="lora-poller-"))
    settings = settings_from_mapping({
        "data_dir": str(tmp),
        "providers": {"counting": {"training_seconds": args.interval}},
        "routing": {"training": {"providers": ["counting"]}, "inference": {"providers": ["counting"]}},
        "engine": {"min_poll_interval_s": args.interval, "max_poll_interval_s": args.interval,
                   "poll_interval_s": 0.5, "concurrency": args.concurrency, "stuck_after_s": 10**7},
    }, env={})
    pm = make_plugin_manager(load_entrypoints=False, extra=[Plugin()])
    async with open_gateway(settings, pm=pm) as gw:
        provider = gw.providers["counting"]
        t0 = time.perf_counter()
        await seed(gw, provider, args.trainings)
        print(f"seeded {args.trainings} trainings in {time.perf_counter() - t0:.1f} s; "
              f"poll interval {args.interval:g} s, window {args.window:g} s")
        engine = Engine(gw)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await anyio.sleep(args.warmup)
            calls0, cpu0, wall0 = CountingSandbox.status_calls, time.process_time(), time.perf_counter()
            await anyio.sleep(args.window)
            calls, cpu, wall = (CountingSandbox.status_calls - calls0, time.process_time() - cpu0,
                                time.perf_counter() - wall0)
            tg.cancel_scope.cancel()
    per_min = calls / wall * 60
    bound = args.trainings / args.interval * 60
    print(f"status requests   {per_min:,.0f} per minute  (bound: one per training per interval = {bound:,.0f})")
    print(f"per training      {calls / args.trainings / (wall / args.interval):.2f} requests per interval")
    print(f"engine CPU        {cpu / wall * 100:.1f}% of one core  (goal < 25%)")
    print(f"CPU per poll      {cpu / max(calls, 1) * 1e3:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainings", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=30.0, help="poll interval (min = max) in seconds")
    p.add_argument("--window", type=float, default=90.0, help="measurement window in seconds")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
