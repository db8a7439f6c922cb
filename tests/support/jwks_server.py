"""A SPIFFE trust domain under the test's control: signing keys and a JWKS over HTTP.

Lets IdP/gateway tests mint JWT-SVIDs (valid and deliberately broken) without the dev
SPIFFE agent. The JWKS is served by a small aiohttp app on its own event loop thread, so
synchronous tests (and blocking subprocess start-up) never stall it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TrustDomainKeys:
    """ES256 keys of a trust domain; ``jwks()`` publishes the public halves."""

    def __init__(self, trust_domain: str = "example.org", kid: str = "td-key-1") -> None:
        self.trust_domain = trust_domain
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())
        # A key the JWKS does not publish: SVIDs signed by it must be refused.
        self.rogue_key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "use": "jwt-svid"})
        return {"keys": [jwk]}

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def claims(self, spiffe_id: str, audience: str | list[str], ttl: int = 300) -> dict[str, Any]:
        now = int(time.time())
        aud = [audience] if isinstance(audience, str) else audience
        return {"sub": spiffe_id, "aud": aud, "exp": now + ttl, "iat": now}

    def svid(
        self,
        spiffe_id: str,
        audience: str | list[str],
        *,
        ttl: int = 300,
        rogue: bool = False,
        kid: str | None = None,
        drop: tuple[str, ...] = (),
    ) -> str:
        claims = self.claims(spiffe_id, audience, ttl)
        for name in drop:
            claims.pop(name, None)
        return jwt.encode(
            claims,
            self.rogue_key if rogue else self.key,
            algorithm="ES256",
            headers={"kid": kid or self.kid, "typ": "JWT"},
        )

    def unsigned_svid(self, spiffe_id: str, audience: str) -> str:
        header = {"alg": "none", "typ": "JWT", "kid": self.kid}
        claims = self.claims(spiffe_id, audience)
        return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."

    def hmac_svid(self, spiffe_id: str, audience: str) -> str:
        """HS256 keyed with the public key PEM: the algorithm-confusion attack."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        claims = self.claims(spiffe_id, audience)
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = hmac.new(self.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"


class JwksServer:
    """Serve ``keys.jwks()`` at ``url`` from a background thread until ``close()``."""

    def __init__(self, keys: TrustDomainKeys) -> None:
        self.keys = keys
        self.fetches = 0
        # Further JWKs to publish (e.g. a rotated-in key), appended to ``keys.jwks()``.
        self.extra_keys: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        async def handler(request: web.Request) -> web.Response:
            self.fetches += 1
            document = self.keys.jwks()
            document["keys"].extend(self.extra_keys)
            return web.json_response(document)

        app = web.Application()
        app.router.add_get("/keys", handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/keys"

    def start(self) -> JwksServer:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("JWKS server did not start")
        return self

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
