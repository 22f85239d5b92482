"""Outbound webhooks: payloads, Apiframe's signature, the durable delivery queue and its sender.

A delivery is queued in the same transaction that moves its LoRA or job, so an event is never
lost or duplicated by a crash. It keeps one id across retries (``X-Webhook-Delivery``), so a
receiver can de-duplicate. Retries back off exponentially with jitter. Requests carry Apiframe's
signature and Standard Webhooks' (``webhook-id``/``webhook-timestamp``/``webhook-signature``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from typing import Any, Callable

from gateway.store.base import Connection
import anyio
import anyio.abc
import httpx
import msgspec
import structlog

from gateway.config import WebhookSettings
from gateway.store import deliveries as deliveries_store
from gateway.store import jobs as jobs_store
from gateway.store import loras as loras_store
from gateway.store import teams as teams_store
from gateway.store.deliveries import Delivery
from gateway.store.models import Job, Lora
from gateway.timeutil import iso, new_id, now

log = structlog.get_logger()

JOB_DEFAULT_EVENTS = ("completed", "failed")


def sign(key_digest: bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(key = sha256(api key) raw digest, msg = raw body)>``."""
    return "sha256=" + hmac.new(key_digest, body, hashlib.sha256).hexdigest()


def sign_standard(key_digest: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks' ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
    keyed with the same raw digest (the receiver's secret is ``whsec_`` + base64 of it)."""
    mac = hmac.new(key_digest, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def lora_payload(lora: Lora, event: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": event, "id": lora.id, "status": lora.status,
        "imageCount": lora.image_count, "completedAt": iso(lora.completed_at),
    }
    if lora.status == "READY":
        body["triggerWord"] = lora.trigger_word
    if lora.status == "FAILED":
        body["error"] = lora.error
    return body


def job_payload(job: Job, event: str, image_urls: list[str] | None = None) -> dict[str, Any]:
    if event == "completed":
        return {
            "event": "completed", "jobId": job.id, "status": "COMPLETED", "progress": 100,
            "result": {"images": image_urls or []}, "model": job.model, "creditCost": job.credit_cost,
            "completedAt": iso(job.completed_at),
        }
    if event == "failed":
        return {"event": "failed", "jobId": job.id, "status": "FAILED", "error": job.error, "model": job.model}
    return {"event": "progress", "jobId": job.id, "status": "PROCESSING", "progress": job.progress, "model": job.model}


async def enqueue(
    conn: Connection, *, team_id: str, key_id: str, kind: str, owner_id: str,
    url: str, event: str, payload: dict[str, Any], terminal: bool, dedup_suffix: str = "",
) -> None:
    """Queue one delivery in the caller's transaction (a no-op if the same one is queued)."""
    ts = now()
    await deliveries_store.insert_delivery(conn, Delivery(
        id=new_id(), team_id=team_id, key_id=key_id, owner_kind=kind, owner_id=owner_id, event=event,
        dedup=f"{kind}:{owner_id}:{event}{dedup_suffix}", url=url, payload=msgspec.json.encode(payload),
        terminal=terminal, status="pending", attempts=0, next_try_at=ts, lease_owner=None, lease_expires=None,
        last_status_code=None, last_error=None, created_at=ts, delivered_at=None,
    ))


async def on_lora_terminal(conn: Connection, lora_id: str) -> None:
    """Queue the LoRA's ``completed``/``failed`` webhook if it asked for that event."""
    lora = await loras_store.get_lora(conn, lora_id)
    if lora is None or not lora.webhook_url:
        return
    event = {"READY": "completed", "FAILED": "failed"}.get(lora.status)
    if event is None or event not in lora.webhook_events.split(","):
        return
    await enqueue(conn, team_id=lora.team_id, key_id=lora.key_id, kind="lora", owner_id=lora.id,
                  url=lora.webhook_url, event=event, payload=lora_payload(lora, event), terminal=True)


async def on_job_event(conn: Connection, job_id: str, event: str, image_urls: list[str] | None = None) -> None:
    job = await jobs_store.get_job(conn, job_id)
    if job is None or not job.webhook_url:
        return
    events = job.webhook_events or list(JOB_DEFAULT_EVENTS)
    if event not in events:
        if event in ("completed", "failed"):
            await jobs_store.update_job(conn, job.id, webhook_status=None)  # nothing will be sent
        return
    suffix = f":{job.progress}" if event == "progress" else ""
    await enqueue(conn, team_id=job.team_id, key_id=job.key_id, kind="job", owner_id=job.id, url=job.webhook_url,
                  event=event, payload=job_payload(job, event, image_urls), terminal=event != "progress",
                  dedup_suffix=suffix)


def retry_delay(cfg: WebhookSettings, attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: base·2^(n-1), capped, times a factor in [0.75, 1.0]."""
    raw = min(cfg.max_delay_s, cfg.base_delay_s * (2 ** max(0, attempts - 1)))
    return raw * (0.75 + 0.25 * rng())


class Deliverer:
    """Sends due deliveries, each on its own: up to ``cfg.concurrency`` at once, a new one
    claimed as soon as a slot frees, so a slow receiver never holds up another. Runs inside the
    engine; several processes may run one on the same database, each with its own ``owner``.

    Each delivery in flight is leased to ``owner``; the leases are renewed every ``lease_s / 3``
    while the try runs, so another process never sends it at the same time. Each try has one
    deadline (``cfg.timeout_s``) for the whole exchange.
    """

    #: after a failure of the loop (a database error), wait this long, doubling up to the max
    error_backoff_s = 0.5
    max_error_backoff_s = 30.0

    def __init__(self, db: Any, cfg: WebhookSettings, client: httpx.AsyncClient, owner: str, *,
                 lease_s: float, poll_interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.cfg = cfg
        self.client = client
        self.owner = owner
        self.clock = clock
        self._inflight: set[str] = set()
        self._wake: anyio.Event | None = None
        self._notified = False
        self._backlog = False  # the last claim filled every free slot: more may be due
        #: the loop's current trouble (for /readyz): None while it works
        self.fault: str | None = None
        #: called with each try's outcome (delivered, pending (will retry), failed, replayed)
        self.on_outcome: Callable[[str], None] = lambda outcome: None

    @property
    def inflight(self) -> frozenset[str]:
        """Ids of the deliveries being sent now."""
        return frozenset(self._inflight)

    def notify(self) -> None:
        """New deliveries may be due: look now rather than at the next poll."""
        self._notified = True
        if self._wake is not None:
            self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled. Never ends on an error: a failed claim is logged
        (``webhook_loop_failed``) and retried with backoff."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_leases)
            task_status.started()
            backoff = self.error_backoff_s
            while True:
                self._wake = anyio.Event()
                self._notified = False
                try:
                    await self._fill(tg)
                except Exception as e:
                    self.fault = f"{type(e).__name__}: {str(e)[:200]}"
                    log.exception("webhook_loop_failed", owner=self.owner, stage="claim", retry_in_s=backoff)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_error_backoff_s)
                    continue
                self.fault = None
                backoff = self.error_backoff_s
                if not self._notified:
                    with anyio.move_on_after(self.poll_interval_s):
                        await self._wake.wait()

    async def _fill(self, tg: anyio.abc.TaskGroup) -> None:
        free = self.cfg.concurrency - len(self._inflight)
        if free <= 0:
            self._backlog = True  # a try that ends wakes the loop
            return
        async with self.db.tx() as conn:
            ids = await deliveries_store.claim_deliveries(
                conn, owner=self.owner, lease_s=self.lease_s, limit=free, exclude=self._inflight
            )
        self._backlog = len(ids) >= free
        for delivery_id in ids:
            self._inflight.add(delivery_id)
            tg.start_soon(self._send, delivery_id)

    async def _send(self, delivery_id: str) -> None:
        again = False
        try:
            again = await self.deliver(delivery_id)
        except Exception:
            # its lease is no longer renewed, so it is retried once the lease runs out
            log.exception("webhook_delivery_crashed", delivery_id=delivery_id)
        finally:
            self._inflight.discard(delivery_id)
            if again or self._backlog:
                self.notify()

    async def _renew_leases(self) -> None:
        while True:
            await anyio.sleep(self.lease_s / 3)
            ids = list(self._inflight)
            if not ids:
                continue
            try:
                async with self.db.tx() as conn:
                    await deliveries_store.renew_delivery_leases(conn, self.owner, self.lease_s, ids=ids)
            except Exception:
                log.exception("webhook_loop_failed", owner=self.owner, stage="renew_leases")

    async def deliver(self, delivery_id: str) -> bool:
        """One try of a delivery leased to this owner. Returns whether it is due again at once
        (a replay arrived during the try)."""
        async with self.db.read() as conn:
            d = await deliveries_store.get_delivery(conn, delivery_id)
            key = await teams_store.key_by_id(conn, d.key_id) if d else None
        if d is None or d.lease_owner != self.owner or d.status != "pending":
            return False
        status_code, error = None, None
        started = self.clock()
        if key is None:
            error = "the signing key no longer exists"
        else:
            status_code, error = await self._post(d, key.digest)
        duration_ms = int((self.clock() - started) * 1000)
        ok = status_code is not None and 200 <= status_code < 300
        attempts = d.attempts + 1
        if ok:
            outcome, next_try = "delivered", d.next_try_at
        elif attempts >= self.cfg.max_attempts or key is None:
            outcome, next_try = "failed", d.next_try_at
        else:
            outcome, next_try = "pending", now() + retry_delay(self.cfg, attempts)
        async with self.db.tx() as conn:
            recorded = await deliveries_store.record_delivery_attempt(
                conn, d, owner=self.owner, status_code=status_code, error=error, duration_ms=duration_ms,
                outcome=outcome, next_try_at=next_try,
            )
            if recorded.outcome in ("delivered", "failed") and d.terminal and d.owner_kind == "job":
                await jobs_store.update_job(conn, d.owner_id, webhook_status=recorded.outcome)
        self.on_outcome(recorded.outcome or "lease_lost")
        log.info(
            "webhook_delivered" if ok else "webhook_attempt_failed", delivery_id=d.id, webhook_event=d.event,
            attempt=recorded.attempt, status_code=status_code, error=error, outcome=recorded.outcome or "lease_lost",
            duration_ms=duration_ms,
        )
        return recorded.outcome == "replayed"

    async def _post(self, d: Delivery, key_digest: bytes) -> tuple[int | None, str | None]:
        """One exchange, cut off at ``cfg.timeout_s`` in all (connect, send, response, body read)."""
        timestamp = str(int(now()))
        headers = {
            "content-type": "application/json",
            "x-webhook-signature": sign(key_digest, d.payload),
            "x-webhook-event": d.event,
            "x-webhook-delivery": d.id,
            "webhook-id": d.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign_standard(key_digest, d.id, timestamp, d.payload),
        }
        with anyio.move_on_after(self.cfg.timeout_s):
            try:
                async with self.client.stream("POST", d.url, content=d.payload, headers=headers) as resp:
                    read = 0
                    async for chunk in resp.aiter_raw():  # read at most a small cap, then stop
                        read += len(chunk)
                        if read >= self.cfg.max_response_bytes:
                            break
                    if 300 <= resp.status_code < 400:
                        return resp.status_code, "redirects are not followed"
                    return resp.status_code, None if resp.status_code < 300 else f"HTTP {resp.status_code}"
            except httpx.TimeoutException:
                return None, "timed out"
            except httpx.HTTPError as e:
                return None, (str(e) or type(e).__name__)[:300]
        return None, "timed out"  # the deadline passed
