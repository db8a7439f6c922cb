"""Which token endpoints the gateway (and its supervisors) may send identities to.

A profile names a ``token_endpoint`` and, optionally, the audience of the JWT-SVID used
as client assertion there (``jwt_svid_audience``). The gateway sends that endpoint its
own SVID and a user's stored subject token (exchange 1), and supervisors send it their
SVID and the intermediate token (exchange 2). Profiles are registered by ordinary users,
so a profile naming an attacker's URL as endpoint, and a real IdP as SVID audience, would
harvest SVIDs replayable at that IdP and users' subject tokens. Hence:

- a token endpoint must be one the operator configured (``--trusted-token-endpoint``),
  by default the ``token_endpoint`` of the OIDC issuer's discovery document — the IdP
  the gateway already trusts for user logins;
- an explicit ``jwt_svid_audience`` must be an audience *of that endpoint*: its SPEC §4.2
  derivation (the Keycloak issuer, or the URL itself), the endpoint URL, the issuer whose
  discovery document named it, or one of ``--trusted-svid-audience``. So an SVID only
  ever goes to a server the operator trusts, for an audience the operator trusts.

The rule is checked when a profile is registered and again by the broker before any
SVID is fetched or subject token decrypted, so a profile stored before the rule (or
before a configuration change) cannot get through either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tokenferry.profiles import Profile, TokenGrant


class TrustUnavailable(Exception):
    """The trusted endpoints cannot be learnt (the issuer's discovery document)."""


def normalize_endpoint(url: str) -> str | None:
    """A comparable form of an http(s) URL (scheme and host lower-cased, default port
    dropped), or None when it is not one we could ever trust (no host, user info, a
    fragment, another scheme)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host or parts.fragment:
        return None
    # user info would make the URL's apparent host differ from where it really goes.
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return None
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if scheme == "https" else 80):
        shown += f":{port}"
    return f"{scheme}://{shown}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")


def derived_audience(token_endpoint: str) -> str:
    """SPEC §4.2's audience of ``token_endpoint`` when a profile names none."""
    return TokenGrant(
        grant_type="client_credentials", token_endpoint=token_endpoint
    ).svid_audience()


@dataclass(frozen=True)
class TrustedEndpoints:
    """The resolved rule: endpoint (normalised) → audiences allowed there."""

    audiences: Mapping[str, frozenset[str]]
    # Shown in refusals, in the operator's spelling.
    shown: tuple[str, ...]

    def problem(self, grant: TokenGrant) -> tuple[str, str] | None:
        """``(field, message)`` when this grant may not be used, else None."""
        endpoint = normalize_endpoint(grant.token_endpoint)
        allowed = self.audiences.get(endpoint) if endpoint is not None else None
        if allowed is None:
            return (
                "token_endpoint",
                f"{grant.token_endpoint[:200]!r} is not a trusted token endpoint of this "
                f"gateway (trusted: {', '.join(self.shown) or 'none'}); the gateway sends "
                "its JWT-SVID and users' subject tokens only to the token endpoints its "
                "operator configured (--trusted-token-endpoint)",
            )
        audience = grant.jwt_svid_audience
        if audience is not None and audience not in allowed:
            return (
                "jwt_svid_audience",
                f"{audience[:200]!r} is not a trusted SVID audience for token endpoint "
                f"{grant.token_endpoint[:200]!r} (allowed: {', '.join(sorted(allowed))}); "
                "omit jwt_svid_audience to use the endpoint's own (SPEC §4.2), or ask the "
                "operator to add it with --trusted-svid-audience",
            )
        return None

    def profile_problems(self, profile: Profile) -> list[tuple[str, str]]:
        """Every untrusted grant of the profile as ``(field path, message)``."""
        found = []
        for index, credential in enumerate(profile.credentials):
            if credential.token_grant is None:
                continue
            problem = self.problem(credential.token_grant)
            if problem is not None:
                field, message = problem
                found.append((f"credentials[{index}].token_grant.{field}", message))
        return found


def build_trusted(
    endpoints: Iterable[tuple[str, Iterable[str]]], svid_audiences: Iterable[str]
) -> TrustedEndpoints:
    """From ``(endpoint URL, extra audiences of that endpoint)`` pairs."""
    shared = frozenset(svid_audiences)
    audiences: dict[str, frozenset[str]] = {}
    shown: list[str] = []
    for url, extra in endpoints:
        normal = normalize_endpoint(url)
        if normal is None:
            raise ValueError(f"{url!r} is not an http(s) URL without user info or fragment")
        allowed = {derived_audience(url), url, normal, *extra} | shared
        audiences[normal] = audiences.get(normal, frozenset()) | frozenset(allowed)
        if url not in shown:
            shown.append(url)
    return TrustedEndpoints(audiences=audiences, shown=tuple(shown))


class EndpointTrust:
    """Resolves the trusted endpoints once: configured ones, else the OIDC issuer's."""

    def __init__(
        self,
        *,
        issuer: str,
        endpoints: tuple[str, ...],
        svid_audiences: tuple[str, ...],
        discovery: Callable[[], Awaitable[Mapping[str, Any]]],
    ) -> None:
        self._issuer = issuer
        self._endpoints = endpoints
        self._svid_audiences = svid_audiences
        self._discovery = discovery
        self._resolved: TrustedEndpoints | None = None
        self._lock = asyncio.Lock()
        if endpoints:
            self._resolved = build_trusted(((e, ()) for e in endpoints), svid_audiences)

    async def resolve(self) -> TrustedEndpoints:
        """The rule; the discovery document is fetched at most once successfully."""
        if self._resolved is not None:
            return self._resolved
        async with self._lock:
            if self._resolved is None:
                try:
                    document = await self._discovery()
                except Exception as exc:
                    raise TrustUnavailable(
                        "cannot learn the trusted token endpoint from the OIDC issuer's "
                        f"discovery document: {exc}"
                    ) from None
                endpoint = document.get("token_endpoint")
                if not isinstance(endpoint, str) or normalize_endpoint(endpoint) is None:
                    raise TrustUnavailable(
                        f"the discovery document of {self._issuer!r} has no usable "
                        "token_endpoint; configure --trusted-token-endpoint"
                    )
                # The issuer named this endpoint, so SVIDs for the issuer may go there.
                self._resolved = build_trusted([(endpoint, (self._issuer,))], self._svid_audiences)
            return self._resolved
