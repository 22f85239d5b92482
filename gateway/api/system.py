"""``/v2/me``, health probes and signed file downloads."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.response import Stream

from typing import Any

from gateway.api.auth import AUTHENTICATED, gateway
from gateway.engine.worker import engine_stale_after
from gateway.store import workers as workers_store
from gateway.errors import Forbidden, Gone, NotFound
from gateway.timeutil import iso
from plugins.storage.base import StorageError
from gateway.services import accounts
from gateway.store.models import Principal

CONTENT_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "webp": "image/webp",
    "zip": "application/zip", "safetensors": "application/octet-stream",
}


@get("/v2/me", tags=["Account"], summary="The caller's user, team (with credits) and key", dependencies=AUTHENTICATED)
async def me(request: Request, principal: Principal) -> Response:
    gw = gateway(request)
    return Response(await accounts.me(gw.db, principal))


@get("/healthz", tags=["Health"], summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["Health"], summary="The database answers and an engine runs")
async def readyz(request: Request) -> Response:
    """200 when the database answers and the engine runs: in this process (``run_workers``),
    or, for an API-only process, in some process whose heartbeat is recent."""
    gw = gateway(request)
    checks: dict[str, Any] = {}
    try:
        checks["database"] = "ok" if await gw.db.ping() else "failed"
    except Exception:
        checks["database"] = "failed"
    engine = getattr(request.app.state, "engine", None)
    lease = gw.settings.engine.lease_s
    if gw.settings.server.run_workers:
        status = engine.status() if engine is not None else {"state": "not running"}
        checks["workers"] = status["state"]
        if "faults" in status:
            checks["faults"] = status["faults"]
    elif checks["database"] == "ok":
        async with gw.db.read() as conn:
            live = await workers_store.live_workers(conn, within_s=engine_stale_after(lease))
        checks["workers"] = f"external ({len(live)} running)" if live else "none running"
        if not live:
            checks["hint"] = ("no `lora-gateway worker` process has beaten in the last "
                              f"{engine_stale_after(lease):g} s: start one against this database")
    ok = checks["database"] == "ok" and (checks.get("workers") == "ok" or str(checks.get("workers")).startswith("external"))
    return Response({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@get("/files/{key:path}", tags=["Files"], summary="A file behind a signed, expiring URL", include_in_schema=False)
async def files(request: Request, key: str) -> Stream:
    gw = gateway(request)
    key = key.lstrip("/")
    expires = request.query_params.get("expires")
    state = gw.signer.check(key, expires, request.query_params.get("sig"))
    if state == "invalid":  # nothing about the file is revealed
        raise Forbidden("This link's signature is missing or not valid: use the URL exactly as the API returned it")
    if state == "expired":
        raise Gone(f"This link expired at {iso(int(expires or 0))}: GET the job (or the LoRA) again for fresh links")
    try:
        size = await gw.storage.size(key)
    except StorageError:  # a key no file can have (``..``, an absolute path): signed or not, nothing there
        size = None
    if size is None:
        raise NotFound("File not found: it was deleted (files are kept for a while, then removed), or never existed")
    ext = key.rsplit(".", 1)[-1]
    return Stream(
        gw.storage.iter_bytes(key),
        media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
        headers={"content-length": str(size), "cache-control": "private, max-age=3600"},
    )
