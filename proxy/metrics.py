"""Prometheus metrics of the supervisor, in their own registry (never the global one).

Labels carry provider and credential *names* and outcomes only, never values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ProxyMetrics"]


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.grants = Counter(
            "tokenferry_proxy_grants",
            "Credential decisions on matched routes, by outcome",
            ["provider", "credential", "outcome"],
            registry=self.registry,
        )
        self.cache = Counter(
            "tokenferry_proxy_token_cache",
            "Token cache lookups by outcome (hit, miss, refresh, shared)",
            ["outcome"],
            registry=self.registry,
        )
        self.intermediate_cache = Counter(
            "tokenferry_proxy_intermediate_cache",
            "Intermediate-token (token_exchange leg 1) cache lookups by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.config_polls = Counter(
            "tokenferry_proxy_config_polls",
            "Gateway configuration polls by result (changed, unchanged, error)",
            ["result"],
            registry=self.registry,
        )
        self.exchanges = Counter(
            "tokenferry_proxy_exchanges",
            "Token requests by leg (leg1 = gateway, leg2 = IdP, client_credentials) and result",
            ["leg", "result"],
            registry=self.registry,
        )
        self.exchange_seconds = Histogram(
            "tokenferry_proxy_exchange_seconds",
            "Token request latency by leg (leg1, leg2, client_credentials)",
            ["leg"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0),
        )
        self.in_flight = Gauge(
            "tokenferry_proxy_exchanges_in_flight",
            "Token endpoint requests currently running",
            registry=self.registry,
        )
        self.evictions = Counter(
            "tokenferry_proxy_token_evictions",
            "Cached tokens dropped after the upstream answered 401",
            registry=self.registry,
        )
        self.routes = Gauge(
            "tokenferry_proxy_routes",
            "Routes in the current route table",
            registry=self.registry,
        )
        # Pre-create the label sets that are always meaningful, so they show as 0.
        self._cache_outcomes = {
            outcome: self.cache.labels(outcome) for outcome in ("hit", "miss", "refresh", "shared")
        }
        self._decisions: dict[tuple[str, str, str], Counter] = {}

    # Per-request counters: the labelled children are looked up once and kept, since
    # ``labels()`` validates and locks on every call.

    def cache_outcome(self, outcome: str) -> Counter:
        """The token cache counter for ``outcome`` (hit, miss, refresh, shared)."""
        child = self._cache_outcomes.get(outcome)
        if child is None:
            child = self._cache_outcomes[outcome] = self.cache.labels(outcome)
        return child

    def grant_decision(self, provider: str, credential: str, outcome: str) -> Counter:
        """The ``grants`` counter of one provider, credential and decision outcome."""
        key = (provider, credential, outcome)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.grants.labels(provider, credential, outcome)
        return child

    @contextmanager
    def exchange(self, leg: str) -> Iterator[None]:
        """Time one token endpoint request and count it in flight while it runs."""
        started = time.monotonic()
        self.in_flight.inc()
        result = "error"
        try:
            yield
            result = "ok"
        finally:
            self.in_flight.dec()
            self.exchange_seconds.labels(leg).observe(time.monotonic() - started)
            self.exchanges.labels(leg, result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
