"""Provider profiles (SPEC §2): the model, loading from YAML/JSON, and validation.

A profile describes one kind of protected service: its credentials, the endpoints that
receive them, and how dynamic tokens are obtained. Field names follow OpenShell's
provider-profile format so existing profiles load; OpenShell keys tokenferry does not act
on are accepted with a warning.

Validation never stops at the first mistake: every error is collected into one
:class:`ProfileError`, each naming the file, the field path
(``credentials[1].token_grant.grant_type``) and the offending value, so a user fixes a
profile in one round instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import logging
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_TOKEN_EXCHANGE",
    "JWT_BEARER_ASSERTION",
    "JWT_SPIFFE_ASSERTION",
    "AudienceOverride",
    "Credential",
    "Endpoint",
    "Problem",
    "Profile",
    "ProfileError",
    "SubjectTokenSource",
    "TokenGrant",
    "load_profile_dir",
    "load_profile_file",
    "load_profile_text",
    "parse_profile",
    "profile_to_dict",
]

log = logging.getLogger(__name__)

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TOKEN_EXCHANGE = "token_exchange"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"

GRANT_TYPES = (GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE)
AUTH_STYLES = ("bearer", "header")
TLS_MODES = ("terminate", "none", "skip")
SUBJECT_SOURCES = ("provider_credential",)
DEFAULT_HEADER_NAME = "Authorization"
CLIENT_ASSERTION_TYPES = (JWT_BEARER_ASSERTION, JWT_SPIFFE_ASSERTION)
# RFC 8693 §3 token type identifiers; others are passed through with a warning.
TOKEN_TYPES = (
    ACCESS_TOKEN_TYPE,
    "urn:ietf:params:oauth:token-type:refresh_token",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:saml1",
    "urn:ietf:params:oauth:token-type:saml2",
    "urn:ietf:params:oauth:token-type:jwt",
)
DEFAULT_PORTS = {"terminate": 443, "none": 80, "skip": 443}
# Token lifetimes are capped at this many seconds (SPEC §4.3): a larger cap does nothing.
MAX_TOKEN_LIFETIME = 3600
# Profiles are small; a cap keeps a hostile upload from costing memory in the gateway.
MAX_PROFILE_BYTES = 1024 * 1024

# Keys OpenShell profiles carry that tokenferry does not act on (SPEC §2). They are
# accepted, with a warning, wherever they appear, so existing OpenShell profiles load.
# ``protocol`` is a real field of endpoints (kept, silent) and only warned about elsewhere.
OPENSHELL_IGNORED_KEYS = frozenset(
    {
        "binaries",
        "inference_capable",
        "refresh",
        "query_param",
        "path_template",
        "allowed_ips",
        "access",
        "enforcement",
        "protocol",
    }
)

# A broker-only credential (the user's subject token) is used by the gateway alone; any
# of these would mean "deliver it into the sandbox", which must never happen (SPEC §9).
BROKER_ONLY_FORBIDDEN_KEYS = (
    "env_vars",
    "auth_style",
    "header_name",
    "token_grant",
    "query_param",
    "path_template",
)

# Headers that frame or route the message: injecting a credential into one of them would
# corrupt the request or be stripped by the next hop (RFC 9110 §7.6.1, RFC 9112 §6/§9).
FORBIDDEN_HEADER_NAMES = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)

_TOP_KEYS = ("id", "display_name", "description", "category", "credentials", "endpoints")
_CREDENTIAL_KEYS = (
    "name",
    "description",
    "required",
    "auth_style",
    "header_name",
    "env_vars",
    "token_grant",
)
_GRANT_KEYS = (
    "grant_type",
    "token_endpoint",
    "audience",
    "scopes",
    "jwt_svid_audience",
    "client_assertion_type",
    "requested_token_type",
    "cache_ttl_seconds",
    "subject_token",
    "audience_overrides",
)
_SUBJECT_KEYS = ("source", "credential", "subject_token_type")
_OVERRIDE_KEYS = ("host", "port", "path", "audience", "scopes")
_ENDPOINT_KEYS = ("host", "port", "path", "tls", "protocol")

_PROFILE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_CREDENTIAL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# RFC 9110 §5.1: field-name = token; token = 1*tchar.
_TCHAR_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_URI_TOKEN_RE = re.compile(r"[\x21-\x7e]+")

# Bounded repr: values in messages come from untrusted files, and a YAML alias bomb must
# not turn one error message into gigabytes.
_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlevel = 3
_repr.maxlist = 6
_repr.maxtuple = 6
_repr.maxdict = 6
_MAX_SHOWN = 80


def _show(value: object) -> str:
    """The offending value for a message: a Python repr, cut to about 80 characters."""
    text = _repr.repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Problem:
    """One validation finding. ``str()`` is ``"<source>: <path>: <message>"``."""

    source: str
    path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        if not self.path:
            return f"{self.source}: {self.message}"
        return f"{self.source}: {self.path}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "source": self.source,
            "path": self.path,
            "message": self.message,
        }


class ProfileError(ValueError):
    """A profile (or a set of profiles) is invalid; ``problems`` holds every error."""

    def __init__(self, problems: Sequence[Problem], warnings: Sequence[Problem] = ()) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.warnings: tuple[Problem, ...] = tuple(warnings)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid profile")


@dataclass(frozen=True)
class SubjectTokenSource:
    """Where the gateway finds the subject token of a token exchange."""

    source: str
    credential: str
    subject_token_type: str = ACCESS_TOKEN_TYPE


@dataclass(frozen=True)
class AudienceOverride:
    """A more specific route with its own final-exchange audience and scopes."""

    host: str
    port: int = 443
    path: str | None = None
    audience: str | None = None
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenGrant:
    grant_type: str
    token_endpoint: str
    audience: str | None = None
    scopes: tuple[str, ...] = ()
    jwt_svid_audience: str | None = None
    client_assertion_type: str = JWT_BEARER_ASSERTION
    requested_token_type: str = ACCESS_TOKEN_TYPE
    cache_ttl_seconds: int = 0
    subject_token: SubjectTokenSource | None = None
    audience_overrides: tuple[AudienceOverride, ...] = ()

    def svid_audience(self) -> str:
        """The audience of the JWT-SVID used as client assertion (SPEC §4.2).

        ``jwt_svid_audience`` when set; otherwise the Keycloak issuer when the token
        endpoint's path contains ``/realms/<name>``; otherwise the token endpoint URL.
        """
        if self.jwt_svid_audience:
            return self.jwt_svid_audience
        parts = urlsplit(self.token_endpoint)
        segments = parts.path.split("/")
        for index, segment in enumerate(segments[:-1]):
            if segment == "realms" and segments[index + 1]:
                prefix = "/".join(segments[: index + 2])
                return f"{parts.scheme}://{parts.netloc}{prefix}"
        return self.token_endpoint


@dataclass(frozen=True)
class Credential:
    name: str
    description: str | None = None
    required: bool = False
    auth_style: str = "bearer"
    header_name: str = DEFAULT_HEADER_NAME
    token_grant: TokenGrant | None = None
    env_vars: tuple[str, ...] = ()
    # Derived by Profile: true when a token_exchange credential of the same profile uses
    # this one as its subject token. Such a credential never leaves the gateway.
    broker_only: bool = False


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int = 443
    path: str | None = None
    tls: str = "terminate"
    protocol: str | None = None


@dataclass(frozen=True)
class Profile:
    id: str
    display_name: str | None = None
    description: str | None = None
    category: str | None = None
    credentials: tuple[Credential, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        # broker_only is a property of the profile, not of one credential: compute it
        # here so it is right however the Profile was constructed.
        broker = self.broker_only_credentials()
        fixed = tuple(
            c
            if c.broker_only == (c.name in broker)
            else dataclasses.replace(c, broker_only=not c.broker_only)
            for c in self.credentials
        )
        object.__setattr__(self, "credentials", fixed)
        object.__setattr__(self, "endpoints", tuple(self.endpoints))

    def credential(self, name: str) -> Credential | None:
        for credential in self.credentials:
            if credential.name == name:
                return credential
        return None

    def broker_only_credentials(self) -> frozenset[str]:
        return frozenset(
            c.token_grant.subject_token.credential
            for c in self.credentials
            if c.token_grant is not None and c.token_grant.subject_token is not None
        )

    def token_grant_credentials(self) -> tuple[Credential, ...]:
        """The credentials tokenferry obtains and injects (those with a ``token_grant``)."""
        return tuple(c for c in self.credentials if c.token_grant is not None)


# --------------------------------------------------------------------------- checking


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(value: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(value.lower(), sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _suggest(value: str, candidates: Iterable[str]) -> str:
    match = _closest(value, candidates)
    return f"; did you mean {match!r}?" if match else ""


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class _Checker:
    """Collects problems for one document; readers return a usable fallback on error.

    The fallbacks let parsing continue past a bad field so that every error is found;
    the object built from them is thrown away whenever any error was recorded.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        # Paths of known keys that an unknown key was probably meant to be: their absence
        # is already explained by the "did you mean" error, so no second error follows.
        self.misspelt: set[str] = set()

    def error(self, path: str, message: str) -> None:
        self.errors.append(Problem(self.source, path, message, "error"))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(self.source, path, message, "warning"))

    def wrong_type(self, path: str, expected: str, value: object) -> None:
        self.error(path, f"must be {expected}, got {_type_name(value)} {_show(value)}")

    def check_keys(self, data: Mapping[Any, Any], path: str, known: Sequence[str]) -> None:
        for key, value in data.items():
            if not isinstance(key, str):
                self.error(path, f"keys must be strings, got {_type_name(key)} {_show(key)}")
                continue
            if key in known:
                continue
            key_path = _join(path, key)
            if key in OPENSHELL_IGNORED_KEYS:
                self.warn(
                    key_path,
                    f"OpenShell key {key!r} is accepted but tokenferry does not act on it "
                    f"(value {_show(value)})",
                )
            else:
                meant = _closest(key, known)
                if meant is not None and meant not in data:
                    self.misspelt.add(_join(path, meant))
                hint = _suggest(key, known) or _suggest(key, OPENSHELL_IGNORED_KEYS)
                self.error(key_path, f"unknown key {key!r}{hint}")

    def absent(self, data: Mapping[Any, Any], key: str, path: str) -> bool:
        """True when ``key`` is really absent (not present, and not merely misspelt)."""
        return data.get(key) in (None, "", []) and _join(path, key) not in self.misspelt

    def mapping(self, value: object, path: str) -> Mapping[Any, Any] | None:
        if isinstance(value, dict):
            return value
        self.wrong_type(path, "a mapping", value)
        return None

    def text(
        self,
        data: Mapping[Any, Any],
        key: str,
        path: str,
        *,
        required: bool = False,
        check: Callable[[str], str | None] | None = None,
    ) -> str | None:
        """An optional/required string; empty strings count as absent for optional ones."""
        key_path = _join(path, key)
        value = data.get(key)
        if value is None:
            if required and key_path not in self.misspelt:
                self.error(key_path, "is required")
            return None
        if not isinstance(value, str):
            self.wrong_type(key_path, "a string", value)
            return None
        if value == "":
            if required:
                self.error(key_path, "must not be empty, got ''")
            return None
        if check is not None:
            problem = check(value)
            if problem is not None:
                self.error(key_path, f"{problem}, got {_show(value)}")
                return None
        return value

    def choice(
        self, data: Mapping[Any, Any], key: str, path: str, choices: Sequence[str], default: str
    ) -> str | None:
        value = self.text(data, key, path)
        if value is None:
            return default if data.get(key) is None or data.get(key) == "" else None
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            hint = _suggest(value, choices)
            self.error(_join(path, key), f"must be one of {options}, got {_show(value)}{hint}")
            return None
        return value

    def boolean(self, data: Mapping[Any, Any], key: str, path: str, default: bool) -> bool:
        value = data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.wrong_type(_join(path, key), "true or false", value)
            return default
        return value

    def integer(
        self, data: Mapping[Any, Any], key: str, path: str, *, low: int, high: int | None
    ) -> int | None:
        key_path = _join(path, key)
        value = data.get(key)
        if value is None:
            return None
        # bool is a subclass of int in Python; `port: true` is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(key_path, "an integer", value)
            return None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            self.error(key_path, f"must be {bounds}, got {_show(value)}")
            return None
        return value

    def string_list(
        self,
        data: Mapping[Any, Any],
        key: str,
        path: str,
        *,
        check: Callable[[str], str | None],
        what: str,
    ) -> tuple[str, ...]:
        key_path = _join(path, key)
        value = data.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            # A lone string is never iterated as characters: it is a mistake.
            self.wrong_type(key_path, f"a list of {what}", value)
            return ()
        items: list[str] = []
        for index, item in enumerate(value):
            item_path = f"{key_path}[{index}]"
            if not isinstance(item, str):
                self.wrong_type(item_path, "a string", item)
                continue
            problem = check(item)
            if problem is not None:
                self.error(item_path, f"{problem}, got {_show(item)}")
                continue
            if item in items:
                self.warn(item_path, f"duplicate {_show(item)} ignored")
                continue
            items.append(item)
        return tuple(items)


