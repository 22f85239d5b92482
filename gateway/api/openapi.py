"""The OpenAPI document, complete: every operation's request body (the multipart fields of
``POST /v2/loras`` included), query parameters, responses with their real shapes (errors as
``{error, code, details}``), and the ``X-API-Key`` and Bearer security schemes.

The controllers read their input themselves (streamed multipart, one msgspec decode with the
gateway's own error wording), so Litestar cannot infer it from their signatures. Instead, each
operation is described here once, from the same sources the code uses: the query specs the
controllers parse with, the msgspec Struct the generate body decodes into, and Structs below
that mirror the views. ``complete(app)`` writes them into the generated document when the app
starts. ``tests/test_openapi.py`` checks the document names everything, and schemathesis checks
the answers against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from litestar import Litestar
from litestar.openapi.spec import (
    Components, OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, Operation, Parameter, RequestBody, Schema,
    SecurityScheme,
)

from gateway.services.jobs import GenerateImageRequest, JOB_STATUSES
from gateway.services.loras import GENDERS, SUBJECT_KINDS, WEBHOOK_EVENTS

# --------------------------------------------------------------------------- shapes


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Every error: a message a person can act on, a machine-readable code, and per field what
    was wrong (400)."""

    error: str
    code: str | None = None
    details: dict[str, list[str]] | None = None
    creditsRequired: int | None = None
    creditsAvailable: int | None = None


