"""Durable cancel requests: one row per attempt to cancel at its provider, worked through by
the engine (leased, retried with backoff) until the vendor confirms, says the job had already
ended, or the tries run out. Written in the same transaction as the state change that needs
it (an archive, a superseded attempt), so a crash never loses one."""

from __future__ import annotations

from typing import Iterable

import msgspec

from gateway.store.models import Attempt, row_to
from gateway.store.sql import marks, skip_locked
from gateway.timeutil import now


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True):
    attempt_id: str
    owner_kind: str
    owner_id: str
    provider: str
    provider_ref: str | None
    reason: str
    state: str  # pending | done | abandoned
    tries: int
    next_try_at: float
    lease_owner: str | None
    lease_expires: float | None
    last_error: str | None
    created_at: float
    finished_at: float | None


async def request_cancel(conn, attempt: Attempt, reason: str, *, ref: str | None = None) -> None:
    """Ask for ``attempt`` to be cancelled (idempotent; a ref learnt later fills in a missing one)."""
    t = now()
    await conn.execute(
        """INSERT INTO cancels (attempt_id, owner_kind, owner_id, provider, provider_ref, reason, state,
             tries, next_try_at, created_at)
           VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)
           ON CONFLICT (attempt_id) DO UPDATE SET provider_ref = COALESCE(cancels.provider_ref, excluded.provider_ref)""",
        (attempt.id, attempt.owner_kind, attempt.owner_id, attempt.provider, ref or attempt.provider_ref, reason, t, t),
    )


async def claim_cancels(conn, *, owner: str, lease_s: float, limit: int) -> list[CancelRequest]:
    if limit <= 0:
        return []
    t = await conn.now()
    rows = await conn.execute_fetchall(
        f"""UPDATE cancels SET lease_owner = ?, lease_expires = ?
           WHERE attempt_id IN (SELECT attempt_id FROM cancels WHERE state = 'pending' AND next_try_at <= ?
                                  AND (lease_expires IS NULL OR lease_expires < ?) ORDER BY next_try_at LIMIT ?{skip_locked(conn)})
           RETURNING *""",
        (owner, t + lease_s, t, t, limit),
    )
    return [row_to(CancelRequest, r) for r in rows]


async def close_cancel(conn, attempt_id: str, owner: str, *, state: str, error: str | None = None,
                       ref: str | None = None) -> bool:
    """``done`` or ``abandoned`` (with the provider's job id it was about, when learnt on the
    way); lease-conditioned. Returns whether it applied."""
    cur = await conn.execute(
        """UPDATE cancels SET state = ?, last_error = ?, finished_at = ?, tries = tries + 1,
             provider_ref = COALESCE(provider_ref, ?), lease_owner = NULL, lease_expires = NULL
           WHERE attempt_id = ? AND lease_owner = ?""",
        (state, error, now(), ref, attempt_id, owner),
    )
    return cur.rowcount == 1


async def retry_cancel(conn, attempt_id: str, owner: str, *, next_try_at: float, error: str | None,
                       ref: str | None = None, count: bool = True) -> None:
    await conn.execute(
        """UPDATE cancels SET tries = tries + ?, next_try_at = ?, last_error = ?,
             provider_ref = COALESCE(provider_ref, ?), lease_owner = NULL, lease_expires = NULL
           WHERE attempt_id = ? AND lease_owner = ?""",
        (1 if count else 0, next_try_at, error, ref, attempt_id, owner),
    )


async def cancels_for(conn, owner_kind: str, owner_id: str) -> list[CancelRequest]:
    rows = await conn.execute_fetchall(
        "SELECT * FROM cancels WHERE owner_kind = ? AND owner_id = ? ORDER BY created_at", (owner_kind, owner_id)
    )
    return [row_to(CancelRequest, r) for r in rows]


async def renew_cancel_leases(conn, owner: str, lease_s: float, attempt_ids: Iterable[str]) -> None:
    until = await conn.now() + lease_s
    ids = list(attempt_ids)
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        await conn.execute(
            f"UPDATE cancels SET lease_expires = ? WHERE lease_owner = ? AND attempt_id IN ({marks(chunk)})", (until, owner, *chunk)
        )


async def release_cancels(conn, owner: str) -> None:
    await conn.execute("UPDATE cancels SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = ?", (owner,))