# --------------------------------------------------------------------------- value rules


def _check_profile_id(value: str) -> str | None:
    if _PROFILE_ID_RE.fullmatch(value):
        return None
    return "must match [a-z0-9][a-z0-9-]{0,62} (lower-case letters, digits, '-')"


def _check_credential_name(value: str) -> str | None:
    if _CREDENTIAL_NAME_RE.fullmatch(value):
        return None
    return "must match [A-Za-z_][A-Za-z0-9_.-]{0,63}"


def _check_env_var(value: str) -> str | None:
    return None if _ENV_VAR_RE.fullmatch(value) else "must be an environment variable name"


def _check_scope(value: str) -> str | None:
    if _SCOPE_RE.fullmatch(value):
        return None
    return "must be a non-empty scope token without spaces, quotes or backslashes (RFC 6749 §3.3)"


def _check_uri_token(value: str) -> str | None:
    return None if _URI_TOKEN_RE.fullmatch(value) else "must not contain spaces"


def _check_header_name(value: str) -> str | None:
    if not _TCHAR_RE.fullmatch(value):
        return "must be a valid HTTP field name (RFC 9110 token characters)"
    if value.lower() in FORBIDDEN_HEADER_NAMES:
        return "must not be a message framing or hop-by-hop header"
    return None


