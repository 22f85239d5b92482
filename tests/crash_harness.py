"""Crash harness: the gateway as a real process (``lora-gateway serve``, uvicorn on 127.0.0.1),
driven with LoRAs and generation jobs on the sandbox provider while it is SIGKILLed at random
moments (during uploads, preparation, submission, training, artifact copy, webhook delivery)
and restarted. Afterwards it checks, from the database, the sandbox's own call log and a
webhook receiver:

- every LoRA is READY and every job COMPLETED, with its images in storage;
- the ledger holds exactly the rule's charges (2 + 255 per LoRA, 2 per image), each once;
- the sandbox holds exactly one job per attempt and was never sent the same attempt again;
- every terminal webhook arrived, signed, under one delivery id per event.

With ``replicas > 1`` and a PostgreSQL ``database_url``, several ``serve`` processes share one
database and one ``data_dir``; each client's requests go to one replica and move on to the next
when it is down, and each kill takes a random replica.

Used by ``tests/test_crash.py`` (small N), ``tests/test_replicas.py`` (three replicas on
PostgreSQL) and ``bench/crash.py`` (large N).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.images import image_set, multipart_files
from tests.receiver import Receiver, serving

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP_CREDITS = 10_000_000


@dataclass
class HarnessConfig:
    workdir: Path
    loras: int = 4
    jobs_per_lora: int = 2
    kills: int = 4
    seed: int = 1
    kill_every: tuple[float, float] = (0.4, 1.6)  # seconds between kills (uniform)
    concurrency: int = 8  # LoRAs driven at once
    timeout_s: float = 240.0
    replicas: int = 1
    database_url: str | None = None  # None: the SQLite file in data_dir


@dataclass
class Report:
    loras: int = 0
    jobs: int = 0
    kills: int = 0
    restarts: int = 0
    client_retries: int = 0
    attempts: int = 0
    resubmissions: int = 0
    webhook_deliveries: int = 0
    webhook_duplicates: int = 0  # the same delivery id received more than once (allowed)
    seconds: float = 0.0
    anomalies: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    def __init__(self, config: Path, port: int, log_dir: Path) -> None:
        self.config = config
        self.port = port
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.base = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.starts += 1
        out = (self.log_dir / f"stdout-{self.starts}.log").open("wb")
        err = (self.log_dir / f"stderr-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config), "--port", str(self.port)],
            stdout=out, stderr=err, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def first_key(self) -> str | None:
        text = (self.log_dir / "stdout-1.log").read_text(errors="replace")
        m = re.search(r"^\s+(afk_[A-Za-z0-9_-]+)\s*$", text, re.M)
        return m.group(1) if m else None

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.log_dir}")
                try:
                    if (await client.get(f"{self.base}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("gateway did not become ready")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until_ready(procs: list["GatewayProcess"], timeout: float = 90) -> None:
    """Block until every process answers ``/readyz`` (for synchronous tests and fixtures)."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    with httpx.Client(timeout=2) as client:
        while pending:
            for p in list(pending):
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {p.proc.returncode}; see {p.log_dir}")
                try:
                    if client.get(f"{p.base}/readyz").status_code == 200:
                        pending.remove(p)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateways not ready: {[p.log_dir for p in pending]}")
            time.sleep(0.1)


def _write_config(path: Path, data_dir: Path, database_url: str | None = None) -> None:
    path.write_text(yaml.safe_dump({
        "data_dir": str(data_dir),
        **({"database": {"url": database_url}} if database_url else {}),
        "providers": {"sandbox": {"training_seconds": 1.5, "queue_seconds": 0.3, "generation_seconds": 0.4}},
        "engine": {"poll_interval_s": 0.1, "min_poll_interval_s": 0.2, "max_poll_interval_s": 1.0,
                   "lease_s": 3, "crash_backoff_s": 0.5},
        "webhooks": {"allow_hosts": ["127.0.0.1"], "base_delay_s": 0.2, "max_delay_s": 1.0, "max_attempts": 50,
                     "timeout_s": 5},
        "teams": {"bootstrap_credits": BOOTSTRAP_CREDITS, "max_concurrent_trainings": 100000, "rate_limit_per_minute": 0},
        "logging": {"format": "json", "level": "info"},
    }))


class _Client:
    """Requests that survive the server dying under them: retried (same Idempotency-Key)
    until a server gives a definite answer; with several replicas, a failed request moves on
    to the next one."""

    def __init__(self, https: list[httpx.AsyncClient], report: Report, start: int = 0) -> None:
        self.https = https
        self.at = start % len(https)
        self.report = report

    @property
    def http(self) -> httpx.AsyncClient:
        return self.https[self.at]

    async def call(self, method: str, path: str, **kw) -> httpx.Response:
        while True:
            try:
                r = await self.http.request(method, path, **kw)
                if r.status_code < 500:
                    return r
            except httpx.HTTPError:
                pass
            self.report.client_retries += 1
            self.at = (self.at + 1) % len(self.https)
            await asyncio.sleep(0.2)

    async def poll(self, path: str, done: set[str], deadline: float) -> dict:
        while True:
            body = (await self.call("GET", path)).json()
            if body.get("status") in done or time.monotonic() > deadline:
                return body
            await asyncio.sleep(0.2)


