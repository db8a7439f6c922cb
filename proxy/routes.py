"""The route table: which credential (if any) an outbound request receives (SPEC §3).

Every credential with a ``token_grant`` produces one route per endpoint of its profile,
and one more specific route per ``audience_overrides`` entry. A request is matched by its
*actual destination* (CONNECT target or absolute-form authority, never the ``Host``
header), its port (exactly) and its path (glob).

Glob semantics (paths): ``**`` matches any run of characters including ``/`` (also the
empty run), ``*`` any run of characters except ``/``; every other character is literal.
A pattern ending in ``/**`` also matches the bare prefix (``/orders/**`` matches
``/orders``). Paths are matched as sent, without the query string, case-sensitively.

Host patterns are compared case-insensitively, label by label: ``*`` is exactly one
label, ``**`` one or more labels. A trailing dot on the request host is ignored.

Specificity (SPEC §3), most specific first: a route with a path pattern beats one
without; then fewer wildcards (``**`` weighs two, ``*`` one, host and path together);
then more literal characters; then an audience override beats the endpoint route it
refines; then provider name, then credential name.

Lookups never scan the whole table: exact host patterns live in a dictionary keyed by
``(host, port)``; only routes with wildcard hosts on the request's port are scanned.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokenferry.profiles import Profile, TokenGrant

TLS_TERMINATE = "terminate"
TLS_NONE = "none"
TLS_SKIP = "skip"


# --- patterns --------------------------------------------------------------------------


def _host_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for label in pattern.lower().rstrip(".").split("."):
        if label == "*":
            parts.append(r"[^.]+")
        elif label == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(label))
    return re.compile(r"\.".join(parts))


def _path_regex(pattern: str) -> re.Pattern[str]:
    # "/x/**" also matches "/x": the usual reading of "everything under /x".
    if pattern.endswith("/**"):
        return re.compile(_glob_to_regex(pattern[:-3]) + r"(?:/.*)?", re.DOTALL)
    return re.compile(_glob_to_regex(pattern), re.DOTALL)


def _glob_to_regex(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _is_wildcard_host(pattern: str) -> bool:
    return "*" in pattern


def _wildcards(text: str) -> int:
    """Wildcard weight: ``**`` counts as two, since it matches more than ``*``."""
    return text.count("*")


def _literals(text: str) -> int:
    return len(text.replace("*", ""))


def normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def strip_query(path: str) -> str:
    """The path of a request target without query string or fragment."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path or "/"


# --- entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where an endpoint or route applies: host pattern, exact port, optional path glob."""

    host: str
    port: int
    path: str | None
    _host_re: re.Pattern[str] = field(repr=False, compare=False)
    _path_re: re.Pattern[str] | None = field(repr=False, compare=False)

    @classmethod
    def make(cls, host: str, port: int, path: str | None) -> Target:
        host = normalise_host(host)
        path = path or None
        return cls(
            host=host,
            port=port,
            path=path,
            _host_re=_host_regex(host),
            _path_re=_path_regex(path) if path is not None else None,
        )

    @property
    def wildcard_host(self) -> bool:
        return _is_wildcard_host(self.host)

    def matches_host(self, host: str) -> bool:
        return self._host_re.fullmatch(host) is not None

    def matches_path(self, path: str | None) -> bool:
        """``path=None`` asks about host and port only (e.g. at CONNECT time)."""
        if self._path_re is None or path is None:
            return True
        return self._path_re.fullmatch(path) is not None

    def specificity(self) -> tuple[int, int, int]:
        """Sort key, smaller is more specific (SPEC §3)."""
        text = self.host + (self.path or "")
        return (0 if self.path is not None else 1, _wildcards(text), -_literals(text))


@dataclass(frozen=True)
class Route:
    """One credential of one provider applied to one target."""

    provider: str
    revision: int
    credential: str
    target: Target
    tls: str
    auth_style: str
    header_name: str
    grant: TokenGrant = field(repr=False)
    audience: str | None
    scopes: tuple[str, ...]
    override: bool = False
    # token_exchange: when the provider's stored subject token expires (epoch seconds, as
    # the gateway reports it); caps the life of tokens derived from it (SPEC §4.3).
    subject_expires_at: float | None = None

    def injects_for(self, scheme: str) -> bool:
        """Plain HTTP only for ``tls: none``, HTTPS only for ``tls: terminate``."""
        if self.tls == TLS_TERMINATE:
            return scheme == "https"
        if self.tls == TLS_NONE:
            return scheme == "http"
        return False

    def header_value(self, token: str) -> str:
        return f"Bearer {token}" if self.auth_style == "bearer" else token

    def sort_key(self) -> tuple[int, int, int, int, str, str]:
        # An override is more specific than the endpoint route it refines, even when
        # host and path are spelled identically.
        return (
            *self.target.specificity(),
            0 if self.override else 1,
            self.provider,
            self.credential,
        )


@dataclass(frozen=True)
class EndpointEntry:
    """Any endpoint of any configured provider, for deny mode."""

    provider: str
    target: Target
    tls: str


# --- index -------------------------------------------------------------------------------


class _HasTarget(Protocol):
    @property
    def target(self) -> Target: ...


class _HostIndex[E: _HasTarget]:
    """Exact host patterns by ``(host, port)``; wildcard patterns by port, scanned."""

    def __init__(self, entries: Iterable[E], order: Callable[[E], object] | None = None):
        self._exact: dict[tuple[str, int], list[E]] = {}
        self._wild: dict[int, list[E]] = {}
        for entry in entries:
            t = entry.target
            if t.wildcard_host:
                self._wild.setdefault(t.port, []).append(entry)
            else:
                self._exact.setdefault((t.host, t.port), []).append(entry)
        if order is not None:
            for bucket in (*self._exact.values(), *self._wild.values()):
                bucket.sort(key=order)  # type: ignore[arg-type]  # any orderable key

    def candidates(self, host: str, port: int) -> Iterable[E]:
        yield from self._exact.get((host, port), ())
        for entry in self._wild.get(port, ()):
            if entry.target.matches_host(host):
                yield entry


