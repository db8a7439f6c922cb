"""Trusted token endpoints and admin subjects, against a real gateway, dev IdP and agents.

An "attacker" token endpoint (a tiny aiohttp server in a thread) counts every request it
receives: a profile naming it, with the real IdP as SVID audience, must never make the
gateway send it anything — refused at registration, and refused by the broker when such
a profile was stored while the gateway still trusted it.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway_client import FailedPrecondition, Forbidden, IdpError, InvalidRequest, NotFound
from tests.support.gateway_stack import (
    GatewayStack,
    client_credentials_profile_yaml,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service, tokenferry_command

ADMIN_SUBJECT = "carol"


@dataclass
class Attacker:
    """A token endpoint that records what reaches it and refuses everything."""

    url: str = ""
    requests: list[dict[str, str]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/realms/dev/protocol/openid-connect/token"

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append({k: str(v) for k, v in form.items()})
        return web.json_response({"error": "invalid_grant"}, status=400)

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._token)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="attacker", daemon=True)
        self._thread.start()
        assert ready.wait(10), "attacker server did not start"

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.fixture(scope="module")
def attacker() -> Iterator[Attacker]:
    server = Attacker()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    services: list[Service] = []
    try:
        stack = start_gateway_stack(
            tmp_path_factory.mktemp("trust"),
            services,
            extra_gateway_args=("--admin-subject", ADMIN_SUBJECT),
        )
        stack.sandbox_agent("a")
        yield stack
    finally:
        for service in reversed(services):
            service.stop()


def restart_with(stack: GatewayStack, *args: str) -> None:
    stack.extra_args = ("--admin-subject", ADMIN_SUBJECT, *args)
    stack.restart_gateway()


def harvesting_profile(profile_id: str, attacker: Attacker, stack: GatewayStack) -> str:
    """The attack: the attacker's endpoint, but SVIDs minted for the real IdP."""
    return exchange_profile_yaml(profile_id, attacker.token_endpoint).replace(
        "      cache_ttl_seconds:",
        f"      jwt_svid_audience: {stack.issuer}\n      cache_ttl_seconds:",
    )


async def test_untrusted_endpoint_is_refused_at_registration(
    stack: GatewayStack, attacker: Attacker
) -> None:
    before = stack.idp_stats()
    alice = stack.user_token("alice")
    async with stack.user(alice) as user:
        with pytest.raises(InvalidRequest) as caught:
            await user.create_profile(harvesting_profile("harvest", attacker, stack))
        assert caught.value.status == 400
        assert caught.value.field == "credentials[1].token_grant.token_endpoint"
        assert attacker.token_endpoint in caught.value.detail
        assert f"trusted: {stack.token_endpoint}" in caught.value.detail
        # client_credentials grants too: supervisors send their SVID there.
        with pytest.raises(InvalidRequest) as caught:
            await user.create_profile(
                client_credentials_profile_yaml("harvest-cc", attacker.token_endpoint)
            )
        assert caught.value.field == "credentials[0].token_grant.token_endpoint"
        for profile_id in ("harvest", "harvest-cc"):
            with pytest.raises(NotFound):
                await user.get_profile(profile_id)
    assert attacker.requests == []
    assert stack.idp_stats() == before


async def test_svid_audience_of_another_idp_is_refused(stack: GatewayStack) -> None:
    alice = stack.user_token("alice")
    profile = exchange_profile_yaml("elsewhere", stack.token_endpoint).replace(
        "      cache_ttl_seconds:",
        "      jwt_svid_audience: https://other-idp.example.org/realms/x\n      cache_ttl_seconds:",
    )
    async with stack.user(alice) as user:
        with pytest.raises(InvalidRequest) as caught:
            await user.create_profile(profile)
        assert caught.value.field == "credentials[1].token_grant.jwt_svid_audience"
        assert "other-idp.example.org" in caught.value.detail


async def test_the_default_from_discovery_trusts_the_login_idp(stack: GatewayStack) -> None:
    # No --trusted-token-endpoint: the dev IdP (the --oidc-issuer) is trusted, with its
    # issuer as SVID audience too; an ordinary user may register such a profile.
    alice = stack.user_token("alice")
    profile = exchange_profile_yaml("idp-orders", stack.token_endpoint).replace(
        "      cache_ttl_seconds:",
        f"      jwt_svid_audience: {stack.issuer}\n      cache_ttl_seconds:",
    )
    async with stack.user(alice) as user:
        record = await user.create_profile(profile)
        assert record.id == "idp-orders"
        await user.create_provider("alice-idp", "idp-orders", {"user_token": alice})
        await user.put_sandbox("a", sandbox_id("a"), ["alice-idp"])
    client, source = stack.supervisor("a")
    before = stack.intermediate_exchanges()
    async with client:
        token = await client.intermediate_token("alice-idp", "access_token")
    await source.close()
    assert token.access_token
    assert stack.intermediate_exchanges() == before + 1