def _check_path_glob(value: str) -> str | None:
    if not value.startswith("/"):
        return "must be a path glob starting with '/'"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "must not contain whitespace or control characters"
    if "?" in value or "#" in value:
        return "must not contain '?' or '#' (paths are matched without query or fragment)"
    return None


def normalize_host_pattern(value: str) -> tuple[str | None, str | None]:
    """``(normalised pattern, None)`` or ``(None, reason)`` for an endpoint host.

    A DNS name or pattern: ``*`` matches exactly one label, ``**`` one or more; other
    labels are DNS labels. IP literals are accepted (IPv6 with or without brackets).
    The rightmost label must be literal, so ``example.*`` cannot match hosts under a TLD
    an attacker could register.
    """
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return ipaddress.ip_address(inner).compressed, None
    except ValueError:
        pass
    if not value.isascii():
        return None, "must be ASCII (write internationalised names in punycode, xn--…)"
    host = value.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # the root label of a fully qualified name
    if not host:
        return None, "must not be empty"
    if len(host) > 253:
        return None, "must be at most 253 characters"
    labels = host.split(".")
    for label in labels:
        if label in ("*", "**"):
            continue
        if "*" in label:
            return None, f"wildcards must be whole labels ('*' or '**'), not {label!r}"
        if not _DNS_LABEL_RE.fullmatch(label):
            return None, f"label {label!r} is not a valid DNS label"
    if labels[-1] in ("*", "**"):
        return None, "the rightmost label must not be a wildcard"
    return host, None


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP address (where plain http cannot be intercepted)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_kubernetes_service(host: str) -> bool:
    labels = host.split(".")
    short = len(labels) == 3 and labels[2] == "svc"
    full = len(labels) == 5 and labels[2:] == ["svc", "cluster", "local"]
    return (short or full) and all(_DNS_LABEL_RE.fullmatch(label) for label in labels[:2])


