"""A broken or hostile token endpoint behind the gateway's broker (exchange 1).

The gateway trusts the in-test fake IdP's endpoints (``--trusted-token-endpoint``), so a
supervisor asking for an intermediate token makes the gateway send the fake IdP its own
JWT-SVID and the user's stored subject token. Whatever the IdP answers, the supervisor
must get a 502 ``idp_error`` with a clear detail, and neither that answer nor the
gateway's log or metrics may hold the subject token, the gateway's SVID, or a token the
IdP should not have been believed about.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from gateway_client import CredentialInput, IdpError
from tests.integration.test_adversarial_cli import FakeGateway
from tests.integration.test_adversarial_idp import CANARY, MODES, FakeIdp
from tests.support.e2e_stack import E2EStack
from tests.support.gateway_stack import (
    ADMIN_TOKEN,
    GatewayStack,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service, start_service

pytestmark = pytest.mark.timeout(120)

SANDBOX = "hostile-idp"
leaked = E2EStack.leaked


@dataclass
class Env:
    stack: GatewayStack
    idp: FakeIdp
    subject_token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    services: list[Service] = []
    idp = FakeIdp()
    try:
        trusted = [a for mode in MODES for a in ("--trusted-token-endpoint", _endpoint(idp, mode))]
        stack = start_gateway_stack(
            tmp_path_factory.mktemp("adversarial-broker"),
            services,
            extra_gateway_args=tuple(trusted),
        )
        subject_token = stack.user_token("alice", ttl=600)

        async def setup() -> None:
            async with stack.admin() as admin:
                for mode in MODES:
                    await admin.create_profile(
                        exchange_profile_yaml(f"{mode}-api", _endpoint(idp, mode))
                    )
                    await admin.create_provider(
                        mode, f"{mode}-api", {"user_token": CredentialInput(subject_token)}
                    )
                await admin.put_sandbox(SANDBOX, sandbox_id(SANDBOX), providers=list(MODES))

        asyncio.run(setup())
        yield Env(stack, idp, subject_token)
    finally:
        for service in reversed(services):
            service.stop()
        idp.stop()


def _endpoint(idp: FakeIdp, mode: str) -> str:
    return f"{idp.url}/{mode}/token"


def _intermediate_token(stack: GatewayStack, provider: str) -> IdpError:
    async def call() -> IdpError:
        client, source = stack.supervisor(SANDBOX)
        try:
            async with client:
                await client.intermediate_token(provider, "access_token")
        except IdpError as exc:
            return exc
        finally:
            await source.close()
        raise AssertionError(f"{provider}: the broker accepted a bad IdP answer")

    return asyncio.run(call())


@pytest.mark.parametrize("mode", list(MODES))
def test_bad_idp_answer_is_a_clear_502_idp_error(env: Env, mode: str) -> None:
    error = _intermediate_token(env.stack, mode)
    assert error.status == 502
    assert MODES[mode][1] in error.detail, error.detail
    shown = f"{error.code} {error.detail}"
    # Failures name indexes, never values: test output must not hold a secret either.
    found = leaked([CANARY, env.subject_token, *env.idp.secrets], shown)
    assert not found, f"secrets {found} leaked"
    assert "\x1b" not in shown and "\u202e" not in shown


def test_gateway_log_and_metrics_hold_no_secret_and_no_traceback(env: Env) -> None:
    for mode in MODES:
        _intermediate_token(env.stack, mode)
    assert env.subject_token in env.idp.secrets  # exchange 1 did reach the fake IdP
    texts = [
        env.stack.gateway.log_text(),
        requests.get(env.stack.admin_url + "/metrics", timeout=10).text,
    ]
    for text in texts:
        assert "Traceback" not in text
        found = leaked([CANARY, *env.idp.secrets], text)
        assert not found, f"secrets {found} leaked"


def test_issuer_answering_json_nested_too_deeply_is_503(env: Env, services: list[Service]) -> None:
    """The OIDC issuer's discovery document (needed to check user tokens and to learn the
    trusted token endpoint) nested past the JSON decoder's limit: 503, not a 500."""
    fake = FakeGateway()
    try:
        issuer = f"{fake.url}/deep/realms/dev"
        gateway = start_service(
            "gateway-deep-issuer",
            [
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--db",
                str(env.stack.tmp / "deep-issuer.db"),
                "--spiffe-socket",
                env.stack.gateway_socket,
                "--oidc-issuer",
                issuer,
                "--oidc-audience",
                "tokenferry",
                "--dev-admin-token",
                ADMIN_TOKEN,
            ],
            env.stack.tmp / "logs",
        )
        services.append(gateway)
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        user_token = jwt.encode(
            {"iss": issuer, "sub": "mallory", "aud": "tokenferry", "exp": now + 300},
            key,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        url = str(gateway.ready["url"])
        for token, body in (
            (user_token, None),
            (ADMIN_TOKEN, {"source": exchange_profile_yaml("deep-api", f"{issuer}/token")}),
        ):
            response = requests.post(
                url + "/v1/profiles",
                headers={"Authorization": f"Bearer {token}"},
                json=body or {"source": "id: x"},
                timeout=20,
            )
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "identity_unavailable"
        assert "Traceback" not in gateway.log_text()
    finally:
        fake.stop()
