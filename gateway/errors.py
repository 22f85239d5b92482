"""The gateway's error tree. One handler (``gateway.api.errors``) renders all of them in
Apiframe's shape: ``{"error": "..."}`` plus ``details`` / the 402 fields where they apply."""

from __future__ import annotations

import re
from typing import Any, ClassVar

_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def split_validation_error(err: Exception) -> tuple[str, str]:
    """msgspec's ``"Expected `int`, got `str` - at `$.server.port`"`` as
    ``("server.port", "Expected `int`, got `str`")``; the path is "" at the top level."""
    text = str(err)
    m = _AT_PATH.search(text)
    return (m.group(1), text[: m.start()]) if m else ("", text)


class GatewayError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code}

    def headers(self) -> dict[str, str]:
        return {}


class ValidationFailed(GatewayError):
    status_code = 400
    code = "validation_error"

    def __init__(self, message: str, details: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}

    @classmethod
    def at(cls, path: str, msg: str) -> "ValidationFailed":
        return cls(f"{path}: {msg}" if path else msg, {path or "body": [msg]})

    def body(self) -> dict[str, Any]:
        b = super().body()
        if self.details:
            b["details"] = self.details
        return b


class Unauthorized(GatewayError):
    status_code = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status_code = 403
    code = "forbidden"


class NotFound(GatewayError):
    status_code = 404
    code = "not_found"


class Conflict(GatewayError):
    status_code = 409
    code = "conflict"


class Gone(GatewayError):
    status_code = 410
    code = "gone"


class InsufficientCredits(GatewayError):
    status_code = 402
    code = "insufficient_credits"

    def __init__(self, required: int, available: int) -> None:
        super().__init__("Insufficient credits")
        self.required = required
        self.available = available

    def body(self) -> dict[str, Any]:
        return {**super().body(), "creditsRequired": self.required, "creditsAvailable": self.available}


class RateLimited(GatewayError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