def _check_token_endpoint(value: str) -> str | None:
    if any(c.isspace() for c in value):
        return "must be a URL without spaces"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return f"must be a valid URL ({exc})"
    del port
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("https", "http") or not host:
        return "must be an https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not contain user information"
    if parts.fragment:
        return "must not contain a fragment"
    if scheme == "http" and not (is_loopback_host(host) or _is_kubernetes_service(host)):
        return (
            "must use https:// (http:// is allowed only for loopback hosts and "
            "Kubernetes service names such as name.ns.svc)"
        )
    return None


# --------------------------------------------------------------------------- parsing


class _RawCredential:
    """What cross-credential rules need: the parsed value plus which keys were present."""

    def __init__(self, credential: Credential, keys: frozenset[str], path: str) -> None:
        self.credential = credential
        self.keys = keys
        self.path = path


def _parse_host(c: _Checker, data: Mapping[Any, Any], path: str) -> str:
    raw = c.text(data, "host", path, required=True)
    if raw is None:
        return ""
    host, reason = normalize_host_pattern(raw)
    if host is None:
        c.error(_join(path, "host"), f"{reason}, got {_show(raw)}")
        return ""
    return host


def _parse_override(c: _Checker, value: object, path: str) -> AudienceOverride:
    data = c.mapping(value, path)
    if data is None:
        return AudienceOverride(host="")
    c.check_keys(data, path, _OVERRIDE_KEYS)
    host = _parse_host(c, data, path)
    port = c.integer(data, "port", path, low=1, high=65535)
    glob = c.text(data, "path", path, check=_check_path_glob)
    audience = c.text(data, "audience", path)
    scopes = c.string_list(data, "scopes", path, check=_check_scope, what="scopes")
    if c.absent(data, "audience", path) and c.absent(data, "scopes", path):
        c.error(
            path,
            "an audience override must set 'audience' or 'scopes' (without either it is "
            "just another endpoint; list it under 'endpoints')",
        )
    return AudienceOverride(
        host=host,
        port=port if port is not None else 443,
        path=glob,
        audience=audience,
        scopes=scopes,
    )


