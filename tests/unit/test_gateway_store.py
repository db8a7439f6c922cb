from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.crypto import Keyring
from gateway.store import (
    SCHEMA_VERSION,
    CredentialWrite,
    DatabaseError,
    Duplicate,
    InUse,
    Missing,
    Store,
    parse_database_option,
)

PROFILE = {"id": "orders-api", "credentials": [], "endpoints": []}


def ring(seed: int = 1, *older: int) -> Keyring:
    return Keyring([bytes([seed]) * 32, *(bytes([o]) * 32 for o in older)])


async def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    store = await Store.open(path, ring())
    assert await store.schema_version() == SCHEMA_VERSION
    await store.close()
    store = await Store.open(path, ring())
    assert await store.schema_version() == SCHEMA_VERSION
    await store.close()
    with sqlite3.connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    store = await Store.open(path, ring())
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (999, 'future')")
    with pytest.raises(DatabaseError, match="newer than this build"):
        await Store.open(path, ring())


async def test_failed_transaction_writes_nothing(tmp_path: Path) -> None:
    store = await Store.open(str(tmp_path / "g.db"), ring())
    async with store.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.provider_insert("p", "orders-api", "alice")
            await tx.credential_put("p", "user_token", CredentialWrite("secret", None))
            raise RuntimeError("found a problem late")
    async with store.read() as tx:
        assert await tx.provider_get("p") is None
        assert await tx.credential_value("p", "user_token") == (None, None)
    await store.close()


async def test_records_constraints_and_values(tmp_path: Path) -> None:
    store = await Store.open(str(tmp_path / "g.db"), ring())
    async with store.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.provider_insert("p", "orders-api", "alice")
        await tx.credential_put("p", "user_token", CredentialWrite("secret", 123.0))
        await tx.credential_put("p", "other", CredentialWrite(None, None))
        assert await tx.provider_update("p") == 2
        await tx.sandbox_put("s", "spiffe://example.org/sandbox/s", "alice")
        await tx.sandbox_attach("s", "p")
    with pytest.raises(Duplicate):
        async with store.transaction() as tx:
            await tx.provider_insert("p", "orders-api", "bob")
    with pytest.raises(Missing, match="profile 'nope'"):
        async with store.transaction() as tx:
            await tx.provider_insert("q", "nope", "bob")
    with pytest.raises(Duplicate, match="already registered"):
        async with store.transaction() as tx:
            await tx.sandbox_put("t", "spiffe://example.org/sandbox/s", "bob")
    with pytest.raises(InUse):
        async with store.transaction() as tx:
            await tx.profile_delete("orders-api")
    async with store.read() as tx:
        provider = await tx.provider_get("p")
        assert provider is not None and provider.revision == 2
        assert [(c.name, c.has_value) for c in provider.credentials] == [
            ("other", False),
            ("user_token", True),
        ]
        assert await tx.credential_value("p", "user_token") == ("secret", 123.0)
        sandbox = await tx.sandbox_by_spiffe_id("spiffe://example.org/sandbox/s")
        assert sandbox is not None and sandbox.providers == ("p",)
    # Deleting the provider detaches it from sandboxes and removes its credentials.
    async with store.transaction() as tx:
        await tx.provider_delete("p")
    async with store.read() as tx:
        sandbox = await tx.sandbox_get("s")
        assert sandbox is not None and sandbox.providers == ()
        assert await tx.credential_value("p", "user_token") == (None, None)
    await store.close()


async def test_wrong_key_is_refused_and_rotation_reseals(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    store = await Store.open(path, ring(1))
    async with store.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.provider_insert("p", "orders-api", "alice")
        await tx.credential_put("p", "user_token", CredentialWrite("secret", None))
    await store.close()
    with pytest.raises(DatabaseError, match="does not match"):
        await Store.open(path, ring(2))
    # New key first, old key second: opens, and every value is re-sealed with the new key.
    store = await Store.open(path, ring(2, 1))
    await store.close()
    store = await Store.open(path, ring(2))
    async with store.read() as tx:
        assert await tx.credential_value("p", "user_token") == ("secret", None)
    await store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("g.db"))
    assert b"secret" not in raw


def test_parse_database_option(tmp_path: Path) -> None:
    assert parse_database_option(str(tmp_path / "a.db")) == str(tmp_path / "a.db")
    assert parse_database_option(f"sqlite:///{tmp_path}/a.db") == f"{tmp_path}/a.db"
    with pytest.raises(DatabaseError, match="not supported in this build"):
        parse_database_option("postgresql://u@h/db")
    with pytest.raises(DatabaseError, match="unknown database URL scheme"):
        parse_database_option("mysql://h/db")
    with pytest.raises(DatabaseError, match="does not exist"):
        parse_database_option(str(tmp_path / "missing-dir" / "a.db"))