async def _drive_one(i: int, client: _Client, hc: HarnessConfig, webhook: str, deadline: float, report: Report,
                     out: dict[str, list[str]]) -> None:
    images = image_set(15, size=(96, 72))
    r = await client.call(
        "POST", "/v2/loras", headers={"Idempotency-Key": f"lora-{i}"},
        data={"name": f"subject {i}", "subjectKind": "object", "webhookUrl": f"{webhook}/lora"},
        files=multipart_files(images),
    )
    if r.status_code != 202:
        report.anomalies.append(f"lora {i}: create answered {r.status_code} {r.text[:200]}")
        return
    lora_id = r.json()["id"]
    out["loras"].append(lora_id)
    lora = await client.poll(f"/v2/loras/{lora_id}", {"READY", "FAILED"}, deadline)
    if lora["status"] != "READY":
        report.anomalies.append(f"lora {lora_id}: ended {lora['status']} ({lora.get('error')})")
        return
    for j in range(hc.jobs_per_lora):
        r = await client.call(
            "POST", "/v2/images/generate", headers={"Idempotency-Key": f"job-{i}-{j}"},
            json={"prompt": f"photo {j}", "model": "flux-lora", "webhookUrl": f"{webhook}/job",
                  "fluxLoraParams": {"loraId": lora_id, "num_outputs": 1 + (j % 2), "seed": j}},
        )
        if r.status_code != 202:
            report.anomalies.append(f"job {i}/{j}: generate answered {r.status_code} {r.text[:200]}")
            continue
        out["jobs"].append(r.json()["jobId"])
        job = await client.poll(f"/v2/jobs/{r.json()['jobId']}", {"COMPLETED", "FAILED"}, deadline)
        if job["status"] != "COMPLETED":
            report.anomalies.append(f"job {job['id']}: ended {job['status']} ({job.get('error')})")


async def run(hc: HarnessConfig) -> Report:
    report = Report()
    rng = random.Random(hc.seed)
    hc.workdir.mkdir(parents=True, exist_ok=True)
    data_dir, logs = hc.workdir / "data", hc.workdir / "logs"
    logs.mkdir(exist_ok=True)
    config = hc.workdir / "config.yaml"
    _write_config(config, data_dir, hc.database_url)
    started = time.monotonic()
    gws = []
    for i in range(hc.replicas):
        (logs / str(i)).mkdir(exist_ok=True)
        gws.append(GatewayProcess(config, _free_port(), logs / str(i)))
    async with serving(Receiver()) as rx:
        try:
            gws[0].start()  # the first start makes the default team and prints its key
            await gws[0].wait_ready()
            key = gws[0].first_key()
            if key is None:
                raise RuntimeError("no API key printed on first start")
            for gw in gws[1:]:
                gw.start()
            for gw in gws[1:]:
                await gw.wait_ready()
            https = [httpx.AsyncClient(base_url=gw.base, headers={"X-API-Key": key}, timeout=30) for gw in gws]
            created: dict[str, list[str]] = {"loras": [], "jobs": []}
            deadline = time.monotonic() + hc.timeout_s
            gate = asyncio.Semaphore(hc.concurrency)

            async def one(i: int) -> None:
                async with gate:
                    await _drive_one(i, _Client(https, report, start=i), hc, rx.base_url, deadline, report, created)

            async def killer() -> None:
                for _ in range(hc.kills):
                    await asyncio.sleep(rng.uniform(*hc.kill_every))
                    gw = rng.choice(gws)
                    gw.kill()
                    report.kills += 1
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    gw.start()
                    report.restarts += 1
                    await gw.wait_ready()

            await asyncio.gather(killer(), *(one(i) for i in range(hc.loras)))
            await _wait_for_webhooks(rx, created, deadline)
            for http in https:
                await http.aclose()
        finally:
            for gw in gws:
                gw.stop()
        report.loras, report.jobs = len(created["loras"]), len(created["jobs"])
        rows = await _Rows.open(data_dir, hc.database_url)
        try:
            await _check(report, hc, data_dir, key, rx, created, rows)
        finally:
            await rows.close()
    report.seconds = round(time.monotonic() - started, 1)
    return report


async def _wait_for_webhooks(rx: Receiver, created: dict[str, list[str]], deadline: float) -> None:
    want = {(i, "completed") for i in created["loras"] + created["jobs"]}
    while time.monotonic() < deadline:
        got = set()
        for req in rx.requests:
            body = json.loads(req.body)
            got.add((body.get("id") or body.get("jobId"), body["event"]))
        if want <= got:
            return
        await asyncio.sleep(0.2)


