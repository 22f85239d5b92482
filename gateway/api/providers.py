"""Extension endpoints (not part of Apiframe's API): provider instances and their health,
a LoRA's or job's attempts, the team's declared provider cost, and Prometheus ``/metrics``."""

from __future__ import annotations

import calendar
import hmac
import time

from litestar import Controller, Request, Response, get

from gateway.store import queue as queue_store
from gateway.api.auth import AUTHENTICATED, gateway
from gateway.api.params import parse_query
from gateway.errors import NotFound, Unauthorized, ValidationFailed
from gateway.health import OPERATIONS
from gateway.metrics import CONTENT_TYPE
from gateway.services import jobs as job_service
from gateway.services import loras as lora_service
from gateway.services import providers as provider_service
from gateway.store.models import Principal


class ProvidersController(Controller):
    path = "/v2"
    tags = ["Extensions"]
    dependencies = AUTHENTICATED

    @get("/providers", summary="Provider instances: capabilities, declared costs, health (extension)")
    async def list_providers(self, request: Request, principal: Principal) -> Response:
        return Response({"providers": await provider_service.listing(gateway(request))})

    @get("/loras/{lora_id:str}/attempts", summary="A LoRA's provider attempts (extension)")
    async def lora_attempts(self, request: Request, lora_id: str, principal: Principal) -> Response:
        gw = gateway(request)
        lora = await lora_service.get(gw, principal, lora_id)  # 404 for another team's
        return Response({"attempts": await provider_service.attempts(gw, principal, "lora", lora.id)})

    @get("/jobs/{job_id:str}/attempts", summary="A job's provider attempts (extension)")
    async def job_attempts(self, request: Request, job_id: str, principal: Principal) -> Response:
        gw = gateway(request)
        job = await job_service.get(gw, principal, job_id)
        return Response({"attempts": await provider_service.attempts(gw, principal, "job", job.id)})

    @get("/usage", summary="Declared provider cost of the team's work, per instance and period (extension)")
    async def usage(self, request: Request, principal: Principal) -> Response:
        gw = gateway(request)
        q = parse_query(request, {"period": ("enum:day|month", "day"), "since": ("str", None)})
        since = None
        if q["since"]:
            try:
                since = float(calendar.timegm(time.strptime(q["since"], "%Y-%m-%d")))
            except ValueError:
                raise ValidationFailed.at("since", "Must be a date, YYYY-MM-DD") from None
        return Response(await provider_service.usage(gw, principal, period=q["period"], since=since))


def _check_metrics_token(request: Request) -> None:
    s = gateway(request).settings.server
    tokens = [t for t in (s.metrics_token, s.admin_token) if t]
    if not tokens:
        raise NotFound("Not found")  # disabled until a token is configured
    auth = request.headers.get("authorization", "")
    given = (auth[7:].strip() if auth[:7].lower() == "bearer " else "").encode()
    if not any(hmac.compare_digest(given, t.encode()) for t in tokens):
        raise Unauthorized("A metrics or admin token is required")


@get("/metrics", tags=["Extensions"], summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    _check_metrics_token(request)
    gw = gateway(request)
    breakers = {}
    for op in OPERATIONS.values():
        states = await gw.health.states(op)
        breakers.update({(name, op): states.get(name, "closed") for name in gw.providers})
    async with gw.db.read() as conn:
        rows = await queue_store.count_by_status(conn)
    return Response(gw.metrics.render(breakers, rows), media_type=CONTENT_TYPE)
