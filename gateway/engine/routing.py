"""Routing: eligibility (declared capabilities), then health (a circuit breaker per provider),
then the configured strategy. Reads only ``Provider.capabilities``, never provider names."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

from gateway.config import RouteSettings
from providers.base import Provider


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; half-opens after ``cooldown_s``."""

    threshold: int = 5
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, int] = field(default_factory=dict)
    _opened_at: dict[str, float] = field(default_factory=dict)

    def healthy(self, name: str) -> bool:
        opened = self._opened_at.get(name)
        return opened is None or self.clock() - opened >= self.cooldown_s

    def success(self, name: str) -> None:
        self._failures.pop(name, None)
        self._opened_at.pop(name, None)

    def failure(self, name: str) -> None:
        n = self._failures.get(name, 0) + 1
        self._failures[name] = n
        if n >= self.threshold:
            self._opened_at[name] = self.clock()

    def state(self, name: str) -> str:
        if name not in self._opened_at:
            return "closed"
        return "half-open" if self.healthy(name) else "open"


@dataclass(frozen=True)
class TrainingNeeds:
    subject_kind: str
    steps: int
    rank: int


@dataclass(frozen=True)
class InferenceNeeds:
    num_outputs: int
    aspect_ratio: str
    portable: bool
    trained_by: str | None


class Router:
    def __init__(
        self,
        providers: dict[str, Provider],
        training: RouteSettings,
        inference: RouteSettings,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.providers = providers
        self.training = training
        self.inference = inference
        self.breaker = breaker or CircuitBreaker()

    # -- eligibility
    @staticmethod
    def can_train(p: Provider, needs: TrainingNeeds) -> bool:
        t = p.capabilities.training
        return (
            t is not None
            and needs.subject_kind in t.subject_kinds
            and t.min_steps <= needs.steps <= t.max_steps
            and (t.min_rank <= needs.rank <= t.max_rank or not t.rank_controllable)
        )

    @staticmethod
    def can_generate(p: Provider, needs: InferenceNeeds) -> bool:
        i = p.capabilities.inference
        if i is None or needs.num_outputs > i.max_outputs or needs.aspect_ratio not in i.aspect_ratios:
            return False
        if p.name == needs.trained_by:
            return True
        return needs.portable and i.accepts_lora_file

    # -- ordering
    def _order(self, route: RouteSettings, eligible: list[Provider], cost: Callable[[Provider], float]) -> list[Provider]:
        ranked = list(eligible)  # configured order = priority
        if route.strategy == "cheapest":
            ranked.sort(key=cost)  # stable: ties keep priority order
        healthy = [p for p in ranked if self.breaker.healthy(p.name)]
        return healthy + [p for p in ranked if p not in healthy]

    def _pick(self, ordered: list[Provider], tried: Sequence[str], exclude: Collection[str] = ()) -> Provider | None:
        """The first provider not tried yet; when all were tried, the least-tried one.
        ``exclude``d providers are never picked."""
        ordered = [p for p in ordered if p.name not in exclude]
        for p in ordered:
            if p.name not in tried:
                return p
        if not ordered:
            return None
        return min(ordered, key=lambda p: (tried.count(p.name), ordered.index(p)))

    def training_order(self, needs: TrainingNeeds) -> list[Provider]:
        eligible = [self.providers[n] for n in self.training.providers if n in self.providers]
        eligible = [p for p in eligible if self.can_train(p, needs)]
        return self._order(self.training, eligible, lambda p: p.capabilities.cost.per_training)

    def inference_order(self, needs: InferenceNeeds) -> list[Provider]:
        names = list(self.inference.providers)
        if needs.trained_by and needs.trained_by not in names and needs.trained_by in self.providers:
            names.append(needs.trained_by)  # a LoRA can always run where it was trained
        eligible = [self.providers[n] for n in names if n in self.providers]
        eligible = [p for p in eligible if self.can_generate(p, needs)]
        return self._order(self.inference, eligible, lambda p: p.capabilities.cost.per_image * needs.num_outputs)

    def pick_training(self, needs: TrainingNeeds, tried: Sequence[str], exclude: Collection[str] = ()) -> Provider | None:
        return self._pick(self.training_order(needs), tried, exclude)

    def pick_inference(self, needs: InferenceNeeds, tried: Sequence[str], exclude: Collection[str] = ()) -> Provider | None:
        return self._pick(self.inference_order(needs), tried, exclude)
