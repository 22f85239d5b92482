"""Working through durable cancel requests (``gateway.store.cancels``).

A request is made in the same transaction as whatever gave up on an attempt: a DELETE of a
LoRA in training, a stuck or superseded attempt, a row that failed while an attempt was in
flight, a submission accepted after its row had moved on. The engine leases due requests and
asks the provider to cancel, with backoff, until the vendor confirms or says the job had
already ended (a non-retryable answer), or ``engine.cancel_tries`` run out (abandoned, logged).
A request whose attempt has no provider ref yet (its submit was still in flight) waits for the
ref, or looks the job up by the attempt id where the provider can.
"""

from __future__ import annotations

import structlog

from gateway.context import Gateway
from gateway.engine.attempts import IN_FLIGHT, Operation, timing
from gateway.store import attempts as attempts_store
from gateway.store import cancels as cancels_store
from gateway.store.cancels import CancelRequest
from gateway.timeutil import now
from providers.base import ProviderError

log = structlog.get_logger()


async def work_cancel(gw: Gateway, op: Operation, req: CancelRequest, owner: str) -> None:
    e = gw.settings.engine
    provider = gw.providers.get(req.provider)
    bound = structlog.contextvars.bound_contextvars(attempt_id=req.attempt_id, provider=req.provider)

    async def close(state: str, error: str | None = None, ref: str | None = None) -> None:
        async with gw.db.tx() as conn:
            if await cancels_store.close_cancel(conn, req.attempt_id, owner, state=state, error=error,
                                                ref=ref) and state == "done":
                await attempts_store.mark_cancelled(conn, req.attempt_id, IN_FLIGHT)
        (log.info if state == "done" else log.warning)(f"cancel_{state}", error=error, tries=req.tries + 1)

    async def again(error: str, ref: str | None = None) -> None:
        if req.tries + 1 >= e.cancel_tries:
            await close("abandoned", error)
            return
        delay = timing(e, op.name, req.provider).poll_delay(req.tries)
        async with gw.db.tx() as conn:
            await cancels_store.retry_cancel(conn, req.attempt_id, owner, next_try_at=now() + delay, error=error, ref=ref)

    with bound:
        if provider is None:
            await close("abandoned", "the provider is no longer configured")
            return
        ref = req.provider_ref
        if ref is None:
            async with gw.db.read() as conn:
                attempt = next((a for a in await attempts_store.attempts_for(conn, req.owner_kind, req.owner_id)
                                if a.id == req.attempt_id), None)
            ref = attempt.provider_ref if attempt else None
        if ref is None:
            # its submit may still be in flight (it records the ref when it returns), or never arrived
            if provider.capabilities.can_lookup:
                try:
                    found = await op.lookup(provider, req.attempt_id)
                except ProviderError as err:
                    await again(f"lookup failed: {err.message}")
                    return
                if found is None:
                    if req.tries + 1 >= e.cancel_tries:
                        await close("done", "the submission never reached the provider")
                    else:
                        await again("not at the provider (yet)")
                    return
                ref = found.ref
            elif now() - req.created_at < e.reconcile_wait_s:
                await again("waiting for the provider's job id")
                return
            else:
                await close("abandoned", "the provider's job id never became known")
                return
        if ref is None:
            await close("abandoned", "the provider's job id is unknown")
            return
        if not provider.capabilities.can_cancel:
            await close("abandoned", "the provider cannot cancel", ref)
            return
        try:
            await op.cancel(provider, ref)
        except ProviderError as err:
            if not err.retryable:  # the vendor refused: it has nothing left to cancel
                await close("done", f"already ended at the provider: {err.message}", ref)
            else:
                await again(err.message, ref)
            return
        await close("done", ref=ref)
