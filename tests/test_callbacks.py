"""Inbound provider callbacks: verified by the provider, they move only the current attempt."""

from __future__ import annotations

import hashlib
import hmac
import json

import anyio
from plugins.hookspecs import hookimpl
from providers.base import Capabilities, CallbackEvent, ProviderAuthError
from providers.sandbox import SandboxProvider
from gateway.store import attempts as attempts_store
from gateway.store import loras as loras_store
from tests.conftest import Api

SECRET = b"callback-secret"


class CallingSandbox(SandboxProvider):
    """The sandbox plus signed callbacks (``x-signature: hex HMAC(secret, body)``)."""

    name = "calling"

    def __init__(self, config, setup):  # type: ignore[no-untyped-def]
        super().__init__(config, setup)
        c = self.capabilities
        self.capabilities = Capabilities(training=c.training, inference=c.inference, cost=c.cost,
                                         can_lookup=True, can_cancel=True, webhooks_in=True)

    async def verify_callback(self, headers, body):  # type: ignore[override]
        expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, headers.get("x-signature", "")):
            raise ProviderAuthError("bad signature")
        return CallbackEvent(ref=json.loads(body)["id"])


class Plugin:
    @hookimpl
    def register_providers(self, register):
        register(CallingSandbox)


def signed(ref: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"id": ref, "status": "completed"}).encode()
    return body, {"x-signature": hmac.new(SECRET, body, hashlib.sha256).hexdigest(), "content-type": "application/json"}


CFG = dict(
    plugins=(Plugin(),),
    providers={"calling": {"training_seconds": 0.2, "queue_seconds": 0}},
    routing={"training": {"providers": ["calling"]}, "inference": {"providers": ["calling"]}},
    # polls far apart: only a callback can finish the training quickly
    engine={"min_poll_interval_s": 30, "max_poll_interval_s": 60, "poll_interval_s": 0.05},
)


async def _training_attempt(api: Api, lora_id: str):
    for _ in range(600):
        async with api.gw.db.read() as conn:
            attempt = await attempts_store.current_attempt(conn, "lora", lora_id)
            lora = await loras_store.get_lora(conn, lora_id)
        if attempt and attempt.provider_ref and lora.stage == "poll":
            return attempt, lora
        await anyio.sleep(0.05)
    raise AssertionError("never submitted")


async def test_a_verified_callback_makes_the_poll_due_now(make_api) -> None:
    async with make_api(**CFG) as api:
        lora_id = (await api.create_lora()).json()["id"]
        attempt, lora = await _training_attempt(api, lora_id)
        assert lora.next_run_at > api.gw.settings.engine.min_poll_interval_s  # far in the future
        await anyio.sleep(0.3)  # the training is done at the "vendor"
        body, headers = signed(attempt.provider_ref)
        r = await api.client.post("/hooks/calling", content=body, headers=headers)
        assert r.status_code == 200 and r.json() == {"received": True, "applied": True}
        ready = await api.wait_lora(lora_id, timeout=10)  # long before the 30 s poll
        assert ready["status"] == "READY"


async def test_bad_signatures_and_unknown_providers(make_api) -> None:
    async with make_api(**CFG) as api:
        lora_id = (await api.create_lora()).json()["id"]
        attempt, before = await _training_attempt(api, lora_id)
        body, headers = signed(attempt.provider_ref)
        r = await api.client.post("/hooks/calling", content=body + b" ", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "Callback verification failed"
        assert (await api.client.post("/hooks/sandbox", content=body, headers=headers)).status_code == 404
        assert (await api.client.post("/hooks/nope", content=body, headers=headers)).status_code == 404
        async with api.gw.db.read() as conn:
            after = await loras_store.get_lora(conn, lora_id)
        assert after.next_run_at == before.next_run_at  # nothing moved


async def test_a_late_callback_from_a_superseded_attempt_changes_nothing(make_api) -> None:
    async with make_api(**CFG) as api:
        lora_id = (await api.create_lora()).json()["id"]
        old, _ = await _training_attempt(api, lora_id)
        # the attempt was superseded (say, by a fallback): a newer attempt is current
        async with api.gw.db.tx() as conn:
            await conn.execute(
                """INSERT INTO attempts (id, owner_kind, owner_id, seq, provider, provider_ref, state, retryable, polls, created_at)
                   VALUES ('newer', 'lora', ?, ?, 'calling', 'other-ref', 'running', 0, 0, 0)""",
                (lora_id, old.seq + 1),
            )
            before = await loras_store.get_lora(conn, lora_id)
        body, headers = signed(old.provider_ref)
        r = await api.client.post("/hooks/calling", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["applied"] is False
        async with api.gw.db.read() as conn:
            after = await loras_store.get_lora(conn, lora_id)
        assert after.next_run_at == before.next_run_at and after.status == "TRAINING"
