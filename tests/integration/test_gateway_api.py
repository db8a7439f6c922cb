"""The gateway's user-facing API against a real gateway process: authentication of users,
ownership, validation (400 naming the field), write-only credentials, supervisor config
with ETags, persistence across restarts, and requests that die halfway.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway_client import (
    BearerAuth,
    Conflict,
    CredentialInput,
    FailedPrecondition,
    Forbidden,
    GatewayClient,
    GatewayUnreachable,
    InvalidRequest,
    NotFound,
    Unauthenticated,
)
from tests.support.gateway_stack import (
    ADMIN_TOKEN,
    GatewayStack,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    services: list[Service] = []
    try:
        stack = start_gateway_stack(tmp_path_factory.mktemp("api"), services)

        async def setup() -> None:
            async with stack.admin() as admin:
                await admin.create_profile(
                    exchange_profile_yaml("orders-api", stack.token_endpoint)
                )

        asyncio.run(setup())
        yield stack
    finally:
        for service in reversed(services):
            service.stop()


async def raw(
    stack: GatewayStack,
    method: str,
    path: str,
    *,
    token: str | None = ADMIN_TOKEN,
    body: object = None,
    data: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    send = dict(headers or {})
    if token is not None:
        send["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            stack.url + path,
            json=body if data is None and body is not None else None,
            data=data,
            headers=send,
        ) as response,
    ):
        text = await response.text()
        return response.status, (json.loads(text) if text else None), dict(response.headers)


# --- user authentication ----------------------------------------------------------------


async def test_auth_config_is_public(stack: GatewayStack) -> None:
    async with GatewayClient(stack.url) as client:
        config = await client.auth_config()
    assert config.issuer == stack.issuer
    assert config.audience == "tokenferry"
    assert config.client_id == "tokenferry-cli"
    assert config.supervisor_audience == "spiffe://example.org/gateway"


async def test_valid_user_token_is_accepted(stack: GatewayStack) -> None:
    async with stack.user(stack.user_token("carol")) as carol:
        provider = await carol.create_provider("carol-orders", "orders-api")
    assert provider.owner == "carol"


async def test_user_token_from_another_issuer_is_401(stack: GatewayStack) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    forged = jwt.encode(
        {"iss": "http://127.0.0.1:1/realms/evil", "sub": "alice", "aud": "tokenferry",
         "exp": now + 600, "iat": now},
        key,
        algorithm="ES256",
        headers={"kid": "evil"},
    )  # fmt: skip
    # Same issuer name as ours but signed by an unknown key: also refused.
    spoofed = jwt.encode(
        {"iss": stack.issuer, "sub": "alice", "aud": "tokenferry", "exp": now + 600},
        key,
        algorithm="ES256",
        headers={"kid": "evil"},
    )
    for token in (forged, spoofed):
        async with stack.user(token) as client:
            with pytest.raises(Unauthenticated):
                await client.list_providers()


async def test_expired_user_token_is_401(stack: GatewayStack) -> None:
    async with stack.user(stack.user_token("alice", ttl=-60)) as client:
        with pytest.raises(Unauthenticated, match="expired"):
            await client.list_providers()


async def test_user_token_with_wrong_audience_is_401(stack: GatewayStack) -> None:
    async with stack.user(stack.user_token("alice", aud="something-else")) as client:
        with pytest.raises(Unauthenticated, match="audience"):
            await client.list_providers()


async def test_missing_and_wrong_admin_token_are_401(stack: GatewayStack) -> None:
    status, body, _ = await raw(stack, "GET", "/v1/providers", token=None)
    assert (status, body["error"]) == (401, "unauthenticated")
    status, body, _ = await raw(stack, "GET", "/v1/providers", token=ADMIN_TOKEN + "x")
    assert (status, body["error"]) == (401, "unauthenticated")


# --- ownership ----------------------------------------------------------------------------


async def test_non_owner_cannot_change_or_delete_a_provider(stack: GatewayStack) -> None:
    alice_token = stack.user_token("alice")
    async with stack.user(alice_token) as alice, stack.user(stack.user_token("mallory")) as mallory:
        created = await alice.create_provider(
            "alice-orders", "orders-api", {"user_token": alice_token}
        )
        with pytest.raises(Forbidden):
            await mallory.update_provider("alice-orders", credentials={"user_token": "stolen"})
        with pytest.raises(Forbidden):
            await mallory.delete_provider("alice-orders")
        # Nor attach it to a sandbox of their own (that would hand them alice's token).
        await mallory.put_sandbox("mallory-box", sandbox_id("mallory"))
        with pytest.raises(Forbidden):
            await mallory.attach_provider("mallory-box", "alice-orders")
        with pytest.raises(Forbidden):
            await mallory.put_sandbox("mallory-box", sandbox_id("mallory"), ["alice-orders"])
        # Nor take over alice's sandbox registration.
        await alice.put_sandbox("alice-box", sandbox_id("alice"), ["alice-orders"])
        with pytest.raises(Forbidden):
            await mallory.put_sandbox("alice-box", sandbox_id("mallory2"))
        unchanged = await alice.get_provider("alice-orders")
        assert unchanged.revision == created.revision
        # The owner and an admin may.
        updated = await alice.update_provider(
            "alice-orders", credentials={"user_token": alice_token}
        )
        assert updated.revision == created.revision + 1
    async with stack.admin() as admin:
        await admin.delete_sandbox("alice-box")
        await admin.delete_provider("alice-orders")
        with pytest.raises(NotFound):
            await admin.get_provider("alice-orders")


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/v1/profiles", "POST"),
        ("/v1/providers", "POST"),
        ("/v1/providers/whatever", "PATCH"),
        ("/v1/sandboxes/whatever", "PUT"),
    ],
)
async def test_malformed_json_bodies_are_400(stack: GatewayStack, path: str, method: str) -> None:
    for data in ('{"name": ', "[1, 2]", "", "\xff"):
        status, body, _ = await raw(stack, method, path, data=data)
        assert status == 400, (path, data)
        assert body["error"] == "invalid_request"
        assert body["detail"]


async def test_invalid_profile_is_400_naming_the_field(stack: GatewayStack) -> None:
    source = exchange_profile_yaml("bad-profile", stack.token_endpoint).replace(
        "grant_type: token_exchange", "grant_type: token_exchang"
    )
    async with stack.admin() as admin:
        with pytest.raises(InvalidRequest) as caught:
            await admin.create_profile(source)
        assert "grant_type" in caught.value.detail
        assert caught.value.field is not None and "grant_type" in caught.value.field
        with pytest.raises(InvalidRequest) as caught:
            await admin.create_profile("id: x\ncredentialz: []\n")
        assert "credentialz" in caught.value.detail
        with pytest.raises(InvalidRequest):
            await admin.create_profile("id: [unclosed\n")
        with pytest.raises(NotFound):
            await admin.get_profile("bad-profile")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"profile": "orders-api"}, "name"),
        ({"name": "p1"}, "profile"),
        ({"name": "Bad Name!", "profile": "orders-api"}, "name"),
        ({"name": "p1", "profile": "orders-api", "credentials": []}, "credentials"),
        ({"name": "p1", "profile": "orders-api", "credentials": {"nope": "x"}}, "credentials.nope"),
        (
            {"name": "p1", "profile": "orders-api", "credentials": {"user_token": 5}},
            "credentials.user_token",
        ),
        (
            {"name": "p1", "profile": "orders-api",
             "credentials": {"user_token": {"value": "x", "expires_at": "tomorrow"}}},
            "credentials.user_token.expires_at",
        ),
        (
            {"name": "p1", "profile": "orders-api",
             "credentials": {"user_token": {"value": "x", "expires_at": "2030-01-01T00:00:00"}}},
            "credentials.user_token.expires_at",
        ),
        (
            {"name": "p1", "profile": "orders-api", "credentials": {"access_token": "x"}},
            "credentials.access_token",
        ),
        (
            {"name": "p1", "profile": "orders-api",
             "credentials": {"user_token": {"expires_at": "2030-01-01T00:00:00Z"}}},
            "credentials.user_token.value",
        ),
    ],
)  # fmt: skip
async def test_invalid_provider_bodies_are_400_naming_the_field(
    stack: GatewayStack, body: dict[str, Any], field: str
) -> None:
    status, answer, _ = await raw(stack, "POST", "/v1/providers", body=body)
    assert status == 400, answer
    assert answer["error"] == "invalid_request"
    assert field.split(".")[-1] in answer["detail"]
    status, _, _ = await raw(stack, "GET", "/v1/providers/p1")
    assert status == 404


async def test_sandbox_validation(stack: GatewayStack) -> None:
    async with stack.admin() as admin:
        with pytest.raises(InvalidRequest, match="spiffe_id"):
            await admin.put_sandbox("s1", "https://not-spiffe")
        with pytest.raises(InvalidRequest, match="trust domain"):
            await admin.put_sandbox("s1", "spiffe://other.org/sandbox/s1")
        with pytest.raises(NotFound, match="provider 'ghost'"):
            await admin.put_sandbox("s1", sandbox_id("s1"), ["ghost"])
        with pytest.raises(NotFound):
            await admin.get_sandbox("s1")
        await admin.put_sandbox("s1", sandbox_id("s1"))
        with pytest.raises(Conflict, match="already registered"):
            await admin.put_sandbox("s2", sandbox_id("s1"))
        await admin.delete_sandbox("s1")


async def test_duplicates_conflict_and_in_use_profile(stack: GatewayStack) -> None:
    async with stack.admin() as admin:
        with pytest.raises(Conflict):
            await admin.create_profile(exchange_profile_yaml("orders-api", stack.token_endpoint))
        await admin.create_provider("dup", "orders-api")
        with pytest.raises(Conflict):
            await admin.create_provider("dup", "orders-api")
        with pytest.raises(FailedPrecondition, match="used by"):
            await admin.delete_profile("orders-api")
        await admin.delete_provider("dup")


# --- write-only credentials and the supervisor config ------------------------------------


async def test_credentials_are_write_only(stack: GatewayStack) -> None:
    value = stack.user_token("dave")
    async with stack.admin() as admin:
        created = await admin.create_provider(
            "dave-orders",
            "orders-api",
            {"user_token": CredentialInput(value)},
        )
        listed = await admin.list_providers()
    cred = created.credential("user_token")
    assert cred is not None and cred.has_value
    # The JWT's own exp became the recorded expiry.
    exp = jwt.decode(value, options={"verify_signature": False})["exp"]
    assert cred.expires_at is not None and int(cred.expires_at.timestamp()) == exp
    for path in ("/v1/providers", "/v1/providers/dave-orders"):
        _, body, _ = await raw(stack, "GET", path)
        assert value not in json.dumps(body)
    assert any(p.name == "dave-orders" for p in listed)


async def test_supervisor_config_etag_and_304(stack: GatewayStack) -> None:
    async with stack.admin() as admin:
        await admin.create_provider("eve-orders", "orders-api", {"user_token": "opaque-subject"})
        await admin.put_sandbox("eve", sandbox_id("eve"), ["eve-orders"])
    client, source = stack.supervisor("eve")
    async with client:
        config = await client.supervisor_config()
        assert config is not None and config.etag
        assert config.sandbox_name == "eve" and config.spiffe_id == sandbox_id("eve")
        (provider,) = config.providers
        assert provider.name == "eve-orders"
        assert provider.profile().id == "orders-api"
        assert [(c.name, c.has_value) for c in provider.credentials] == [("user_token", True)]
        assert await client.supervisor_config(config.etag) is None
        async with stack.admin() as admin:
            await admin.update_provider("eve-orders", credentials={"user_token": "other"})
        changed = await client.supervisor_config(config.etag)
        assert changed is not None and changed.etag != config.etag
        assert changed.providers[0].revision == provider.revision + 1
    await source.close()


async def test_unreachable_gateway_raises_gateway_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with GatewayClient(f"http://127.0.0.1:{port}", auth=BearerAuth("x")) as client:
        with pytest.raises(GatewayUnreachable):
            await client.list_profiles()


# --- durability -----------------------------------------------------------------------------


async def test_request_killed_halfway_leaves_no_record(stack: GatewayStack) -> None:
    host, port = stack.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(
        {"name": "half", "profile": "orders-api", "credentials": {"user_token": "x" * 500}}
    ).encode()
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/providers HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # The gateway is still healthy and nothing named "half" exists, not even partly.
    async with stack.admin() as admin:
        with pytest.raises(NotFound):
            await admin.get_provider("half")
        assert all(p.name != "half" for p in await admin.list_providers())


async def test_restart_keeps_every_record(stack: GatewayStack) -> None:
    token = stack.user_token("frank")
    async with stack.admin() as admin:
        await admin.create_provider("frank-orders", "orders-api", {"user_token": token})
        await admin.put_sandbox("frank", sandbox_id("frank"), ["frank-orders"])
        before = (
            [p.id for p in await admin.list_profiles()],
            await admin.list_providers(),
            await admin.list_sandboxes(),
        )
    stack.restart_gateway()
    async with stack.admin() as admin:
        after = (
            [p.id for p in await admin.list_profiles()],
            await admin.list_providers(),
            await admin.list_sandboxes(),
        )
    assert after == before
    # The stored subject token still decrypts: the broker can use it after the restart.
    client, source = stack.supervisor("frank")
    async with client:
        minted = await client.intermediate_token("frank-orders", "access_token")
    await source.close()
    assert jwt.decode(minted.access_token, options={"verify_signature": False})["sub"] == "frank"
