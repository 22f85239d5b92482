"""``POST /hooks/{provider}``: inbound provider callbacks. The provider verifies the request
itself; a verified callback only makes its current attempt's poll due now (the poller stays
on as the backstop, and the status is always read from the provider, not from the callback)."""

from __future__ import annotations

import structlog
from litestar import Request, Response, post

from gateway.api.auth import gateway
from gateway.errors import NotFound, Unauthorized
from gateway.store import work
from providers.base import ProviderError

log = structlog.get_logger()

MAX_CALLBACK_BODY = 1024 * 1024


@post("/hooks/{provider_name:str}", status_code=200, request_max_body_size=MAX_CALLBACK_BODY,
      tags=["Callbacks"], summary="Provider callbacks", include_in_schema=False)
async def provider_callback(request: Request, provider_name: str) -> Response:
    gw = gateway(request)
    provider = gw.providers.get(provider_name)
    if provider is None or not provider.capabilities.webhooks_in:
        raise NotFound("Not found")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        event = await provider.verify_callback(headers, body)
    except ProviderError as e:
        log.warning("callback_rejected", provider=provider_name, error=e.message)
        raise Unauthorized("Callback verification failed") from None
    async with gw.db.tx() as conn:
        if event.attempt_id:  # names the attempt: it may resolve a submission whose answer was lost
            await work.bind_callback(conn, provider_name, event.attempt_id, event.ref)
        owner = await work.poll_now_for_ref(conn, provider_name, event.ref)
    log.info("callback_received", provider=provider_name, provider_ref=event.ref, applied=owner is not None)
    if owner is not None:
        gw.wake()
    return Response({"received": True, "applied": owner is not None})
