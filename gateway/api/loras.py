"""``/v2/loras``: create (streamed multipart), list, get, delete; the weights (extension)."""

from __future__ import annotations

from pathlib import Path

import base64
import re

from litestar import Controller, Request, Response, delete, get, post
from litestar.response import Stream

from gateway.api.auth import AUTHENTICATED, gateway
from gateway.api.params import parse_query
from gateway.api.views import lora_view
from gateway.services import idempotency
from gateway.services import loras as lora_service
from gateway.services import providers as provider_service
from gateway.store.models import Principal
from gateway.uploads import receive_upload


class LoraController(Controller):
    path = "/v2/loras"
    tags = ["LoRAs"]
    dependencies = AUTHENTICATED

    @post("/", status_code=202, request_max_body_size=None, summary="Create a LoRA (multipart upload of 15–30 photos)")
    async def create(self, request: Request, principal: Principal) -> Response:
        gw = gateway(request)
        key = idempotency.key_from(request.headers)
        preferred = provider_service.preferred(gw, request.headers)
        if not await lora_service.has_idempotent_record(gw, principal, key):
            await lora_service.precheck_create(gw, principal)  # fail fast, before reading 100 MB
        tmp_root = gw.settings.uploads.tmp_dir
        upload = await receive_upload(
            request.stream(), request.headers.get("content-type"), gw.upload_limits,
            tmp_root=None if tmp_root is None else Path(tmp_root),
        )
        try:
            lora, replayed = await lora_service.create(gw, principal, upload, idempotency_key=key, preferred=preferred)
        finally:
            upload.cleanup()
        headers = {"idempotent-replayed": "true"} if replayed else {}
        return Response({"id": lora.id, "status": lora.status, "imageCount": lora.image_count}, status_code=202, headers=headers)

    @get("/", summary="List LoRAs, newest first")
    async def list_loras(self, request: Request, principal: Principal) -> Response:
        gw = gateway(request)
        q = parse_query(
            request,
            {"cursor": ("uuid", None), "limit": ("int:1:100", 24), "includeArchived": ("bool", False)},
        )
        items, next_cursor = await lora_service.list_page(
            gw, principal, limit=q["limit"], cursor=q["cursor"], include_archived=q["includeArchived"]
        )
        return Response({"items": [lora_view(i, gw) for i in items], "nextCursor": next_cursor})

    @get("/{lora_id:str}", summary="Get a LoRA")
    async def get_lora(self, request: Request, lora_id: str, principal: Principal) -> Response:
        lora = await lora_service.get(gateway(request), principal, lora_id)
        return Response(lora_view(lora, gateway(request)))

    @get("/{lora_id:str}/weights", tags=["Extensions"],
         summary="Download a READY LoRA's weights (.safetensors), with their sha256 (extension)")
    async def get_weights(self, request: Request, lora_id: str, principal: Principal) -> Stream:
        gw = gateway(request)
        lora, artifact, size = await lora_service.weights(gw, principal, lora_id)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", lora.name).strip("-")[:60] or "lora"
        return Stream(
            gw.storage.iter_bytes(artifact.storage_key),
            media_type="application/octet-stream",
            headers={
                "content-length": str(size),
                "content-disposition": f'attachment; filename="{name}-{lora.id[:8]}.safetensors"',
                "x-weights-sha256": artifact.sha256,
                "repr-digest": f"sha-256=:{base64.b64encode(bytes.fromhex(artifact.sha256)).decode()}:",
                "x-weights-key-format": artifact.format,
                "x-trigger-word": lora.trigger_word or "",
                "cache-control": "private, no-store",
            },
        )

    @delete("/{lora_id:str}", status_code=204, summary="Archive a LoRA (idempotent)")
    async def delete_lora(self, request: Request, lora_id: str, principal: Principal) -> None:
        await lora_service.delete(gateway(request), principal, lora_id)