class RouteTable:
    """Immutable once built; replaced wholesale when the configuration changes."""

    def __init__(self, routes: Sequence[Route], endpoints: Sequence[EndpointEntry] = ()):
        self.routes: tuple[Route, ...] = tuple(sorted(routes, key=Route.sort_key))
        self.endpoints: tuple[EndpointEntry, ...] = tuple(endpoints)
        self._routes = _HostIndex(self.routes, Route.sort_key)
        self._endpoints = _HostIndex(self.endpoints)

    def __len__(self) -> int:
        return len(self.routes)

    def lookup(self, host: str, port: int, path: str) -> Route | None:
        """The most specific route for this destination and path, whatever its TLS mode."""
        host = normalise_host(host)
        path = strip_query(path)
        best: Route | None = None
        for route in self._routes.candidates(host, port):
            if route.target.matches_path(path) and (
                best is None or route.sort_key() < best.sort_key()
            ):
                best = route
        return best

    def match(self, scheme: str, host: str, port: int, path: str) -> Route | None:
        """The route whose credential this request receives, or None.

        The most specific route decides: when it is ``tls: skip`` or its TLS mode does not
        fit the request's scheme, nothing is injected (a less specific route is not
        consulted: that would hand out a token the operator excluded).
        """
        route = self.lookup(host, port, path)
        if route is None or not route.injects_for(scheme):
            return None
        return route

    def terminates(self, host: str, port: int) -> bool:
        """Does any ``tls: terminate`` route target this host and port (any path)?"""
        host = normalise_host(host)
        return any(r.tls == TLS_TERMINATE for r in self._routes.candidates(host, port))

    def any_endpoint(self, host: str, port: int, path: str | None = None) -> bool:
        """Does any endpoint of any provider match? (``path=None``: host and port only.)"""
        host = normalise_host(host)
        path = strip_query(path) if path is not None else None
        if any(e.target.matches_path(path) for e in self._endpoints.candidates(host, port)):
            return True
        # Override routes are destinations too, even if no endpoint names them.
        return any(r.target.matches_path(path) for r in self._routes.candidates(host, port))


# --- building ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderProfile:
    """The part of a provider the route table needs."""

    name: str
    revision: int
    profile: Profile
    # Expiry (epoch seconds, None = unknown/none) of stored credentials by name, as the
    # gateway's supervisor config reports them; never their values.
    credential_expiry: tuple[tuple[str, float | None], ...] = ()

    def expiry_of(self, credential: str) -> float | None:
        return dict(self.credential_expiry).get(credential)


def _subject_expiry(provider: ProviderProfile, grant: TokenGrant) -> float | None:
    subject = grant.subject_token
    return provider.expiry_of(subject.credential) if subject is not None else None


def build_routes(providers: Iterable[ProviderProfile]) -> RouteTable:
    routes: list[Route] = []
    endpoints: list[EndpointEntry] = []
    for provider in providers:
        profile = provider.profile
        for ep in profile.endpoints:
            endpoints.append(
                EndpointEntry(provider.name, Target.make(ep.host, ep.port, ep.path), ep.tls)
            )
        for cred in profile.credentials:
            grant = cred.token_grant
            if grant is None:
                continue
            subject_expires_at = _subject_expiry(provider, grant)
            for ep in profile.endpoints:
                routes.append(
                    Route(
                        provider=provider.name,
                        revision=provider.revision,
                        credential=cred.name,
                        target=Target.make(ep.host, ep.port, ep.path),
                        tls=ep.tls,
                        auth_style=cred.auth_style,
                        header_name=cred.header_name,
                        grant=grant,
                        audience=grant.audience,
                        scopes=tuple(grant.scopes),
                        subject_expires_at=subject_expires_at,
                    )
                )
            for ov in grant.audience_overrides:
                target = Target.make(ov.host, ov.port, ov.path)
                routes.append(
                    Route(
                        provider=provider.name,
                        revision=provider.revision,
                        credential=cred.name,
                        target=target,
                        tls=_override_tls(profile, target),
                        auth_style=cred.auth_style,
                        header_name=cred.header_name,
                        grant=grant,
                        audience=ov.audience if ov.audience is not None else grant.audience,
                        scopes=tuple(ov.scopes) if ov.scopes else tuple(grant.scopes),
                        override=True,
                        subject_expires_at=subject_expires_at,
                    )
                )
    return RouteTable(routes, endpoints)


def _override_tls(profile: Profile, target: Target) -> str:
    """An override inherits the TLS mode of the endpoint with its host and port, if any.

    Otherwise it is ``terminate``: overrides name HTTPS resources (port default 443), and
    plain HTTP is only ever opted into explicitly by an endpoint.
    """
    for ep in profile.endpoints:
        if normalise_host(ep.host) == target.host and ep.port == target.port:
            return ep.tls
    return TLS_TERMINATE


class RouteTableRef:
    """The current table, shared by the addons; swapped atomically on a config change."""

    def __init__(self, table: RouteTable | None = None) -> None:
        self.current: RouteTable = table if table is not None else RouteTable(())

    def swap(self, table: RouteTable) -> None:
        # A single reference assignment: a request sees either the old or the new table.
        self.current = table