async def test_a_stored_profile_no_longer_trusted_is_refused_by_the_broker(
    stack: GatewayStack, attacker: Attacker
) -> None:
    # 1. The operator trusts the attacker's endpoint for a while (explicit list).
    restart_with(
        stack,
        *("--trusted-token-endpoint", stack.token_endpoint),
        *("--trusted-token-endpoint", attacker.token_endpoint),
        *("--trusted-svid-audience", stack.issuer),
    )
    alice = stack.user_token("alice")
    async with stack.user(alice) as user:
        await user.create_profile(harvesting_profile("was-trusted", attacker, stack))
        await user.create_provider("was-trusted", "was-trusted", {"user_token": alice})
        await user.put_sandbox("b", sandbox_id("b"), ["was-trusted"])
    client, source = stack.supervisor("b")
    async with client:
        # While trusted, the broker does go there: the attacker's counter works.
        with pytest.raises(IdpError):
            await client.intermediate_token("was-trusted", "access_token")
        assert len(attacker.requests) == 1
        assert attacker.requests[0]["subject_token"] == alice
        config = await client.supervisor_config(None)
        assert config is not None
        assert [p.name for p in config.providers] == ["was-trusted"]
    await source.close()

    # 2. Back to the default (the dev IdP only): the stored profile gets nowhere.
    restart_with(stack)
    client, source = stack.supervisor("b")
    async with client:
        for _ in range(2):  # no back-off or cache involved: refused every time
            with pytest.raises(FailedPrecondition) as caught:
                await client.intermediate_token("was-trusted", "access_token")
            assert caught.value.status == 409
            assert "token_endpoint" in caught.value.detail
            assert "not a trusted token endpoint" in caught.value.detail
        # The supervisor is not told about it either (it would send its SVID there).
        config = await client.supervisor_config(None)
        assert config is not None
        assert config.providers == ()
    await source.close()
    assert len(attacker.requests) == 1
    assert "left out of a supervisor's configuration" in stack.gateway.log_text()


async def test_admin_subject_acts_on_other_users_records(stack: GatewayStack) -> None:
    alice, bob, carol = (stack.user_token(s) for s in ("alice", "bob", ADMIN_SUBJECT))
    async with stack.user(alice) as user:
        await user.create_profile(exchange_profile_yaml("shared", stack.token_endpoint))
        await user.create_provider("alice-shared", "shared", {"user_token": alice})
    async with stack.user(bob) as other:
        with pytest.raises(Forbidden):
            await other.update_provider("alice-shared", profile="shared")
        with pytest.raises(Forbidden):
            await other.delete_provider("alice-shared")
        with pytest.raises(Forbidden, match="only an admin may delete profiles"):
            await other.delete_profile("shared")
    async with stack.user(carol) as admin:
        updated = await admin.update_provider("alice-shared", credentials={"user_token": bob})
        assert updated.owner == "alice"
        created = await admin.create_provider("for-alice", "shared", owner="alice")
        assert created.owner == "alice"
        await admin.delete_provider("for-alice")
        await admin.delete_provider("alice-shared")
        await admin.delete_profile("shared")
        with pytest.raises(NotFound):
            await admin.get_profile("shared")


async def test_profiles_admin_only(stack: GatewayStack) -> None:
    restart_with(stack, "--profiles-admin-only")
    try:
        async with stack.user(stack.user_token("alice")) as user:
            with pytest.raises(Forbidden, match="only an admin may register profiles"):
                await user.create_profile(exchange_profile_yaml("alice-p", stack.token_endpoint))
        async with stack.user(stack.user_token(ADMIN_SUBJECT)) as admin:
            record = await admin.create_profile(
                exchange_profile_yaml("carol-p", stack.token_endpoint)
            )
            assert record.id == "carol-p"
    finally:
        restart_with(stack)


def test_a_bad_trusted_endpoint_stops_the_process_with_one_line() -> None:
    result = subprocess.run(
        tokenferry_command(
            "gateway",
            *("--oidc-issuer", "http://127.0.0.1:1/realms/dev", "--oidc-audience", "t"),
            *("--spiffe-socket", "/nonexistent.sock"),
            *("--trusted-token-endpoint", "idp.example.org/token"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: --trusted-token-endpoint: 'idp.example.org/token' is not an http(s) URL "
        "(without user info or fragment)"
    )