def _parse_subject(c: _Checker, value: object, path: str) -> SubjectTokenSource:
    data = c.mapping(value, path)
    if data is None:
        return SubjectTokenSource(source="", credential="")
    c.check_keys(data, path, _SUBJECT_KEYS)
    source = c.choice(data, "source", path, SUBJECT_SOURCES, SUBJECT_SOURCES[0])
    credential = c.text(data, "credential", path, required=True)
    token_type = c.text(data, "subject_token_type", path, check=_check_uri_token)
    if token_type is not None and token_type not in TOKEN_TYPES:
        c.warn(
            _join(path, "subject_token_type"),
            f"{_show(token_type)} is not an RFC 8693 token type{_suggest(token_type, TOKEN_TYPES)}",
        )
    return SubjectTokenSource(
        source=source or "",
        credential=credential or "",
        subject_token_type=token_type or ACCESS_TOKEN_TYPE,
    )


def _parse_grant(c: _Checker, value: object, path: str) -> TokenGrant:
    data = c.mapping(value, path)
    if data is None:
        return TokenGrant(grant_type="", token_endpoint="")
    c.check_keys(data, path, _GRANT_KEYS)

    grant_path = _join(path, "grant_type")
    raw_grant = data.get("grant_type")
    if raw_grant == "urn:ietf:params:oauth:grant-type:token-exchange":
        c.error(grant_path, f"write 'token_exchange' instead of {_show(raw_grant)}")
        grant_type = None
    elif grant_path in c.misspelt:
        grant_type = None  # unknown: rules that depend on it would only add noise
    else:
        grant_type = c.choice(data, "grant_type", path, GRANT_TYPES, GRANT_CLIENT_CREDENTIALS)

    endpoint = c.text(data, "token_endpoint", path, required=True, check=_check_token_endpoint)
    audience = c.text(data, "audience", path)
    scopes = c.string_list(data, "scopes", path, check=_check_scope, what="scopes")
    svid_audience = c.text(data, "jwt_svid_audience", path)

    assertion_type = c.text(data, "client_assertion_type", path, check=_check_uri_token)
    if assertion_type is not None and assertion_type not in CLIENT_ASSERTION_TYPES:
        c.warn(
            _join(path, "client_assertion_type"),
            f"{_show(assertion_type)} is not a client assertion type tokenferry knows; it is "
            f"sent as is{_suggest(assertion_type, CLIENT_ASSERTION_TYPES)}",
        )
    requested = c.text(data, "requested_token_type", path, check=_check_uri_token)
    if requested is not None and requested not in TOKEN_TYPES:
        c.warn(
            _join(path, "requested_token_type"),
            f"{_show(requested)} is not an RFC 8693 token type{_suggest(requested, TOKEN_TYPES)}",
        )

    ttl = c.integer(data, "cache_ttl_seconds", path, low=0, high=None)
    if ttl is not None and ttl > MAX_TOKEN_LIFETIME:
        c.warn(
            _join(path, "cache_ttl_seconds"),
            f"{ttl} has no effect: token lifetimes are capped at {MAX_TOKEN_LIFETIME} s anyway",
        )

    subject: SubjectTokenSource | None = None
    subject_path = _join(path, "subject_token")
    if data.get("subject_token") is not None:
        subject = _parse_subject(c, data["subject_token"], subject_path)
        if grant_type == GRANT_CLIENT_CREDENTIALS:
            c.error(
                subject_path,
                f"is only allowed with grant_type 'token_exchange' (grant_type is {grant_type!r})",
            )
    elif grant_type == GRANT_TOKEN_EXCHANGE and subject_path not in c.misspelt:
        c.error(subject_path, "is required when grant_type is 'token_exchange'")

    overrides: list[AudienceOverride] = []
    overrides_path = _join(path, "audience_overrides")
    raw_overrides = data.get("audience_overrides")
    if raw_overrides is not None:
        if not isinstance(raw_overrides, list):
            c.wrong_type(overrides_path, "a list of mappings", raw_overrides)
        else:
            for index, item in enumerate(raw_overrides):
                overrides.append(_parse_override(c, item, f"{overrides_path}[{index}]"))

    return TokenGrant(
        grant_type=grant_type or "",
        token_endpoint=endpoint or "",
        audience=audience,
        scopes=scopes,
        jwt_svid_audience=svid_audience,
        client_assertion_type=assertion_type or JWT_BEARER_ASSERTION,
        requested_token_type=requested or ACCESS_TOKEN_TYPE,
        cache_ttl_seconds=ttl or 0,
        subject_token=subject,
        audience_overrides=tuple(overrides),
    )


