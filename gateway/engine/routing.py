"""Routing: which provider instances may serve a LoRA or a job, and in which order.

1. **Eligibility**, from declared capabilities only (never a provider's name or type): subject
   kind, steps, rank (unless the vendor picks it), whether the dataset can be handed over in the
   form the instance asks for; for inference the output count and aspect ratio, and for the
   LoRA: the instance that trained it, or (a portable LoRA) any instance that takes a LoRA file
   of its key format and can reach the weights.
2. **The strategy** of the route (the team's own, else the configured one): ``priority``
   (configured order), ``cheapest`` (declared cost; ties by order) or ``weighted`` (rendezvous
   hashing on the object's id, so one LoRA or job always ranks the instances the same way and
   many spread by the weights). For inference, instances that honour every parameter the client
   set go first. A preferred instance (the ``X-Gateway-Provider`` header) goes first.
3. **Health** (``gateway.health``, shared by every process): closed breakers first, then
   half-open ones (one probe at a time), then open ones, which are tried only when nothing
   else is left.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Awaitable, Callable

from gateway.config import RouteSettings, RoutingSettings
from gateway.health import ProviderHealth
from providers.base import GENERATION_PARAMS, Provider

#: the order health puts instances in
HEALTH_RANK = {"closed": 0, "half-open": 1, "probing": 2, "open": 3}


@dataclass(frozen=True)
class TrainingNeeds:
    subject_kind: str
    steps: int
    rank: int
    key: str = ""  # the LoRA's id: weighted routing is stable per object
    team_id: str | None = None
    preferred: str | None = None  # an instance the request asked for


@dataclass(frozen=True)
class InferenceNeeds:
    num_outputs: int
    aspect_ratio: str
    portable: bool
    trained_by: str | None
    set_params: frozenset[str] = frozenset()  # the fluxLoraParams the client set
    artifact_format: str | None = None  # diffusers | kohya
    weights_local: bool = False  # the stored weights are a file on this machine
    key: str = ""  # the job's id
    team_id: str | None = None
    preferred: str | None = None


def rendezvous(key: str, names: list[str], weights: dict[str, float]) -> list[str]:
    """``names`` ordered by weighted rendezvous hashing on ``key``: stable for one key, and over
    many keys each name comes first in proportion to its weight."""
    def score(name: str) -> float:
        h = hashlib.sha256(f"{key}\x1f{name}".encode()).digest()
        u = (int.from_bytes(h[:8], "big") + 0.5) / 2**64  # uniform in (0, 1)
        return -weights.get(name, 1.0) / math.log(u)

    return sorted(names, key=score, reverse=True)


@dataclass
class Router:
    providers: dict[str, Provider]
    routing: RoutingSettings
    health: ProviderHealth
    public: bool = False  # server.public_base_url is set: signed gateway URLs reach the vendor
    #: a team's own routes (``{"training": {...}, "inference": {...}}``), or None
    team_routes: Callable[[str], Awaitable[dict[str, RouteSettings] | None]] | None = None

    # ------------------------------------------------------------------ eligibility

    def can_train(self, p: Provider, needs: TrainingNeeds) -> bool:
        t = p.capabilities.training
        return (
            t is not None
            and needs.subject_kind in t.subject_kinds
            and t.min_steps <= needs.steps <= t.max_steps
            and (t.min_rank <= needs.rank <= t.max_rank or not t.rank_controllable)
            and (t.dataset_input not in ("zip_url", "image_urls") or self.public)  # signed URLs need a public URL
        )

    def can_generate(self, p: Provider, needs: InferenceNeeds) -> bool:
        i = p.capabilities.inference
        if i is None or needs.num_outputs > i.max_outputs or needs.aspect_ratio not in i.aspect_ratios:
            return False
        if p.name == needs.trained_by:  # where it was trained (by instance, from the attempt)
            return True
        if not (needs.portable and i.accepts_lora_file):
            return False
        if needs.artifact_format and needs.artifact_format not in i.lora_formats:
            return False
        if i.weights_access == "local_file":
            return needs.weights_local
        if i.weights_access == "public_url":
            return self.public
        return True

    # ------------------------------------------------------------------ ordering

    async def _route(self, operation: str, team_id: str | None) -> RouteSettings:
        if team_id and self.team_routes is not None:
            own = await self.team_routes(team_id)
            if own and operation in own:
                return own[operation]
        return getattr(self.routing, operation)

    @staticmethod
    def _ranked(route: RouteSettings, eligible: list[Provider], key: str, cost: Callable[[Provider], float]) -> list[Provider]:
        if route.strategy == "cheapest":
            return sorted(eligible, key=cost)  # stable: ties keep the configured order
        if route.strategy == "weighted":
            by_name = {p.name: p for p in eligible}
            return [by_name[n] for n in rendezvous(key, list(by_name), route.weights)]
        return list(eligible)

    async def _ordered(self, operation: str, ranked: list[Provider], preferred: str | None) -> list[Provider]:
        if preferred:
            ranked = sorted(ranked, key=lambda p: p.name != preferred)  # first, if it is eligible
        states = await self.health.states(operation)
        return sorted(ranked, key=lambda p: HEALTH_RANK[states.get(p.name, "closed")])

    async def training_order(self, needs: TrainingNeeds) -> list[Provider]:
        route = await self._route("training", needs.team_id)
        eligible = [self.providers[n] for n in route.providers if n in self.providers]
        eligible = [p for p in eligible if self.can_train(p, needs)]
        ranked = self._ranked(route, eligible, needs.key, lambda p: p.capabilities.cost.per_training)
        return await self._ordered("training", ranked, needs.preferred)

    async def inference_order(self, needs: InferenceNeeds) -> list[Provider]:
        route = await self._route("inference", needs.team_id)
        names = list(route.providers)
        if needs.trained_by and needs.trained_by not in names and needs.trained_by in self.providers:
            names.append(needs.trained_by)  # a LoRA can always run where it was trained
        eligible = [self.providers[n] for n in names if n in self.providers]
        eligible = [p for p in eligible if self.can_generate(p, needs)]
        ranked = self._ranked(route, eligible, needs.key,
                              lambda p: p.capabilities.cost.per_image * needs.num_outputs)
        # those that honour every parameter the client set go first (stable within each part)
        wanted = needs.set_params & GENERATION_PARAMS
        ranked.sort(key=lambda p: not wanted <= p.capabilities.inference.honours)
        return await self._ordered("inference", ranked, needs.preferred)

    def preference_allowed(self, name: str) -> bool:
        return name in self.providers