class _Rows:
    """Read-only queries on the gateway's database, SQLite or PostgreSQL."""

    def __init__(self, sqlite: sqlite3.Connection | None, pg: object | None) -> None:
        self.sqlite, self.pg = sqlite, pg

    @classmethod
    async def open(cls, data_dir: Path, database_url: str | None) -> "_Rows":
        if database_url:
            import asyncpg

            return cls(None, await asyncpg.connect(database_url))
        db = sqlite3.connect(f"file:{data_dir / 'gateway.sqlite3'}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        return cls(db, None)

    async def all(self, sql: str, *args: object) -> list:
        if self.sqlite is not None:
            return self.sqlite.execute(sql, args).fetchall()
        from gateway.store.postgres import translate

        return await self.pg.fetch(translate(sql), *args)  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
        else:
            await self.pg.close()  # type: ignore[attr-defined]


async def _check(report: Report, hc: HarnessConfig, data_dir: Path, key: str, rx: Receiver,
                 created: dict[str, list[str]], db: _Rows) -> None:
    a = report.anomalies
    loras = {r["id"]: r for r in await db.all("SELECT * FROM loras")}
    jobs = {r["id"]: r for r in await db.all("SELECT * FROM jobs")}
    if sorted(loras) != sorted(created["loras"]):
        a.append(f"{len(loras)} LoRA rows for {len(created['loras'])} created (duplicates or losses)")
    if sorted(jobs) != sorted(created["jobs"]):
        a.append(f"{len(jobs)} job rows for {len(created['jobs'])} created")
    for lid, r in loras.items():
        if r["status"] != "READY":
            a.append(f"lora {lid} is {r['status']}")
    for jid, r in jobs.items():
        if r["status"] != "COMPLETED":
            a.append(f"job {jid} is {r['status']}")
        images = await db.all("SELECT storage_key FROM job_images WHERE job_id = ?", jid)
        want = json.loads(r["input"])["fluxLoraParams"].get("num_outputs", 1)
        if len(images) != want or not all((data_dir / "blobs" / k[0]).exists() for k in images):
            a.append(f"job {jid}: {len(images)} stored images, {want} expected")

    # the ledger: exactly the rule's charges, each once, no refunds (nothing failed)
    expected: dict[tuple[str, str], int] = {}
    for lid in loras:
        expected[(lid, "lora_create")] = -2
        expected[(lid, "lora_training")] = -255
    for jid, r in jobs.items():
        expected[(jid, "job")] = -2 * json.loads(r["input"])["fluxLoraParams"].get("num_outputs", 1)
    actual = {(r["ref"], r["kind"]): r["amount"] for r in await db.all("SELECT * FROM ledger WHERE kind != 'grant'")}
    if actual != expected:
        extra = {k: v for k, v in actual.items() if expected.get(k) != v}
        missing = {k: v for k, v in expected.items() if k not in actual}
        a.append(f"ledger differs: unexpected {list(extra.items())[:5]}, missing {list(missing.items())[:5]}")
    (credits,) = (await db.all("SELECT credits FROM teams"))[0]
    if credits != BOOTSTRAP_CREDITS + sum(expected.values()):
        a.append(f"balance {credits} != {BOOTSTRAP_CREDITS + sum(expected.values())}")

    # the vendor (sandbox) view: the jobs it holds (one file per accepted attempt, written
    # before its log line) and its call log, where "-again" marks an attempt sent a second time
    calls_path = data_dir / "sandbox" / "calls.log"
    calls = [line.split(" ", 1) for line in calls_path.read_text().splitlines()] if calls_path.exists() else []
    for kind, attempt_id in calls:
        if kind.endswith("-again"):
            report.resubmissions += 1
            a.append(f"attempt {attempt_id} was sent to the sandbox again ({kind})")
    accepted = set()
    for folder in ("trainings", "generations"):
        for path in (data_dir / "sandbox" / folder).glob("*.json"):
            accepted.add(json.loads(path.read_bytes())["attempt_id"])
    attempts = {r["id"]: r for r in await db.all("SELECT * FROM attempts")}
    report.attempts = len(attempts)
    for attempt_id in accepted - set(attempts):
        a.append(f"the sandbox holds a job for attempt {attempt_id}, which the gateway has no record of")
    for attempt_id, r in attempts.items():
        if r["provider_ref"] and attempt_id not in accepted:
            a.append(f"attempt {attempt_id} has a ref but the sandbox holds no job for it")

    # webhooks: each terminal event arrived, signed, under one delivery id
    secret = hashlib.sha256(key.encode()).digest()
    ids_per_event: dict[tuple[str, str], set[str]] = {}
    seen: set[str] = set()
    for req in rx.requests:
        expected_sig = "sha256=" + hmac.new(secret, req.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected_sig, req.headers.get("x-webhook-signature", "")):
            a.append("a webhook with a bad signature")
        body = json.loads(req.body)
        event = (body.get("id") or body.get("jobId"), body["event"])
        delivery = req.headers["x-webhook-delivery"]
        ids_per_event.setdefault(event, set()).add(delivery)
        if delivery in seen:
            report.webhook_duplicates += 1
        seen.add(delivery)
    report.webhook_deliveries = len(seen)
    for object_id in list(loras) + list(jobs):
        if (object_id, "completed") not in ids_per_event:
            a.append(f"no completed webhook for {object_id}")
    for event, ids in ids_per_event.items():
        if len(ids) != 1:
            a.append(f"{event} arrived under {len(ids)} delivery ids")
