"""Where the supervisor's configuration comes from.

A *config source* produces ``SupervisorConfig`` values: the sandbox name and the attached
providers, each with its name, revision and parsed ``Profile``. The runner builds a route
table from each config it receives and swaps it in atomically. Two sources are planned:

- ``FileConfigSource`` (this module): ``--profiles DIR`` + ``--providers FILE``,
  client_credentials only, read once at startup.
- ``GatewayConfigSource`` (this module): ``GET /v1/supervisor/config`` polled with
  ``If-None-Match``, yielding a new config whenever the gateway's answer changes.

Providers file format (YAML or JSON)::

    sandbox: ci-runner-7          # optional, used in log lines (--sandbox wins)
    providers:
      - name: orders              # required, unique
        profile: orders-api       # required, the id of a profile in --profiles DIR
        revision: 1               # optional positive integer, default 1
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from proxy.routes import ProviderProfile
from tokenferry.profiles import GRANT_TOKEN_EXCHANGE, Profile, ProfileError, load_profile_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PROVIDER_KEYS = ("name", "profile", "revision")
_TOP_KEYS = ("sandbox", "providers")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_host: str = "127.0.0.1") -> Address:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = default_host, text
        host = host.strip("[]") or default_host
        try:
            number = int(port)
        except ValueError:
            raise ValueError(f"{text!r}: expected HOST:PORT") from None
        if not 0 <= number <= 65535:
            raise ValueError(f"{text!r}: port must be 0-65535")
        return cls(host, number)


class ConfigError(ValueError):
    """The supervisor configuration is unusable; the message names file and field."""


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    revision: int
    profile: Profile
    # Gateway mode: expiry (epoch seconds) of the provider's stored credentials by name.
    credential_expiry: tuple[tuple[str, float | None], ...] = ()

    def as_route_source(self) -> ProviderProfile:
        return ProviderProfile(self.name, self.revision, self.profile, self.credential_expiry)


@dataclass(frozen=True)
class SupervisorConfig:
    sandbox: str | None
    providers: tuple[ProviderConfig, ...]
    # Gateway mode: the sandbox's SPIFFE ID as the gateway knows it, and the answer's ETag.
    spiffe_id: str | None = None
    etag: str | None = None


class ConfigSource(Protocol):
    def describe(self) -> str:
        """Where the configuration comes from, for log lines."""
        ...

    async def load(self) -> SupervisorConfig:
        """The configuration at startup; raises ConfigError when it is unusable."""
        ...

    def updates(self) -> AsyncIterator[SupervisorConfig]:
        """Later configurations, each yielded only when something changed."""
        ...


class FileConfigSource:
    def __init__(self, profiles_dir: Path, providers_file: Path) -> None:
        self.profiles_dir = profiles_dir
        self.providers_file = providers_file

    def describe(self) -> str:
        return f"files (profiles {self.profiles_dir}, providers {self.providers_file})"

    async def load(self) -> SupervisorConfig:
        return load_file_config(self.profiles_dir, self.providers_file)

    async def updates(self) -> AsyncIterator[SupervisorConfig]:
        # Files are read once; restart the supervisor to change them.
        return
        yield  # pragma: no cover  (makes this an async generator)


def load_file_config(profiles_dir: Path, providers_file: Path) -> SupervisorConfig:
    profiles = _load_profiles(profiles_dir)
    return parse_providers(_read_structured(providers_file), str(providers_file), profiles)


def _load_profiles(profiles_dir: Path) -> dict[str, Profile]:
    if not profiles_dir.is_dir():
        raise ConfigError(f"{profiles_dir}: --profiles must be a directory of profile files")
    try:
        loaded = load_profile_dir(profiles_dir)
    except ProfileError as exc:
        problems = [str(p) for p in exc.problems if p.severity == "error"] or [str(exc)]
        raise ConfigError("invalid profiles:\n  " + "\n  ".join(problems)) from None
    except OSError as exc:
        raise ConfigError(f"{profiles_dir}: cannot read profiles: {exc.strerror}") from None
    return {profile.id: profile for profile in loaded}


def _read_structured(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read providers file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML/JSON{where}") from None
    except RecursionError:
        # The YAML parser recurses per nesting level; a file of brackets is a user error.
        raise ConfigError(f"{path}: nested too deeply to be a providers file") from None


def parse_providers(data: object, source: str, profiles: dict[str, Profile]) -> SupervisorConfig:
    """Validate a providers document; every problem is reported, each naming its field."""
    errors: list[str] = []

    def err(path: str, message: str) -> None:
        errors.append(f"{source}: {path}: {message}")

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'providers' list")
    for key in data:
        if key not in _TOP_KEYS:
            err(str(key), f"unknown key (expected one of {', '.join(_TOP_KEYS)})")
    sandbox = data.get("sandbox")
    if sandbox is not None and (not isinstance(sandbox, str) or not sandbox):
        err("sandbox", f"must be a non-empty string, got {sandbox!r}")
        sandbox = None
    raw_providers = data.get("providers")
    providers: list[ProviderConfig] = []
    if not isinstance(raw_providers, list):
        err("providers", "required, a list of {name, profile, revision}")
        raw_providers = []
    seen: set[str] = set()
    for i, item in enumerate(raw_providers):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str):
            if name in seen:
                err(f"providers[{i}].name", f"duplicate provider name {name!r}")
                continue
            seen.add(name)
        provider = _parse_provider(item, f"providers[{i}]", profiles, err)
        if provider is not None:
            providers.append(provider)
    if errors:
        raise ConfigError("\n".join(errors))
    return SupervisorConfig(sandbox=sandbox, providers=tuple(providers))


def _parse_provider(
    item: object, path: str, profiles: dict[str, Profile], err: Any
) -> ProviderConfig | None:
    if not isinstance(item, dict):
        err(path, f"must be a mapping with name and profile, got {item!r}")
        return None
    ok = True
    for key in item:
        if key not in _PROVIDER_KEYS:
            err(f"{path}.{key}", f"unknown key (expected one of {', '.join(_PROVIDER_KEYS)})")
            ok = False
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        err(f"{path}.name", f"required, letters/digits/'.-_' (max 63), got {name!r}")
        ok = False
    revision = item.get("revision", 1)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        err(f"{path}.revision", f"must be a positive integer, got {revision!r}")
        ok = False
    profile_id = item.get("profile")
    profile = profiles.get(profile_id) if isinstance(profile_id, str) else None
    if profile is None:
        known = ", ".join(sorted(profiles)) or "none"
        err(
            f"{path}.profile",
            f"no profile {profile_id!r} in the profiles directory (known: {known})",
        )
        return None
    for cred in profile.credentials:
        grant = cred.token_grant
        if grant is not None and grant.grant_type == GRANT_TOKEN_EXCHANGE:
            err(
                f"{path}.profile",
                f"profile {profile.id!r} credential {cred.name!r} uses grant_type "
                "token_exchange, which needs a gateway; local files support "
                "client_credentials only",
            )
            ok = False
    if not ok or not isinstance(name, str) or not isinstance(revision, int):
        return None
    return ProviderConfig(name=name, revision=revision, profile=profile)
