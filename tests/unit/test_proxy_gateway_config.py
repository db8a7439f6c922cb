"""GatewayConfigSource against a scripted fake of the gateway client (the real gateway is
exercised by tests/integration/test_e2e_*.py): ETags, 304s, retry delays before the first
configuration, keeping the last good one when a poll fails."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway_client import (
    CredentialInfo,
    Forbidden,
    GatewayUnreachable,
    SupervisorConfig,
    SupervisorProvider,
)
from proxy.config import ConfigError
from proxy.gateway_config import (
    GatewayConfigSource,
    config_from_gateway,
    describe_poll_failure,
)
from proxy.metrics import ProxyMetrics
from proxy.runner import waiting_detail
from tokenferry.svid import SvidUnavailable

TE = "https://idp.example.org/realms/r1/protocol/openid-connect/token"

PROFILE: dict[str, Any] = {
    "id": "orders-api",
    "credentials": [
        {"name": "user_token"},
        {
            "name": "access_token",
            "token_grant": {
                "grant_type": "token_exchange",
                "token_endpoint": TE,
                "audience": "orders",
                "subject_token": {"source": "provider_credential", "credential": "user_token"},
            },
        },
    ],
    "endpoints": [{"host": "api.example.org"}],
}

EXPIRY = datetime(2030, 1, 1, tzinfo=UTC)


def answer(revision: int, etag: str, profile: dict[str, Any] | None = None) -> SupervisorConfig:
    return SupervisorConfig(
        sandbox_name="alpha",
        spiffe_id="spiffe://example.org/sandbox/alpha",
        providers=(
            SupervisorProvider(
                name="orders",
                revision=revision,
                profile_data=profile or PROFILE,
                credentials=(CredentialInfo("user_token", True, EXPIRY),),
            ),
        ),
        etag=etag,
    )


class ScriptedGateway:
    """Answers ``supervisor_config`` from a script: a config, None (304) or an exception."""

    base_url = "http://gateway.test"

    def __init__(self, script: list[SupervisorConfig | Exception | None]) -> None:
        self.script = list(script)
        self.etags: list[str | None] = []

    async def supervisor_config(self, etag: str | None = None) -> SupervisorConfig | None:
        self.etags.append(etag)
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def source(
    script: list[SupervisorConfig | Exception | None], **kwargs: Any
) -> tuple[GatewayConfigSource, ScriptedGateway, Sleeps]:
    gateway = ScriptedGateway(script)
    sleeps = Sleeps()
    src = GatewayConfigSource(gateway, sleep=sleeps, **kwargs)  # type: ignore[arg-type]
    return src, gateway, sleeps


async def take(src: GatewayConfigSource, count: int) -> list[Any]:
    out = []
    updates = src.updates()
    for _ in range(count):
        out.append(await anext(updates))
    await updates.aclose()
    return out


def test_config_from_gateway_keeps_names_revisions_profiles_and_expiry() -> None:
    config = config_from_gateway(answer(3, '"e1"'))
    assert (config.sandbox, config.spiffe_id, config.etag) == (
        "alpha",
        "spiffe://example.org/sandbox/alpha",
        '"e1"',
    )
    (provider,) = config.providers
    assert (provider.name, provider.revision, provider.profile.id) == ("orders", 3, "orders-api")
    assert provider.credential_expiry == (("user_token", EXPIRY.timestamp()),)
    route = provider.as_route_source()
    assert route.expiry_of("user_token") == EXPIRY.timestamp()


def test_an_unparsable_profile_is_a_config_error_naming_the_provider() -> None:
    bad = dict(PROFILE, endpoints=[{"host": "api.example.org", "port": 70000}])
    with pytest.raises(ConfigError, match="provider 'orders'"):
        config_from_gateway(answer(1, '"e"', bad))


async def test_polls_send_the_etag_and_yield_only_changes() -> None:
    metrics = ProxyMetrics()
    src, gateway, sleeps = source(
        [answer(1, '"e1"'), None, None, answer(2, '"e2"')], poll_interval=15, metrics=metrics
    )
    first = await src.load()
    assert first.providers[0].revision == 1
    (changed,) = await take(src, 1)
    assert changed.providers[0].revision == 2
    assert gateway.etags == [None, '"e1"', '"e1"', '"e1"']
    assert sleeps.delays == [15, 15, 15]
    text = metrics.render().decode()
    assert 'tokenferry_proxy_config_polls_total{result="changed"} 2.0' in text
    assert 'tokenferry_proxy_config_polls_total{result="unchanged"} 2.0' in text


async def test_before_the_first_config_retries_quickly_then_at_the_poll_interval() -> None:
    down = GatewayUnreachable("cannot reach the gateway at http://gateway.test: refused")
    src, _, sleeps = source([down, down, down, down, down, answer(1, '"e1"')], poll_interval=5)
    failures: list[str] = []
    src.on_failure = failures.append
    assert await src.try_load() is None
    assert src.last_failure is not None and "gateway unreachable" in src.last_failure
    (config,) = await take(src, 1)
    assert config.providers[0].name == "orders"
    assert sleeps.delays == [1, 2, 4, 5, 5]
    assert len(failures) == 5
    assert src.loaded


async def test_a_failed_poll_keeps_the_last_good_config_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad_profile = dict(PROFILE, endpoints="nope")
    src, gateway, _ = source(
        [
            answer(1, '"e1"'),
            Forbidden("forbidden", "SPIFFE ID is not a registered sandbox", 403),
            answer(2, '"e2"', bad_profile),
            SvidUnavailable("agent restarting"),
            answer(3, '"e3"'),
        ],
        poll_interval=15,
    )
    await src.load()
    failures: list[str] = []
    src.on_failure = failures.append
    with caplog.at_level(logging.WARNING, logger="tokenferry.proxy.config"):
        (config,) = await take(src, 1)
    assert config.providers[0].revision == 3
    # The unusable answer did not move the ETag: the gateway is asked for it again.
    assert gateway.etags == [None, '"e1"', '"e1"', '"e1"', '"e1"']
    assert len(failures) == 3
    assert "forbidden, HTTP 403" in failures[0]
    assert "provider 'orders'" in failures[1]
    assert "agent restarting" in failures[2]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("configuration poll failed; keeping the last good configuration") == 3


def test_describe_poll_failure_hides_unknown_exception_text() -> None:
    assert describe_poll_failure(RuntimeError("secret")) == (
        "configuration request failed (RuntimeError)"
    )


def test_waiting_detail_names_the_gateway() -> None:
    assert (
        waiting_detail("http://gw:1", None)
        == "no configuration from the gateway at http://gw:1 yet"
    )
    assert waiting_detail("http://gw:1", "gateway unreachable: x").endswith(
        "yet: gateway unreachable: x"
    )


def test_poll_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        GatewayConfigSource(ScriptedGateway([]), poll_interval=0)  # type: ignore[arg-type]
