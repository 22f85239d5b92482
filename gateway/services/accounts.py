"""Teams, API keys and credits: authentication for the API, and the admin operations."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog

from gateway.authcache import AuthCache
from gateway.config import ConfigError, RouteSettings, check_route
from gateway.errors import Conflict, Forbidden, NotFound, RateLimited, Unauthorized, ValidationFailed
from gateway.keys import KEY_PREFIX, display_prefix, generate_key, key_digest
from gateway.store import ledger as ledger_store
from gateway.store import teams as teams_store
from gateway.store.base import Database
from gateway.store.models import ApiKey, Principal, Team
from gateway.timeutil import new_id

log = structlog.get_logger()


class NewKey(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # shown once; only its sha256 is stored
    record: ApiKey


async def authenticate(db: Database, raw_key: str | None, cache: AuthCache | None = None) -> Principal:
    if not raw_key:
        raise Unauthorized("API key is required")
    digest = key_digest(raw_key)
    if cache is not None and (hit := cache.get(digest)) is not None:
        return hit
    async with db.read() as conn:
        found = await teams_store.key_with_team_limit(conn, digest)
    if found is None or found[0].revoked_at is not None:
        raise Unauthorized("Invalid API key")
    key, team_rate = found
    if not key.active:
        raise Forbidden("API key is inactive")
    principal = Principal(key=key, team_id=key.team_id, user_id=key.user_id, rate_limit_per_minute=team_rate)
    if cache is not None:
        cache.put(digest, principal)
    return principal


async def check_rate(gw: Any, principal: Principal) -> None:
    """Per-key token bucket; the team's override wins over ``teams.rate_limit_per_minute``."""
    team_limit = principal.rate_limit_per_minute
    per_minute = team_limit if team_limit is not None else gw.settings.teams.rate_limit_per_minute
    wait = await gw.rate_limiter.check(principal.key.id, per_minute)
    if wait > 0:
        raise RateLimited(f"Rate limit of {per_minute} requests per minute exceeded", int(wait) + 1)


async def me(db: Database, principal: Principal) -> dict[str, Any]:
    async with db.read() as conn:
        team = await teams_store.get_team(conn, principal.team_id)
        user = await teams_store.get_user(conn, principal.user_id)
    assert team is not None
    return {
        "user": {"id": principal.user_id, "email": user.email if user else None, "role": user.role if user else "owner"},
        "team": {"id": team.id, "name": team.name, "credits": team.credits, "plan": team.plan, "customerId": team.customer_id},
        "apiKey": {"id": principal.key.id, "name": principal.key.name, "prefix": principal.key.prefix},
    }


# --------------------------------------------------------------------------- admin


async def create_team(
    db: Database, *, name: str, credits: int, max_concurrent_trainings: int, email: str | None = None, key_name: str = "default"
) -> tuple[Team, NewKey]:
    async with db.tx() as conn:
        team = await teams_store.create_team(conn, name=name, credits=credits, max_concurrent_trainings=max_concurrent_trainings)
        user = await teams_store.create_user(conn, team_id=team.id, email=email)
        new = await _insert_key(conn, team.id, user.id, key_name)
        team = await teams_store.get_team(conn, team.id)
    assert team is not None
    log.info("team_created", team_id=team.id, key_prefix=new.record.prefix)
    return team, new


async def _insert_key(conn: Any, team_id: str, user_id: str, name: str) -> NewKey:
    key = generate_key()
    record = await teams_store.insert_key(
        conn, team_id=team_id, user_id=user_id, name=name, prefix=display_prefix(key), digest=key_digest(key)
    )
    return NewKey(key=key, record=record)


async def create_key(db: Database, team_id: str, name: str) -> NewKey:
    async with db.tx() as conn:
        if await teams_store.get_team(conn, team_id) is None:
            raise NotFound(f"no team {team_id}")
        owner = await teams_store.team_owner(conn, team_id)
        if owner is None:
            owner = await teams_store.create_user(conn, team_id=team_id, email=None)
        new = await _insert_key(conn, team_id, owner.id, name)
    log.info("key_created", team_id=team_id, key_prefix=new.record.prefix)
    return new


