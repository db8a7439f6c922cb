"""A remote JWKS: fetched over HTTP, cached, re-fetched when a token names an unknown key.

One implementation for every place that trusts keys published at a URL: the gateway's
OIDC issuer, the dev upstream's issuer and the dev IdP's SPIFFE trust domain. The keys
come either from a JWKS URL or from an issuer's OIDC discovery document (``jwks_uri``).

Re-fetching on an unknown ``kid`` lets keys rotate without a restart; it is rate-limited
(``min_refetch_interval``) so a stream of tokens with garbage ``kid`` values cannot turn
into a stream of requests to the key server, and concurrent misses share one fetch.
Every answer is checked before use: HTTP 200, at most ``max_body_bytes``, JSON (nesting
too deep for the decoder is a failure, not a ``RecursionError``), the expected shape.
Failures raise ``JwksError`` subclasses whose attributes let callers word their own
messages; no response body is ever echoed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

log = logging.getLogger("tokenferry.jwks")

DEFAULT_MAX_BODY_BYTES = 1024 * 1024

MalformedProblem = Literal["not_object", "no_keys", "no_jwks_uri", "wrong_issuer"]


class JwksError(Exception):
    """A JWKS (or the discovery document naming it) could not be obtained or used."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class JwksUnavailable(JwksError):
    """No usable answer: connection failure, timeout, non-200, too large, not JSON.

    ``status`` is the HTTP status of a non-200 answer; otherwise ``cause`` names what went
    wrong (an exception type name such as ``ClientConnectorError`` or ``JSONDecodeError``).
    """

    def __init__(self, url: str, *, status: int | None = None, cause: str = "") -> None:
        if status is not None:
            message = f"{url} answered HTTP {status}"
        else:
            message = f"cannot fetch {url}: {cause}"
        super().__init__(message, url=url)
        self.status = status
        self.cause = cause


class JwksMalformed(JwksError):
    """The answer was JSON but not the expected document.

    ``document`` says which one (``"discovery"`` or ``"jwks"``); ``problem`` says what is
    wrong with it.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        document: Literal["discovery", "jwks"],
        problem: MalformedProblem,
    ) -> None:
        super().__init__(message, url=url)
        self.document = document
        self.problem = problem


@dataclass(frozen=True)
class IssuerDiscovery:
    """Find the JWKS through ``<issuer>/.well-known/openid-configuration``.

    With ``check_issuer`` the document must name exactly ``issuer`` (OpenID Connect
    Discovery §4.3), so a mis-pointed issuer URL cannot lend us another issuer's keys.
    """

    issuer: str
    check_issuer: bool = True

    @property
    def url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True)
class _Snapshot:
    jwks: dict[str, Any]
    keys: dict[str, dict[str, Any]]


async def fetch_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    document: Literal["discovery", "jwks"] = "jwks",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> dict[str, Any]:
    """GET ``url`` and return its JSON object; ``JwksError`` for anything else."""
    try:
        async with session.get(
            url, allow_redirects=False, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise JwksUnavailable(url, status=response.status)
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > max_body_bytes:
                    raise JwksUnavailable(url, cause=f"answer larger than {max_body_bytes} bytes")
            data = json.loads(body) if body else None
    except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
        # ValueError: not JSON or not UTF-8. RecursionError: a JSON document nested
        # deeper than the decoder goes: an unusable answer, not a crash.
        raise JwksUnavailable(url, cause=type(exc).__name__) from None
    if not isinstance(data, dict):
        raise JwksMalformed(
            f"{url} did not return a JSON object",
            url=url,
            document=document,
            problem="not_object",
        )
    return data


def index_keys(jwks: Mapping[str, Any], *, url: str) -> dict[str, dict[str, Any]]:
    """The JWKS's keys by ``kid`` (keys without a string ``kid`` cannot be selected)."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise JwksMalformed(
            "issuer JWKS has no 'keys' list", url=url, document="jwks", problem="no_keys"
        )
    return {k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)}


