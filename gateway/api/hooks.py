"""``POST /hooks/{provider}``: inbound provider callbacks. The provider verifies the request
itself; a verified callback only makes its current attempt's poll due now (the poller stays
on as the backstop, and the status is always read from the provider, not from the callback).
A provider whose vendor signs nothing returns a *hint*: it names an attempt (from the callback
URL the provider built) and only makes that attempt's poll due now, at most every 5 s."""

from __future__ import annotations

import functools
import inspect

import structlog
from litestar import Request, Response, post

from gateway.store import attempts as attempts_store
from gateway.api.auth import gateway
from gateway.errors import NotFound, Unauthorized
from providers.base import ProviderError

log = structlog.get_logger()

MAX_CALLBACK_BODY = 1024 * 1024
#: an unverifiable callback makes its attempt's poll due now at most this often
HINT_EVERY_S = 5.0


@functools.lru_cache(maxsize=64)
def _takes_params_cached(fn: object) -> bool:
    try:
        sig = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return "params" in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _takes_params(method: object) -> bool:
    return _takes_params_cached(getattr(method, "__func__", method))


@post("/hooks/{provider_name:str}", status_code=200, request_max_body_size=MAX_CALLBACK_BODY,
      tags=["Callbacks"], summary="Provider callbacks", include_in_schema=False)
async def provider_callback(request: Request, provider_name: str) -> Response:
    gw = gateway(request)
    provider = gw.providers.get(provider_name)
    if provider is None or not provider.capabilities.webhooks_in:
        raise NotFound("Not found")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    params = dict(request.query_params)
    try:
        if _takes_params(provider.verify_callback):
            event = await provider.verify_callback(headers, body, params)
        else:  # a plugin written against the two-argument form
            event = await provider.verify_callback(headers, body)
    except ProviderError as e:
        log.warning("callback_rejected", provider=provider_name, error=e.message)
        raise Unauthorized("Callback verification failed") from None
    async with gw.db.tx() as conn:
        if event.hint:  # unverifiable: only "look now" for the attempt it names, rate-limited
            owner = (await attempts_store.hint_attempt(conn, provider_name, event.attempt_id, every_s=HINT_EVERY_S)
                     if event.attempt_id else None)
        else:
            if event.attempt_id and event.ref:  # it may resolve a submission whose answer was lost
                await attempts_store.bind_callback(conn, provider_name, event.attempt_id, event.ref)
            owner = await attempts_store.poll_now_for_ref(conn, provider_name, event.ref) if event.ref else None
    log.info("callback_received", provider=provider_name, provider_ref=event.ref, hint=event.hint,
             applied=owner is not None)
    if owner is not None:
        gw.wake()
    return Response({"received": True, "applied": owner is not None})
