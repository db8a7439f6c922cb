"""Exchange 1 of SPEC §1: the intermediate token for a verified supervisor.

The checks run in exactly the order SPEC §6 lists, each with its own status; the caller
(``gateway.api``) has already checked the body fields and verified the SVID. The
audience of the exchange is the *verified* SVID subject, never anything from the request
body, so a sandbox can only ever obtain tokens minted for its own SPIFFE ID; and the
cache key includes that SPIFFE ID, so one sandbox is never served another's token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.crypto import DecryptionError
from gateway.errors import (
    ApiError,
    failed_precondition,
    forbidden,
    identity_unavailable,
    idp_error,
    not_found,
)
from gateway.metrics import GatewayMetrics
from gateway.store import Store
from gateway.trust import EndpointTrust, TrustUnavailable
from tokenferry.oauth import (
    InvalidTokenResponse,
    OAuthError,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
)
from tokenferry.profiles import GRANT_TOKEN_EXCHANGE, Profile, parse_profile
from tokenferry.svid import SvidSource, SvidUnavailable
from tokenferry.tokens import CachedToken, CacheKey, TokenCache, token_lifetime

log = logging.getLogger("tokenferry.gateway.broker")


@dataclass(frozen=True)
class IntermediateToken:
    access_token: str = field(repr=False)
    token_type: str
    issued_token_type: str | None
    expires_in: int
    cache: str

    def body(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "issued_token_type": self.issued_token_type,
            "expires_in": self.expires_in,
        }


class _GatewayIdentityError(Exception):
    """Raised inside a cache fetch; mapped to 503 outside (never cached as a token)."""


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Broker:
    def __init__(
        self,
        *,
        store: Store,
        svid_source: SvidSource,
        token_client: TokenEndpointClient,
        cache: TokenCache,
        metrics: GatewayMetrics,
        trust: EndpointTrust,
    ) -> None:
        self._trust = trust
        self._store = store
        self._svids = svid_source
        self._oauth = token_client
        self._cache = cache
        self._metrics = metrics
        self._profiles: dict[tuple[str, str], Profile] = {}

    def _profile(self, profile_id: str, updated_at: str, parsed: dict[str, Any]) -> Profile:
        key = (profile_id, updated_at)
        profile = self._profiles.get(key)
        if profile is None:
            profile, _warnings = parse_profile(parsed, source=f"profile {profile_id}")
            self._profiles[key] = profile
        return profile

    async def intermediate_token(
        self, supervisor_id: str, provider_name: str, credential_name: str
    ) -> IntermediateToken:
        # Resolved before the store's lock is taken: the first call may fetch the OIDC
        # issuer's discovery document; afterwards this is a cached value.
        try:
            trusted = await self._trust.resolve()
        except TrustUnavailable as exc:
            raise identity_unavailable(str(exc)) from None
        async with self._store.read() as tx:
            sandbox = await tx.sandbox_by_spiffe_id(supervisor_id)
            if sandbox is None:
                raise forbidden(f"SPIFFE ID {supervisor_id!r} is not a registered sandbox")
            provider = await tx.provider_get(provider_name)
            if provider is None:
                raise not_found(f"provider {provider_name!r} does not exist")
            if provider_name not in sandbox.providers:
                raise forbidden(
                    f"provider {provider_name!r} is not attached to sandbox {sandbox.name!r}"
                )
            profile_row = await tx.profile_get(provider.profile_id)
            if profile_row is None:  # prevented by a foreign key; kept for clarity
                raise failed_precondition(f"profile {provider.profile_id!r} does not exist")
            profile = self._profile(profile_row.id, profile_row.updated_at, profile_row.parsed)
            credential = profile.credential(credential_name)
            if credential is None:
                raise failed_precondition(
                    f"profile {profile.id!r} has no credential {credential_name!r}"
                )
            grant = credential.token_grant
            if grant is None or grant.grant_type != GRANT_TOKEN_EXCHANGE:
                raise failed_precondition(
                    f"credential {credential_name!r} of profile {profile.id!r} "
                    "has no token_exchange grant"
                )
            subject = grant.subject_token
            if subject is None:
                raise failed_precondition(
                    f"credential {credential_name!r} names no subject_token credential"
                )
            # A profile stored before the trust rule, or before the operator changed the
            # trusted endpoints, is refused here: before the subject token is decrypted
            # and before the gateway fetches an SVID to send there.
            untrusted = trusted.problem(grant)
            if untrusted is not None:
                field, message = untrusted
                raise failed_precondition(
                    f"credential {credential_name!r} of profile {profile.id!r}: "
                    f"token_grant.{field}: {message}"
                )
            try:
                subject_value, subject_expiry = await tx.credential_value(
                    provider.name, subject.credential
                )
            except DecryptionError:
                log.error(
                    "stored subject token cannot be decrypted",
                    extra={"provider": provider.name, "credential": subject.credential},
                )
                raise ApiError(
                    "internal", "the stored subject token cannot be decrypted with this key"
                ) from None
        if subject_value is None:
            raise failed_precondition(
                f"subject credential {subject.credential!r} of provider {provider.name!r} "
                "has no stored value"
            )
        if subject_expiry is not None and subject_expiry <= time.time():
            raise failed_precondition(
                f"subject credential {subject.credential!r} of provider {provider.name!r} "
                f"expired at {_iso(subject_expiry)}"
            )

        svid_audience = grant.svid_audience()
        key = CacheKey(
            grant_type=GRANT_TOKEN_EXCHANGE,
            token_endpoint=grant.token_endpoint,
            svid_audience=svid_audience,
            client_assertion_type=grant.client_assertion_type,
            audience=supervisor_id,
            scopes=(),
            requested_token_type=grant.requested_token_type,
            provider=provider.name,
            revision=provider.revision,
            credential=credential_name,
            supervisor_id=supervisor_id,
        )

        async def fetch() -> CachedToken:
            try:
                svid = await self._svids.fetch_jwt_svid(svid_audience)
            except SvidUnavailable as exc:
                raise _GatewayIdentityError(str(exc)) from None
            started = time.monotonic()
            outcome = "error"
            try:
                response = await self._oauth.token_exchange(
                    grant.token_endpoint,
                    client_assertion=svid.token,
                    client_assertion_type=grant.client_assertion_type,
                    subject_token=subject_value,
                    subject_token_type=subject.subject_token_type,
                    requested_token_type=grant.requested_token_type,
                    audience=supervisor_id,
                )
                outcome = "ok"
            except TokenEndpointError:
                outcome = "refused"
                raise
            except TokenEndpointUnavailable:
                outcome = "unreachable"
                raise
            finally:
                self._metrics.idp_latency.labels(outcome).observe(time.monotonic() - started)
            lifetime = token_lifetime(
                response.expires_in,
                response.access_token,
                cache_ttl_seconds=grant.cache_ttl_seconds,
                not_after=subject_expiry,
                now=time.time(),
            )
            return CachedToken(
                value=response.access_token,
                obtained_at=started,
                lifetime=lifetime,
                token_type=response.token_type or "Bearer",
                issued_token_type=response.issued_token_type,
            )

        try:
            token, outcome = await self._cache.get(key, fetch)
        except _GatewayIdentityError as exc:
            raise identity_unavailable(
                f"the gateway cannot obtain its own JWT-SVID: {exc}"
            ) from None
        except TokenEndpointError as exc:
            detail = f"identity provider refused the exchange (HTTP {exc.status}): {exc.error}"
            if exc.description:
                detail += f": {exc.description}"
            raise idp_error(detail) from None
        except TokenEndpointUnavailable as exc:
            raise idp_error(f"identity provider unreachable: {exc}") from None
        except InvalidTokenResponse as exc:
            raise idp_error(f"identity provider sent an invalid token response: {exc}") from None
        except OAuthError as exc:
            raise idp_error(f"token exchange failed: {exc}") from None
        self._metrics.cache.labels(str(outcome)).inc()
        self._metrics.cache_entries.set(len(self._cache))
        remaining = token.obtained_at + token.lifetime - time.monotonic()
        return IntermediateToken(
            access_token=token.value,
            token_type=token.token_type,
            issued_token_type=token.issued_token_type,
            expires_in=max(1, int(remaining)),
            cache=str(outcome),
        )
