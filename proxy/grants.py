"""Obtaining the token a route needs: grant orchestration over the shared token cache.

``GrantBroker.obtain(route)`` builds the full cache key (provider revision included, so a
provider update never serves an old entry), asks the ``TokenCache`` (single flight,
refresh ahead, back-off) and, on a miss, runs the route's grant. Each grant type is one
``Grant`` implementation registered by its ``grant_type``: ``client_credentials`` (local
files and gateway mode) and ``token_exchange`` (gateway mode: leg 1 at the gateway, leg 2
at the IdP, SPEC §1).

Every failure surfaces as ``GrantError`` with a detail an agent can read; details are
built from our own words and the sanitised ``OAuthError``/``SvidUnavailable`` messages,
never from a token or assertion.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway_client import (
    FailedPrecondition,
    GatewayClient,
    GatewayClientError,
    GatewayError,
    GatewayUnreachable,
    Unauthenticated,
)
from proxy.metrics import ProxyMetrics
from tokenferry.oauth import (
    InvalidTokenResponse,
    OAuthError,
    TokenClientConfig,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
)
from tokenferry.profiles import ACCESS_TOKEN_TYPE, GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE
from tokenferry.svid import SvidSource, SvidUnavailable, svid_source_from_options
from tokenferry.tokens import CachedToken, CacheKey, CacheOutcome, TokenCache

if TYPE_CHECKING:
    from proxy.routes import Route


class GrantError(Exception):
    """No token for this route right now. ``detail`` is safe to show to the sandbox."""

    def __init__(self, provider: str, credential: str, detail: str) -> None:
        super().__init__(f"{provider}/{credential}: {detail}")
        self.provider = provider
        self.credential = credential
        self.detail = detail


@dataclass(frozen=True)
class GrantResult:
    token: CachedToken = field(repr=False)
    outcome: CacheOutcome
    latency: float  # seconds the request waited for its token (≈0 on a hit)
    key: CacheKey


class Grant(Protocol):
    """One grant type: fetch a fresh token for a route (the cache is the broker's job)."""

    async def fetch(self, route: Route) -> CachedToken: ...

    async def aclose(self) -> None: ...


def cache_key(route: Route, supervisor_id: str | None = None) -> CacheKey:
    grant = route.grant
    return CacheKey(
        grant_type=grant.grant_type,
        token_endpoint=grant.token_endpoint,
        svid_audience=grant.svid_audience(),
        client_assertion_type=grant.client_assertion_type,
        audience=route.audience,
        scopes=tuple(route.scopes),
        requested_token_type=grant.requested_token_type,
        provider=route.provider,
        revision=route.revision,
        credential=route.credential,
        supervisor_id=supervisor_id,
    )


class LegError(Exception):
    """One leg of the token exchange failed; ``detail`` names the leg and the reason."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def describe_failure(exc: Exception) -> str:
    """A readable, secret-free explanation of why no token could be obtained."""
    if isinstance(exc, LegError):
        return exc.detail
    if isinstance(exc, SvidUnavailable):
        return f"workload identity (JWT-SVID) unavailable: {exc}"
    if isinstance(exc, TokenEndpointError):
        text = f"token endpoint refused the request (HTTP {exc.status}): {exc.error}"
        return f"{text}: {exc.description}" if exc.description else text
    if isinstance(exc, TokenEndpointUnavailable):
        return f"token endpoint unavailable: {exc}"
    if isinstance(exc, InvalidTokenResponse):
        return f"token endpoint sent an unusable response: {exc}"
    if isinstance(exc, OAuthError):
        return f"token request failed: {exc}"
    return f"token request failed ({type(exc).__name__})"


class ClientCredentialsGrant:
    """SPEC §1: the supervisor's IdP-audience JWT-SVID as client assertion."""

    leg = "client_credentials"

    def __init__(
        self,
        svids: SvidSource,
        client: TokenEndpointClient,
        metrics: ProxyMetrics,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._svids = svids
        self._client = client
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._monotonic = monotonic

    async def fetch(self, route: Route) -> CachedToken:
        grant = route.grant
        svid = await self._svids.fetch_jwt_svid(grant.svid_audience())
        with self._metrics.exchange(self.leg):
            response = await self._client.client_credentials(
                grant.token_endpoint,
                client_assertion=svid.token,
                client_assertion_type=grant.client_assertion_type,
                audience=route.audience,
                scopes=route.scopes,
            )
        return CachedToken.from_response(
            response,
            obtained_at=self._monotonic(),
            now=self._wall_clock(),
            cache_ttl_seconds=grant.cache_ttl_seconds,
        )

    async def aclose(self) -> None:
        return None


LEG1 = "leg1"
LEG2 = "leg2"


def describe_leg1_failure(exc: BaseException) -> str:
    """Leg 1 (the gateway's broker) failed: what the sandbox's agent reads in the 502."""
    prefix = "gateway (leg 1): "
    if isinstance(exc, GatewayUnreachable):
        return prefix + f"gateway unreachable ({exc})"
    if isinstance(exc, FailedPrecondition):
        # The gateway's own sentence names the provider and credential; lead with what to do.
        if "expired" in exc.detail:
            return prefix + f"subject token expired: update the provider ({exc.detail})"
        if "no stored value" in exc.detail:
            return prefix + f"no subject token stored: update the provider ({exc.detail})"
        return prefix + exc.detail
    if isinstance(exc, Unauthenticated):
        return prefix + f"the gateway refused this supervisor's JWT-SVID: {exc.detail}"
    if isinstance(exc, GatewayError):
        return prefix + f"{exc.code} (HTTP {exc.status}): {exc.detail}"
    if isinstance(exc, GatewayClientError):
        return prefix + f"gateway request failed: {exc}"
    if isinstance(exc, SvidUnavailable):
        return prefix + f"workload identity (JWT-SVID for the gateway) unavailable: {exc}"
    return prefix + f"request failed ({type(exc).__name__})"


class TokenExchangeGrant:
    """SPEC §1, both legs of ``token_exchange``.

    Leg 1: the gateway exchanges the stored user token for an *intermediate* token whose
    ``aud`` is this supervisor (``GatewayClient.intermediate_token``; the client
    authenticates with the gateway-audience SVID). Leg 2: this supervisor exchanges the
    intermediate token at the IdP with its **IdP-audience** SVID as client assertion,
    for the route's audience and scopes.

    Intermediate tokens are cached here too, keyed by provider, revision and credential
    (everything else in the key is the grant's): every audience of one provider's
    credential is exchanged from the same intermediate token while it lives, and a
    provider update (new revision) never reuses one minted from the old subject token.
    The intermediate cache is single-flight like the final one, so concurrent misses
    for two audiences still make one gateway call.
    """

    def __init__(
        self,
        svids: SvidSource,
        client: TokenEndpointClient,
        gateway: GatewayClient,
        metrics: ProxyMetrics,
        *,
        intermediate_cache: TokenCache | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._svids = svids
        self._client = client
        self._gateway = gateway
        self._metrics = metrics
        self._intermediates = intermediate_cache or TokenCache(clock=monotonic)
        self._wall_clock = wall_clock
        self._monotonic = monotonic

    @property
    def intermediate_cache(self) -> TokenCache:
        return self._intermediates

    @staticmethod
    def intermediate_key(route: Route) -> CacheKey:
        grant = route.grant
        return CacheKey(
            grant_type=GRANT_TOKEN_EXCHANGE,
            token_endpoint=grant.token_endpoint,
            svid_audience=grant.svid_audience(),
            client_assertion_type=grant.client_assertion_type,
            audience=None,  # the gateway decides: always this supervisor's SPIFFE ID
            scopes=(),
            requested_token_type=grant.requested_token_type,
            provider=route.provider,
            revision=route.revision,
            credential=route.credential,
        )

    async def _fetch_intermediate(self, route: Route) -> CachedToken:
        try:
            with self._metrics.exchange(LEG1):
                response = await self._gateway.intermediate_token(route.provider, route.credential)
        except Exception as exc:
            raise LegError(describe_leg1_failure(exc)) from None
        return CachedToken.from_response(
            response,
            obtained_at=self._monotonic(),
            now=self._wall_clock(),
            cache_ttl_seconds=route.grant.cache_ttl_seconds,
            not_after=route.subject_expires_at,
        )

    async def intermediate(self, route: Route) -> CachedToken:
        async def fetch() -> CachedToken:
            return await self._fetch_intermediate(route)

        try:
            token, outcome = await self._intermediates.get(self.intermediate_key(route), fetch)
        except LegError:
            raise
        except Exception as exc:  # e.g. a token already expired on arrival
            raise LegError(f"gateway (leg 1): {describe_failure(exc)}") from None
        self._metrics.intermediate_cache.labels(str(outcome)).inc()
        return token

    async def fetch(self, route: Route) -> CachedToken:
        grant = route.grant
        intermediate = await self.intermediate(route)
        try:
            svid = await self._svids.fetch_jwt_svid(grant.svid_audience())
            with self._metrics.exchange(LEG2):
                response = await self._client.token_exchange(
                    grant.token_endpoint,
                    client_assertion=svid.token,
                    client_assertion_type=grant.client_assertion_type,
                    # SPEC §1 step 3: the intermediate token is presented as an access
                    # token (its audience is this supervisor).
                    subject_token=intermediate.value,
                    subject_token_type=ACCESS_TOKEN_TYPE,
                    requested_token_type=grant.requested_token_type,
                    audience=route.audience,
                    scopes=route.scopes,
                )
        except Exception as exc:
            if isinstance(exc, TokenEndpointError) and exc.error == "invalid_grant":
                # The IdP no longer accepts this intermediate token (revoked, or the
                # subject behind it): the next attempt must run leg 1 again.
                self._intermediates.evict_token(self.intermediate_key(route), intermediate.value)
            raise LegError(f"identity provider (leg 2): {describe_failure(exc)}") from None
        return CachedToken.from_response(
            response,
            obtained_at=self._monotonic(),
            now=self._wall_clock(),
            cache_ttl_seconds=grant.cache_ttl_seconds,
            not_after=route.subject_expires_at,
        )

    async def aclose(self) -> None:
        await self._intermediates.aclose()


# Far more than any configuration has routes; only reached after many table swaps.
_KEY_MEMO_LIMIT = 4096


class GrantBroker:
    """Routes in, tokens out: the cache in front of the grant implementations."""

    def __init__(
        self,
        cache: TokenCache,
        grants: Mapping[str, Grant],
        metrics: ProxyMetrics,
        *,
        supervisor_id: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        closers: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self._closers = tuple(closers)
        self._cache = cache
        self._grants = dict(grants)
        self._metrics = metrics
        self._supervisor_id = supervisor_id
        self._monotonic = monotonic
        self._keys: dict[int, tuple[Route, CacheKey]] = {}

    def key(self, route: Route) -> CacheKey:
        # Built once per route object rather than per request (it parses the token
        # endpoint URL). Keyed by identity, with the route kept alongside so its id
        # cannot be reused by another route while the entry exists; routes of replaced
        # tables are dropped when the memo is cleared.
        memo = self._keys.get(id(route))
        if memo is not None and memo[0] is route:
            return memo[1]
        key = cache_key(route, self._supervisor_id)
        if len(self._keys) >= _KEY_MEMO_LIMIT:
            self._keys.clear()
        self._keys[id(route)] = (route, key)
        return key

    def cached(self, route: Route) -> GrantResult | None:
        """The route's token without waiting, when the cache holds one that needs no
        refresh yet (what ``obtain`` would answer as a hit); None otherwise: then
        ``obtain`` fetches, refreshes, shares a fetch or reports the failure.

        Lets the proxy inject on a hit without creating and awaiting coroutines.
        """
        if route.grant.grant_type not in self._grants:
            return None
        key = self.key(route)
        token = self._cache.peek(key)
        if token is None or self._cache.clock() >= token.refresh_after:
            return None
        self._metrics.cache_outcome(CacheOutcome.HIT).inc()
        return GrantResult(token, CacheOutcome.HIT, 0.0, key)

    async def obtain(self, route: Route) -> GrantResult:
        grant = self._grants.get(route.grant.grant_type)
        if grant is None:
            raise GrantError(
                route.provider,
                route.credential,
                f"grant type {route.grant.grant_type!r} is not available in this "
                "supervisor's configuration mode",
            )
        key = self.key(route)
        started = self._monotonic()

        async def fetch() -> CachedToken:
            return await grant.fetch(route)

        try:
            token, outcome = await self._cache.get(key, fetch)
        except Exception as exc:  # every failure is closed and reported the same way
            raise GrantError(route.provider, route.credential, describe_failure(exc)) from None
        self._metrics.cache_outcome(outcome).inc()
        return GrantResult(token, outcome, self._monotonic() - started, key)

    def evict_token(self, key: CacheKey, value: str) -> bool:
        """Upstream said 401 to this token: drop it (only if it is still the cached one)."""
        dropped = self._cache.evict_token(key, value)
        if dropped:
            self._metrics.evictions.inc()
        return dropped

    @property
    def cache(self) -> TokenCache:
        return self._cache

    async def aclose(self) -> None:
        await self._cache.aclose()
        for grant in self._grants.values():
            await grant.aclose()
        for close in self._closers:
            await close()


@dataclass(frozen=True)
class IdentityOptions:
    """How the supervisor obtains its JWT-SVIDs and reaches token endpoints."""

    spiffe_socket: str | None = None
    svid_dir: str | None = None
    bundle_file: str | None = None
    reuse_svids: bool = True
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)


def open_broker(
    options: IdentityOptions,
    metrics: ProxyMetrics,
    *,
    svids: SvidSource | None = None,
    gateway: GatewayClient | None = None,
) -> GrantBroker:
    """A broker with the grants of the configuration mode.

    Local files: client_credentials. With ``gateway`` (gateway mode) also token_exchange;
    ``svids`` is then the source the gateway client authenticates with, shared so one
    Workload API connection serves both audiences. The broker closes everything it is
    given (gateway client and SVID source included).

    Raises ValueError with a readable message when the SVID options are inconsistent.
    Call from the event loop that will use it; close with ``aclose()``.
    """
    if svids is None:
        svids = svid_source_from_options(
            options.spiffe_socket,
            options.svid_dir,
            options.bundle_file,
            reuse_svids=options.reuse_svids,
        )
    client = TokenEndpointClient(TokenClientConfig(ssl_context=options.ssl_context))
    cache = TokenCache()
    grants: dict[str, Grant] = {
        GRANT_CLIENT_CREDENTIALS: ClientCredentialsGrant(
            svids, client, metrics, monotonic=cache.clock
        )
    }
    closers: list[Callable[[], Awaitable[None]]] = [client.aclose]
    if gateway is not None:
        grants[GRANT_TOKEN_EXCHANGE] = TokenExchangeGrant(
            svids, client, gateway, metrics, monotonic=cache.clock
        )
        closers.append(gateway.aclose)
    closers.append(svids.close)
    return GrantBroker(cache, grants, metrics, closers=closers)
