"""The extension endpoints: ``GET /v2/providers``, ``/v2/loras/{id}/attempts``,
``/v2/jobs/{id}/attempts``, ``/v2/usage``, and Prometheus ``/metrics``."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable

from tests.test_routing_matrix import ENGINE

PROVIDERS = {"sb-1": {"type": "sandbox", "training_seconds": 0.2, "queue_seconds": 0.05, "cost_per_training": 1.5,
                      "cost_per_image": 0.1},
             "sb-2": {"type": "sandbox", "cost_per_image": 0.25, "generation_failure_rate": 1.0}}
ROUTES = {"training": {"providers": ["sb-1"]}, "inference": {"providers": ["sb-2", "sb-1"]}}


async def generate(api: Any, lora_id: str, n: int = 1) -> dict[str, Any]:
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={
        "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id, "num_outputs": n}})
    assert r.status_code == 202, r.text
    return await api.wait_job(r.json()["jobId"])


async def test_providers_attempts_and_usage(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=PROVIDERS, routing=ROUTES, engine=ENGINE) as api:
        assert (await api.client.get("/v2/providers")).status_code == 401
        lora = await api.ready_lora()
        job = await generate(api, lora["id"], n=2)  # sb-2 fails (retryable), sb-1 makes them
        assert job["status"] == "COMPLETED"

        r = await api.client.get(f"/v2/jobs/{job['id']}/attempts", headers=api.h())
        got = r.json()["attempts"]
        assert [(a["seq"], a["provider"], a["state"], a["retryable"]) for a in got] == [
            (1, "sb-2", "failed", True), (2, "sb-1", "succeeded", False)]
        assert got[0]["error"] == "sandbox: generation failed (simulated failure)" and got[1]["error"] is None
        assert got[1]["cost"] == 0.2 and got[1]["currency"] == "USD" and got[1]["finishedAt"].endswith("Z")
        r = await api.client.get(f"/v2/loras/{lora['id']}/attempts", headers=api.h())
        (t,) = r.json()["attempts"]
        assert (t["provider"], t["state"], t["cost"]) == ("sb-1", "succeeded", 1.5)
        assert (await api.client.get(f"/v2/jobs/{uuid.uuid4()}/attempts", headers=api.h())).status_code == 404
        _, other_key = await api.new_team()
        assert (await api.client.get(f"/v2/jobs/{job['id']}/attempts", headers=api.h(other_key))).status_code == 404

        await api.gw.health.flush()
        r = await api.client.get("/v2/providers", headers=api.h())
        listing = {p["name"]: p for p in r.json()["providers"]}
        assert set(listing) == {"sandbox", "sb-1", "sb-2"}
        sb1 = listing["sb-1"]
        assert sb1["type"] == "sandbox" and sb1["cost"] == {"currency": "USD", "perTraining": 1.5, "perImage": 0.1}
        assert sb1["capabilities"]["training"]["subjectKinds"] == ["object", "person", "style"]
        assert sb1["capabilities"]["inference"]["acceptsLoraFile"] is True
        assert sb1["health"]["training"]["breaker"] == "closed" and sb1["health"]["training"]["calls"] >= 1
        assert sb1["health"]["training"]["successRate"] == 1.0 and sb1["health"]["training"]["meanLatencyMs"] >= 0
        assert sb1["inFlight"] == {"training": 0, "inference": 0}
        # a failed generation is the provider answering: the call succeeded
        assert listing["sb-2"]["health"]["inference"]["successRate"] == 1.0
        assert listing["sandbox"]["health"]["inference"]["calls"] == 0

        for _ in range(api.gw.settings.routing.breaker.failures):
            await api.gw.health.record("sb-2", "inference", ok=False)
        await api.gw.health.flush()
        listing = {p["name"]: p for p in (await api.client.get("/v2/providers", headers=api.h())).json()["providers"]}
        assert listing["sb-2"]["health"]["inference"]["breaker"] == "open"
        assert listing["sb-2"]["health"]["training"]["breaker"] == "closed"

        r = await api.client.get("/v2/usage", headers=api.h())
        body = r.json()
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert body["granularity"] == "day" and body["since"].startswith(today)
        # attempts a provider accepted (sb-2 refused the generation at once: not counted)
        assert body["usage"] == [
            {"period": today, "provider": "sb-1", "currency": "USD", "trainings": 1, "generations": 1, "cost": 1.7},
        ]
        month = (await api.client.get("/v2/usage?period=month", headers=api.h())).json()
        assert [u["period"] for u in month["usage"]] == [today[:7]]
        since = (await api.client.get(f"/v2/usage?since={today}", headers=api.h())).json()
        assert since["usage"] == body["usage"]
        assert (await api.client.get("/v2/usage?since=2026-13-45", headers=api.h())).status_code == 400
        assert (await api.client.get("/v2/usage?period=year", headers=api.h())).status_code == 400
        assert (await api.client.get("/v2/usage", headers=api.h(other_key))).json()["usage"] == []


async def test_metrics(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=PROVIDERS, routing=ROUTES, engine=ENGINE) as api:
        assert (await api.client.get("/metrics")).status_code == 404  # no token configured: off
    async with make_api(providers=PROVIDERS, routing=ROUTES, engine=ENGINE,
                        server={"admin_token": "adm-secret", "metrics_token": "prom-secret"}) as api:
        assert (await api.client.get("/metrics")).status_code == 401
        assert (await api.client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await api.client.get("/metrics", headers={"Authorization": "Bearer adm-secret"})).status_code == 200
        lora = await api.ready_lora()
        job = await generate(api, lora["id"])
        assert job["status"] == "COMPLETED"
        missing = str(uuid.uuid4())
        assert (await api.client.get(f"/v2/loras/{missing}", headers=api.h())).status_code == 404
        for _ in range(api.gw.settings.routing.breaker.failures):
            await api.gw.health.record("sb-2", "training", ok=False)
        r = await api.client.get("/metrics", headers={"Authorization": "Bearer prom-secret"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for line in (
            'lora_gateway_attempts_total{instance="sb-2",operation="inference",outcome="failed"} 1.0',
            'lora_gateway_attempts_total{instance="sb-1",operation="inference",outcome="succeeded"} 1.0',
            'lora_gateway_attempts_total{instance="sb-1",operation="training",outcome="succeeded"} 1.0',
            'lora_gateway_fallbacks_total{instance="sb-2",operation="inference"} 1.0',
            'lora_gateway_breaker_state{instance="sb-2",operation="training"} 2.0',
            'lora_gateway_breaker_state{instance="sb-1",operation="inference"} 0.0',
            'lora_gateway_rows{kind="lora",status="READY"} 1.0',
            'lora_gateway_rows{kind="job",status="COMPLETED"} 1.0',
        ):
            assert line in text, line
        assert re.search(r'lora_gateway_http_request_duration_seconds_count\{method="POST",route="/v2/images/generate",'
                         r'status="202"\} 1\.0', text)
        assert re.search(r'lora_gateway_http_request_duration_seconds_count\{method="GET",route="/v2/loras/\{lora_id\}",'
                         r'status="404"\}', text)
        assert re.search(r'lora_gateway_provider_call_duration_seconds_count\{instance="sb-1",operation="training",'
                         r'outcome="ok"\} [1-9]', text)
        # bounded labels only: no id, key or team anywhere
        for secret in (lora["id"], job["id"], api.team_id, api.key, missing):
            assert secret not in text
