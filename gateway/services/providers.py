"""Provider instances as clients see them: the ``X-Gateway-Provider`` preference, the
``GET /v2/providers`` listing, a LoRA's or job's attempts, and the declared cost of a team's usage."""

from __future__ import annotations

import calendar
import time
from typing import Any

from gateway.context import Gateway
from gateway.engine.attempts import IN_FLIGHT
from gateway.errors import ValidationFailed
from gateway.health import OPERATIONS
from gateway.store import attempts as attempts_store
from gateway.store.models import Attempt, Principal
from gateway.timeutil import iso, now

HEADER = "x-gateway-provider"


def preferred(gw: Gateway, headers: Any) -> str | None:
    """The instance a request asks for (an extension header); 400 if no such instance exists.
    It is honoured when that instance is eligible and healthy, else routing goes on as usual."""
    name = headers.get(HEADER)
    if name is None or not name.strip():
        return None
    name = name.strip()
    if name not in gw.providers:
        raise ValidationFailed.at("X-Gateway-Provider", f"Must be one of {', '.join(sorted(gw.providers))}")
    return name


def _capabilities(p: Any) -> dict[str, Any]:
    c = p.capabilities
    t, i = c.training, c.inference
    return {
        "training": None if t is None else {
            "subjectKinds": sorted(t.subject_kinds), "steps": [t.min_steps, t.max_steps],
            "rank": [t.min_rank, t.max_rank] if t.rank_controllable else None, "datasetInput": t.dataset_input,
            "producesWeights": t.produces_artifact, "makesTriggerWord": t.makes_trigger_word,
        },
        "inference": None if i is None else {
            "acceptsLoraFile": i.accepts_lora_file, "maxOutputs": i.max_outputs, "aspectRatios": sorted(i.aspect_ratios),
            "outputFormats": sorted(i.output_formats), "honours": sorted(i.honours), "loraFormats": sorted(i.lora_formats),
        },
        "callbacks": c.webhooks_in, "lookup": c.can_lookup, "cancel": c.can_cancel,
    }


async def listing(gw: Gateway, minutes: int = 15) -> list[dict[str, Any]]:
    """Every instance: its type, capabilities, declared costs, breaker per operation, the recent
    success rate and latency of its calls (every process's), and its attempts in flight."""
    recent = await gw.health.recent(minutes)
    async with gw.db.read() as conn:
        inflight = await attempts_store.attempts_in_flight(conn, IN_FLIGHT)
    out = []
    for name, p in gw.providers.items():
        health = {}
        for op in OPERATIONS.values():
            calls, failures, total_ms = recent.get((name, op), (0, 0, 0.0))
            health[op] = {
                "breaker": await gw.health.state(name, op),
                "calls": calls,
                "successRate": round(1 - failures / calls, 4) if calls else None,
                "meanLatencyMs": round(total_ms / calls, 1) if calls else None,
            }
        cost = p.capabilities.cost
        out.append({
            "name": name, "type": type(p).name, "capabilities": _capabilities(p),
            "cost": {"currency": cost.currency, "perTraining": cost.per_training, "perImage": cost.per_image},
            "health": health, "windowMinutes": minutes,
            "inFlight": {"training": inflight.get((name, "lora"), 0), "inference": inflight.get((name, "job"), 0)},
        })
    return out


def attempt_view(a: Attempt) -> dict[str, Any]:
    return {
        "id": a.id, "seq": a.seq, "provider": a.provider, "state": a.state, "error": a.error,
        "retryable": a.retryable, "progress": a.progress, "cost": a.cost, "currency": a.currency,
        "createdAt": iso(a.created_at), "submittedAt": iso(a.submitted_at), "finishedAt": iso(a.finished_at),
    }


async def attempts(gw: Gateway, principal: Principal, kind: str, owner_id: str) -> list[dict[str, Any]]:
    async with gw.db.read() as conn:
        return [attempt_view(a) for a in await attempts_store.attempts_for(conn, kind, owner_id)]


def _period_start(period: str, t: float) -> float:
    g = time.gmtime(t)
    if period == "month":
        return float(calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0)))
    return float(calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0)))


async def usage(gw: Gateway, principal: Principal, *, period: str, since: float | None) -> dict[str, Any]:
    """Declared provider cost of the team's attempts a provider accepted, per instance and
    ``period`` (day or month, UTC), from ``since`` (default: the start of the current period)."""
    start = since if since is not None else _period_start(period, now())
    async with gw.db.read() as conn:
        rows = await attempts_store.team_usage(conn, principal.team_id, since=start)
    buckets: dict[tuple[str, str, str], dict[str, Any]] = {}
    for provider, kind, currency, submitted_at, cost in rows:
        label = time.strftime("%Y-%m" if period == "month" else "%Y-%m-%d", time.gmtime(submitted_at))
        b = buckets.setdefault((label, provider, currency or "USD"), {
            "period": label, "provider": provider, "currency": currency or "USD", "trainings": 0,
            "generations": 0, "cost": 0.0})
        b["trainings" if kind == "lora" else "generations"] += 1
        b["cost"] = round(b["cost"] + (cost or 0.0), 6)
    return {"since": iso(start), "granularity": period,
            "usage": sorted(buckets.values(), key=lambda b: (b["period"], b["provider"]))}