def _parse_credential(c: _Checker, value: object, path: str) -> _RawCredential | None:
    data = c.mapping(value, path)
    if data is None:
        return None
    c.check_keys(data, path, _CREDENTIAL_KEYS)
    name = c.text(data, "name", path, required=True, check=_check_credential_name)
    description = c.text(data, "description", path)
    required = c.boolean(data, "required", path, default=False)
    env_vars = c.string_list(
        data, "env_vars", path, check=_check_env_var, what="environment variable names"
    )
    grant = None
    if data.get("token_grant") is not None:
        grant = _parse_grant(c, data["token_grant"], _join(path, "token_grant"))

    style_path = _join(path, "auth_style")
    if grant is not None:
        auth_style = c.choice(data, "auth_style", path, AUTH_STYLES, "bearer")
    else:
        # OpenShell static credentials may use styles tokenferry never injects with; a
        # credential without token_grant is not injected by tokenferry at all.
        auth_style = c.text(data, "auth_style", path) or "bearer"
        if auth_style not in AUTH_STYLES:
            c.warn(
                style_path,
                f"{_show(auth_style)} is kept but not acted on: tokenferry injects only "
                "token_grant credentials, with auth_style 'bearer' or 'header'",
            )
    header_name = c.text(data, "header_name", path, check=_check_header_name)
    if auth_style == "header" and c.absent(data, "header_name", path):
        c.error(_join(path, "header_name"), "is required when auth_style is 'header'")

    # Present with a value: `env_vars: []` (OpenShell's serialised default) declares nothing.
    keys = frozenset(
        k for k, v in data.items() if isinstance(k, str) and v is not None and v not in ("", [], {})
    )
    credential = Credential(
        name=name or "",
        description=description,
        required=required,
        auth_style=auth_style or "bearer",
        header_name=header_name or DEFAULT_HEADER_NAME,
        token_grant=grant,
        env_vars=env_vars,
    )
    return _RawCredential(credential, keys, path)


def _check_credentials(c: _Checker, raws: Sequence[_RawCredential]) -> None:
    """Rules that relate credentials to each other: unique names, subject credentials."""
    first_seen: dict[str, str] = {}
    for raw in raws:
        name = raw.credential.name
        if not name:
            continue
        if name in first_seen:
            c.error(
                _join(raw.path, "name"),
                f"duplicate credential name {_show(name)} (first defined at {first_seen[name]})",
            )
        else:
            first_seen[name] = raw.path
    by_name = {raw.credential.name: raw for raw in reversed(raws) if raw.credential.name}
    reported_broker: set[tuple[str, str]] = set()
    for raw in raws:
        grant = raw.credential.token_grant
        if grant is None or grant.subject_token is None or not grant.subject_token.credential:
            continue
        target = grant.subject_token.credential
        ref_path = f"{raw.path}.token_grant.subject_token.credential"
        if target == raw.credential.name:
            c.error(ref_path, f"must name another credential, not this one ({_show(target)})")
            continue
        subject = by_name.get(target)
        if subject is None:
            names = [n for n in by_name if n != raw.credential.name]
            known = ", ".join(repr(n) for n in names) or "none"
            c.error(
                ref_path,
                f"names no credential of this profile: {_show(target)}{_suggest(target, names)} "
                f"(credentials: {known})",
            )
            continue
        for key in BROKER_ONLY_FORBIDDEN_KEYS:
            if key in subject.keys and (subject.path, key) not in reported_broker:
                reported_broker.add((subject.path, key))
                c.error(
                    _join(subject.path, key),
                    f"credential {_show(target)} is broker-only (the subject token of "
                    f"{_show(raw.credential.name)}) and may not declare {key!r}; it never "
                    "leaves the gateway",
                )


def _parse_endpoint(c: _Checker, value: object, path: str) -> Endpoint:
    data = c.mapping(value, path)
    if data is None:
        return Endpoint(host="")
    c.check_keys(data, path, _ENDPOINT_KEYS)
    host = _parse_host(c, data, path)
    tls = c.choice(data, "tls", path, TLS_MODES, "terminate")
    port = c.integer(data, "port", path, low=1, high=65535)
    glob = c.text(data, "path", path, check=_check_path_glob)
    protocol = c.text(data, "protocol", path)
    return Endpoint(
        host=host,
        port=port if port is not None else DEFAULT_PORTS.get(tls or "terminate", 443),
        path=glob,
        tls=tls or "terminate",
        protocol=protocol,
    )


