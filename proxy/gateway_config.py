"""The supervisor's configuration from the gateway (``GET /v1/supervisor/config``).

``GatewayConfigSource`` implements ``proxy.config.ConfigSource``: the gateway answers
with the sandbox (name, SPIFFE ID) and its attached providers (name, revision, profile,
credential names with expiry — never a value) plus an ``ETag``. The source re-polls every
``poll_interval`` seconds with ``If-None-Match``; a 304 changes nothing, a 200 yields a
new ``SupervisorConfig`` that the runner applies by swapping the route table.

Failures never remove routes: when a poll fails (gateway unreachable, SVID refused,
an answer that does not parse) the last good configuration stays in force and the
failure is logged. Before the first configuration has arrived, polls are retried
quickly (1 s doubling up to the poll interval) so a supervisor started before its
gateway configures itself soon after the gateway is up.

Authentication is ``gateway_client.SvidAuth``: a JWT-SVID whose audience is the
gateway's ``supervisor_audience`` (from ``GET /v1/auth/config``). The supervisor's
IdP-audience SVIDs are used only at the token endpoint, never sent to the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime

from gateway_client import (
    GatewayClient,
    GatewayClientError,
    GatewayError,
    GatewayUnreachable,
)
from gateway_client import SupervisorConfig as GatewaySupervisorConfig
from proxy.config import ConfigError, ProviderConfig, SupervisorConfig
from proxy.metrics import ProxyMetrics
from tokenferry.profiles import ProfileError
from tokenferry.svid import SvidUnavailable

logger = logging.getLogger("tokenferry.proxy.config")

DEFAULT_POLL_INTERVAL = 15.0
FIRST_RETRY_DELAY = 1.0


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def config_from_gateway(answer: GatewaySupervisorConfig) -> SupervisorConfig:
    """The gateway's answer as the supervisor's configuration; ConfigError names the
    provider whose profile does not parse (the gateway validated it, so this means a
    version mismatch between gateway and supervisor)."""
    providers: list[ProviderConfig] = []
    problems: list[str] = []
    for item in answer.providers:
        try:
            profile = item.profile()
        except ProfileError as exc:
            errors = [str(p) for p in exc.problems if p.severity == "error"] or [str(exc)]
            problems.append(f"provider {item.name!r}: " + "; ".join(errors))
            continue
        providers.append(
            ProviderConfig(
                name=item.name,
                revision=item.revision,
                profile=profile,
                credential_expiry=tuple((c.name, _epoch(c.expires_at)) for c in item.credentials),
            )
        )
    if problems:
        raise ConfigError("the gateway's configuration is unusable: " + " | ".join(problems))
    return SupervisorConfig(
        sandbox=answer.sandbox_name,
        providers=tuple(providers),
        spiffe_id=answer.spiffe_id,
        etag=answer.etag,
    )


def describe_poll_failure(exc: BaseException) -> str:
    """Why the configuration could not be loaded: readable, secret-free."""
    if isinstance(exc, GatewayUnreachable):
        return f"gateway unreachable: {exc}"
    if isinstance(exc, GatewayError):
        return f"gateway refused the request ({exc.code}, HTTP {exc.status}): {exc.detail}"
    if isinstance(exc, GatewayClientError):
        return f"gateway request failed: {exc}"
    if isinstance(exc, SvidUnavailable):
        return f"workload identity (JWT-SVID for the gateway) unavailable: {exc}"
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"configuration request failed ({type(exc).__name__})"


class GatewayConfigSource:
    def __init__(
        self,
        client: GatewayClient,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        first_retry_delay: float = FIRST_RETRY_DELAY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("the poll interval must be positive")
        self.client = client
        self.poll_interval = poll_interval
        self.first_retry_delay = min(first_retry_delay, poll_interval)
        self._sleep = sleep
        self._metrics = metrics
        self._etag: str | None = None
        self.loaded = False
        self.last_failure: str | None = None
        # Called with the reason after every failed poll (the runner shows it in the 502s
        # it answers while no configuration has arrived yet).
        self.on_failure: Callable[[str], None] | None = None

    def describe(self) -> str:
        return f"gateway {self.client.base_url}"

    async def poll(self) -> SupervisorConfig | None:
        """One request: the new configuration, or None when unchanged (304).

        Raises ConfigError (with the reason) when no usable answer arrived.
        """
        try:
            answer = await self.client.supervisor_config(self._etag)
            config = config_from_gateway(answer) if answer is not None else None
        except Exception as exc:  # any failure keeps the last good configuration
            self._count("error")
            raise ConfigError(describe_poll_failure(exc)) from None
        if self.last_failure is not None:
            logger.info("gateway answered again", extra={"gateway": self.client.base_url})
            self.last_failure = None
        if answer is None or config is None:
            self._count("unchanged")
            return None
        self._count("changed")
        # Only a configuration we could use moves the ETag: a bad answer is asked again.
        self._etag = answer.etag
        self.loaded = True
        return config

    async def load(self) -> SupervisorConfig:
        config = await self.poll()
        if config is None:  # only after an earlier load; ask for the whole answer again
            self._etag = None
            config = await self.poll()
            assert config is not None, "the gateway answered 304 without If-None-Match"
        return config

    async def try_load(self) -> SupervisorConfig | None:
        """``load()`` once; on failure log it and return None (the caller keeps polling)."""
        try:
            return await self.load()
        except ConfigError as exc:
            self._failed(str(exc))
            return None

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.config_polls.labels(result).inc()

    def _failed(self, reason: str) -> None:
        self.last_failure = reason
        if self.loaded:
            logger.warning(
                "configuration poll failed; keeping the last good configuration",
                extra={"gateway": self.client.base_url, "reason": reason},
            )
        else:
            logger.warning(
                "no configuration from the gateway yet; retrying",
                extra={"gateway": self.client.base_url, "reason": reason},
            )
        if self.on_failure is not None:
            self.on_failure(reason)

    async def updates(self) -> AsyncGenerator[SupervisorConfig]:
        delay = self.poll_interval if self.loaded else self.first_retry_delay
        while True:
            await self._sleep(delay)
            try:
                config = await self.poll()
            except ConfigError as exc:
                self._failed(str(exc))
                delay = self.poll_interval if self.loaded else min(delay * 2, self.poll_interval)
                continue
            delay = self.poll_interval
            if config is not None:
                yield config
