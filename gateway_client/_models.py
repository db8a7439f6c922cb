"""Typed values of the gateway API: what requests take and what answers hold."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway_client._exceptions import GatewayProtocolError
from tokenferry.profiles import Problem, Profile, parse_profile


def _bad(what: str) -> GatewayProtocolError:
    return GatewayProtocolError("protocol_error", f"unexpected gateway answer: {what}", 0)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _bad(f"{key!r} is not a string")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(f"{key!r} is not a string")
    return value


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{key!r} is not an integer")
    return value


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{what} is not a list")
    return value


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise _bad(f"{value!r} is not an ISO 8601 time") from None


def format_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware (e.g. datetime.now(UTC))")
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuthConfig:
    """``GET /v1/auth/config``: how users log in and which audience supervisors use."""

    issuer: str
    client_id: str
    audience: str
    supervisor_audience: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuthConfig:
        return cls(
            issuer=_str(data, "issuer"),
            client_id=_str(data, "client_id"),
            audience=_str(data, "audience"),
            supervisor_audience=_str(data, "supervisor_audience"),
        )


@dataclass(frozen=True)
class CredentialInput:
    """A credential to store: ``value`` None records the name without a value."""

    value: str | None = field(repr=False)
    expires_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "expires_at": format_time(self.expires_at) if self.expires_at else None,
        }


@dataclass(frozen=True)
class CredentialInfo:
    """A stored credential as reads show it: never its value."""

    name: str
    has_value: bool
    expires_at: datetime | None

    @classmethod
    def from_json(cls, data: object) -> CredentialInfo:
        item = _dict(data, "credential")
        has_value = item.get("has_value")
        if not isinstance(has_value, bool):
            raise _bad("'has_value' is not a boolean")
        return cls(_str(item, "name"), has_value, parse_time(_opt_str(item, "expires_at")))


@dataclass(frozen=True)
class ProfileRecord:
    id: str
    display_name: str | None
    description: str | None
    category: str | None
    data: dict[str, Any]
    source: str
    created_at: datetime | None
    warnings: tuple[Problem, ...] = ()

    def profile(self) -> Profile:
        """The profile as ``tokenferry.profiles.Profile`` (parsed locally)."""
        profile, _ = parse_profile(self.data, source=f"gateway profile {self.id}")
        return profile

    @classmethod
    def from_json(cls, data: object) -> ProfileRecord:
        item = _dict(data, "profile record")
        warnings = tuple(
            Problem(
                source=str(w.get("source", "")),
                path=str(w.get("path", "")),
                message=str(w.get("message", "")),
                severity="warning",
            )
            for w in _list(item.get("warnings", []), "warnings")
            if isinstance(w, dict)
        )
        return cls(
            id=_str(item, "id"),
            display_name=_opt_str(item, "display_name"),
            description=_opt_str(item, "description"),
            category=_opt_str(item, "category"),
            data=_dict(item.get("profile"), "'profile'"),
            source=_str(item, "source"),
            created_at=parse_time(_opt_str(item, "created_at")),
            warnings=warnings,
        )


@dataclass(frozen=True)
class ProviderRecord:
    name: str
    profile: str
    owner: str
    revision: int
    credentials: tuple[CredentialInfo, ...]
    created_at: datetime | None
    updated_at: datetime | None

    def credential(self, name: str) -> CredentialInfo | None:
        return next((c for c in self.credentials if c.name == name), None)

    @classmethod
    def from_json(cls, data: object) -> ProviderRecord:
        item = _dict(data, "provider record")
        return cls(
            name=_str(item, "name"),
            profile=_str(item, "profile"),
            owner=_str(item, "owner"),
            revision=_int(item, "revision"),
            credentials=tuple(
                CredentialInfo.from_json(c) for c in _list(item.get("credentials"), "credentials")
            ),
            created_at=parse_time(_opt_str(item, "created_at")),
            updated_at=parse_time(_opt_str(item, "updated_at")),
        )


@dataclass(frozen=True)
class SandboxRecord:
    name: str
    spiffe_id: str
    owner: str
    providers: tuple[str, ...]
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_json(cls, data: object) -> SandboxRecord:
        item = _dict(data, "sandbox record")
        providers = _list(item.get("providers"), "providers")
        if not all(isinstance(p, str) for p in providers):
            raise _bad("'providers' is not a list of names")
        return cls(
            name=_str(item, "name"),
            spiffe_id=_str(item, "spiffe_id"),
            owner=_str(item, "owner"),
            providers=tuple(providers),
            created_at=parse_time(_opt_str(item, "created_at")),
            updated_at=parse_time(_opt_str(item, "updated_at")),
        )


@dataclass(frozen=True)
class SupervisorProvider:
    """One provider attached to the supervisor's sandbox."""

    name: str
    revision: int
    profile_data: dict[str, Any]
    credentials: tuple[CredentialInfo, ...]

    def profile(self) -> Profile:
        """The profile as ``tokenferry.profiles.Profile`` (raises ProfileError if invalid)."""
        profile, _ = parse_profile(self.profile_data, source=f"gateway provider {self.name}")
        return profile


@dataclass(frozen=True)
class SupervisorConfig:
    """``GET /v1/supervisor/config``; ``etag`` goes back as ``If-None-Match`` next time."""

    sandbox_name: str
    spiffe_id: str
    providers: tuple[SupervisorProvider, ...]
    etag: str | None

    @classmethod
    def from_json(cls, data: object, etag: str | None) -> SupervisorConfig:
        item = _dict(data, "supervisor config")
        sandbox = _dict(item.get("sandbox"), "'sandbox'")
        providers = []
        for raw in _list(item.get("providers"), "providers"):
            entry = _dict(raw, "provider")
            providers.append(
                SupervisorProvider(
                    name=_str(entry, "name"),
                    revision=_int(entry, "revision"),
                    profile_data=_dict(entry.get("profile"), "'profile'"),
                    credentials=tuple(
                        CredentialInfo.from_json(c)
                        for c in _list(entry.get("credentials"), "credentials")
                    ),
                )
            )
        return cls(
            sandbox_name=_str(sandbox, "name"),
            spiffe_id=_str(sandbox, "spiffe_id"),
            providers=tuple(providers),
            etag=etag,
        )
