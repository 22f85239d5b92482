"""``/admin``: the webhook delivery log and replay, and revoking an API key. Bearer
``server.admin_token``; disabled (404) when no token is configured."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Controller, Request, Response, get, post

from gateway.api.auth import gateway
from gateway.api.params import parse_query
from gateway.errors import NotFound, Unauthorized
from gateway.services import accounts
from gateway.store import deliveries as deliveries_store
from gateway.store.deliveries import Delivery, DeliveryAttempt
from gateway.timeutil import iso


def _check_admin(request: Request) -> None:
    token = gateway(request).settings.server.admin_token
    if not token:
        raise NotFound("Not found")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("Admin token is required")


def delivery_view(d: Delivery, log: list[DeliveryAttempt] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": d.id, "teamId": d.team_id, "objectKind": d.owner_kind, "objectId": d.owner_id, "event": d.event,
        "url": d.url, "status": d.status, "attempts": d.attempts, "nextTryAt": iso(d.next_try_at) if d.status == "pending" else None,
        "lastStatusCode": d.last_status_code, "lastError": d.last_error,
        "createdAt": iso(d.created_at), "deliveredAt": iso(d.delivered_at),
    }
    if log is not None:
        body["log"] = [
            {"attempt": a.attempt, "at": iso(a.at), "statusCode": a.status_code, "error": a.error, "durationMs": a.duration_ms}
            for a in log
        ]
    return body


class AdminController(Controller):
    path = "/admin"
    tags = ["Admin"]
    include_in_schema = False

    @get("/teams/{team_id:str}/deliveries", summary="A team's webhook deliveries, newest first")
    async def list_deliveries(self, request: Request, team_id: str) -> Response:
        _check_admin(request)
        q = parse_query(request, {"status": ("enum:pending|delivered|failed", None), "limit": ("int:1:1000", 100)})
        async with gateway(request).db.read() as conn:
            items = await deliveries_store.list_deliveries(conn, team_id, status=q["status"], limit=q["limit"])
        return Response({"deliveries": [delivery_view(d) for d in items]})

    @get("/deliveries/{delivery_id:str}", summary="One delivery with every attempt")
    async def get_delivery(self, request: Request, delivery_id: str) -> Response:
        _check_admin(request)
        async with gateway(request).db.read() as conn:
            d = await deliveries_store.get_delivery(conn, delivery_id)
            log = await deliveries_store.delivery_attempts(conn, delivery_id) if d else []
        if d is None:
            raise NotFound("Delivery not found")
        return Response(delivery_view(d, log))

    @post("/deliveries/{delivery_id:str}/replay", status_code=202, summary="Send a delivery again (same id)")
    async def replay(self, request: Request, delivery_id: str) -> Response:
        _check_admin(request)
        gw = gateway(request)
        async with gw.db.tx() as conn:
            d = await deliveries_store.get_delivery(conn, delivery_id)
            if d is None or not await deliveries_store.replay_delivery(conn, delivery_id, d.team_id):
                raise NotFound("Delivery not found")
        gw.wake_deliveries()
        return Response({"id": delivery_id, "status": "pending"}, status_code=202)

    @post("/keys/{key_id:str}/revoke", status_code=200, summary="Revoke an API key, on every replica")
    async def revoke_key(self, request: Request, key_id: str) -> Response:
        _check_admin(request)
        gw = gateway(request)
        if not await accounts.revoke_key(gw.db, key_id, gw.auth_cache):
            raise NotFound("No such key, or it is revoked already")
        return Response({"id": key_id, "revoked": True})