async def revoke_key(db: Database, key_id: str, cache: AuthCache | None = None) -> bool:
    async with db.tx() as conn:
        done = await teams_store.revoke_key(conn, key_id)
    if cache is not None:
        cache.clear()
    await db.notify("auth", key_id)  # every replica's cache (PostgreSQL; SQLite: within auth_cache_s)
    log.info("key_revoked", key_id=key_id, changed=done)
    return done


async def set_key_active(db: Database, key_id: str, active: bool, cache: AuthCache | None = None) -> bool:
    async with db.tx() as conn:
        done = await teams_store.set_key_active(conn, key_id, active)
    if cache is not None:
        cache.clear()
    await db.notify("auth", key_id)
    return done


async def add_credits(db: Database, team_id: str, amount: int, reason: str) -> Team:
    async with db.tx() as conn:
        if await teams_store.get_team(conn, team_id) is None:
            raise NotFound(f"no team {team_id}")
        try:
            await ledger_store.apply_credits(conn, team_id, amount, reason=reason, ref=new_id(), kind="grant" if amount >= 0 else "debit")
        except ledger_store.InsufficientBalance as e:
            raise Forbidden(f"the balance is {e.available}; cannot remove {e.required}") from None
        team = await teams_store.get_team(conn, team_id)
    assert team is not None
    return team


async def set_limits(db: Database, team_id: str, *, max_concurrent_trainings: int | None, rate_limit_per_minute: int | None) -> Team:
    async with db.tx() as conn:
        if not await teams_store.set_team_limits(
            conn, team_id, max_concurrent_trainings=max_concurrent_trainings, rate_limit_per_minute=rate_limit_per_minute
        ):
            raise NotFound(f"no team {team_id}")
        team = await teams_store.get_team(conn, team_id)
    assert team is not None
    return team


async def set_route(db: Database, team_id: str, operation: str, route: RouteSettings | None,
                    providers: dict[str, Any]) -> dict[str, Any] | None:
    """Set (or with None, clear) a team's own route for ``operation`` (training or inference);
    returns the team's routes. The route must name configured instances."""
    if route is not None:
        try:
            check_route(route, providers, f"the `{operation}")
        except ConfigError as e:
            raise ValidationFailed(str(e)) from None
    async with db.tx() as conn:
        team = await teams_store.get_team(conn, team_id)
        if team is None:
            raise NotFound(f"no team {team_id}")
        routes = dict(await teams_store.team_routing(conn, team_id) or {})
        if route is None:
            routes.pop(operation, None)
        else:
            routes[operation] = msgspec.to_builtins(route)
        await teams_store.set_team_routing(conn, team_id, routes or None)
    return routes or None


async def resolve_team(db: Database, ref: str) -> Team:
    """The team ``ref`` names: its id, or its name (case-insensitive) when that is unique."""
    async with db.read() as conn:
        found = await teams_store.find_teams(conn, ref)
    if not found:
        raise NotFound(f"no team with the id or name {ref!r} (`lora-gateway teams list` shows them)")
    if len(found) > 1:
        ids = ", ".join(t.id for t in found)
        raise Conflict(f"{len(found)} teams are named {ref!r}; give one's id instead: {ids}")
    return found[0]


async def resolve_key(db: Database, ref: str) -> ApiKey:
    """The API key ``ref`` names: its id, its display prefix (``afk_XXXX``, when unique), or the
    key itself."""
    digest = key_digest(ref) if ref.startswith(KEY_PREFIX) and len(ref) > len(display_prefix(ref)) else None
    async with db.read() as conn:
        found = await teams_store.find_keys(conn, key_id=ref.lower(), prefix=ref, digest=digest)
    if not found:
        raise NotFound(f"no API key with the id, prefix or value {display_prefix(ref) + '…' if digest else ref!r} "
                       "(`lora-gateway keys list TEAM` shows a team's keys)")
    if len(found) > 1:
        ids = ", ".join(k.id for k in found)
        raise Conflict(f"{len(found)} keys start with {ref!r}; give one's id instead: {ids}")
    return found[0]


async def list_teams(db: Database) -> list[Team]:
    async with db.read() as conn:
        return await teams_store.list_teams(conn)


async def list_keys(db: Database, team_id: str) -> list[ApiKey]:
    async with db.read() as conn:
        return await teams_store.list_keys(conn, team_id)