class LoraExtension(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    portable: bool
    samples: list[str]


class LoraView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    userId: str
    teamId: str
    name: str
    subjectKind: str
    gender: str | None
    ethnicity: str | None
    age: str | None
    status: Literal["PENDING", "UPLOADING", "TRAINING", "READY", "FAILED", "ARCHIVED"]
    imageCount: int
    steps: int
    loraRank: int
    isReady: bool
    hasWeights: bool
    triggerWord: str | None
    error: str | None
    createdAt: str
    startedAt: str | None
    completedAt: str | None
    gateway: LoraExtension


class LoraCreated(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    status: str
    imageCount: int


class LoraPage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    items: list[LoraView]
    nextCursor: str | None


class JobResult(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    images: list[str]


class JobExtension(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ignoredParams: list[str]


class JobView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    status: Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]
    model: str
    progress: int | None
    result: JobResult | None
    error: str | None
    creditCost: int
    webhookStatus: str | None
    createdAt: str
    completedAt: str | None
    expired: bool
    input: dict[str, Any] | None
    gateway: JobExtension


class JobAccepted(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    jobId: str
    status: str


class JobPage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    jobs: list[JobView]
    nextCursor: str | None
    hasMore: bool
    models: list[str] | None = None


class MeUser(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    email: str | None
    role: str


class MeTeam(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    credits: int
    plan: str | None
    customerId: str | None


class MeKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    prefix: str


class Me(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user: MeUser
    team: MeTeam
    apiKey: MeKey


class Providers(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    providers: list[dict[str, Any]]


class Attempts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    attempts: list[dict[str, Any]]


class Usage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    since: str
    granularity: str
    usage: list[dict[str, Any]]


class Health(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    status: str
    checks: dict[str, Any] | None = None


SHAPES = [ErrorBody, LoraView, LoraCreated, LoraPage, JobView, JobAccepted, JobPage, Me, Providers, Attempts,
          Usage, Health, GenerateImageRequest]

# --------------------------------------------------------------------------- the create form

LORA_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["images", "name"],
    "properties": {
        "images": {"type": "array", "minItems": 15, "maxItems": 30,
                   "items": {"type": "string", "format": "binary"},
                   "description": "15–30 photos (JPEG, PNG or WebP by content; 10 MB each, 100 MB together; "
                                  "40 megapixels at most); repeat the field"},
        "name": {"type": "string", "minLength": 1, "maxLength": 60},
        "subjectKind": {"type": "string", "enum": list(SUBJECT_KINDS), "default": "person"},
        "gender": {"type": "string", "enum": list(GENDERS), "description": "required for a person"},
        "ethnicity": {"type": "string", "minLength": 1, "maxLength": 40, "description": "required for a person"},
        "age": {"type": "string", "minLength": 1, "maxLength": 40},
        "steps": {"type": "integer", "minimum": 500, "maximum": 3000, "default": 1000},
        "loraRank": {"type": "integer", "minimum": 8, "maximum": 64, "default": 32},
        "webhookUrl": {"type": "string", "maxLength": 2048, "description": "https:// on a public address"},
        "webhookEvents": {"type": "string", "description": "comma-separated: " + ", ".join(WEBHOOK_EVENTS)},
    },
}

# --------------------------------------------------------------------------- operations

KEY = [{"ApiKey": []}]
ID = {"type": "string", "format": "uuid"}


def _q(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _h(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "schema": {"type": "string", "maxLength": 255}, "description": description}


IDEMPOTENCY = _h("Idempotency-Key", "retries with the same key and body return the first answer (24 h)")
PROVIDER = _h("X-Gateway-Provider", "the provider instance to prefer, when eligible and healthy (extension)")


@dataclass
class Doc:
    ok: int = 200
    ok_shape: Any = None            # a Struct, or None for no body
    ok_media: str = "application/json"
    errors: tuple[int, ...] = ()
    body: tuple[str, Any] | None = None  # (media type, Struct or JSON schema)
    params: list[dict[str, Any]] = field(default_factory=list)
    security: list[dict[str, list[str]]] | None = field(default_factory=lambda: KEY)
    headers: dict[str, str] = field(default_factory=dict)


AUTH_ERRORS = (401, 403, 429)
OPERATIONS: dict[tuple[str, str], Doc] = {
    ("post", "/v2/loras"): Doc(202, LoraCreated, errors=(400, *AUTH_ERRORS, 402, 409, 413), body=("multipart/form-data", LORA_FORM),
                               params=[IDEMPOTENCY, PROVIDER]),
    ("get", "/v2/loras"): Doc(200, LoraPage, errors=(400, *AUTH_ERRORS), params=[
        _q("cursor", ID, "the id of the last item of the previous page"),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 24}),
        _q("includeArchived", {"type": "boolean", "default": False})]),
    ("get", "/v2/loras/{lora_id}"): Doc(200, LoraView, errors=(400, *AUTH_ERRORS, 404)),
    ("delete", "/v2/loras/{lora_id}"): Doc(204, None, errors=(400, *AUTH_ERRORS, 404)),
    ("get", "/v2/loras/{lora_id}/weights"): Doc(200, None, ok_media="application/octet-stream",
                                                errors=(400, *AUTH_ERRORS, 404, 409),
                                                headers={"x-weights-sha256": "sha256 of the file, hex",
                                                         "x-weights-key-format": "kohya or diffusers",
                                                         "x-trigger-word": "the LoRA's trigger word"}),
    ("get", "/v2/loras/{lora_id}/attempts"): Doc(200, Attempts, errors=(400, *AUTH_ERRORS, 404)),
    ("post", "/v2/images/generate"): Doc(202, JobAccepted, errors=(400, *AUTH_ERRORS, 402, 404, 409, 413),
                                         body=("application/json", GenerateImageRequest), params=[IDEMPOTENCY, PROVIDER]),
    ("get", "/v2/jobs"): Doc(200, JobPage, errors=(400, *AUTH_ERRORS), params=[
        _q("status", {"type": "string", "enum": list(JOB_STATUSES)}),
        _q("model", {"type": "string"}),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
        _q("cursor", {"type": "string"}, "the nextCursor of the previous page, unchanged"),
        _q("scope", {"type": "string", "enum": ["user", "team"], "default": "user"}),
        _q("search", ID, "a job id"),
        _q("include_models", {"type": "boolean", "default": False})]),
    ("get", "/v2/jobs/{job_id}"): Doc(200, JobView, errors=(400, *AUTH_ERRORS, 404)),
    ("get", "/v2/jobs/{job_id}/attempts"): Doc(200, Attempts, errors=(400, *AUTH_ERRORS, 404)),
    ("get", "/v2/me"): Doc(200, Me, errors=AUTH_ERRORS),
    ("get", "/v2/providers"): Doc(200, Providers, errors=AUTH_ERRORS),
    ("get", "/v2/usage"): Doc(200, Usage, errors=(400, *AUTH_ERRORS), params=[
        _q("period", {"type": "string", "enum": ["day", "month"], "default": "day"}),
        _q("since", {"type": "string", "format": "date"}, "YYYY-MM-DD")]),
    ("get", "/healthz"): Doc(200, Health, security=None),
    ("get", "/readyz"): Doc(200, Health, errors=(503,), security=None),
}

EXTENSIONS = {"/v2/loras/{lora_id}/weights", "/v2/loras/{lora_id}/attempts", "/v2/jobs/{job_id}/attempts",
              "/v2/providers", "/v2/usage"}

DESCRIPTIONS = {
    200: "OK", 202: "Accepted: the work goes on in the background", 204: "Done, nothing to return",
    400: "Invalid input: `details` names each field and what was wrong with it",
    401: "No API key, or an unknown or revoked one", 402: "Not enough credits (`creditsRequired`, `creditsAvailable`)",
    403: "The API key is inactive", 404: "Not found, or another team's",
    409: "In a state that does not allow it (or an Idempotency-Key reused with another request)",
    413: "The request body is too large", 429: "Too many requests or trainings at once; `Retry-After` says when",
    503: "The database does not answer or no engine runs",
}

SECURITY_SCHEMES = {
    "ApiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header",
                             description="A team's API key (`afk_…`), from `lora-gateway keys create`"),
    "Bearer": SecurityScheme(type="http", scheme="bearer",
                             description="`server.admin_token` (the /admin endpoints) or `server.metrics_token`"),
}


def _schemas() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    refs, components = msgspec.json.schema_components(SHAPES, ref_template="#/components/schemas/{name}")
    return dict(zip((s.__name__ for s in SHAPES), refs)), components


def complete(app: Litestar) -> None:
    """Write the operations' bodies, parameters, responses and security into ``app``'s
    OpenAPI document (on startup, before anyone reads it)."""
    doc = app.openapi_schema
    refs, components = _schemas()
    doc.components = doc.components or Components()
    doc.components.schemas = {**(doc.components.schemas or {}), **components}  # type: ignore[dict-item]
    doc.components.security_schemes = {**(doc.components.security_schemes or {}), **SECURITY_SCHEMES}
    for path, item in (doc.paths or {}).items():
        for method in ("get", "post", "delete", "put", "patch"):
            op: Operation | None = getattr(item, method, None)
            if op is None:
                continue
            spec = OPERATIONS.get((method, path))
            if spec is None:
                continue
            _fill(op, path, spec, refs)


def _content(media: str, shape: Any, refs: dict[str, Any]) -> dict[str, OpenAPIMediaType]:
    if shape is None:
        schema: Any = {"type": "string", "format": "binary"} if media != "application/json" else {}
    elif isinstance(shape, dict):
        schema = shape
    else:
        schema = refs[shape.__name__]
    return {media: OpenAPIMediaType(schema=schema)}  # type: ignore[arg-type]


def _fill(op: Operation, path: str, spec: Doc, refs: dict[str, Any]) -> None:
    responses: dict[str, OpenAPIResponse] = {}
    headers = {k: OpenAPIHeader(schema=Schema(type="string"), description=v) for k, v in spec.headers.items()}
    if spec.ok == 204:
        responses["204"] = OpenAPIResponse(description=DESCRIPTIONS[204])
    else:
        responses[str(spec.ok)] = OpenAPIResponse(
            description=DESCRIPTIONS.get(spec.ok, "OK"),
            content=_content(spec.ok_media, spec.ok_shape, refs), headers=headers or None)
    for status in spec.errors:
        shape = Health if status == 503 else ErrorBody
        responses[str(status)] = OpenAPIResponse(description=DESCRIPTIONS[status], content=_content("application/json", shape, refs))
    op.responses = responses  # type: ignore[assignment]
    params: list[Any] = [p for p in (op.parameters or []) if getattr(p, "param_in", None) == "path"]
    for p in spec.params:
        params.append(Parameter(name=p["name"], param_in=p["in"], schema=p["schema"],  # type: ignore[arg-type]
                                description=p.get("description") or None, required=False))
    op.parameters = params or None
    if spec.body is not None:
        media, shape = spec.body
        op.request_body = RequestBody(content=_content(media, shape, refs), required=True)
    op.security = [dict(s) for s in spec.security] if spec.security else None
    if path in EXTENSIONS:
        op.tags = ["Extensions"]
