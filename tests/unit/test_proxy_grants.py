"""GrantBroker and ClientCredentialsGrant against in-process fakes of the SVID source and
token endpoint client (the real ones are exercised by the integration tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from gateway_client import (
    FailedPrecondition,
    Forbidden,
    GatewayUnreachable,
    IdpError,
    Unauthenticated,
)
from proxy.grants import (
    ClientCredentialsGrant,
    GrantBroker,
    GrantError,
    TokenExchangeGrant,
    cache_key,
    describe_failure,
    describe_leg1_failure,
)
from proxy.metrics import ProxyMetrics
from proxy.routes import ProviderProfile, Route, build_routes
from tokenferry.oauth import TokenEndpointError, TokenEndpointUnavailable, TokenResponse
from tokenferry.profiles import (
    ACCESS_TOKEN_TYPE,
    JWT_SPIFFE_ASSERTION,
    AudienceOverride,
    Credential,
    Endpoint,
    Profile,
    SubjectTokenSource,
    TokenGrant,
)
from tokenferry.svid import JwtSvid, SvidUnavailable
from tokenferry.tokens import CacheOutcome, TokenCache

TE = "https://idp.example.org/realms/r1/protocol/openid-connect/token"


class FakeSvids:
    def __init__(self) -> None:
        self.audiences: list[str] = []

    async def fetch_jwt_svid(self, audience: str) -> JwtSvid:
        self.audiences.append(audience)
        return JwtSvid(token="svid-token-value", spiffe_id="spiffe://x/y", expiry=time.time() + 60)

    async def fetch_jwt_bundles(self) -> dict[str, dict[str, Any]]:
        return {}

    async def close(self) -> None:
        return None


class FakeClient:
    def __init__(self, *, fail: Exception | None = None, expires_in: int = 120) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.expires_in = expires_in
        self.gate: asyncio.Event | None = None

    async def client_credentials(
        self,
        token_endpoint: str,
        *,
        client_assertion: str,
        client_assertion_type: str,
        audience: str | None = None,
        scopes: Sequence[str] = (),
    ) -> TokenResponse:
        self.calls.append(
            {
                "endpoint": token_endpoint,
                "assertion": client_assertion,
                "audience": audience,
                "scopes": tuple(scopes),
            }
        )
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        n = len(self.calls)
        return TokenResponse(
            access_token=f"token-{n}",
            token_type="Bearer",
            issued_token_type=None,
            expires_in=self.expires_in,
            scope=None,
        )


def routes(revision: int = 1) -> list[Route]:
    profile = Profile(
        id="orders-api",
        credentials=(
            Credential(
                "access_token",
                token_grant=TokenGrant(
                    "client_credentials",
                    TE,
                    audience="orders",
                    scopes=("orders.read",),
                    audience_overrides=(
                        AudienceOverride("reports.example.org", 443, None, "reports", ()),
                    ),
                ),
            ),
        ),
        endpoints=(Endpoint("api.example.org"),),
    )
    return list(build_routes([ProviderProfile("orders", revision, profile)]).routes)


def broker(client: FakeClient, svids: FakeSvids | None = None) -> GrantBroker:
    metrics = ProxyMetrics()
    grant = ClientCredentialsGrant(svids or FakeSvids(), client, metrics)  # type: ignore[arg-type]
    return GrantBroker(TokenCache(), {"client_credentials": grant}, metrics)


async def test_client_credentials_uses_idp_audience_svid_and_route_audience() -> None:
    client, svids = FakeClient(), FakeSvids()
    b = broker(client, svids)
    by_audience = {r.audience: r for r in routes()}
    first = await b.obtain(by_audience["orders"])
    assert first.outcome is CacheOutcome.MISS and first.token.value == "token-1"
    again = await b.obtain(by_audience["orders"])
    assert again.outcome is CacheOutcome.HIT
    override = await b.obtain(by_audience["reports"])
    assert override.token.value == "token-2"
    assert svids.audiences == ["https://idp.example.org/realms/r1"] * 2  # SPEC §4.2
    assert [(c["audience"], c["scopes"]) for c in client.calls] == [
        ("orders", ("orders.read",)),
        ("reports", ("orders.read",)),
    ]
    assert client.calls[0]["assertion"] == "svid-token-value"


async def test_revision_is_part_of_the_key() -> None:
    client = FakeClient()
    b = broker(client)
    await b.obtain(routes(1)[0])
    result = await b.obtain(routes(2)[0])
    assert result.outcome is CacheOutcome.MISS
    assert cache_key(routes(1)[0]) != cache_key(routes(2)[0])
    assert len(client.calls) == 2


async def test_concurrent_misses_share_one_fetch() -> None:
    client = FakeClient()
    client.gate = asyncio.Event()
    b = broker(client)
    route = routes()[0]
    tasks = [asyncio.create_task(b.obtain(route)) for _ in range(20)]
    await asyncio.sleep(0)
    client.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(client.calls) == 1
    assert {r.token.value for r in results} == {"token-1"}


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TokenEndpointUnavailable("connection refused"), "token endpoint unavailable"),
        (
            TokenEndpointError(400, "invalid_client", "bad assertion"),
            "refused the request (HTTP 400): invalid_client: bad assertion",
        ),
        (SvidUnavailable("no socket"), "JWT-SVID) unavailable: no socket"),
    ],
)
async def test_failures_become_grant_errors(error: Exception, expected: str) -> None:
    b = broker(FakeClient(fail=error))
    route = routes()[0]
    with pytest.raises(GrantError) as excinfo:
        await b.obtain(route)
    assert (excinfo.value.provider, excinfo.value.credential) == ("orders", "access_token")
    assert expected in excinfo.value.detail
    assert "svid-token-value" not in excinfo.value.detail


def test_describe_failure_hides_unknown_exception_text() -> None:
    assert describe_failure(RuntimeError("secret-ish")) == "token request failed (RuntimeError)"


async def test_unknown_grant_type_is_a_grant_error() -> None:
    b = GrantBroker(TokenCache(), {}, ProxyMetrics())
    with pytest.raises(GrantError, match="not available"):
        await b.obtain(routes()[0])


async def test_evict_token_drops_only_that_token() -> None:
    client = FakeClient()
    b = broker(client)
    route = routes()[0]
    result = await b.obtain(route)
    assert not b.evict_token(result.key, "some-other-token")
    assert b.evict_token(result.key, result.token.value)
    assert (await b.obtain(route)).outcome is CacheOutcome.MISS


async def test_cached_answers_a_fresh_token_without_a_fetch() -> None:
    now = [1000.0]
    client = FakeClient()
    metrics = ProxyMetrics()
    grant = ClientCredentialsGrant(FakeSvids(), client, metrics, monotonic=lambda: now[0])  # type: ignore[arg-type]
    b = GrantBroker(TokenCache(clock=lambda: now[0]), {"client_credentials": grant}, metrics)
    route, other = routes()[0], routes()[1]
    assert b.cached(route) is None  # nothing cached yet: the caller must obtain()
    first = await b.obtain(route)
    hit = b.cached(route)
    assert hit is not None and hit.outcome is CacheOutcome.HIT and hit.key == first.key
    assert hit.token.value == first.token.value and len(client.calls) == 1
    assert b.cached(other) is None  # another audience, another key
    assert metrics.cache.labels("hit")._value.get() == 1
    # Due for refresh: the hit must go through obtain(), which starts the refresh.
    now[0] = first.token.refresh_after
    assert b.cached(route) is None
    refreshing = await b.obtain(route)
    assert refreshing.outcome is CacheOutcome.REFRESH
    await b.cache.drain()
    assert len(client.calls) == 2
    fresh = b.cached(route)
    assert fresh is not None and fresh.token.value == "token-2"
    # Evicted (upstream 401): nothing to answer without a fetch.
    assert b.evict_token(fresh.key, fresh.token.value)
    assert b.cached(route) is None


def test_cached_is_none_for_a_grant_type_the_mode_lacks() -> None:
    assert GrantBroker(TokenCache(), {}, ProxyMetrics()).cached(routes()[0]) is None


def test_key_is_built_once_per_route_and_stays_equal() -> None:
    b = broker(FakeClient())
    route = routes()[0]
    assert b.key(route) is b.key(route)
    same_config_again = routes()[0]  # an equal route of a new table: an equal key
    assert b.key(same_config_again) == b.key(route)
    assert b.key(routes(revision=2)[0]) != b.key(route)


# --- token_exchange ---------------------------------------------------------------------

IDP_AUDIENCE = "https://idp.example.org/realms/r1"


class FakeGateway:
    """``GatewayClient.intermediate_token`` only: what leg 1 needs."""

    base_url = "http://gateway.test"

    def __init__(self, *, fail: Exception | None = None, expires_in: int = 600) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail
        self.expires_in = expires_in
        self.gate: asyncio.Event | None = None

    async def intermediate_token(self, provider: str, credential: str) -> TokenResponse:
        self.calls.append((provider, credential))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return TokenResponse(
            access_token=f"intermediate-{len(self.calls)}",
            token_type="Bearer",
            issued_token_type=ACCESS_TOKEN_TYPE,
            expires_in=self.expires_in,
            scope=None,
        )

    async def aclose(self) -> None:
        return None


class FakeExchangeClient(FakeClient):
    async def token_exchange(
        self,
        token_endpoint: str,
        *,
        client_assertion: str,
        client_assertion_type: str,
        subject_token: str,
        subject_token_type: str,
        requested_token_type: str,
        audience: str | None = None,
        scopes: Sequence[str] = (),
    ) -> TokenResponse:
        self.calls.append(
            {
                "endpoint": token_endpoint,
                "assertion": client_assertion,
                "assertion_type": client_assertion_type,
                "subject_token": subject_token,
                "subject_token_type": subject_token_type,
                "requested_token_type": requested_token_type,
                "audience": audience,
                "scopes": tuple(scopes),
            }
        )
        if self.fail is not None:
            raise self.fail
        return TokenResponse(
            access_token=f"final-{len(self.calls)}",
            token_type="Bearer",
            issued_token_type=requested_token_type,
            expires_in=self.expires_in,
            scope=None,
        )


def exchange_routes(revision: int = 1, *, subject_expires_at: float | None = None) -> list[Route]:
    grant = TokenGrant(
        "token_exchange",
        TE,
        audience="orders",
        scopes=("orders.read",),
        client_assertion_type=JWT_SPIFFE_ASSERTION,
        requested_token_type="urn:ietf:params:oauth:token-type:jwt",
        subject_token=SubjectTokenSource("provider_credential", "user_token", ACCESS_TOKEN_TYPE),
        audience_overrides=(
            AudienceOverride("reports.example.org", 443, None, "reports", ("reports.read",)),
        ),
    )
    profile = Profile(
        id="orders-api",
        credentials=(Credential("user_token"), Credential("access_token", token_grant=grant)),
        endpoints=(Endpoint("api.example.org"),),
    )
    provider = ProviderProfile("orders", revision, profile, (("user_token", subject_expires_at),))
    return list(build_routes([provider]).routes)


def exchange_broker(
    client: FakeExchangeClient,
    gateway: FakeGateway,
    svids: FakeSvids | None = None,
    metrics: ProxyMetrics | None = None,
) -> tuple[GrantBroker, TokenExchangeGrant]:
    metrics = metrics or ProxyMetrics()
    grant = TokenExchangeGrant(
        svids or FakeSvids(),
        client,  # type: ignore[arg-type]
        gateway,  # type: ignore[arg-type]
        metrics,
    )
    return GrantBroker(TokenCache(), {"token_exchange": grant}, metrics), grant


async def test_token_exchange_runs_leg_1_at_the_gateway_and_leg_2_at_the_idp() -> None:
    client, gateway, svids, metrics = (
        FakeExchangeClient(),
        FakeGateway(),
        FakeSvids(),
        ProxyMetrics(),
    )
    b, _ = exchange_broker(client, gateway, svids, metrics)
    by_audience = {r.audience: r for r in exchange_routes()}
    result = await b.obtain(by_audience["orders"])
    assert result.token.value == "final-1"
    assert gateway.calls == [("orders", "access_token")]
    assert client.calls == [
        {
            "endpoint": TE,
            "assertion": "svid-token-value",
            "assertion_type": JWT_SPIFFE_ASSERTION,
            "subject_token": "intermediate-1",
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": "orders",
            "scopes": ("orders.read",),
        }
    ]
    # Leg 2's client assertion is the IdP-audience SVID (the gateway client has its own).
    assert svids.audiences == [IDP_AUDIENCE]

    # The override audience reuses the cached intermediate token: no second gateway call.
    override = await b.obtain(by_audience["reports"])
    assert override.token.value == "final-2"
    assert gateway.calls == [("orders", "access_token")]
    assert (client.calls[1]["audience"], client.calls[1]["scopes"]) == (
        "reports",
        ("reports.read",),
    )
    assert client.calls[1]["subject_token"] == "intermediate-1"
    text = metrics.render().decode()
    assert 'tokenferry_proxy_exchange_seconds_count{leg="leg1"} 1.0' in text
    assert 'tokenferry_proxy_exchange_seconds_count{leg="leg2"} 2.0' in text
    assert 'tokenferry_proxy_intermediate_cache_total{outcome="hit"} 1.0' in text


async def test_concurrent_misses_for_two_audiences_make_one_gateway_call() -> None:
    client, gateway = FakeExchangeClient(), FakeGateway()
    gateway.gate = asyncio.Event()
    b, _ = exchange_broker(client, gateway)
    routes_ = exchange_routes()
    tasks = [asyncio.create_task(b.obtain(r)) for r in routes_ for _ in range(10)]
    await asyncio.sleep(0)
    gateway.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(gateway.calls) == 1
    assert len(client.calls) == 2  # one final exchange per audience
    assert len({r.token.value for r in results}) == 2


async def test_new_revision_needs_a_new_intermediate_token() -> None:
    client, gateway = FakeExchangeClient(), FakeGateway()
    b, grant = exchange_broker(client, gateway)
    await b.obtain(exchange_routes(1)[0])
    await b.obtain(exchange_routes(2)[0])
    assert len(gateway.calls) == 2
    assert grant.intermediate_key(exchange_routes(1)[0]) != grant.intermediate_key(
        exchange_routes(2)[0]
    )


async def test_intermediate_lifetime_is_capped_at_the_subject_tokens_expiry() -> None:
    client, gateway = FakeExchangeClient(), FakeGateway(expires_in=600)
    b, grant = exchange_broker(client, gateway)
    route = exchange_routes(subject_expires_at=time.time() + 100)[0]
    await b.obtain(route)
    cached = grant.intermediate_cache.peek(grant.intermediate_key(route))
    assert cached is not None and 90 < cached.lifetime <= 100
    final = await b.obtain(route)
    assert final.token.lifetime <= 100


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            FailedPrecondition(
                "failed_precondition",
                "subject credential 'user_token' of provider 'orders' expired at "
                "2026-01-01T00:00:00Z",
                409,
            ),
            "gateway (leg 1): subject token expired: update the provider (subject credential",
        ),
        (
            FailedPrecondition(
                "failed_precondition",
                "subject credential 'user_token' of provider 'orders' has no stored value",
                409,
            ),
            "gateway (leg 1): no subject token stored: update the provider",
        ),
        (
            GatewayUnreachable("cannot reach the gateway at http://gw: ClientConnectorError"),
            "gateway (leg 1): gateway unreachable (cannot reach the gateway at http://gw",
        ),
        (
            Forbidden("forbidden", "provider 'orders' is not attached to sandbox 'a'", 403),
            "gateway (leg 1): forbidden (HTTP 403): provider 'orders' is not attached",
        ),
        (
            Unauthenticated("unauthenticated", "SVID audience mismatch", 401),
            "gateway (leg 1): the gateway refused this supervisor's JWT-SVID: SVID audience",
        ),
        (
            IdpError("idp_error", "identity provider refused the exchange", 502),
            "gateway (leg 1): idp_error (HTTP 502): identity provider refused",
        ),
    ],
)
async def test_leg_1_failures_name_the_gateway_and_the_reason(
    error: Exception, expected: str
) -> None:
    b, _ = exchange_broker(FakeExchangeClient(), FakeGateway(fail=error))
    with pytest.raises(GrantError) as excinfo:
        await b.obtain(exchange_routes()[0])
    assert excinfo.value.detail.startswith(expected), excinfo.value.detail


async def test_leg_2_failures_name_the_identity_provider() -> None:
    client = FakeExchangeClient(fail=TokenEndpointError(400, "invalid_grant", "bad subject"))
    gateway = FakeGateway()
    b, _ = exchange_broker(client, gateway)
    with pytest.raises(GrantError) as excinfo:
        await b.obtain(exchange_routes()[0])
    assert excinfo.value.detail == (
        "identity provider (leg 2): token endpoint refused the request (HTTP 400): "
        "invalid_grant: bad subject"
    )
    assert "intermediate-1" not in excinfo.value.detail


async def test_leg_2_without_an_svid_names_the_identity_provider_leg() -> None:
    class NoSvids(FakeSvids):
        async def fetch_jwt_svid(self, audience: str) -> JwtSvid:
            raise SvidUnavailable("agent gone")

    b, _ = exchange_broker(FakeExchangeClient(), FakeGateway(), NoSvids())
    with pytest.raises(GrantError) as excinfo:
        await b.obtain(exchange_routes()[0])
    assert excinfo.value.detail == (
        "identity provider (leg 2): workload identity (JWT-SVID) unavailable: agent gone"
    )


def test_leg_1_description_of_unknown_errors_hides_their_text() -> None:
    assert describe_leg1_failure(RuntimeError("secret")) == (
        "gateway (leg 1): request failed (RuntimeError)"
    )


async def test_leg_2_invalid_grant_drops_the_intermediate_token() -> None:
    client = FakeExchangeClient(fail=TokenEndpointError(400, "invalid_grant", "revoked"))
    gateway = FakeGateway()
    b, grant = exchange_broker(client, gateway)
    route = exchange_routes()[0]
    with pytest.raises(GrantError):
        await b.obtain(route)
    assert grant.intermediate_cache.peek(grant.intermediate_key(route)) is None
    # Any other leg-2 failure keeps it: the gateway is not asked again for nothing.
    client.fail = TokenEndpointUnavailable("connection refused")
    override = exchange_routes()[1]
    with pytest.raises(GrantError):
        await b.obtain(override)
    assert grant.intermediate_cache.peek(grant.intermediate_key(override)) is not None
    assert len(gateway.calls) == 2
