"""The broker (POST /v1/supervisor/intermediate-token) against a real gateway process.

Every check of SPEC §6 fails with its own status and code, in the documented order; the
happy path yields a token for the caller's own SPIFFE ID; single flight and revisions
drive the number of IdP exchanges.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway_client import (
    CredentialInput,
    FailedPrecondition,
    Forbidden,
    IdpError,
    NotFound,
)
from tests.support.gateway_stack import (
    GATEWAY_ID,
    GatewayStack,
    client_credentials_profile_yaml,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service

BROKER = "/v1/supervisor/intermediate-token"
A = sandbox_id("a")
B = sandbox_id("b")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _setup(stack: GatewayStack, alice_token: str, nowhere: str) -> None:
    async with stack.admin() as admin:
        await admin.create_profile(exchange_profile_yaml("nowhere-api", nowhere))
        await admin.create_provider("nowhere", "nowhere-api", {"user_token": alice_token})
        await admin.create_profile(exchange_profile_yaml("orders-api", stack.token_endpoint))
        await admin.create_profile(
            client_credentials_profile_yaml("reports-api", stack.token_endpoint)
        )
        await admin.create_provider("orders", "orders-api", {"user_token": alice_token})
        await admin.create_provider("orders-b", "orders-api", {"user_token": alice_token})
        await admin.create_provider("orders-fresh", "orders-api", {"user_token": alice_token})
        await admin.create_provider("no-subject", "orders-api", {})
        await admin.create_provider(
            "expired-subject",
            "orders-api",
            {
                "user_token": CredentialInput(
                    alice_token, expires_at=datetime.now(UTC) - timedelta(minutes=1)
                )
            },
        )
        await admin.create_provider(
            "garbage-subject", "orders-api", {"user_token": "not-a-token-the-idp-knows"}
        )
        await admin.create_provider("reports", "reports-api", {})
        await admin.put_sandbox(
            "a",
            A,
            [
                "orders",
                "orders-fresh",
                "no-subject",
                "expired-subject",
                "garbage-subject",
                "reports",
                "nowhere",
            ],
        )
        await admin.put_sandbox("b", B, ["orders", "orders-b"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    services: list[Service] = []
    try:
        stack = start_gateway_stack(tmp_path_factory.mktemp("broker"), services)
        # The IdP-unreachable test needs a token endpoint nothing listens on, and the
        # gateway sends nothing to an endpoint it does not trust: list both explicitly.
        nowhere = f"http://127.0.0.1:{closed_port()}/realms/dev/protocol/openid-connect/token"
        stack.extra_args = (
            *("--trusted-token-endpoint", stack.token_endpoint),
            *("--trusted-token-endpoint", nowhere),
        )
        stack.restart_gateway()
        stack.sandbox_agent("a")
        stack.sandbox_agent("b")
        stack.notes["alice"] = stack.user_token("alice")
        asyncio.run(_setup(stack, stack.notes["alice"], nowhere))
        yield stack
    finally:
        for service in reversed(services):
            service.stop()


async def post(
    stack: GatewayStack, body: object, authorization: str | None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    raw = body if isinstance(body, str) else json.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.url + BROKER, data=raw, headers=headers) as response,
    ):
        return response.status, await response.json()


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def svid_of(stack: GatewayStack, name: str, audience: str = GATEWAY_ID) -> str:
    _client, source = stack.supervisor(name)
    try:
        return (await source.fetch_jwt_svid(audience)).token
    finally:
        await source.close()


GOOD = {"provider": "orders", "credential": "access_token"}


# --- 400: body fields first -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "provider"),
        ({"provider": "orders"}, "credential"),
        ({"credential": "access_token"}, "provider"),
        ({"provider": 7, "credential": "access_token"}, "provider"),
        ({"provider": "orders", "credential": ""}, "credential"),
    ],
)
async def test_missing_fields_are_400_naming_the_field(
    stack: GatewayStack, body: dict[str, Any], named: str
) -> None:
    # No credentials at all: the body is checked first (SPEC §6 order).
    status, answer = await post(stack, body, None)
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert named in answer["detail"]


async def test_malformed_json_is_400(stack: GatewayStack) -> None:
    status, answer = await post(stack, '{"provider": "orders",', bearer("x"))
    assert (status, answer["error"]) == (400, "invalid_request")
    assert "not valid JSON" in answer["detail"]


# --- 401: the SVID ----------------------------------------------------------------------


async def test_no_svid_is_401(stack: GatewayStack) -> None:
    status, answer = await post(stack, GOOD, None)
    assert (status, answer["error"]) == (401, "unauthenticated")


@pytest.mark.parametrize(
    "header", ["Bearer garbage", "Bearer a.b.c", "Basic Zm9vOmJhcg==", "Bearer"]
)
async def test_garbled_svid_is_401(stack: GatewayStack, header: str) -> None:
    status, answer = await post(stack, GOOD, header)
    assert (status, answer["error"]) == (401, "unauthenticated")


async def test_expired_svid_is_401(stack: GatewayStack) -> None:
    token = stack.sign_svid(sub=A, ttl=-60)
    status, answer = await post(stack, GOOD, bearer(token))
    assert (status, answer["error"]) == (401, "unauthenticated")
    assert "expired" in answer["detail"]


async def test_svid_signed_by_unknown_key_is_401(stack: GatewayStack) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    for kid in (stack.kid, "some-unknown-kid"):
        token = stack.sign_svid(sub=A, key=stranger, kid=kid)
        status, answer = await post(stack, GOOD, bearer(token))
        assert (status, answer["error"]) == (401, "unauthenticated"), kid


async def test_alg_none_is_401(stack: GatewayStack) -> None:
    status, answer = await post(stack, GOOD, bearer(stack.unsigned_svid(sub=A)))
    assert (status, answer["error"]) == (401, "unauthenticated")


async def test_hs256_keyed_with_the_public_key_is_401(stack: GatewayStack) -> None:
    status, answer = await post(stack, GOOD, bearer(stack.hmac_svid_with_public_key(sub=A)))
    assert (status, answer["error"]) == (401, "unauthenticated")


async def test_wrong_audience_is_401(stack: GatewayStack) -> None:
    # A real SVID from sandbox A's agent, but minted for the IdP, not the gateway.
    token = await svid_of(stack, "a", audience=stack.issuer)
    status, answer = await post(stack, GOOD, bearer(token))
    assert (status, answer["error"]) == (401, "unauthenticated")
    assert "aud" in answer["detail"]


async def test_other_trust_domain_is_401(stack: GatewayStack) -> None:
    # Signed by a key the gateway trusts, but for an identity of another trust domain.
    token = stack.sign_svid(sub="spiffe://evil.example/sandbox/a")
    status, answer = await post(stack, GOOD, bearer(token))
    assert (status, answer["error"]) == (401, "unauthenticated")
    assert "trust domain" in answer["detail"]


# --- 403/404/409: registrations and stored state ----------------------------------------


async def test_unregistered_spiffe_id_is_403(stack: GatewayStack) -> None:
    token = stack.sign_svid(sub=sandbox_id("nobody"))
    status, answer = await post(stack, GOOD, bearer(token))
    assert (status, answer["error"]) == (403, "forbidden")
    assert "not a registered sandbox" in answer["detail"]


async def test_unknown_provider_is_404(stack: GatewayStack) -> None:
    client, source = stack.supervisor("a")
    async with client:
        with pytest.raises(NotFound, match="does not exist"):
            await client.intermediate_token("no-such-provider", "access_token")
    await source.close()


async def test_provider_not_attached_is_403(stack: GatewayStack) -> None:
    client, source = stack.supervisor("a")
    async with client:
        with pytest.raises(Forbidden, match="not attached") as caught:
            await client.intermediate_token("orders-b", "access_token")
    await source.close()
    assert caught.value.status == 403


@pytest.mark.parametrize(
    ("provider", "credential", "says"),
    [
        ("orders", "nope", "has no credential 'nope'"),
        ("orders", "user_token", "no token_exchange grant"),
        ("reports", "service_token", "no token_exchange grant"),
        ("no-subject", "access_token", "has no stored value"),
        ("expired-subject", "access_token", "expired at"),
    ],
)
async def test_failed_preconditions_are_409_naming_which(
    stack: GatewayStack, provider: str, credential: str, says: str
) -> None:
    client, source = stack.supervisor("a")
    async with client:
        with pytest.raises(FailedPrecondition) as caught:
            await client.intermediate_token(provider, credential)
    await source.close()
    assert caught.value.status == 409
    assert says in caught.value.detail


async def test_idp_refusal_is_502_with_its_sanitised_error(stack: GatewayStack) -> None:
    client, source = stack.supervisor("a")
    async with client:
        with pytest.raises(IdpError) as caught:
            await client.intermediate_token("garbage-subject", "access_token")
    await source.close()
    assert caught.value.status == 502
    assert "identity provider refused" in caught.value.detail
    assert "invalid_grant" in caught.value.detail or "invalid_request" in caught.value.detail
    assert "not-a-token-the-idp-knows" not in caught.value.detail


async def test_idp_unreachable_is_502_saying_unreachable(stack: GatewayStack) -> None:
    client, source = stack.supervisor("a")
    async with client:
        with pytest.raises(IdpError, match="unreachable") as caught:
            await client.intermediate_token("nowhere", "access_token")
    await source.close()
    assert caught.value.status == 502


# --- the happy path and the isolation of sandboxes ----------------------------------------


async def test_happy_path_token_is_for_the_caller_and_the_user(stack: GatewayStack) -> None:
    client, source = stack.supervisor("a")
    async with client:
        token = await client.intermediate_token("orders", "access_token")
    await source.close()
    claims = jwt.decode(token.access_token, options={"verify_signature": False})
    assert claims["aud"] in ([A], A)
    assert claims["sub"] == "alice"
    assert claims["azp"] == GATEWAY_ID
    assert token.token_type is not None and token.token_type.lower() == "bearer"
    assert token.expires_in is not None and 0 < token.expires_in <= 3600


async def test_sandbox_a_cannot_obtain_a_token_for_sandbox_b(stack: GatewayStack) -> None:
    a_svid = await svid_of(stack, "a")
    # 1. Asking for B in the body changes nothing: the audience is the verified subject.
    for extra in ({"audience": B}, {"supervisor": B}, {"spiffe_id": B}, {"sandbox": "b"}):
        status, answer = await post(stack, {**GOOD, **extra}, bearer(a_svid))
        assert status == 200, answer
        claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
        assert claims["aud"] in ([A], A), extra
    # 2. A provider attached only to B is refused.
    status, answer = await post(
        stack, {"provider": "orders-b", "credential": "access_token"}, bearer(a_svid)
    )
    assert (status, answer["error"]) == (403, "forbidden")
    # 3. A's agent issues SVIDs only for A; one with B's ID as audience is not a gateway SVID.
    status, _ = await post(stack, GOOD, bearer(await svid_of(stack, "a", audience=B)))
    assert status == 401
    # 4. B, asking for the same provider, gets its own token, never A's cached one.
    b_svid = await svid_of(stack, "b")
    status, answer = await post(stack, GOOD, bearer(b_svid))
    assert status == 200
    claims_b = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims_b["aud"] in ([B], B)


async def test_20_concurrent_calls_make_one_exchange_and_an_update_exchanges_again(
    stack: GatewayStack,
) -> None:
    svid = await svid_of(stack, "a")
    body = {"provider": "orders-fresh", "credential": "access_token"}
    before = stack.intermediate_exchanges()
    results = await asyncio.gather(*(post(stack, body, bearer(svid)) for _ in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert len({answer["access_token"] for _, answer in results}) == 1
    assert stack.intermediate_exchanges() == before + 1

    # Still cached: no new exchange.
    status, _ = await post(stack, body, bearer(svid))
    assert status == 200
    assert stack.intermediate_exchanges() == before + 1

    # A new subject token bumps the revision; the next call exchanges again, as bob.
    async with stack.admin() as admin:
        old = await admin.get_provider("orders-fresh")
        updated = await admin.update_provider(
            "orders-fresh", credentials={"user_token": stack.user_token("bob")}
        )
    assert updated.revision == old.revision + 1
    status, answer = await post(stack, body, bearer(svid))
    assert status == 200
    assert stack.intermediate_exchanges() == before + 2
    assert jwt.decode(answer["access_token"], options={"verify_signature": False})["sub"] == "bob"


async def test_subject_token_never_leaves_the_gateway(stack: GatewayStack) -> None:
    secret = stack.notes["alice"]
    seen: list[str] = []
    headers = {"Authorization": bearer("dev-admin-token-for-tests")}
    svid = await svid_of(stack, "a")
    async with aiohttp.ClientSession() as session:
        for path in (
            "/v1/providers",
            "/v1/providers/orders",
            "/v1/sandboxes",
            "/v1/sandboxes/a",
            "/v1/profiles",
        ):
            async with session.get(stack.url + path, headers=headers) as response:
                assert response.status == 200
                seen.append(await response.text())
        async with session.get(
            stack.url + "/v1/supervisor/config", headers={"Authorization": bearer(svid)}
        ) as response:
            assert response.status == 200
            seen.append(await response.text())
        async with session.post(
            stack.url + BROKER, json=GOOD, headers={"Authorization": bearer(svid)}
        ) as response:
            assert response.status == 200
            seen.append(await response.text())
        async with session.get(stack.admin_url + "/metrics") as response:
            metrics = await response.text()
            seen.append(metrics)
    assert "tokenferry_gateway_broker_requests_total" in metrics
    # The signature part alone is unique to this token: check it and the whole token.
    signature = secret.rsplit(".", 1)[1]
    for text in [*seen, stack.gateway.log_text()]:
        assert secret not in text
        assert signature not in text
    raw = stack.raw_database_bytes()
    assert len(raw) > 0
    assert secret.encode() not in raw
    assert signature.encode() not in raw
    # The supervisor config names the broker-only credential but holds no value.
    config = json.loads(seen[5])
    orders = next(p for p in config["providers"] if p["name"] == "orders")
    user_token = orders["credentials"][0]
    assert (user_token["name"], user_token["has_value"]) == ("user_token", True)
    assert set(user_token) == {"name", "has_value", "expires_at"}


async def test_metrics_count_broker_outcomes_and_cache(stack: GatewayStack) -> None:
    svid = await svid_of(stack, "a")
    await post(stack, GOOD, bearer(svid))
    await post(stack, GOOD, bearer(svid))
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.admin_url + "/metrics") as response,
    ):
        text = await response.text()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['tokenferry_gateway_broker_requests_total{outcome="ok"}'] >= 2
    assert values['tokenferry_gateway_intermediate_cache_total{result="hit"}'] >= 1
    assert values['tokenferry_gateway_idp_exchange_seconds_count{outcome="ok"}'] >= 1