def _parse_list(
    c: _Checker, data: Mapping[Any, Any], key: str, parse: Callable[[_Checker, object, str], Any]
) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        c.wrong_type(key, "a list of mappings", value)
        return []
    return [parse(c, item, f"{key}[{index}]") for index, item in enumerate(value)]


def parse_profile(data: object, source: str = "<profile>") -> tuple[Profile, tuple[Problem, ...]]:
    """Validate a decoded document; returns the profile and its warnings.

    Raises :class:`ProfileError` holding every error found (never just the first).
    """
    c = _Checker(source)
    if not isinstance(data, dict):
        if data is None:
            c.error("", "the profile is empty; expected a mapping with 'id', 'credentials', …")
        else:
            c.error("", f"a profile must be a mapping, got {_type_name(data)} {_show(data)}")
        raise ProfileError(c.errors, c.warnings)

    c.check_keys(data, "", _TOP_KEYS)
    profile_id = c.text(data, "id", "", required=True, check=_check_profile_id)
    display_name = c.text(data, "display_name", "")
    description = c.text(data, "description", "")
    category = c.text(data, "category", "")

    raws = [r for r in _parse_list(c, data, "credentials", _parse_credential) if r is not None]
    _check_credentials(c, raws)
    endpoints: list[Endpoint] = _parse_list(c, data, "endpoints", _parse_endpoint)

    seen: dict[tuple[str, int, str | None], int] = {}
    for index, endpoint in enumerate(endpoints):
        key = (endpoint.host, endpoint.port, endpoint.path)
        if endpoint.host and key in seen:
            c.warn(f"endpoints[{index}]", f"duplicates endpoints[{seen[key]}]")
        seen.setdefault(key, index)

    credentials = tuple(raw.credential for raw in raws)
    granted = [cr for cr in credentials if cr.token_grant is not None]
    has_overrides = any(cr.token_grant and cr.token_grant.audience_overrides for cr in granted)
    if granted and not endpoints and not has_overrides:
        c.warn("endpoints", "no endpoints: the token_grant credentials are never injected")
    if raws and not granted:
        c.warn(
            "credentials",
            "no credential has a token_grant: tokenferry injects nothing for this profile",
        )
    if len(granted) > 1:
        # Every token_grant credential produces routes for every endpoint (SPEC §3), so
        # they tie on each endpoint and the name decides; almost never what was meant.
        winner = min(cr.name for cr in granted)
        c.warn(
            "credentials",
            f"{len(granted)} credentials have a token_grant: each gets routes for every "
            f"endpoint and only one is injected per request (ties go to {winner!r})",
        )

    if c.errors:
        raise ProfileError(c.errors, c.warnings)
    profile = Profile(
        id=profile_id or "",
        display_name=display_name,
        description=description,
        category=category,
        credentials=credentials,
        endpoints=tuple(endpoints),
    )
    return profile, tuple(c.warnings)


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Checked before merge keys (`<<: *base`) are flattened, so overriding a merged key
    # locally stays legal while writing the same key twice is refused.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {_show(key)}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _yaml_problem(source: str, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"invalid YAML: {problem}"
    if context:
        message += f" ({context})"
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return Problem(source, where, message)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_show(key)}")
        result[key] = value
    return result


def _decode(text: str, source: str) -> object:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PROFILE_BYTES:
        raise ProfileError([Problem(source, "", f"larger than {MAX_PROFILE_BYTES} bytes")])
    if text.lstrip().startswith("{"):
        # JSON first: it reports JSON mistakes better, and YAML rejects tab indentation
        # that JSON allows. Flow-style YAML falls through to the YAML parser.
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as exc:
            json_error: Problem | None = Problem(
                source, f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}"
            )
        except ValueError as exc:
            raise ProfileError([Problem(source, "", f"invalid JSON: {exc}")]) from None
    else:
        json_error = None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ProfileError([json_error or _yaml_problem(source, exc)]) from None


def load_profile_text(text: str, source: str) -> tuple[Profile, tuple[Problem, ...]]:
    """Parse YAML or JSON text and validate it; see :func:`parse_profile`."""
    try:
        data = _decode(text, source)
    except RecursionError:
        # Both parsers recurse per nesting level: a file of brackets is a user error.
        raise ProfileError([Problem(source, "", "nested too deeply to be a profile")]) from None
    return parse_profile(data, source)


