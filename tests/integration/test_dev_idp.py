"""The dev IdP over real HTTP: client assertions, both exchange legs, device flow (SPEC §8)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from spiffe import WorkloadApiClient

from tests.support.jwks_server import JwksServer, TrustDomainKeys
from tests.support.procs import Service, start_service

GATEWAY = "spiffe://example.org/gateway"
SANDBOX_A = "spiffe://example.org/sandbox/a"
SANDBOX_B = "spiffe://example.org/sandbox/b"
WORKLOAD = "spiffe://example.org/ci/job-7"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TTL = 300


class Idp:
    def __init__(self, service: Service, jwks_server: JwksServer) -> None:
        self.service = service
        self.jwks_server = jwks_server
        self.keys = jwks_server.keys
        self.issuer: str = service.ready["issuer"]
        self.token_endpoint: str = service.ready["token_endpoint"]
        self.http = httpx.Client(trust_env=False, timeout=10)
        self._jwks: dict[str, Any] | None = None

    def assertion(self, spiffe_id: str, **kwargs: Any) -> str:
        return self.keys.svid(spiffe_id, self.issuer, **kwargs)

    def token(self, **form: Any) -> httpx.Response:
        return self.http.post(self.token_endpoint, data=form)

    def client_credentials(self, spiffe_id: str, **form: Any) -> httpx.Response:
        return self.token(
            grant_type="client_credentials",
            client_assertion_type=JWT_BEARER,
            client_assertion=self.assertion(spiffe_id),
            **form,
        )

    def exchange(self, caller: str, subject_token: str, **form: Any) -> httpx.Response:
        fields: dict[str, Any] = {
            "grant_type": TOKEN_EXCHANGE,
            "client_assertion_type": JWT_SPIFFE,
            "client_assertion": self.assertion(caller),
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN,
            "requested_token_type": ACCESS_TOKEN,
        }
        fields.update(form)
        return self.token(**fields)

    def user_token(self, **body: Any) -> str:
        response = self.http.post(f"{self.issuer}/dev/user-token", json=body)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get(f"{self.issuer}/dev/stats").json()
        return result

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """Verify a token issued by the IdP with its published JWKS, as a resource would."""
        if self._jwks is None:
            config = self.http.get(f"{self.issuer}/.well-known/openid-configuration").json()
            self._jwks = self.http.get(config["jwks_uri"]).json()
        kid = jwt.get_unverified_header(token)["kid"]
        (jwk,) = [k for k in self._jwks["keys"] if k["kid"] == kid]
        claims: dict[str, Any] = jwt.decode(
            token,
            jwt.PyJWK(jwk),
            algorithms=["ES256"],
            audience=audience,
            issuer=self.issuer,
        )
        return claims


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    keys = TrustDomainKeys()
    jwks = JwksServer(keys).start()
    service = start_service(
        "dev-idp",
        [
            "dev",
            "idp",
            "--listen",
            "127.0.0.1:0",
            "--spiffe-jwks",
            jwks.url,
            "--gateway-id",
            GATEWAY,
            "--token-ttl",
            str(TOKEN_TTL),
            "--device-interval",
            "1",
            "--device-slow-down",
            "1",
        ],
        tmp_path_factory.mktemp("idp-logs"),
    )
    client = Idp(service, jwks)
    yield client
    client.http.close()
    service.stop()
    jwks.close()


def _error(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    description: str = body["error_description"]
    return description


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def test_discovery_document(idp: Idp) -> None:
    assert idp.issuer.startswith("http://127.0.0.1:")
    assert idp.issuer.endswith("/realms/dev")
    config = idp.http.get(f"{idp.issuer}/.well-known/openid-configuration").json()
    assert config["issuer"] == idp.issuer
    assert config["token_endpoint"] == f"{idp.issuer}/protocol/openid-connect/token"
    assert config["token_endpoint"] == idp.token_endpoint
    assert (
        config["device_authorization_endpoint"]
        == f"{idp.issuer}/protocol/openid-connect/auth/device"
    )
    assert set(config["grant_types_supported"]) == {
        "client_credentials",
        TOKEN_EXCHANGE,
        DEVICE_CODE,
        "refresh_token",
    }
    assert "HS256" not in config["token_endpoint_auth_signing_alg_values_supported"]
    jwks = idp.http.get(config["jwks_uri"]).json()
    (key,) = jwks["keys"]
    assert key["kty"] == "EC" and key["alg"] == "ES256" and key["kid"]
    assert "d" not in key


@pytest.mark.parametrize("assertion_type", [JWT_BEARER, JWT_SPIFFE])
@pytest.mark.parametrize("audience_kind", ["issuer", "token_endpoint"])
def test_client_credentials_with_valid_assertion(
    idp: Idp, assertion_type: str, audience_kind: str
) -> None:
    svid_audience = idp.issuer if audience_kind == "issuer" else idp.token_endpoint
    response = idp.token(
        grant_type="client_credentials",
        client_assertion_type=assertion_type,
        client_assertion=idp.keys.svid(WORKLOAD, svid_audience),
        audience="orders",
        scope="orders.read orders.write",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "orders.read orders.write"
    assert 0 < body["expires_in"] <= TOKEN_TTL
    claims = idp.verify(body["access_token"], "orders")
    assert claims["sub"] == WORKLOAD
    assert claims["azp"] == WORKLOAD
    assert claims["client_id"] == WORKLOAD
    assert claims["aud"] == ["orders"]
    assert claims["scope"] == "orders.read orders.write"
    assert claims["exp"] - claims["iat"] == TOKEN_TTL
    assert claims["jti"]
    assert "act" not in claims


def test_client_credentials_default_audience(idp: Idp) -> None:
    response = idp.client_credentials(WORKLOAD)
    assert response.status_code == 200, response.text
    assert _claims(response.json()["access_token"])["aud"] == ["account"]
    assert "scope" not in response.json()


def _bad_assertions(idp: Idp) -> dict[str, str]:
    other_key = ec.generate_private_key(ec.SECP256R1())
    expired = idp.keys.svid(WORKLOAD, idp.issuer, ttl=-60)
    return {
        "unknown kid": idp.keys.svid(WORKLOAD, idp.issuer, rogue=True, kid="unknown-kid"),
        "known kid, other key": idp.keys.svid(WORKLOAD, idp.issuer, rogue=True),
        "alg none": idp.keys.unsigned_svid(WORKLOAD, idp.issuer),
        "hmac with public key": idp.keys.hmac_svid(WORKLOAD, idp.issuer),
        "wrong audience": idp.keys.svid(WORKLOAD, "https://elsewhere.example/realms/dev"),
        "expired": expired,
        "no exp": idp.keys.svid(WORKLOAD, idp.issuer, drop=("exp",)),
        "other trust domain": idp.keys.svid("spiffe://other.org/w", idp.issuer),
        "not a spiffe id": idp.keys.svid("alice", idp.issuer),
        "garbage": "not-a-jwt",
        "other key, other kid": jwt.encode(
            idp.keys.claims(WORKLOAD, idp.issuer),
            other_key,
            algorithm="ES256",
            headers={"kid": "elsewhere"},
        ),
    }


EXPECTED_REASONS = {
    "unknown kid": "key id 'unknown-kid' is not in the JWT bundle",
    "known kid, other key": "signature does not verify",
    "alg none": "algorithm 'none' is not allowed",
    "hmac with public key": "algorithm 'HS256' is not allowed",
    "wrong audience": "does not include",
    "expired": "expired",
    "no exp": "no exp claim",
    "other trust domain": "trust domain 'other.org' is not allowed",
    "not a spiffe id": "is not a SPIFFE ID",
    "garbage": "not a well-formed",
    "other key, other kid": "key id 'elsewhere' is not in the JWT bundle",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_REASONS))
def test_bad_client_assertion_is_invalid_client(idp: Idp, case: str) -> None:
    assertion = _bad_assertions(idp)[case]
    response = idp.token(
        grant_type="client_credentials",
        client_assertion_type=JWT_BEARER,
        client_assertion=assertion,
    )
    description = _error(response, 401, "invalid_client")
    assert EXPECTED_REASONS[case] in description
    assert assertion not in response.text
    # The same refusal for token exchange: authentication comes before anything else.
    user = idp.user_token()
    response = idp.token(
        grant_type=TOKEN_EXCHANGE,
        client_assertion_type=JWT_SPIFFE,
        client_assertion=assertion,
        subject_token=user,
        subject_token_type=ACCESS_TOKEN,
        audience=SANDBOX_A,
    )
    _error(response, 401, "invalid_client")
    log = idp.service.log_text()
    assert assertion not in log
    assert user not in log


def test_missing_or_unsupported_client_authentication(idp: Idp) -> None:
    _error(idp.token(grant_type="client_credentials"), 401, "invalid_client")
    response = idp.token(
        grant_type="client_credentials",
        client_assertion_type="urn:example:password",
        client_assertion=idp.assertion(WORKLOAD),
    )
    assert "not supported" in _error(response, 401, "invalid_client")
    response = idp.client_credentials(WORKLOAD, client_id="spiffe://example.org/someone-else")
    assert "client_id does not match" in _error(response, 401, "invalid_client")


def test_client_credentials_refuses_reserved_audiences(idp: Idp) -> None:
    # SPIFFE-ID audiences address intermediate tokens; the user audience is the gateway's.
    for audience in (SANDBOX_A, "tokenferry"):
        _error(idp.client_credentials(WORKLOAD, audience=audience), 400, "invalid_target")


def _intermediate(idp: Idp, user_token: str, audience: str = SANDBOX_A) -> str:
    response = idp.exchange(GATEWAY, user_token, audience=audience)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def test_two_leg_exchange_issues_every_claim(idp: Idp) -> None:
    before = idp.stats()
    user_token = idp.user_token(sub="alice", ttl=600, aud="tokenferry")
    user_claims = _claims(user_token)
    assert user_claims["sub"] == "alice" and user_claims["aud"] == ["tokenferry"]

    # Leg 1: the gateway trades the user token for an intermediate token for sandbox A.
    response = idp.exchange(GATEWAY, user_token, audience=SANDBOX_A)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN
    assert body["token_type"] == "Bearer"
    intermediate = body["access_token"]
    ic = idp.verify(intermediate, SANDBOX_A)
    assert ic["sub"] == "alice"
    assert ic["aud"] == [SANDBOX_A]
    assert ic["azp"] == GATEWAY
    assert ic["act"] == {"sub": GATEWAY}
    assert ic["iss"] == idp.issuer
    assert ic["exp"] <= user_claims["exp"]
    assert "scope" not in ic

    # Leg 2: sandbox A's supervisor trades the intermediate token for the resource.
    response = idp.exchange(SANDBOX_A, intermediate, audience="orders", scope="orders.read")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "orders.read"
    assert body["issued_token_type"] == ACCESS_TOKEN
    assert 0 < body["expires_in"] <= TOKEN_TTL
    final = idp.verify(body["access_token"], "orders")
    assert final["sub"] == "alice"
    assert final["aud"] == ["orders"]
    assert final["azp"] == SANDBOX_A
    assert final["client_id"] == SANDBOX_A
    assert final["scope"] == "orders.read"
    assert final["act"] == {"sub": SANDBOX_A, "act": {"sub": GATEWAY}}
    assert final["exp"] <= ic["exp"] <= user_claims["exp"]
    assert final["jti"] != ic["jti"]

    after = idp.stats()
    assert (
        after["by_policy"]["intermediate"]["ok"]
        == before["by_policy"].get("intermediate", {}).get("ok", 0) + 1
    )
    assert (
        after["by_policy"]["final"]["ok"] == before["by_policy"].get("final", {}).get("ok", 0) + 1
    )
    assert after["total"] == before["total"] + 2
    log = idp.service.log_text()
    for token in (user_token, intermediate, body["access_token"]):
        assert token not in log
    assert '"policy": "final"' in log


def test_issued_tokens_never_outlive_their_subject_token(idp: Idp) -> None:
    user_token = idp.user_token(ttl=40)
    user_exp = _claims(user_token)["exp"]
    intermediate = _intermediate(idp, user_token)
    assert _claims(intermediate)["exp"] == user_exp  # capped below the 300 s token TTL
    response = idp.exchange(SANDBOX_A, intermediate, audience="orders")
    assert response.status_code == 200, response.text
    assert _claims(response.json()["access_token"])["exp"] == user_exp
    assert response.json()["expires_in"] <= 40


def test_intermediate_policy_only_for_gateways(idp: Idp) -> None:
    response = idp.exchange(SANDBOX_A, idp.user_token(), audience=SANDBOX_A)
    assert "not an allowed gateway" in _error(response, 400, "unauthorized_client")


@pytest.mark.parametrize(
    "audience",
    [
        "spiffe://example.org/gateway",
        "spiffe://example.org/sandboxes/a",
        "spiffe://other.org/sandbox/a",
        "spiffe://example.org/sandbox/",
        "orders",
    ],
)
def test_intermediate_audience_must_be_a_sandbox(idp: Idp, audience: str) -> None:
    response = idp.exchange(GATEWAY, idp.user_token(), audience=audience)
    _error(response, 400, "invalid_target")


def test_intermediate_needs_exactly_one_audience(idp: Idp) -> None:
    _error(idp.exchange(GATEWAY, idp.user_token()), 400, "invalid_request")
    response = idp.token(
        grant_type=TOKEN_EXCHANGE,
        client_assertion_type=JWT_SPIFFE,
        client_assertion=idp.assertion(GATEWAY),
        subject_token=idp.user_token(),
        subject_token_type=ACCESS_TOKEN,
        audience=[SANDBOX_A, SANDBOX_B],
    )
    _error(response, 400, "invalid_target")


def test_final_exchange_refused_for_another_sandbox(idp: Idp) -> None:
    intermediate = _intermediate(idp, idp.user_token(), SANDBOX_A)
    response = idp.exchange(SANDBOX_B, intermediate, audience="orders")
    assert "does not include client" in _error(response, 400, "invalid_grant")
    # Nor can the gateway itself redeem it.
    _error(idp.exchange(GATEWAY, intermediate, audience="orders"), 400, "invalid_grant")


@pytest.mark.parametrize("audience", [SANDBOX_B, "tokenferry"])
def test_final_exchange_refuses_reserved_audiences(idp: Idp, audience: str) -> None:
    intermediate = _intermediate(idp, idp.user_token())
    _error(idp.exchange(SANDBOX_A, intermediate, audience=audience), 400, "invalid_target")


def test_final_and_client_tokens_cannot_be_exchanged_again(idp: Idp) -> None:
    intermediate = _intermediate(idp, idp.user_token())
    response = idp.exchange(SANDBOX_A, intermediate, audience="orders")
    final = response.json()["access_token"]
    _error(idp.exchange(SANDBOX_A, final, audience="orders"), 400, "invalid_grant")
    _error(idp.exchange(GATEWAY, final, audience=SANDBOX_A), 400, "invalid_grant")
    client_token = idp.client_credentials(SANDBOX_A).json()["access_token"]
    _error(idp.exchange(GATEWAY, client_token, audience=SANDBOX_A), 400, "invalid_grant")


def test_bad_subject_tokens_are_invalid_grant(idp: Idp) -> None:
    expired = idp.user_token(ttl=-10)
    assert "expired" in _error(
        idp.exchange(GATEWAY, expired, audience=SANDBOX_A), 400, "invalid_grant"
    )
    foreign = jwt.encode(
        {"sub": "alice", "iss": idp.issuer, "exp": int(time.time()) + 60, "azp": "tokenferry-cli"},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "someone-else"},
    )
    _error(idp.exchange(GATEWAY, foreign, audience=SANDBOX_A), 400, "invalid_grant")
    _error(idp.exchange(GATEWAY, "garbage", audience=SANDBOX_A), 400, "invalid_grant")
    response = idp.exchange(GATEWAY, idp.user_token(), audience=SANDBOX_A, subject_token_type="x")
    _error(response, 400, "invalid_request")


def test_malformed_token_requests(idp: Idp) -> None:
    _error(idp.token(), 400, "invalid_request")
    _error(idp.token(grant_type="password"), 400, "unsupported_grant_type")
    response = idp.http.post(idp.token_endpoint, json={"grant_type": "client_credentials"})
    _error(response, 400, "invalid_request")
    response = idp.http.post(
        idp.token_endpoint,
        content="grant_type=client_credentials&grant_type=password",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert "repeated" in _error(response, 400, "invalid_request")
    _error(idp.client_credentials(WORKLOAD, scope='bad"scope'), 400, "invalid_scope")


def test_device_flow_polling_then_tokens_then_refresh(idp: Idp) -> None:
    device_endpoint = f"{idp.issuer}/protocol/openid-connect/auth/device"
    response = idp.http.post(
        device_endpoint, data={"client_id": "tokenferry-cli", "scope": "openid"}
    )
    assert response.status_code == 200, response.text
    grant = response.json()
    assert grant["verification_uri"] == f"{idp.issuer}/device"
    assert grant["user_code"] in grant["verification_uri_complete"]
    assert grant["interval"] == 1 and grant["expires_in"] > 0
    poll = {
        "grant_type": DEVICE_CODE,
        "device_code": grant["device_code"],
        "client_id": "tokenferry-cli",
    }

    _error(idp.token(**poll), 400, "authorization_pending")
    # Polling again at once is too fast: slow_down, and the interval grows by 1 s.
    assert "at least 2 s" in _error(idp.token(**poll), 400, "slow_down")
    time.sleep(2.05)  # the protocol's polling interval, not synchronisation
    response = idp.token(**poll)
    assert response.status_code == 200, response.text
    tokens = response.json()
    access = idp.verify(tokens["access_token"], "tokenferry")
    assert access["sub"] == "alice"
    assert access["azp"] == "tokenferry-cli"
    assert access["scope"] == "openid"
    assert tokens["refresh_token"] and tokens["expires_in"] == TOKEN_TTL
    # A device code works once.
    _error(idp.token(**poll), 400, "invalid_grant")

    # The login token is a valid subject token for the intermediate exchange.
    assert _intermediate(idp, tokens["access_token"])

    refresh = {"grant_type": "refresh_token", "client_id": "tokenferry-cli"}
    response = idp.token(refresh_token=tokens["refresh_token"], **refresh)
    assert response.status_code == 200, response.text
    refreshed = response.json()
    assert idp.verify(refreshed["access_token"], "tokenferry")["sub"] == "alice"
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    # Rotation: the old refresh token is spent.
    _error(idp.token(refresh_token=tokens["refresh_token"], **refresh), 400, "invalid_grant")
    response = idp.token(
        refresh_token=refreshed["refresh_token"], grant_type="refresh_token", client_id="other"
    )
    _error(response, 401, "invalid_client")
    stats = idp.stats()["by_grant"]
    assert stats["device_code"]["authorization_pending"] >= 1
    assert stats["device_code"]["slow_down"] >= 1
    assert stats["refresh_token"]["ok"] >= 1
    log = idp.service.log_text()
    for secret in (tokens["refresh_token"], tokens["access_token"], grant["device_code"]):
        assert secret not in log


def test_device_authorization_for_unknown_client(idp: Idp) -> None:
    device_endpoint = f"{idp.issuer}/protocol/openid-connect/auth/device"
    _error(idp.http.post(device_endpoint, data={"client_id": "nope"}), 401, "invalid_client")


def test_unknown_kid_triggers_a_jwks_refetch(idp: Idp) -> None:
    # Key rotation at the SPIFFE side: a new key appears in the JWKS after the IdP cached it.
    server = idp.jwks_server
    new_key = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(new_key.public_key(), as_dict=True)
    jwk.update({"kid": "rotated-in", "use": "jwt-svid"})
    assert idp.client_credentials(WORKLOAD).status_code == 200  # JWKS cached
    server.extra_keys.append(jwk)
    fetches = server.fetches
    assertion = jwt.encode(
        idp.keys.claims(WORKLOAD, idp.issuer),
        new_key,
        algorithm="ES256",
        headers={"kid": "rotated-in"},
    )
    deadline = time.monotonic() + 5
    # The IdP re-fetches at most once a second; retry for that long at most.
    for _ in range(50):
        response = idp.token(
            grant_type="client_credentials",
            client_assertion_type=JWT_BEARER,
            client_assertion=assertion,
        )
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200, response.text
    assert server.fetches > fetches


def test_dev_user_token_validation(idp: Idp) -> None:
    url = f"{idp.issuer}/dev/user-token"
    assert idp.http.post(url, json={"ttl": "long"}).status_code == 400
    assert idp.http.post(url, json={"nope": 1}).status_code == 400
    assert idp.http.post(url, content=b"[1]").status_code == 400
    claims = _claims(idp.user_token(sub="bob", aud=["a", "b"], ttl=30))
    assert claims["sub"] == "bob" and claims["aud"] == ["a", "b"]
    assert claims["exp"] - claims["iat"] == 30


def test_two_leg_exchange_with_svids_from_the_dev_spiffe_agent(
    tmp_path: Path, services: list[Service]
) -> None:
    key_file = tmp_path / "td.pem"
    sockets = {GATEWAY: tmp_path / "gw.sock", SANDBOX_A: tmp_path / "sb.sock"}
    agents = {}
    for spiffe_id, sock in sockets.items():
        args = ["dev", "spiffe", "--socket", str(sock), "--spiffe-id", spiffe_id]
        args += ["--key-file", str(key_file), "--jwks-listen", "127.0.0.1:0"]
        agents[spiffe_id] = start_service(f"agent-{sock.stem}", args, tmp_path / "logs")
        services.append(agents[spiffe_id])
    service = start_service(
        "dev-idp-agent",
        [
            "dev",
            "idp",
            "--listen",
            "127.0.0.1:0",
            "--spiffe-jwks",
            agents[GATEWAY].ready["jwks_url"],
        ],
        tmp_path / "logs",
    )
    services.append(service)
    issuer = service.ready["issuer"]
    token_endpoint = service.ready["token_endpoint"]

    def svid(spiffe_id: str) -> str:
        client = WorkloadApiClient(socket_path=f"unix:{sockets[spiffe_id]}")
        try:
            result = client.fetch_jwt_svid(audience={issuer})
        finally:
            client.close()
        assert str(result.spiffe_id) == spiffe_id
        token: str = result.token
        return token

    with httpx.Client(trust_env=False, timeout=10) as http:
        user = http.post(f"{issuer}/dev/user-token", json={"sub": "carol"}).json()["access_token"]
        common = {
            "grant_type": TOKEN_EXCHANGE,
            "client_assertion_type": JWT_SPIFFE,
            "subject_token_type": ACCESS_TOKEN,
        }
        response = http.post(
            token_endpoint,
            data={
                **common,
                "client_assertion": svid(GATEWAY),
                "subject_token": user,
                "audience": SANDBOX_A,
            },
        )
        assert response.status_code == 200, response.text
        intermediate = response.json()["access_token"]
        response = http.post(
            token_endpoint,
            data={
                **common,
                "client_assertion": svid(SANDBOX_A),
                "subject_token": intermediate,
                "audience": "orders",
                "scope": "orders.read",
            },
        )
        assert response.status_code == 200, response.text
        final = _claims(response.json()["access_token"])
        assert final["sub"] == "carol"
        assert final["azp"] == SANDBOX_A
        assert final["aud"] == ["orders"]
        assert final["act"] == {"sub": SANDBOX_A, "act": {"sub": GATEWAY}}
        # A sandbox SVID cannot take the gateway's role.
        response = http.post(
            token_endpoint,
            data={
                **common,
                "client_assertion": svid(SANDBOX_A),
                "subject_token": user,
                "audience": SANDBOX_A,
            },
        )
        assert response.status_code == 400
        assert response.json()["error"] == "unauthorized_client"
