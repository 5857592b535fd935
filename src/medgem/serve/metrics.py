"""Prometheus metrics for GET /metrics: requests, tokens, queue depth, latency histograms.

Each app owns its registry, so several apps (tests, Ray replicas in one process) never collide.
Labels are route templates and status codes only: nothing a client writes reaches a label.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # `*_created` timestamps double the output and say nothing a scraper needs

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


_ENGINE_GAUGES = {"queue_depth": "requests waiting for a batch slot", "running": "requests decoding",
                  "prefilling": "requests in prefill", "free_slots": "idle batch slots",
                  "max_slots": "batch slots", "prefix_cache_bytes": "bytes held by the prefix cache"}


class _EngineCollector:
    """The engine's own numbers at scrape time: its gauges, and its counters as `*_total`."""

    def __init__(self, read: Callable[[], dict[str, int | float]]):
        self.read = read

    def collect(self):
        for name, value in self.read().items():
            if name in _ENGINE_GAUGES:
                yield GaugeMetricFamily(f"medgem_engine_{name}", _ENGINE_GAUGES[name], value=value)
            else:
                yield CounterMetricFamily(f"medgem_engine_{name}", f"engine counter {name}", value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medgem_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("medgem_request_latency_seconds", "time to the last byte of the response",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("medgem_time_to_first_token_seconds", "time from request to first generated text",
                              ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("medgem_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("medgem_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("medgem_cancelled_requests", "generations cancelled by a client disconnect",
                                 registry=r)
        self.in_flight = Gauge("medgem_in_flight_requests", "API requests being answered", registry=r)

    def watch_engine(self, read: Callable[[], dict[str, int | float]]) -> None:
        self.registry.register(_EngineCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
