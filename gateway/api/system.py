"""``/v2/me``, health probes and signed file downloads."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.response import Stream

from gateway.api.auth import caller, gateway
from gateway.errors import NotFound
from gateway.services import accounts

CONTENT_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "webp": "image/webp",
    "zip": "application/zip", "safetensors": "application/octet-stream",
}


@get("/v2/me", tags=["Account"], summary="The caller's user, team (with credits) and key")
async def me(request: Request) -> Response:
    gw = gateway(request)
    return Response(await accounts.me(gw.db, await caller(request)))


@get("/healthz", tags=["Health"], summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["Health"], summary="The database answers and the workers run")
async def readyz(request: Request) -> Response:
    gw = gateway(request)
    checks: dict[str, str] = {}
    try:
        checks["database"] = "ok" if await gw.db.ping() else "failed"
    except Exception:
        checks["database"] = "failed"
    engine = getattr(request.app.state, "engine", None)
    if gw.settings.server.run_workers:
        checks["workers"] = "ok" if engine is not None and engine.ready else "not running"
    else:
        checks["workers"] = "external"
    ok = all(v in ("ok", "external") for v in checks.values())
    return Response({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@get("/files/{key:path}", tags=["Files"], summary="A file behind a signed, expiring URL", include_in_schema=False)
async def files(request: Request, key: str) -> Stream:
    gw = gateway(request)
    key = key.lstrip("/")
    if not gw.signer.verify(key, request.query_params.get("expires"), request.query_params.get("sig")):
        raise NotFound("Not found")  # bad, expired or missing signature: nothing to reveal
    size = await gw.storage.size(key)
    if size is None:
        raise NotFound("Not found")
    ext = key.rsplit(".", 1)[-1]
    return Stream(
        gw.storage.iter_bytes(key),
        media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
        headers={"content-length": str(size), "cache-control": "private, max-age=3600"},
    )
