"""User-token verification against an in-process issuer (discovery + JWKS on loopback)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import AuthenticationFailed, IdentityUnavailable, OidcVerifier


@dataclass
class Issuer:
    url: str = ""
    keys: dict[str, Any] = field(default_factory=dict)
    public: list[dict[str, Any]] = field(default_factory=list)
    fetches: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0})
    claimed_issuer: str | None = None

    def add_key(self, kid: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = key
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        self.public.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})

    def token(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "sub": "alice", "aud": "tokenferry", "exp": now + 300, **claims}
        return jwt.encode(body, self.keys[kid], algorithm="ES256", headers={"kid": kid})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    state = Issuer()

    async def discovery(request: web.Request) -> web.Response:
        state.fetches["discovery"] += 1
        return web.json_response(
            {"issuer": state.claimed_issuer or state.url, "jwks_uri": state.url + "/certs"}
        )

    async def certs(request: web.Request) -> web.Response:
        state.fetches["jwks"] += 1
        return web.json_response({"keys": state.public})

    app = web.Application()
    app.router.add_get("/realms/t/.well-known/openid-configuration", discovery)
    app.router.add_get("/realms/t/certs", certs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/realms/t"
    state.add_key("k1")
    yield state
    await runner.cleanup()


async def test_keys_are_cached_and_refetched_on_unknown_kid_rate_limited(issuer: Issuer) -> None:
    now = [0.0]
    async with aiohttp.ClientSession() as session:
        verifier = OidcVerifier(
            issuer.url, "tokenferry", http=lambda: session, clock=lambda: now[0]
        )
        assert (await verifier.verify(issuer.token("k1")))["sub"] == "alice"
        assert (await verifier.verify(issuer.token("k1")))["sub"] == "alice"
        assert issuer.fetches == {"discovery": 1, "jwks": 1}
        # The issuer rotates in a new key: the first token with it triggers one re-fetch.
        issuer.add_key("k2")
        now[0] = 11
        assert (await verifier.verify(issuer.token("k2")))["sub"] == "alice"
        assert issuer.fetches["jwks"] == 2
        # Garbage kids right after cannot make the gateway hammer the issuer.
        issuer.add_key("k3")
        for _ in range(5):
            with pytest.raises(AuthenticationFailed, match="not in the issuer's JWKS"):
                await verifier.verify(issuer.token("k3"))
        assert issuer.fetches["jwks"] == 2


async def test_foreign_issuer_is_refused_without_any_fetch(issuer: Issuer) -> None:
    async with aiohttp.ClientSession() as session:
        verifier = OidcVerifier(issuer.url, "tokenferry", http=lambda: session)
        with pytest.raises(AuthenticationFailed, match="not issued by the configured"):
            await verifier.verify(issuer.token("k1", iss="http://127.0.0.1:1/realms/evil"))
        with pytest.raises(AuthenticationFailed, match="not a JWT"):
            await verifier.verify("opaque")
    assert issuer.fetches == {"discovery": 0, "jwks": 0}


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"aud": "other"}, "audience"),
        ({"exp": int(time.time()) - 60}, "expired"),
        ({"sub": ""}, "subject|invalid token"),
    ],
)
async def test_claims_are_checked(issuer: Issuer, claims: dict[str, Any], message: str) -> None:
    async with aiohttp.ClientSession() as session:
        verifier = OidcVerifier(issuer.url, "tokenferry", http=lambda: session)
        with pytest.raises(AuthenticationFailed, match=message):
            await verifier.verify(issuer.token("k1", **claims))


async def test_discovery_naming_another_issuer_is_refused(issuer: Issuer) -> None:
    issuer.claimed_issuer = "https://elsewhere.example"
    async with aiohttp.ClientSession() as session:
        verifier = OidcVerifier(issuer.url, "tokenferry", http=lambda: session)
        with pytest.raises(IdentityUnavailable, match="names issuer"):
            await verifier.verify(issuer.token("k1"))