def load_profile_file(path: str | Path) -> tuple[Profile, tuple[Problem, ...]]:
    """Read and validate one profile file; unreadable files raise :class:`ProfileError`."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ProfileError([Problem(source, "", "no such file")]) from None
    except IsADirectoryError:
        raise ProfileError([Problem(source, "", "is a directory, not a profile file")]) from None
    except OSError as exc:
        raise ProfileError([Problem(source, "", f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError([Problem(source, "", f"larger than {MAX_PROFILE_BYTES} bytes")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProfileError(
            [Problem(source, "", f"not UTF-8 text (byte {exc.start}: {exc.reason})")]
        ) from None
    return load_profile_text(text, source)


PROFILE_SUFFIXES = (".yaml", ".yml", ".json")


def profile_files(directory: Path) -> list[Path]:
    """The profile files of a directory, sorted; hidden files (editor backups) skipped."""
    return sorted(
        file
        for file in directory.iterdir()
        if file.suffix.lower() in PROFILE_SUFFIXES
        and not file.name.startswith(".")
        and file.is_file()
    )


def load_profile_dir(path: str | Path) -> tuple[Profile, ...]:
    """Every ``*.yaml``/``*.yml``/``*.json`` profile in a directory, sorted by file name.

    Errors of all files are collected into one :class:`ProfileError`; two files with the
    same profile id are an error. Warnings are logged.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ProfileError([Problem(str(directory), "", "not a directory")])
    errors: list[Problem] = []
    warnings: list[Problem] = []
    profiles: list[Profile] = []
    first_file: dict[str, str] = {}
    for file in profile_files(directory):
        try:
            profile, found = load_profile_file(file)
        except ProfileError as exc:
            errors.extend(exc.problems)
            warnings.extend(exc.warnings)
            continue
        warnings.extend(found)
        if profile.id in first_file:
            errors.append(
                Problem(
                    str(file),
                    "id",
                    f"duplicate profile id {_show(profile.id)} (also in {first_file[profile.id]})",
                )
            )
            continue
        first_file[profile.id] = str(file)
        profiles.append(profile)
    for warning in warnings:
        log.warning("profile warning: %s", warning)
    if errors:
        raise ProfileError(errors, warnings)
    return tuple(profiles)


# --------------------------------------------------------------------------- dumping


def _grant_to_dict(grant: TokenGrant) -> dict[str, Any]:
    result: dict[str, Any] = {
        "grant_type": grant.grant_type,
        "token_endpoint": grant.token_endpoint,
    }
    if grant.audience is not None:
        result["audience"] = grant.audience
    result["scopes"] = list(grant.scopes)
    if grant.jwt_svid_audience is not None:
        result["jwt_svid_audience"] = grant.jwt_svid_audience
    result["client_assertion_type"] = grant.client_assertion_type
    result["requested_token_type"] = grant.requested_token_type
    result["cache_ttl_seconds"] = grant.cache_ttl_seconds
    if grant.subject_token is not None:
        result["subject_token"] = {
            "source": grant.subject_token.source,
            "credential": grant.subject_token.credential,
            "subject_token_type": grant.subject_token.subject_token_type,
        }
    if grant.audience_overrides:
        overrides = []
        for override in grant.audience_overrides:
            item: dict[str, Any] = {"host": override.host, "port": override.port}
            if override.path is not None:
                item["path"] = override.path
            if override.audience is not None:
                item["audience"] = override.audience
            item["scopes"] = list(override.scopes)
            overrides.append(item)
        result["audience_overrides"] = overrides
    return result


def _credential_to_dict(credential: Credential) -> dict[str, Any]:
    result: dict[str, Any] = {"name": credential.name}
    if credential.description is not None:
        result["description"] = credential.description
    result["required"] = credential.required
    if credential.broker_only:
        # A broker-only credential may not carry injection fields; emitting the
        # defaults would make the dict fail validation when parsed again.
        return result
    result["auth_style"] = credential.auth_style
    result["header_name"] = credential.header_name
    if credential.env_vars:
        result["env_vars"] = list(credential.env_vars)
    if credential.token_grant is not None:
        result["token_grant"] = _grant_to_dict(credential.token_grant)
    return result


def _endpoint_to_dict(endpoint: Endpoint) -> dict[str, Any]:
    result: dict[str, Any] = {"host": endpoint.host, "port": endpoint.port}
    if endpoint.path is not None:
        result["path"] = endpoint.path
    result["tls"] = endpoint.tls
    if endpoint.protocol is not None:
        result["protocol"] = endpoint.protocol
    return result


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """A JSON-able dict with every default spelled out; ``parse_profile`` accepts it."""
    result: dict[str, Any] = {"id": profile.id}
    for key in ("display_name", "description", "category"):
        value = getattr(profile, key)
        if value is not None:
            result[key] = value
    result["credentials"] = [_credential_to_dict(c) for c in profile.credentials]
    result["endpoints"] = [_endpoint_to_dict(e) for e in profile.endpoints]
    return result
