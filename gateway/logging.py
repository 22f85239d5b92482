"""structlog set-up (JSON in production, console in development) and the request-id middleware."""

from __future__ import annotations

import itertools
import logging
import re
import sys
import time
import uuid

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import route_of

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_KEYS = re.compile(r"(api[_-]?key|authorization|secret|password|token)", re.I)


def _redact(_logger: object, _name: str, event: dict) -> dict:
    """Defence in depth: never let a secret-looking field reach the log."""
    for k in list(event):
        if _SECRET_KEYS.search(k) and k not in ("key_prefix",):
            event[k] = "[redacted]"
    return event


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # sys.stderr looked up per logger, not bound once (it may be swapped, e.g. under pytest)
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # httpx logs every request URL at INFO (URLs can carry signed tokens)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ID_PREFIX = uuid.uuid4().hex[:12]  # random per process
_ID_COUNTER = itertools.count(1)


def next_request_id() -> str:
    """Unique across processes (a random prefix) and cheap (a counter)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Binds ``request_id`` to every log line of a request and returns it as ``x-request-id``."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = incoming if incoming and _REQUEST_ID.match(incoming) else next_request_id()
        raw_rid = rid.encode()
        started, status = time.perf_counter(), [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_rid)]
            await send(message)

        try:
            with structlog.contextvars.bound_contextvars(request_id=rid):
                await app(scope, receive, send_with_id)
        finally:
            gw = getattr(getattr(scope.get("app"), "state", None), "gw", None)
            if gw is not None:  # the request's latency, by its route template
                gw.metrics.http_observed(scope.get("method", "GET"), route_of(scope), status[0],
                                         time.perf_counter() - started)

    return middleware
