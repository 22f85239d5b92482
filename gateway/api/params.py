"""Query-string parsing with Apiframe-shaped 400s."""

from __future__ import annotations

from typing import Any

from litestar import Request

from gateway.errors import ValidationFailed
from gateway.timeutil import is_uuid


def parse_query(request: Request, spec: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """``spec``: name -> (kind, default). Kinds: ``str``, ``uuid``, ``bool``, ``int:lo:hi``,
    ``enum:a|b|c``. Unknown parameters are ignored; every bad one is reported at once."""
    out: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    params = request.query_params
    for name, (kind, default) in spec.items():
        values = params.getall(name, [])
        if not values or values[-1] == "":
            out[name] = default
            continue
        raw = values[-1]
        if kind == "str":
            out[name] = raw
        elif kind == "uuid":
            if not is_uuid(raw):
                errors[name] = ["Must be a UUID"]
            out[name] = raw.lower()  # ids are stored in lower case
        elif kind == "bool":
            if raw not in ("true", "false"):
                errors[name] = ['Must be "true" or "false"']
            out[name] = raw == "true"
        elif kind.startswith("int:"):
            _, lo, hi = kind.split(":")
            try:
                value = int(raw)
            except ValueError:
                errors[name] = ["Expected an integer"]
                continue
            if not int(lo) <= value <= int(hi):
                errors[name] = [f"Must be between {lo} and {hi}"]
            out[name] = value
        elif kind.startswith("enum:"):
            allowed = kind[5:].split("|")
            if raw not in allowed:
                errors[name] = [f"Must be one of {', '.join(allowed)}"]
            out[name] = raw
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
    if errors:
        first = next(iter(errors))
        raise ValidationFailed(f"Invalid query: {first}: {errors[first][0]}", errors)
    return out
