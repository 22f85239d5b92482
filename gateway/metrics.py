"""Prometheus metrics (``GET /metrics``), with bounded labels only: a route template, an instance,
an operation, an outcome; never a key, a team, a LoRA or a job id.

Counters and histograms are this process's; the gauges (breakers, rows by state) are read from
the database when scraped, so they are the whole deployment's, whichever process answers.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_VALUE = {"closed": 0, "half-open": 1, "probing": 1, "open": 2}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http = Histogram("lora_gateway_http_request_duration_seconds", "HTTP request latency",
                              ["method", "route", "status"], registry=r,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.attempts = Counter("lora_gateway_attempts_total", "Provider attempts by how they ended",
                                ["instance", "operation", "outcome"], registry=r)
        self.fallbacks = Counter("lora_gateway_fallbacks_total", "Moves of a LoRA or job to another attempt",
                                 ["instance", "operation"], registry=r)
        self.provider_calls = Histogram("lora_gateway_provider_call_duration_seconds", "Provider call latency",
                                        ["instance", "operation", "outcome"], registry=r,
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.webhooks = Counter("lora_gateway_webhook_deliveries_total", "Webhook delivery tries by outcome",
                                ["outcome"], registry=r)
        self.breaker = Gauge("lora_gateway_breaker_state", "Breaker per instance and operation (0 closed, "
                             "1 half-open, 2 open)", ["instance", "operation"], registry=r)
        self.rows = Gauge("lora_gateway_rows", "LoRAs and jobs by status (the queue's depth)", ["kind", "status"],
                          registry=r)

    def http_observed(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http.labels(method, route, str(status)).observe(seconds)

    def call_observed(self, instance: str, operation: str, ok: bool, seconds: float) -> None:
        self.provider_calls.labels(instance, operation, "ok" if ok else "error").observe(seconds)

    def render(self, breakers: dict[tuple[str, str], str], rows: dict[tuple[str, str], int]) -> bytes:
        for (instance, operation), state in breakers.items():
            self.breaker.labels(instance, operation).set(BREAKER_VALUE.get(state, 0))
        self.rows.clear()
        for (kind, status), n in rows.items():
            self.rows.labels(kind, status).set(n)
        return generate_latest(self.registry)


def route_of(scope: dict[str, Any]) -> str:
    """The route template that served a request (bounded: ``/v2/loras/{lora_id}``), or ``unmatched``."""
    template = scope.get("path_template")
    if template:
        return str(template)
    handler = scope.get("route_handler")
    paths = getattr(handler, "paths", None)
    return min(paths) if paths else "unmatched"


def elapsed(started: float) -> float:
    return time.perf_counter() - started
