"""Several processes on one database: ``lora-gateway serve`` with ``run_workers: false`` answers
the API while two ``lora-gateway worker`` processes do the work, on one SQLite file, with the
sandbox failing at random; one worker is SIGKILLed mid-way. Afterwards, from the database, the
sandbox's own files and a webhook receiver:

- every LoRA and job ended in the terminal state its sandbox attempts call for, exactly once;
- the ledger holds exactly the charges and refunds those states owe, each once;
- the sandbox was never sent one attempt twice, and holds no job the gateway does not know;
- each terminal webhook arrived under one delivery id;
- the API process and the surviving worker were never disturbed (they stop cleanly on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.crash_harness import ROOT, _free_port
from tests.images import image_set, multipart_files
from tests.receiver import Receiver, serving

LORAS, JOBS = 50, 100
CREDITS = 1_000_000


def _config(tmp: Path) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(tmp / "data"),
        "server": {"run_workers": False},
        "providers": {"sandbox": {"training_seconds": 0.8, "queue_seconds": 0.1, "generation_seconds": 0.2,
                                  "training_failure_rate": 0.3, "generation_failure_rate": 0.3, "seed": 11}},
        "engine": {"poll_interval_s": 0.1, "min_poll_interval_s": 0.1, "max_poll_interval_s": 0.5, "lease_s": 2,
                   "retry_backoff_s": 0.1, "crash_backoff_s": 0.2, "concurrency": 8},
        "webhooks": {"allow_hosts": ["127.0.0.1"], "base_delay_s": 0.2, "max_delay_s": 1.0, "max_attempts": 50,
                     "timeout_s": 5},
        "teams": {"bootstrap_credits": CREDITS, "max_concurrent_trainings": 1000, "rate_limit_per_minute": 0},
        "logging": {"format": "json", "level": "info"},
    }))
    return path


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _wait_terminal(client: httpx.AsyncClient, path: str, done: set[str], deadline: float) -> dict:
    while True:
        body = (await client.get(path)).json()
        if body["status"] in done or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.2)


async def test_api_process_and_two_workers_with_a_kill(tmp_path: Path) -> None:
    cfg, port = _config(tmp_path), _free_port()
    api = _spawn(["serve", "--config", str(cfg), "--port", str(port)], tmp_path / "api.log")
    workers = [_spawn(["worker", "--config", str(cfg)], tmp_path / f"worker-{i}.log") for i in range(2)]
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(5)
    try:
        async with serving(Receiver()) as rx, httpx.AsyncClient(base_url=base, timeout=30) as anon:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await anon.get("/readyz")).status_code == 200:  # an engine beats somewhere
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-2000:]
                await asyncio.sleep(0.1)
            text = (tmp_path / "api.log").read_text()
            key = next(line.strip() for line in text.splitlines() if line.strip().startswith("afk_"))
            client = httpx.AsyncClient(base_url=base, timeout=30, headers={"X-API-Key": key})
            deadline = time.monotonic() + 180
            lora_ids: list[str] = []

            async def create(i: int) -> None:
                r = await client.post("/v2/loras", files=multipart_files(image_set(15, size=(64, 48))),
                                      data={"name": f"s{i}", "subjectKind": "object", "webhookUrl": f"{rx.base_url}/l"})
                assert r.status_code == 202, r.text
                lora_ids.append(r.json()["id"])

            await asyncio.gather(*(create(i) for i in range(LORAS)))
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            workers[0].send_signal(signal.SIGKILL)  # one worker dies mid-way; its leases expire
            workers[0].wait()
            loras = await asyncio.gather(*(_wait_terminal(client, f"/v2/loras/{i}", {"READY", "FAILED"}, deadline)
                                           for i in lora_ids))
            ready = [lo["id"] for lo in loras if lo["status"] == "READY"]
            assert ready, "no LoRA trained"
            job_ids: list[str] = []
            for n in range(JOBS):
                r = await client.post("/v2/images/generate", json={
                    "prompt": f"p{n}", "model": "flux-lora", "webhookUrl": f"{rx.base_url}/j",
                    "fluxLoraParams": {"loraId": ready[n % len(ready)], "num_outputs": 1 + n % 2}})
                assert r.status_code == 202, r.text
                job_ids.append(r.json()["jobId"])
            jobs = await asyncio.gather(*(_wait_terminal(client, f"/v2/jobs/{j}", {"COMPLETED", "FAILED"}, deadline)
                                          for j in job_ids))
            want_hooks = {(o["id"], "completed" if o["status"] == "READY" else "failed") for o in loras}
            want_hooks |= {(j["id"], "completed" if j["status"] == "COMPLETED" else "failed") for j in jobs}
            while time.monotonic() < deadline:
                got = {(json.loads(r.body).get("id") or json.loads(r.body).get("jobId"), json.loads(r.body)["event"])
                       for r in rx.requests}
                if want_hooks <= got:
                    break
                await asyncio.sleep(0.2)
            await client.aclose()
            received = list(rx.requests)
        assert api.poll() is None and workers[1].poll() is None  # nobody disturbed them
        workers[1].send_signal(signal.SIGTERM)
        assert workers[1].wait(timeout=20) == 0  # a clean stop
        api.send_signal(signal.SIGTERM)  # uvicorn stops gracefully, then re-raises the signal it caught
        assert api.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        for proc in (api, *workers):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert all(lo["status"] in ("READY", "FAILED") for lo in loras), [lo["status"] for lo in loras]
    assert all(j["status"] in ("COMPLETED", "FAILED") for j in jobs), [j["status"] for j in jobs]
    data = tmp_path / "data"
    db = sqlite3.connect(f"file:{data / 'gateway.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    sandbox_jobs = {}
    for folder in ("trainings", "generations"):
        for p in (data / "sandbox" / folder).glob("*.json"):
            j = json.loads(p.read_bytes())
            sandbox_jobs[j["attempt_id"]] = j
    problems: list[str] = []

    # the terminal states agree with what the sandbox did with each attempt
    for kind, rows, ok_status in (("lora", loras, "READY"), ("job", jobs, "COMPLETED")):
        for row in rows:
            tries = db.execute("SELECT * FROM attempts WHERE owner_kind = ? AND owner_id = ? ORDER BY seq",
                               (kind, row["id"])).fetchall()
            sent = [t for t in tries if t["id"] in sandbox_jobs]
            succeeded = [t for t in sent if (sandbox_jobs[t["id"]].get("outcome", "succeed") == "succeed"
                                             and not sandbox_jobs[t["id"]].get("error"))]
            if row["status"] == ok_status and not succeeded:
                problems.append(f"{kind} {row['id']} is {row['status']} but no attempt succeeded at the sandbox")
            if row["status"] != ok_status and succeeded and succeeded[-1]["state"] == "succeeded":
                problems.append(f"{kind} {row['id']} is {row['status']} though attempt {succeeded[-1]['seq']} succeeded")
            if len(tries) > 2:
                problems.append(f"{kind} {row['id']} has {len(tries)} attempts (one provider: at most 2)")

    # the ledger: exactly what each terminal state owes, each once
    expected: dict[tuple[str, str], int] = {}
    for lo in loras:
        expected[(lo["id"], "lora_create")] = -2
        charged = db.execute("SELECT 1 FROM ledger WHERE ref = ? AND kind = 'lora_training'", (lo["id"],)).fetchone()
        if charged:
            expected[(lo["id"], "lora_training")] = -255
        if lo["status"] == "FAILED":
            if charged:
                expected[(lo["id"], "lora_training_refund")] = 255
            if lo["startedAt"] is None:
                expected[(lo["id"], "lora_create_refund")] = 2
        elif not charged:
            problems.append(f"lora {lo['id']} is READY but its training was never charged")
    for j in jobs:
        row = db.execute("SELECT input FROM jobs WHERE id = ?", (j["id"],)).fetchone()
        n = json.loads(row["input"])["fluxLoraParams"].get("num_outputs", 1)
        expected[(j["id"], "job")] = -2 * n
        if j["status"] == "FAILED":
            expected[(j["id"], "job_refund")] = 2 * n
    actual = {(r["ref"], r["kind"]): r["amount"] for r in db.execute("SELECT * FROM ledger WHERE kind != 'grant'")}
    if actual != expected:
        diff = {k: (actual.get(k), expected.get(k)) for k in set(actual) | set(expected) if actual.get(k) != expected.get(k)}
        problems.append(f"ledger differs (actual, expected): {list(diff.items())[:5]}")
    (balance,) = db.execute("SELECT credits FROM teams").fetchone()
    if balance != CREDITS + sum(expected.values()):
        problems.append(f"balance {balance} != {CREDITS + sum(expected.values())}")

    # the vendor's view: nothing sent twice, nothing unknown to the gateway
    calls = [line.split(" ", 1) for line in (data / "sandbox" / "calls.log").read_text().splitlines()]
    problems += [f"attempt {a} was sent to the sandbox again" for kind, a in calls if kind.endswith("-again")]
    known = {r["id"] for r in db.execute("SELECT id FROM attempts")}
    problems += [f"the sandbox holds attempt {a}, unknown to the gateway" for a in set(sandbox_jobs) - known]

    # webhooks: each terminal event under one delivery id
    ids: dict[tuple[str, str], set[str]] = {}
    for req in received:
        body = json.loads(req.body)
        ids.setdefault((body.get("id") or body.get("jobId"), body["event"]), set()).add(req.headers["x-webhook-delivery"])
    problems += [f"no {ev} webhook for {oid}" for oid, ev in want_hooks if (oid, ev) not in ids]
    problems += [f"{ev} for {oid} arrived under {len(d)} delivery ids" for (oid, ev), d in ids.items() if len(d) != 1]
    db.close()
    assert problems == [], "\n".join(problems[:20])
    assert any(lo["status"] == "FAILED" for lo in loras) or any(j["status"] == "FAILED" for j in jobs)
