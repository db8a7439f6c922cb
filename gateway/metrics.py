"""Prometheus metrics of the gateway, on a registry of its own (served on the admin listener).

Labels are fixed vocabularies (outcomes, cache results); no label or value ever carries
a token, a credential, or a caller-supplied string.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BROKER_OUTCOMES = (
    "ok",
    "invalid_request",
    "unauthenticated",
    "forbidden",
    "not_found",
    "failed_precondition",
    "identity_unavailable",
    "idp_error",
    "internal",
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.broker_requests = Counter(
            "tokenferry_gateway_broker_requests",
            "Intermediate-token requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in BROKER_OUTCOMES:
            self.broker_requests.labels(outcome)
        self.idp_latency = Histogram(
            "tokenferry_gateway_idp_exchange_seconds",
            "Latency of token exchanges at the IdP (exchange 1)",
            ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0),
            registry=self.registry,
        )
        self.cache = Counter(
            "tokenferry_gateway_intermediate_cache",
            "Intermediate-token cache lookups by result (hit, miss, refresh, shared)",
            ["result"],
            registry=self.registry,
        )
        for result in ("hit", "miss", "refresh", "shared"):
            self.cache.labels(result)
        self.cache_entries = Gauge(
            "tokenferry_gateway_intermediate_cache_entries",
            "Intermediate tokens currently cached",
            registry=self.registry,
        )
        self.api_requests = Counter(
            "tokenferry_gateway_api_requests",
            "API requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
