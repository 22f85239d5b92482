"""``Idempotency-Key``: a replay within 24 h returns the original object (its status may have
moved on); the same key with a different request is a 409. The record is written in the same
transaction as the object and its charge, before them (the insert is the lock), so two
concurrent requests, on one replica or several, create one object."""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.store.base import Connection
import msgspec

from gateway.errors import Conflict, ValidationFailed
from gateway.store import idempotency as idempotency_store
from gateway.store.idempotency import IdempotencyRecord
from gateway.timeutil import now

HEADER = "idempotency-key"
MAX_LENGTH = 255
TTL_S = 24 * 3600


def key_from(headers: Any) -> str | None:
    raw = headers.get(HEADER)
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_LENGTH or not raw.isprintable():
        raise ValidationFailed.at("Idempotency-Key", f"Must be 1–{MAX_LENGTH} printable characters")
    return raw


def digest(value: Any) -> str:
    """A canonical digest of a request (JSON with sorted keys)."""
    return hashlib.sha256(msgspec.json.encode(msgspec.to_builtins(value), order="sorted")).hexdigest()


async def lookup(conn: Connection, team_id: str, key: str, route: str, request_digest: str | None) -> str | None:
    """The id of the object an earlier request with this key created, or None.

    With ``request_digest`` None only existence is checked (before the body is read)."""
    rec = await idempotency_store.idempotency_get(conn, team_id, key, newer_than=now() - TTL_S)
    if rec is None:
        return None
    if request_digest is not None and (rec.route != route or rec.request_digest != request_digest):
        raise Conflict("This Idempotency-Key was already used with a different request")
    return rec.object_id


async def claim(conn: Connection, team_id: str, key: str, route: str, request_digest: str, object_id: str) -> str | None:
    """Take the key for the object this request is about to create (insert-as-lock, in the
    transaction that creates it): None when it is ours, else the id of the object an earlier
    request with this key created (409 if that request was a different one)."""
    t = now()
    rec = IdempotencyRecord(team_id=team_id, key=key, route=route, request_digest=request_digest,
                            object_id=object_id, created_at=t)
    if await idempotency_store.claim(conn, rec, expired_before=t - TTL_S):
        return None
    earlier = await lookup(conn, team_id, key, route, request_digest)
    assert earlier is not None, "an idempotency key that is held has a record"
    return earlier
