"""The one place errors become HTTP responses, in Apiframe's shape. No stack trace, vendor
body or key ever reaches a client."""

from __future__ import annotations


import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException, ValidationException

from gateway.errors import GatewayError
from gateway.logging import _REQUEST_ID, next_request_id
from gateway.uploads import UploadRejected

log = structlog.get_logger()


def gateway_error(_: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status_code, headers=exc.headers())


def upload_rejected(_: Request, exc: UploadRejected) -> Response:
    return Response({"error": exc.message, "code": "validation_error", "details": {exc.path: [exc.message]}}, status_code=400)


def _unrouted_headers(request: Request, headers: dict[str, str] | None) -> dict[str, str] | None:
    """A request that matched no route (404/405) never reaches the request-id middleware,
    which Litestar runs per route: give its response the ``x-request-id`` here."""
    if "route_handler" in request.scope:
        return headers
    incoming = request.headers.get("x-request-id")
    rid = incoming if incoming and _REQUEST_ID.match(incoming) else next_request_id()
    return {**(headers or {}), "x-request-id": rid}


def http_exception(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    code = {400: "validation_error", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 413: "too_large"}.get(status, "internal_error" if status >= 500 else "error")
    if isinstance(exc, NotFoundException):
        message = "Not found"
    elif isinstance(exc, ValidationException):
        message = "Invalid request"
    elif isinstance(exc, NotAuthorizedException):
        message = "API key is required"
    elif status == 413:
        message = "Request body is too large"
    elif status == 405:
        message = "Method not allowed"
    else:
        message = exc.detail if status < 500 else "Internal server error"
    return Response({"error": message, "code": code}, status_code=status,
                    headers=_unrouted_headers(request, exc.headers or None))


def unexpected(_: Request, exc: Exception) -> Response:
    log.exception("request_failed", error_type=type(exc).__name__)
    return Response({"error": "Internal server error", "code": "internal_error"}, status_code=500)


EXCEPTION_HANDLERS = {
    GatewayError: gateway_error,
    UploadRejected: upload_rejected,
    HTTPException: http_exception,
    Exception: unexpected,
}
