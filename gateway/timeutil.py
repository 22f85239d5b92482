"""Time and id helpers: UTC, ISO-8601 with milliseconds and ``Z``; bare UUIDs."""

from __future__ import annotations

import re
import time
import uuid


def now() -> float:
    """Seconds since the epoch (the one clock the store uses)."""
    return time.time()


def iso(ts: float | None) -> str | None:
    """``2026-04-25T10:18:11.000Z`` for a timestamp, None for None."""
    if ts is None:
        return None
    ms = int(round(ts * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def new_id() -> str:
    return str(uuid.uuid4())


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_uuid(value: str) -> bool:
    """A UUID in its canonical hyphenated form (either case)."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None
