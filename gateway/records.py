"""The rules about profiles, providers and sandboxes (who may do what, what is valid).

Handlers in ``gateway.api`` parse requests into the plain values these functions take;
each operation runs in one store transaction, checks and writes together, so a request
refused halfway through has written nothing.

Ownership: a provider is owned by the user who created it; a sandbox likewise. Only the
owner or an admin may change or delete either, and a provider may be attached only to a
sandbox by someone who owns (or administers) that provider — otherwise one user could
point their own sandbox at another user's stored subject token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from gateway.auth import User
from gateway.errors import ApiError, conflict, forbidden, invalid_request, not_found
from gateway.store import (
    CredentialWrite,
    Duplicate,
    InUse,
    Missing,
    ProfileRow,
    ProviderRow,
    SandboxRow,
    Store,
    StoreError,
    Tx,
)
from gateway.trust import TrustedEndpoints
from tokenferry.profiles import Profile, parse_profile, profile_to_dict

log = logging.getLogger("tokenferry.gateway.records")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def store_error(exc: StoreError) -> ApiError:
    if isinstance(exc, Missing):
        return not_found(str(exc))
    if isinstance(exc, Duplicate):
        return conflict(str(exc))
    if isinstance(exc, InUse):
        return ApiError("failed_precondition", str(exc))
    return ApiError("internal", "storage error")


@asynccontextmanager
async def _transaction(store: Store) -> AsyncIterator[Tx]:
    """One store transaction, with storage failures answered as API errors."""
    try:
        async with store.transaction() as tx:
            yield tx
    except StoreError as exc:
        raise store_error(exc) from None


def check_name(kind: str, value: str) -> None:
    if not NAME_RE.fullmatch(value):
        raise invalid_request(
            f"{kind} name {value[:80]!r} is invalid (lower-case letters, digits, '.', '_', '-'; "
            "starting with a letter or digit; at most 63 characters)"
        )


def profile_from_row(row: ProfileRow) -> Profile:
    profile, _warnings = parse_profile(row.parsed, source=f"profile {row.id}")
    return profile


def profile_view(row: ProfileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "display_name": row.parsed.get("display_name"),
        "description": row.parsed.get("description"),
        "category": row.parsed.get("category"),
        "profile": row.parsed,
        "source": row.source,
        "created_at": row.created_at,
    }


def credentials_view(profile: Profile | None, row: ProviderRow) -> list[dict[str, Any]]:
    """Every storable credential of the profile plus any stored one; never a value."""
    stored = {c.name: c for c in row.credentials}
    names: list[str] = []
    if profile is not None:
        names = [c.name for c in profile.credentials if c.token_grant is None]
    names += [n for n in stored if n not in names]
    view = []
    for name in names:
        cred = stored.get(name)
        view.append(
            {
                "name": name,
                "has_value": bool(cred and cred.has_value),
                "expires_at": iso(cred.expires_at) if cred else None,
            }
        )
    return view


def provider_view(row: ProviderRow, profile: Profile | None) -> dict[str, Any]:
    return {
        "name": row.name,
        "profile": row.profile_id,
        "owner": row.owner,
        "revision": row.revision,
        "credentials": credentials_view(profile, row),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def sandbox_view(row: SandboxRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "spiffe_id": row.spiffe_id,
        "owner": row.owner,
        "providers": list(row.providers),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _may_change(user: User, owner: str) -> bool:
    return user.admin or user.sub == owner


async def _owned_provider(tx: Tx, user: User, name: str) -> ProviderRow:
    """The provider, if this user may change it."""
    row = await tx.provider_get(name)
    if row is None:
        raise not_found(f"provider {name!r} does not exist")
    if not _may_change(user, row.owner):
        raise forbidden(f"provider {name!r} belongs to another user")
    return row


async def _owned_sandbox(tx: Tx, user: User, name: str) -> SandboxRow:
    """The sandbox, if this user may change it."""
    row = await tx.sandbox_get(name)
    if row is None:
        raise not_found(f"sandbox {name!r} does not exist")
    if not _may_change(user, row.owner):
        raise forbidden(f"sandbox {name!r} belongs to another user")
    return row


# --- profiles ---------------------------------------------------------------------


async def create_profile(store: Store, profile: Profile, source: str) -> dict[str, Any]:
    async with _transaction(store) as tx:
        await tx.profile_insert(profile.id, source, profile_to_dict(profile))
        row = await tx.profile_get(profile.id)
    assert row is not None
    return profile_view(row)


async def get_profile(store: Store, profile_id: str) -> dict[str, Any]:
    async with store.read() as tx:
        row = await tx.profile_get(profile_id)
    if row is None:
        raise not_found(f"profile {profile_id!r} does not exist")
    return profile_view(row)


async def list_profiles(store: Store) -> list[dict[str, Any]]:
    async with store.read() as tx:
        return [profile_view(r) for r in await tx.profile_list()]


async def delete_profile(store: Store, profile_id: str) -> None:
    async with _transaction(store) as tx:
        await tx.profile_delete(profile_id)


# --- providers --------------------------------------------------------------------


def _check_credential_writes(
    profile: Profile, writes: Mapping[str, CredentialWrite | None]
) -> None:
    for name, write in writes.items():
        credential = profile.credential(name)
        field = f"credentials.{name}"
        if credential is None:
            known = ", ".join(c.name for c in profile.credentials if c.token_grant is None)
            raise invalid_request(
                f"{field}: profile {profile.id!r} has no credential {name!r}"
                + (f" (storable: {known})" if known else ""),
                field=field,
            )
        if credential.token_grant is not None and write is not None:
            raise invalid_request(
                f"{field}: credential {name!r} is obtained by a token grant and cannot be stored",
                field=field,
            )


async def _profile_for(tx: Tx, profile_id: str) -> Profile:
    row = await tx.profile_get(profile_id)
    if row is None:
        raise not_found(f"profile {profile_id!r} does not exist")
    return profile_from_row(row)


async def create_provider(
    store: Store,
    user: User,
    *,
    name: str,
    profile_id: str,
    credentials: Mapping[str, CredentialWrite],
    owner: str | None,
) -> dict[str, Any]:
    check_name("provider", name)
    if owner is not None and not user.admin and owner != user.sub:
        raise forbidden("only an admin may create a provider owned by someone else")
    async with _transaction(store) as tx:
        profile = await _profile_for(tx, profile_id)
        _check_credential_writes(profile, credentials)
        await tx.provider_insert(name, profile_id, owner or user.sub)
        for cred_name, write in credentials.items():
            await tx.credential_put(name, cred_name, write)
        row = await tx.provider_get(name)
    assert row is not None
    return provider_view(row, profile)


async def get_provider(store: Store, name: str) -> dict[str, Any]:
    async with store.read() as tx:
        row = await tx.provider_get(name)
        if row is None:
            raise not_found(f"provider {name!r} does not exist")
        profile_row = await tx.profile_get(row.profile_id)
    return provider_view(row, profile_from_row(profile_row) if profile_row else None)


async def list_providers(store: Store) -> list[dict[str, Any]]:
    async with store.read() as tx:
        rows = await tx.provider_list()
        profiles = {p.id: profile_from_row(p) for p in await tx.profile_list()}
    return [provider_view(r, profiles.get(r.profile_id)) for r in rows]


async def update_provider(
    store: Store,
    user: User,
    name: str,
    *,
    profile_id: str | None,
    credentials: Mapping[str, CredentialWrite | None],
) -> dict[str, Any]:
    async with _transaction(store) as tx:
        row = await _owned_provider(tx, user, name)
        profile = await _profile_for(tx, profile_id or row.profile_id)
        _check_credential_writes(profile, credentials)
        for cred_name, write in credentials.items():
            if write is None:
                await tx.credential_delete(name, cred_name)
            else:
                await tx.credential_put(name, cred_name, write)
        if profile_id is not None and profile_id != row.profile_id:
            # Stored values must still be credentials of the new profile.
            current = await tx.provider_get(name)
            assert current is not None
            _check_credential_writes(
                profile, {c.name: CredentialWrite(None, None) for c in current.credentials}
            )
        await tx.provider_update(name, profile_id=profile_id)
        updated = await tx.provider_get(name)
    assert updated is not None
    return provider_view(updated, profile)


async def delete_provider(store: Store, user: User, name: str) -> None:
    async with _transaction(store) as tx:
        await _owned_provider(tx, user, name)
        await tx.provider_delete(name)


# --- sandboxes --------------------------------------------------------------------


async def _check_attach(tx: Tx, user: User, provider: str, already: Sequence[str]) -> None:
    row = await tx.provider_get(provider)
    if row is None:
        raise not_found(f"provider {provider!r} does not exist")
    if provider not in already and not _may_change(user, row.owner):
        raise forbidden(
            f"provider {provider!r} belongs to another user; only its owner or an admin "
            "may attach it to a sandbox"
        )


async def put_sandbox(
    store: Store,
    user: User,
    name: str,
    *,
    spiffe_id: str,
    providers: Sequence[str] | None,
) -> tuple[dict[str, Any], bool]:
    """Create or update; returns the view and whether it was created."""
    check_name("sandbox", name)
    async with _transaction(store) as tx:
        existing = await tx.sandbox_get(name)
        if existing is not None and not _may_change(user, existing.owner):
            raise forbidden(f"sandbox {name!r} belongs to another user")
        already = existing.providers if existing else ()
        await tx.sandbox_put(name, spiffe_id, existing.owner if existing else user.sub)
        if providers is not None:
            for provider in providers:
                await _check_attach(tx, user, provider, already)
            await tx.sandbox_set_providers(name, providers)
        row = await tx.sandbox_get(name)
    assert row is not None
    return sandbox_view(row), existing is None


async def attach(store: Store, user: User, name: str, provider: str) -> dict[str, Any]:
    async with _transaction(store) as tx:
        existing = await _owned_sandbox(tx, user, name)
        await _check_attach(tx, user, provider, existing.providers)
        await tx.sandbox_attach(name, provider)
        row = await tx.sandbox_get(name)
    assert row is not None
    return sandbox_view(row)


async def detach(store: Store, user: User, name: str, provider: str) -> dict[str, Any]:
    async with _transaction(store) as tx:
        await _owned_sandbox(tx, user, name)
        if not await tx.sandbox_detach(name, provider):
            raise not_found(f"provider {provider!r} is not attached to sandbox {name!r}")
        row = await tx.sandbox_get(name)
    assert row is not None
    return sandbox_view(row)


async def get_sandbox(store: Store, name: str) -> dict[str, Any]:
    async with store.read() as tx:
        row = await tx.sandbox_get(name)
    if row is None:
        raise not_found(f"sandbox {name!r} does not exist")
    return sandbox_view(row)


async def list_sandboxes(store: Store) -> list[dict[str, Any]]:
    async with store.read() as tx:
        return [sandbox_view(r) for r in await tx.sandbox_list()]


async def delete_sandbox(store: Store, user: User, name: str) -> None:
    async with _transaction(store) as tx:
        await _owned_sandbox(tx, user, name)
        await tx.sandbox_delete(name)


# --- supervisor -------------------------------------------------------------------


async def supervisor_config(
    store: Store, spiffe_id: str, trusted: TrustedEndpoints | None = None
) -> tuple[dict[str, Any], str]:
    """The sandbox's configuration and its ETag (a hash of exactly that content).

    With ``trusted``, a provider whose profile names an untrusted token endpoint (stored
    before the rule or before the operator changed it) is left out: a supervisor would
    send its SVID and the intermediate token there.
    """
    async with store.read() as tx:
        sandbox = await tx.sandbox_by_spiffe_id(spiffe_id)
        if sandbox is None:
            raise forbidden(f"SPIFFE ID {spiffe_id!r} is not a registered sandbox")
        providers = []
        for name in sandbox.providers:
            row = await tx.provider_get(name)
            if row is None:
                continue
            profile_row = await tx.profile_get(row.profile_id)
            if profile_row is None:
                continue
            profile = profile_from_row(profile_row)
            if trusted is not None and trusted.profile_problems(profile):
                log.warning(
                    "provider left out of a supervisor's configuration: its profile names "
                    "an untrusted token endpoint",
                    extra={"provider": row.name, "profile": profile.id, "sandbox": sandbox.name},
                )
                continue
            providers.append(
                {
                    "name": row.name,
                    "revision": row.revision,
                    "profile": profile_row.parsed,
                    "credentials": credentials_view(profile, row),
                }
            )
    body = {
        "sandbox": {"name": sandbox.name, "spiffe_id": sandbox.spiffe_id},
        "providers": providers,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(canonical).hexdigest()[:32] + '"'
    return body, etag
