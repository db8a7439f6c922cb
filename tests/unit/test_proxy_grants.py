"""GrantBroker and ClientCredentialsGrant against in-process fakes of the SVID source and
token endpoint client (the real ones are exercised by the integration tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from proxy.grants import (
    ClientCredentialsGrant,
    GrantBroker,
    GrantError,
    cache_key,
    describe_failure,
)
from proxy.metrics import ProxyMetrics
from proxy.routes import ProviderProfile, Route, build_routes
from tokenferry.oauth import TokenEndpointError, TokenEndpointUnavailable, TokenResponse
from tokenferry.profiles import AudienceOverride, Credential, Endpoint, Profile, TokenGrant
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
