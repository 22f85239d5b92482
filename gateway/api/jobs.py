"""``POST /v2/images/generate`` and ``/v2/jobs``."""

from __future__ import annotations

from litestar import Controller, Request, Response, get, post

from gateway.store import jobs as jobs_store
from gateway.api.auth import AUTHENTICATED, gateway
from gateway.api.params import parse_query
from gateway.api.views import job_view
from gateway.services import idempotency
from gateway.services import jobs as job_service
from gateway.services import providers as provider_service
from gateway.store.models import Principal

MAX_JSON_BODY = 64 * 1024


class GenerateController(Controller):
    path = "/v2/images"
    tags = ["Images"]
    dependencies = AUTHENTICATED

    @post("/generate", status_code=202, request_max_body_size=MAX_JSON_BODY, summary="Generate images with a LoRA")
    async def generate(self, request: Request, principal: Principal) -> Response:
        gw = gateway(request)
        key = idempotency.key_from(request.headers)
        req, set_params = job_service.decode_generate(await request.body())
        job, replayed = await job_service.create(gw, principal, req, idempotency_key=key, set_params=set_params,
                                                 preferred=provider_service.preferred(gw, request.headers))
        headers = {"idempotent-replayed": "true"} if replayed else {}
        return Response({"jobId": job.id, "status": job.status}, status_code=202, headers=headers)


class JobController(Controller):
    path = "/v2/jobs"
    tags = ["Jobs"]
    dependencies = AUTHENTICATED

    @get("/{job_id:str}", summary="Get a job")
    async def get_job(self, request: Request, job_id: str, principal: Principal) -> Response:
        gw = gateway(request)
        job = await job_service.get(gw, principal, job_id)
        images = []
        if job.status == "COMPLETED":
            async with gw.db.read() as conn:
                images = await jobs_store.job_images(conn, job.id)
        return Response(job_view(gw, job, images))

    @get("/", summary="List jobs, newest first")
    async def list_jobs(self, request: Request, principal: Principal) -> Response:
        gw = gateway(request)
        q = parse_query(
            request,
            {
                "status": ("enum:" + "|".join(job_service.JOB_STATUSES), None),
                "model": ("str", None),
                "limit": ("int:1:100", 20),
                "cursor": ("str", None),
                "scope": ("enum:user|team", "user"),
                "search": ("uuid", None),
                "include_models": ("bool", False),
            },
        )
        q["cursor"] = job_service.decode_cursor(q["cursor"]) if q["cursor"] else None
        items, next_cursor, models = await job_service.list_page(gw, principal, q)
        views = []
        async with gw.db.read() as conn:
            for job in items:
                images = await jobs_store.job_images(conn, job.id) if job.status == "COMPLETED" else []
                views.append(job_view(gw, job, images))
        body = {"jobs": views, "nextCursor": next_cursor, "hasMore": next_cursor is not None}
        if models is not None:
            body["models"] = models
        return Response(body)