class RemoteJwks:
    """A JWKS at a URL (or named by issuer discovery), cached for ``max_age`` seconds.

    ``session`` returns the aiohttp session to use (e.g. an application's shared one);
    without it the instance owns a session (``trust_env=False``: no proxy from the
    environment sees key fetches) created on first use and closed by ``close()``.

    With ``serve_stale_on_error`` a failed refresh keeps the last keys serving (logged);
    otherwise the failure propagates.
    """

    def __init__(
        self,
        source: str | IssuerDiscovery,
        *,
        session: Callable[[], aiohttp.ClientSession] | None = None,
        timeout: float = 10.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_age: float = 300.0,
        min_refetch_interval: float = 1.0,
        serve_stale_on_error: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._session_factory = session
        self._owned_session: aiohttp.ClientSession | None = None
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._max_age = max_age
        self._min_refetch = min_refetch_interval
        self._serve_stale = serve_stale_on_error
        self._clock = clock
        self._snapshot: _Snapshot | None = None
        self._fetched_at = -math.inf
        self._lock = asyncio.Lock()
        self._discovery: dict[str, Any] | None = None
        self._discovery_lock = asyncio.Lock()
        self._jwks_uri: str | None = source if isinstance(source, str) else None

    def __repr__(self) -> str:
        return f"RemoteJwks({self.source!r})"

    def _session(self) -> aiohttp.ClientSession:
        if self._session_factory is not None:
            return self._session_factory()
        if self._owned_session is None:
            self._owned_session = aiohttp.ClientSession(
                trust_env=False, timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        return self._owned_session

    async def close(self) -> None:
        """Close the session this instance created (a caller's session stays open)."""
        if self._owned_session is not None:
            await self._owned_session.close()
            self._owned_session = None

    async def _fetch_json(self, url: str, document: Literal["discovery", "jwks"]) -> dict[str, Any]:
        return await fetch_json(
            self._session(), url, document=document, max_body_bytes=self._max_body_bytes
        )

    async def discovery(self) -> dict[str, Any]:
        """The issuer's discovery document, fetched once and kept (a URL source: error)."""
        source = self.source
        if not isinstance(source, IssuerDiscovery):
            raise TypeError("this JWKS has a fixed URL, not an issuer to discover")
        async with self._discovery_lock:
            if self._discovery is None:
                url = source.url
                doc = await self._fetch_json(url, "discovery")
                if source.check_issuer and doc.get("issuer") != source.issuer:
                    raise JwksMalformed(
                        f"discovery document names issuer {doc.get('issuer')!r}, "
                        f"not {source.issuer!r}",
                        url=url,
                        document="discovery",
                        problem="wrong_issuer",
                    )
                self._discovery = doc
            return self._discovery

    async def _resolve_jwks_uri(self) -> str:
        if self._jwks_uri is None:
            doc = await self.discovery()
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                raise JwksMalformed(
                    "discovery document has no usable jwks_uri",
                    url=self.source.url if isinstance(self.source, IssuerDiscovery) else "",
                    document="discovery",
                    problem="no_jwks_uri",
                )
            self._jwks_uri = jwks_uri
        return self._jwks_uri

    async def _fetch(self) -> _Snapshot:
        url = await self._resolve_jwks_uri()
        jwks = await self._fetch_json(url, "jwks")
        return _Snapshot(jwks=jwks, keys=index_keys(jwks, url=url))

    async def _current(self, *, refresh: bool, kid: str | None = None) -> _Snapshot:
        # One lock around check-and-fetch: concurrent callers that all miss wait for the
        # first one's fetch and then find the fresh keys instead of fetching again.
        async with self._lock:
            age = self._clock() - self._fetched_at
            snapshot = self._snapshot
            wanted = refresh or (
                kid is not None and snapshot is not None and kid not in snapshot.keys
            )
            if snapshot is None or age >= self._max_age or (wanted and age >= self._min_refetch):
                try:
                    snapshot = await self._fetch()
                except JwksError:
                    if not self._serve_stale or snapshot is None or not snapshot.keys:
                        raise
                    log.warning("JWKS refresh failed; using cached keys")
                else:
                    self._snapshot = snapshot
                    self._fetched_at = self._clock()
            return snapshot

    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        """The JWKS document; ``refresh`` asks for a re-fetch (rate-limited)."""
        return (await self._current(refresh=refresh)).jwks

    async def key(self, kid: str) -> dict[str, Any] | None:
        """The JWK with this ``kid``; an unknown kid triggers a (rate-limited) re-fetch."""
        return (await self._current(refresh=False, kid=kid)).keys.get(kid)
