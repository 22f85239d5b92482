"""Time and id helpers: UTC, ISO-8601 with milliseconds and ``Z``; bare UUIDs."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone


def now() -> float:
    """Seconds since the epoch (the one clock the store uses)."""
    return time.time()


def iso(ts: float | None) -> str | None:
    """``2026-04-25T10:18:11.000Z`` for a timestamp, None for None."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def new_id() -> str:
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except (ValueError, AttributeError, TypeError):
        return False
