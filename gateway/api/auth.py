"""Resolving the caller: ``X-API-Key`` (or ``Authorization: Bearer``), then the rate limit."""

from __future__ import annotations

from litestar import Request
from litestar.di import Provide

from gateway.context import Gateway
from gateway.services import accounts
from gateway.store.models import Principal


def gateway(request: Request) -> Gateway:
    return request.app.state.gw


def raw_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


async def caller(request: Request) -> Principal:
    gw = gateway(request)
    principal = await accounts.authenticate(gw.db, raw_key(request), gw.auth_cache)
    await accounts.check_rate(gw, principal)
    return principal


async def _provide_principal(request: Request) -> Principal:
    return await caller(request)


#: ``dependencies=AUTHENTICATED`` on a controller or handler: its ``principal: Principal``
#: parameter is the authenticated, rate-limited caller (401/403/429 before the handler runs)
AUTHENTICATED = {"principal": Provide(_provide_principal)}
