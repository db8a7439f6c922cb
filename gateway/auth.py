"""Who is calling: supervisors by JWT-SVID, users by OIDC access token (SPEC §6).

Supervisor SVIDs are checked by ``tokenferry.svid_verify`` against the JWT bundles the
gateway gets from its own SVID source. Bundles are cached and re-fetched when a token
names a key we do not know (rate-limited, so garbage ``kid`` values cannot make us hammer
the Workload API); when the source is briefly unreachable the last bundles keep serving.

User tokens are checked against the configured issuer only: a token naming another
issuer is refused before any network request, so a caller cannot make the gateway fetch
keys from a URL of their choosing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import PyJWKError, PyJWTError

from tokenferry.jwks import IssuerDiscovery, JwksError, RemoteJwks
from tokenferry.svid import SvidSource, SvidUnavailable
from tokenferry.svid_verify import (
    ALLOWED_ALGORITHMS,
    SvidVerificationError,
    UnknownKeyError,
    VerifiedSvid,
    verify_jwt_svid,
)

log = logging.getLogger("tokenferry.gateway.auth")

SVID_LEEWAY_SECONDS = 5.0
_MAX_BEARER_LENGTH = 16 * 1024


class AuthenticationFailed(Exception):
    """401: no, malformed, or invalid credentials. The message never holds the token."""


class IdentityUnavailable(Exception):
    """503: the gateway cannot reach what it needs to verify or act (bundles, its SVID)."""


@dataclass(frozen=True)
class User:
    sub: str
    admin: bool = False


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Authorization header is not 'Bearer <token>'")
    if len(token) > _MAX_BEARER_LENGTH:
        raise AuthenticationFailed("bearer token is longer than 16 KiB")
    if not (token.isascii() and token.isprintable()):
        # Header bytes that are not UTF-8 arrive as lone surrogates, which the JWT and
        # admin-token checks cannot even encode: refuse them here, as a 401.
        raise AuthenticationFailed("bearer token has non-ASCII or control characters")
    return token


class BundleCache:
    """The trust domains' JWT bundles from the gateway's SVID source, cached."""

    def __init__(
        self,
        source: SvidSource,
        *,
        max_age: float = 60.0,
        min_refetch_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._max_age = max_age
        self._min_refetch = min_refetch_interval
        self._clock = clock
        self._bundles: dict[str, dict[str, Any]] | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, *, force: bool = False) -> Mapping[str, Mapping[str, Any]]:
        async with self._lock:
            age = self._clock() - self._fetched_at
            stale = self._bundles is None or age >= self._max_age
            if force and age >= self._min_refetch:
                stale = True
            if stale:
                try:
                    self._bundles = await self._source.fetch_jwt_bundles()
                    self._fetched_at = self._clock()
                except SvidUnavailable as exc:
                    if self._bundles is None:
                        raise IdentityUnavailable(
                            f"cannot obtain JWT bundles to verify SVIDs: {exc}"
                        ) from exc
                    # Keep verifying with the last bundles; try again after the interval.
                    self._fetched_at = self._clock() - self._max_age + self._min_refetch
                    log.warning("JWT bundle refresh failed; serving cached bundles")
            assert self._bundles is not None
            return self._bundles


class SupervisorAuthenticator:
    def __init__(
        self, bundles: BundleCache, *, audience: str, trust_domains: Collection[str]
    ) -> None:
        self._bundles = bundles
        self.audience = audience
        self.trust_domains = frozenset(trust_domains)

    async def authenticate(self, authorization: str | None) -> VerifiedSvid:
        token = bearer_token(authorization)
        bundles = await self._bundles.get()
        try:
            return self._verify(token, bundles)
        except UnknownKeyError:
            # Keys rotate: re-fetch once (rate-limited) before refusing.
            bundles = await self._bundles.get(force=True)
            try:
                return self._verify(token, bundles)
            except SvidVerificationError as exc:
                raise AuthenticationFailed(f"invalid JWT-SVID: {exc}") from None
        except SvidVerificationError as exc:
            raise AuthenticationFailed(f"invalid JWT-SVID: {exc}") from None

    def _verify(self, token: str, bundles: Mapping[str, Mapping[str, Any]]) -> VerifiedSvid:
        return verify_jwt_svid(
            token,
            bundles=bundles,
            audience=self.audience,
            trust_domains=self.trust_domains,
            leeway=SVID_LEEWAY_SECONDS,
        )


class OidcVerifier:
    """Validates user access tokens of one issuer: discovery and JWKS cached."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        http: Callable[[], aiohttp.ClientSession],
        max_age: float = 3600.0,
        min_refetch_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._jwks = RemoteJwks(
            IssuerDiscovery(issuer),
            session=http,
            max_age=max_age,
            min_refetch_interval=min_refetch_interval,
            serve_stale_on_error=True,
            clock=clock,
        )

    async def discovery(self) -> dict[str, Any]:
        """The issuer's discovery document, fetched once (also names its token endpoint)."""
        try:
            return await self._jwks.discovery()
        except JwksError as exc:
            raise IdentityUnavailable(str(exc)) from None

    async def _key(self, kid: str) -> dict[str, Any] | None:
        try:
            return await self._jwks.key(kid)
        except JwksError as exc:
            raise IdentityUnavailable(str(exc)) from None

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except PyJWTError:
            raise AuthenticationFailed("bearer token is not a JWT") from None
        if unverified.get("iss") != self.issuer:
            raise AuthenticationFailed("token was not issued by the configured OIDC issuer")
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthenticationFailed(f"token algorithm {alg!r} is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationFailed("token header has no key id (kid)")
        jwk = await self._key(kid)
        if jwk is None:
            raise AuthenticationFailed(f"token key id {kid!r} is not in the issuer's JWKS")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=SVID_LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("token has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationFailed(
                f"token audience does not include {self.audience!r}"
            ) from None
        except (PyJWTError, PyJWKError) as exc:
            raise AuthenticationFailed(f"invalid token: {type(exc).__name__}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AuthenticationFailed("token has no subject")
        return claims


class UserAuthenticator:
    def __init__(
        self,
        oidc: OidcVerifier,
        *,
        dev_admin_token: str | None,
        admin_subjects: Collection[str] = (),
    ) -> None:
        self._oidc = oidc
        self._dev_admin = dev_admin_token.encode() if dev_admin_token else None
        # Subjects of the one configured issuer: a token from any other issuer is refused
        # before its `sub` is looked at, so a listed `sub` cannot be claimed elsewhere.
        self._admin_subjects = frozenset(admin_subjects)

    def __repr__(self) -> str:
        return f"UserAuthenticator(issuer={self._oidc.issuer!r}, dev_mode={bool(self._dev_admin)})"

    async def authenticate(self, authorization: str | None) -> User:
        token = bearer_token(authorization)
        # Constant-time compare: the admin token must not leak through response timing.
        if self._dev_admin is not None and hmac.compare_digest(token.encode(), self._dev_admin):
            return User(sub="admin", admin=True)
        claims = await self._oidc.verify(token)
        sub = str(claims["sub"])
        return User(sub=sub, admin=sub in self._admin_subjects)
