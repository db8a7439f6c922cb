"""End to end: the two-stage token exchange through ``tokenferry proxy --gateway``.

Every component is a real process: the gateway's and two sandboxes' dev SPIFFE agents
(one trust domain key), the dev IdP, the gateway on SQLite, HTTPS dev upstreams that
verify the final token, the proxy in gateway mode for sandbox ``alpha``, and real
clients (curl, httpx). One stack for the module: each test uses its own provider (own
routes, own cache keys) where it needs a cold cache or changes the provider.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_client import CredentialInput, Forbidden
from tests.support.e2e_stack import (
    E2EStack,
    exchange_profile,
    prometheus,
    run,
    start_e2e_stack,
    wait_until,
)
from tests.support.gateway_stack import GATEWAY_ID, sandbox_id
from tests.support.procs import Service
from tests.support.stack import JWT_RE, curl
from tokenferry.tokens import peek_jwt_claims

pytestmark = pytest.mark.timeout(120)

ALPHA = sandbox_id("alpha")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EStack]:
    root: Path = tmp_path_factory.mktemp("e2e")
    s = start_e2e_stack(
        root,
        {"orders": ("orders", ["orders.read"]), "reports": ("reports", ["reports.read"])},
    )
    try:
        te = s.token_endpoint
        here = "127.0.0.1"
        s.add_profile(
            exchange_profile(
                "orders-api",
                te,
                audience="orders",
                scopes=["orders.read"],
                endpoints=[{"host": here, "port": s.upstream_port("orders")}],
                overrides=[
                    {
                        "host": here,
                        "port": s.upstream_port("reports"),
                        "audience": "reports",
                        "scopes": ["reports.read"],
                    }
                ],
            )
        )
        # Capture-server routes, one profile (and provider) per test that needs its own.
        for name in ("burst", "stale", "beta", "update", "moved"):
            s.add_profile(
                exchange_profile(
                    f"capture-{name}",
                    te,
                    audience=f"{name}-api",
                    scopes=[],
                    endpoints=[{"host": here, "port": s.capture.port, "path": f"/{name}/**"}],
                )
            )
        # A client_credentials credential served by the gateway too (no user involved).
        s.add_profile(
            {
                "id": "reports-service",
                "credentials": [
                    {
                        "name": "service_token",
                        "token_grant": {
                            "grant_type": "client_credentials",
                            "token_endpoint": te,
                            "audience": "reports",
                            "scopes": ["reports.read"],
                        },
                    }
                ],
                "endpoints": [
                    {"host": here, "port": s.upstream_port("reports"), "path": "/service/**"}
                ],
            }
        )
        s.admin_call(lambda a: a.create_provider("svc", "reports-service", {}))
        alice = s.user_token("alice")
        for provider in ("orders", "burst", "stale", "update", "moved"):
            profile = "orders-api" if provider == "orders" else f"capture-{provider}"
            s.add_provider(provider, profile, alice)
        s.add_provider("betaonly", "capture-beta", s.user_token("bob"))
        s.add_sandbox("alpha", ["orders", "burst", "stale", "update", "moved", "svc"])
        s.add_sandbox("beta", ["betaonly"])
        s.start_proxy("alpha", poll_interval=1.0)
        yield s
    finally:
        s.stop()


def proxy_of(stack: E2EStack) -> Service:
    return stack.proxies["proxy-alpha"]


def echoed_claims(stack: E2EStack, url: str) -> dict[str, Any]:
    status, body = curl(proxy_of(stack), url)
    assert status == 200, body
    claims: dict[str, Any] = json.loads(body)["claims"]
    return claims


def captured_jwt_claims(stack: E2EStack, prefix: str) -> list[dict[str, Any]]:
    """Claims of the bearer tokens the capture server received on paths under ``prefix``."""
    found = []
    for request in stack.capture.requests:
        if request.path.startswith(prefix):
            for value in request.values("Authorization"):
                claims = peek_jwt_claims(value.removeprefix("Bearer "))
                assert claims is not None
                found.append(claims)
    return found


def test_final_token_names_user_sandbox_and_route_audience(stack: E2EStack) -> None:
    proxy = proxy_of(stack)
    assert proxy.ready["configured"] is True
    brokered = stack.broker_requests()
    finals = stack.idp_exchanges("final")

    claims = echoed_claims(stack, stack.upstream_url("orders") + "/orders/1")
    assert claims["sub"] == "alice"
    assert claims["azp"] == ALPHA
    assert claims["aud"] == ["orders"]
    assert claims["scope"] == "orders.read"
    # act: the supervisor acts, on behalf of what the gateway obtained (RFC 8693 §4.1).
    assert claims["act"] == {"sub": ALPHA, "act": {"sub": GATEWAY_ID}}

    # The audience override: same provider and credential, another resource.
    override = echoed_claims(stack, stack.upstream_url("reports") + "/reports/7")
    assert (override["sub"], override["azp"]) == ("alice", ALPHA)
    assert override["aud"] == ["reports"]
    assert override["scope"] == "reports.read"
    assert override["act"] == {"sub": ALPHA, "act": {"sub": GATEWAY_ID}}

    # Two final exchanges, but one gateway call: the second audience reused the
    # intermediate token the supervisor cached.
    assert stack.broker_requests() - brokered == 1
    assert stack.idp_exchanges("final") - finals == 2
    samples = stack.proxy_metrics(proxy)
    assert samples['tokenferry_proxy_intermediate_cache_total{outcome="hit"}'] >= 1
    assert samples['tokenferry_proxy_exchange_seconds_count{leg="leg1"}'] >= 1
    assert samples['tokenferry_proxy_exchange_seconds_count{leg="leg2"}'] >= 2


def test_client_credentials_routes_from_the_gateway_need_no_user(stack: E2EStack) -> None:
    brokered = stack.broker_requests()
    claims = echoed_claims(stack, stack.upstream_url("reports") + "/service/status")
    assert (claims["sub"], claims["azp"], claims["aud"]) == (ALPHA, ALPHA, ["reports"])
    assert "act" not in claims
    assert stack.broker_requests() == brokered  # the gateway is not involved


def test_subject_token_never_reaches_the_supervisor(stack: E2EStack) -> None:
    served = stack.served_config_text("alpha")
    config = json.loads(served)
    assert config["sandbox"] == {"name": "alpha", "spiffe_id": ALPHA}
    by_name = {p["name"]: p for p in config["providers"]}
    assert {"orders", "burst", "stale", "update"} <= set(by_name)
    stored = {c["name"]: c for c in by_name["orders"]["credentials"]}
    assert stored["user_token"]["has_value"] is True
    assert "value" not in stored["user_token"]
    proxy_log = proxy_of(stack).log_text()
    leaked = stack.leaked(stack.user_tokens, served)  # indexes, never token values
    assert leaked == []
    leaked = stack.leaked(stack.user_tokens, proxy_log)  # indexes, never token values
    assert leaked == []
    # Nothing token-shaped at all in what the supervisor received or logged.
    token_shaped = len(JWT_RE.findall(served))  # a count: never print a token
    assert token_shaped == 0
    token_shaped = len(JWT_RE.findall(proxy_log))  # a count: never print a token
    assert token_shaped == 0


def test_fifty_concurrent_requests_on_a_cold_cache_make_one_exchange_per_leg(
    stack: E2EStack,
) -> None:
    proxy = proxy_of(stack)
    brokered = stack.broker_requests()
    intermediates = stack.idp_exchanges("intermediate")
    finals = stack.idp_exchanges("final")
    context = ssl.create_default_context(cafile=str(proxy.ready["ca_file"]))
    url = f"{stack.capture.url}/burst/items"

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(
            proxy=str(proxy.ready["proxy_url"]),
            verify=context,
            trust_env=False,
            limits=limits,
            timeout=30,
        ) as client:
            responses = await asyncio.gather(*(client.get(f"{url}/{i}") for i in range(50)))
        return [r.status_code for r in responses]

    statuses = run(burst())
    assert statuses == [200] * 50
    assert stack.broker_requests() - brokered == 1
    assert stack.idp_exchanges("intermediate") - intermediates == 1
    assert stack.idp_exchanges("final") - finals == 1
    seen = captured_jwt_claims(stack, "/burst/")
    assert len(seen) == 50
    assert len({c["jti"] for c in seen}) == 1
    assert seen[0]["aud"] == ["burst-api"] and seen[0]["azp"] == ALPHA


def test_provider_update_applies_without_restart_and_old_tokens_are_not_reused(
    stack: E2EStack,
) -> None:
    proxy = proxy_of(stack)
    url = f"{stack.capture.url}/update/item"
    for _ in range(2):
        status, body = curl(proxy, url)
        assert status == 200, body
    before = captured_jwt_claims(stack, "/update/")
    assert len({c["jti"] for c in before}) == 1  # the second request was a cache hit
    old_jti = before[0]["jti"]

    revision = stack.set_subject_token("update", stack.user_token("alice"))
    # The proxy picks the new revision up by polling (1 s here), without a restart.
    assert stack.wait_for_revision(proxy, "update", revision)
    assert proxy.alive()
    brokered = stack.broker_requests()
    for _ in range(3):
        status, body = curl(proxy, url)
        assert status == 200, body
    after = captured_jwt_claims(stack, "/update/")[len(before) :]
    assert len(after) == 3
    jtis = {c["jti"] for c in after}
    assert old_jti not in jtis
    assert len(jtis) == 1
    # Both legs ran again: the intermediate token of the old revision was not reused.
    assert stack.broker_requests() - brokered == 1
    assert stack.proxy_metrics(proxy)['tokenferry_proxy_config_polls_total{result="changed"}'] >= 2


def test_expired_subject_token_is_a_502_naming_leg_1_and_nothing_is_forwarded(
    stack: E2EStack,
) -> None:
    proxy = proxy_of(stack)
    expired = stack.user_token("alice", ttl=-60)
    revision = stack.set_subject_token(
        "stale", CredentialInput(expired, expires_at=datetime.now(UTC) - timedelta(minutes=1))
    )
    assert stack.wait_for_revision(proxy, "stale", revision)
    status, body = curl(proxy, f"{stack.capture.url}/stale/thing")
    assert status == 502
    answer = json.loads(body)
    assert answer["error"] == "credential_unavailable"
    assert (answer["provider"], answer["credential"]) == ("stale", "access_token")
    assert answer["detail"].startswith(
        "gateway (leg 1): subject token expired: update the provider"
    )
    assert not any(r.path.startswith("/stale/") for r in stack.capture.requests)
    assert stack.broker_requests("failed_precondition") >= 1


def test_a_sandbox_never_obtains_tokens_for_another_sandboxs_provider(stack: E2EStack) -> None:
    proxy = proxy_of(stack)
    # alpha's configuration does not contain beta's provider, so its proxy has no route
    # for it: the request is forwarded as the sandbox sent it, without any token.
    served = json.loads(stack.served_config_text("alpha"))
    assert "betaonly" not in {p["name"] for p in served["providers"]}
    status, _ = curl(proxy, f"{stack.capture.url}/beta/data")
    assert status == 200
    forwarded = [r for r in stack.capture.requests if r.path.startswith("/beta/")]
    assert len(forwarded) == 1
    carried_a_token = bool(forwarded[0].values("Authorization"))
    assert not carried_a_token

    # Asking the broker directly with alpha's identity is refused (403), and the
    # refusal is the gateway's, before any exchange.
    async def ask() -> str:
        client, source = stack.gw.supervisor("alpha")
        try:
            async with client:
                with pytest.raises(Forbidden) as refused:
                    await client.intermediate_token("betaonly", "access_token")
            return refused.value.detail
        finally:
            await source.close()

    detail = run(ask())
    assert "not attached to sandbox 'alpha'" in detail


def test_a_provider_moved_to_another_sandbox_is_refused_before_the_proxy_notices(
    stack: E2EStack,
) -> None:
    # A proxy that will not re-read its configuration during this test still has a route
    # for "moved" after the provider went to beta: the gateway refuses leg 1 (403), and
    # the sandbox gets the 502 naming it. Nothing reaches the upstream.
    slow = stack.start_proxy("alpha", name="proxy-alpha-slow", poll_interval=3600)
    assert stack.health(slow)[1]["providers"]["moved"] == 1
    stack.admin_call(lambda a: a.detach_provider("alpha", "moved"))
    stack.admin_call(lambda a: a.attach_provider("beta", "moved"))
    refused = stack.broker_requests("forbidden")
    status, body = curl(slow, f"{stack.capture.url}/moved/x")
    assert status == 502
    answer = json.loads(body)
    assert (answer["error"], answer["provider"]) == ("credential_unavailable", "moved")
    assert answer["detail"] == (
        "gateway (leg 1): forbidden (HTTP 403): provider 'moved' is not attached to sandbox 'alpha'"
    )
    assert stack.broker_requests("forbidden") - refused == 1
    assert not any(r.path.startswith("/moved/") for r in stack.capture.requests)
    # The polling proxy drops the route at its next poll.
    assert wait_until(lambda: "moved" not in stack.health(proxy_of(stack))[1]["providers"])
    slow.stop()


def test_the_supervisors_logs_contain_no_token(stack: E2EStack) -> None:
    status, _ = curl(proxy_of(stack), stack.upstream_url("orders") + "/orders/last")
    assert status == 200
    injected = stack.capture.tokens()
    assert injected  # the tests above sent tokens through the capture server
    proxy_log = "\n".join(p.log_text() for p in stack.proxies.values())
    assert "decision" in proxy_log  # the decision log is on, and still holds no token
    leaked = stack.leaked(
        injected | set(stack.user_tokens), proxy_log
    )  # indexes, never token values
    assert leaked == []
    token_shaped = len(JWT_RE.findall(proxy_log))  # a count: never print a token
    assert token_shaped == 0


def test_svids_go_only_to_their_audience(stack: E2EStack) -> None:
    # alpha's agent issued SVIDs for two audiences only: the gateway's and the IdP's.
    issued = [
        json.loads(line)
        for line in stack.gw.sandbox_agent("alpha").log_text().splitlines()
        if '"issued JWT-SVID"' in line
    ]
    audiences = {a for entry in issued for a in entry["audience"]}
    assert audiences == {GATEWAY_ID, stack.gw.issuer}
    # The gateway refused no request as unauthenticated: it never received an SVID for
    # another audience (the IdP-audience SVID would have been a 401).
    samples = prometheus(f"{stack.gw.admin_url}/metrics")
    refused = [k for k in samples if 'status="401"' in k and samples[k] > 0]
    assert refused == []
    assert stack.broker_requests("unauthenticated") == 0
