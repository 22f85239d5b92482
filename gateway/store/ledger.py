"""The credit ledger: append-only, one row per charge or refund, unique on (reference, kind);
the team's balance moves in the same transaction and never below zero."""

from __future__ import annotations

from gateway.store.base import Connection
from gateway.store.models import LedgerEntry, row_to
from gateway.timeutil import now


class InsufficientBalance(Exception):
    def __init__(self, required: int, available: int) -> None:
        super().__init__(f"requires {required}, has {available}")
        self.required = required
        self.available = available

async def apply_credits(
    conn: Connection, team_id: str, amount: int, *, reason: str, ref: str, kind: str
) -> bool:
    """Append one ledger entry and move the balance, in the caller's transaction.

    Returns False (and changes nothing) when an entry with this ``(ref, kind)`` already exists,
    so a charge or refund can never happen twice. Raises InsufficientBalance, having written
    nothing, when a debit would take the balance below zero: the balance is checked (and
    moved) before the ledger row is written.
    """
    rows = list(await conn.execute_fetchall("SELECT 1 FROM ledger WHERE ref = ? AND kind = ?", (ref, kind)))
    if rows:  # already applied (checked first: a repeat must never be refused for the balance)
        return False
    cur = await conn.execute(
        "UPDATE teams SET credits = credits + ? WHERE id = ? AND credits + ? >= 0", (amount, team_id, amount)
    )
    if cur.rowcount == 0:
        rows = list(await conn.execute_fetchall("SELECT credits FROM teams WHERE id = ?", (team_id,)))
        raise InsufficientBalance(-amount, int(rows[0][0]) if rows else 0)
    await conn.execute(
        "INSERT INTO ledger (team_id, amount, reason, ref, kind, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (team_id, amount, reason, ref, kind, now()),
    )
    return True

async def refund(conn: Connection, team_id: str, *, ref: str, charge_kind: str, reason: str) -> bool:
    """Refund a charge in full, once. No charge, or already refunded: nothing happens."""
    rows = list(
        await conn.execute_fetchall("SELECT amount FROM ledger WHERE ref = ? AND kind = ?", (ref, charge_kind))
    )
    if not rows or rows[0][0] >= 0:
        return False
    return await apply_credits(conn, team_id, -rows[0][0], reason=reason, ref=ref, kind=f"{charge_kind}_refund")

async def ledger_for(conn: Connection, team_id: str, limit: int = 1000) -> list[LedgerEntry]:
    rows = await conn.execute_fetchall(
        "SELECT * FROM ledger WHERE team_id = ? ORDER BY id LIMIT ?", (team_id, limit)
    )
    return [row_to(LedgerEntry, r) for r in rows]
