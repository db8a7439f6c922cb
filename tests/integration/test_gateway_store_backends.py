"""The gateway store on both backends: SQLite files and a real PostgreSQL server.

Every test runs once per backend against the same ``Store``/``Tx`` API. "Two replicas"
are two ``Store`` objects open on one database at the same time, each with its own
connection(s), which is exactly what two gateway processes have.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from gateway.crypto import Keyring
from gateway.store import (
    SCHEMA_VERSION,
    CredentialWrite,
    Database,
    DatabaseError,
    Duplicate,
    InUse,
    Missing,
    Store,
)
from tests.support import postgres as postgres_support
from tests.support.postgres import PostgresCluster

PROFILE = {"id": "orders-api", "credentials": [], "endpoints": []}
OTHER_PROFILE = {"id": "billing-api", "credentials": [], "endpoints": []}
SECRET = "subject-token-7f3a9c-never-stored-in-clear"


def ring(seed: int = 1, *older: int) -> Keyring:
    return Keyring([bytes([seed]) * 32, *(bytes([o]) * 32 for o in older)])


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return Database.sqlite(str(tmp_path / "g.db"))
    # Only the PostgreSQL half of the suite starts (and needs) the server.
    return Database("postgresql", request.getfixturevalue("postgres_url"))


async def raw_execute(database: Database, sql: str) -> None:
    """A statement outside the store, as an operator (or another version) would run it."""
    if database.kind == "sqlite":
        with sqlite3.connect(database.location) as conn:
            conn.execute(sql)
        return
    conn = await asyncpg.connect(database.location)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def raw_versions(database: Database) -> list[int]:
    sql = "SELECT version FROM schema_version ORDER BY version"
    if database.kind == "sqlite":
        with sqlite3.connect(database.location) as conn:
            return [row[0] for row in conn.execute(sql)]
    conn = await asyncpg.connect(database.location)
    try:
        return [row["version"] for row in await conn.fetch(sql)]
    finally:
        await conn.close()


def raw_bytes(database: Database, request: pytest.FixtureRequest) -> bytes:
    """Everything the database holds, as stored: the files, or the server's dump."""
    if database.kind == "sqlite":
        path = Path(database.location)
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.pg_dump(database.location.rsplit("/", 1)[1])


async def test_migrations_are_recorded_and_idempotent(database: Database) -> None:
    store = await Store.open(database, ring())
    assert await store.schema_version() == SCHEMA_VERSION
    await store.close()
    store = await Store.open(database, ring())
    assert await store.schema_version() == SCHEMA_VERSION
    await store.close()
    assert await raw_versions(database) == list(range(1, SCHEMA_VERSION + 1))


async def test_replicas_starting_at_once_migrate_once(database: Database) -> None:
    stores = await asyncio.gather(*(Store.open(database, ring()) for _ in range(4)))
    try:
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION] * 4
        assert await raw_versions(database) == list(range(1, SCHEMA_VERSION + 1))
        # They all agreed on one key check: each can read what another sealed.
        async with stores[0].transaction() as tx:
            await tx.profile_insert("orders-api", "src", PROFILE)
            await tx.provider_insert("p", "orders-api", "alice")
            await tx.credential_put("p", "user_token", CredentialWrite(SECRET, None))
        async with stores[3].read() as tx:
            assert await tx.credential_value("p", "user_token") == (SECRET, None)
    finally:
        for store in stores:
            await store.close()


async def test_newer_schema_is_refused(database: Database) -> None:
    store = await Store.open(database, ring())
    await store.close()
    await raw_execute(database, "INSERT INTO schema_version VALUES (999, 'future')")
    with pytest.raises(DatabaseError, match="newer than this build"):
        await Store.open(database, ring())


async def test_failed_transaction_writes_nothing(database: Database) -> None:
    store = await Store.open(database, ring())
    async with store.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.provider_insert("p", "orders-api", "alice")
            await tx.credential_put("p", "user_token", CredentialWrite("secret", None))
            await tx.sandbox_put("s", "spiffe://example.org/sandbox/s", "alice")
            raise RuntimeError("found a problem late")
    # A conflict inside a transaction that goes on: the rest still commits.
    async with store.transaction() as tx:
        with pytest.raises(Duplicate):
            await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.profile_insert("billing-api", "src", OTHER_PROFILE)
    async with store.read() as tx:
        assert await tx.provider_get("p") is None
        assert await tx.credential_value("p", "user_token") == (None, None)
        assert await tx.sandbox_get("s") is None
        assert [p.id for p in await tx.profile_list()] == ["billing-api", "orders-api"]
    await store.close()


async def test_every_record_operation(database: Database) -> None:
    store = await Store.open(database, ring())
    async with store.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.profile_insert("billing-api", "billing-src", OTHER_PROFILE)
        await tx.provider_insert("p", "orders-api", "alice")
        await tx.provider_insert("q", "orders-api", "bob")
        await tx.credential_put("p", "user_token", CredentialWrite("secret", 123.5))
        await tx.credential_put("p", "other", CredentialWrite(None, None))
        assert await tx.provider_update("p") == 2
        await tx.sandbox_put("s", "spiffe://example.org/sandbox/s", "alice")
        await tx.sandbox_attach("s", "p")
        await tx.sandbox_attach("s", "p")  # attaching twice is a no-op
        await tx.sandbox_put("t", "spiffe://example.org/sandbox/t", "bob")
    with pytest.raises(Duplicate, match="profile 'orders-api' already exists"):
        async with store.transaction() as tx:
            await tx.profile_insert("orders-api", "src", PROFILE)
    with pytest.raises(Duplicate, match="provider 'p' already exists"):
        async with store.transaction() as tx:
            await tx.provider_insert("p", "orders-api", "bob")
    with pytest.raises(Missing, match="profile 'nope'"):
        async with store.transaction() as tx:
            await tx.provider_insert("r", "nope", "bob")
    with pytest.raises(Missing, match="provider 'nope'"):
        async with store.transaction() as tx:
            await tx.provider_update("nope")
    with pytest.raises(Missing, match="provider 'nope'"):
        async with store.transaction() as tx:
            await tx.sandbox_attach("s", "nope")
    with pytest.raises(Duplicate, match="already registered"):
        async with store.transaction() as tx:
            await tx.sandbox_put("u", "spiffe://example.org/sandbox/s", "bob")
    with pytest.raises(InUse, match="provider\\(s\\) 'p', 'q'"):
        async with store.transaction() as tx:
            await tx.profile_delete("orders-api")
    with pytest.raises(Missing):
        async with store.transaction() as tx:
            await tx.profile_delete("nope")

    async with store.read() as tx:
        profile = await tx.profile_get("billing-api")
        assert profile is not None and profile.parsed == OTHER_PROFILE
        assert profile.source == "billing-src"
        assert [p.id for p in await tx.profile_list()] == ["billing-api", "orders-api"]
        provider = await tx.provider_get("p")
        assert provider is not None and provider.revision == 2 and provider.owner == "alice"
        assert [(c.name, c.has_value, c.expires_at) for c in provider.credentials] == [
            ("other", False, None),
            ("user_token", True, 123.5),
        ]
        assert [p.name for p in await tx.provider_list()] == ["p", "q"]
        assert await tx.credential_value("p", "user_token") == ("secret", 123.5)
        assert await tx.credential_value("p", "other") == (None, None)
        sandbox = await tx.sandbox_by_spiffe_id("spiffe://example.org/sandbox/s")
        assert sandbox is not None and sandbox.name == "s" and sandbox.providers == ("p",)
        assert [s.name for s in await tx.sandbox_list()] == ["s", "t"]

    async with store.transaction() as tx:
        # Switching the profile bumps the revision in the same statement.
        assert await tx.provider_update("p", profile_id="billing-api") == 3
        assert await tx.credential_delete("p", "other") is True
        assert await tx.credential_delete("p", "other") is False
        await tx.credential_put("p", "user_token", CredentialWrite("newer", None))
        await tx.sandbox_set_providers("t", ["p", "q"])
        assert await tx.sandbox_detach("s", "p") is True
        assert await tx.sandbox_detach("s", "p") is False
        # Changing a sandbox's SPIFFE ID keeps its owner.
        await tx.sandbox_put("s", "spiffe://example.org/sandbox/s2", "mallory")
    async with store.read() as tx:
        provider = await tx.provider_get("p")
        assert provider is not None and provider.profile_id == "billing-api"
        assert [c.name for c in provider.credentials] == ["user_token"]
        assert await tx.credential_value("p", "user_token") == ("newer", None)
        t = await tx.sandbox_get("t")
        assert t is not None and t.providers == ("p", "q")
        s = await tx.sandbox_get("s")
        assert s is not None and s.providers == () and s.owner == "alice"
        assert s.spiffe_id == "spiffe://example.org/sandbox/s2"
        assert await tx.sandbox_by_spiffe_id("spiffe://example.org/sandbox/s") is None

    # Deleting a provider detaches it from sandboxes and removes its credentials.
    async with store.transaction() as tx:
        await tx.provider_delete("p")
        await tx.provider_delete("q")
        await tx.profile_delete("orders-api")
        await tx.sandbox_delete("s")
    with pytest.raises(Missing):
        async with store.transaction() as tx:
            await tx.provider_delete("p")
    with pytest.raises(Missing):
        async with store.transaction() as tx:
            await tx.sandbox_delete("s")
    async with store.read() as tx:
        t = await tx.sandbox_get("t")
        assert t is not None and t.providers == ()
        assert await tx.credential_value("p", "user_token") == (None, None)
        assert await tx.profile_get("orders-api") is None
        assert [s.name for s in await tx.sandbox_list()] == ["t"]
    await store.ping()
    await store.close()


async def test_wrong_key_is_refused_and_rotation_reseals(
    database: Database, request: pytest.FixtureRequest
) -> None:
    store = await Store.open(database, ring(1))
    async with store.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.provider_insert("p", "orders-api", "alice")
        await tx.credential_put("p", "user_token", CredentialWrite(SECRET, None))
    await store.close()
    with pytest.raises(DatabaseError, match="does not match"):
        await Store.open(database, ring(2))
    # New key first, old key second: opens, and every value is re-sealed with the new key.
    store = await Store.open(database, ring(2, 1))
    await store.close()
    store = await Store.open(database, ring(2))
    async with store.read() as tx:
        assert await tx.credential_value("p", "user_token") == (SECRET, None)
    await store.close()
    raw = raw_bytes(database, request)
    assert b"orders-api" in raw  # the dump/file really holds the records...
    assert SECRET.encode() not in raw  # ...but never the value in clear


async def test_two_replicas_bump_revisions_without_losing_any(database: Database) -> None:
    first, second = Store.open(database, ring()), Store.open(database, ring())
    replicas = await asyncio.gather(first, second)
    async with replicas[0].transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.provider_insert("p", "orders-api", "alice")
    rounds = 6

    async def update(store: Store, index: int) -> int:
        async with store.transaction() as tx:
            row = await tx.provider_get("p")
            assert row is not None
            await tx.credential_put("p", f"c{index}", CredentialWrite(f"v{index}", None))
            return await tx.provider_update("p")

    revisions = await asyncio.gather(*(update(replicas[i % 2], i) for i in range(rounds)))
    # Each update bumped exactly once, and saw its own bump.
    assert sorted(revisions) == list(range(2, rounds + 2))
    async with replicas[1].read() as tx:
        row = await tx.provider_get("p")
        assert row is not None and row.revision == rounds + 1
        assert [c.name for c in row.credentials] == [f"c{i}" for i in range(rounds)]
    for store in replicas:
        await store.close()


async def test_two_replicas_racing_for_one_name_get_duplicate(database: Database) -> None:
    replicas = await asyncio.gather(Store.open(database, ring()), Store.open(database, ring()))
    async with replicas[0].transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
    inserted = asyncio.Event()
    release = asyncio.Event()

    async def create_and_hold(store: Store) -> None:
        async with store.transaction() as tx:
            await tx.provider_insert("p", "orders-api", "alice")
            await tx.sandbox_put("s", "spiffe://example.org/sandbox/s", "alice")
            inserted.set()
            await release.wait()

    async def create_second(store: Store) -> None:
        await inserted.wait()
        # The holder commits while this one starts: whether the insert waits on the
        # holder's lock or runs after its commit, the name is taken.
        asyncio.get_running_loop().call_soon(release.set)
        async with store.transaction() as tx:
            await tx.provider_insert("p", "orders-api", "bob")

    async def claim_spiffe_id(store: Store) -> None:
        async with store.transaction() as tx:
            await tx.sandbox_put("other", "spiffe://example.org/sandbox/s", "bob")

    results = await asyncio.gather(
        create_and_hold(replicas[0]), create_second(replicas[1]), return_exceptions=True
    )
    assert results[0] is None
    assert isinstance(results[1], Duplicate), results[1]
    with pytest.raises(Duplicate):
        await claim_spiffe_id(replicas[1])
    async with replicas[1].read() as tx:
        row = await tx.provider_get("p")
        assert row is not None and row.owner == "alice"
    for store in replicas:
        await store.close()


async def test_rotation_while_another_replica_still_writes_with_the_old_key(
    database: Database,
) -> None:
    old_replica = await Store.open(database, ring(1))
    async with old_replica.transaction() as tx:
        await tx.profile_insert("orders-api", "src", PROFILE)
        await tx.provider_insert("p", "orders-api", "alice")
    # Another replica restarts with the new key first: it re-seals what exists...
    rotated = await Store.open(database, ring(2, 1))
    await rotated.close()
    # ...while the replica not yet restarted still seals with the old key.
    async with old_replica.transaction() as tx:
        await tx.credential_put("p", "user_token", CredentialWrite(SECRET, None))
    await old_replica.close()
    # Dropping the old key now would strand that value: refused, naming the remedy.
    with pytest.raises(DatabaseError, match="not among the configured keys"):
        await Store.open(database, ring(2))
    # One more start with both keys re-seals it; then the new key alone suffices.
    store = await Store.open(database, ring(2, 1))
    await store.close()
    store = await Store.open(database, ring(2))
    async with store.read() as tx:
        assert await tx.credential_value("p", "user_token") == (SECRET, None)
    await store.close()


def test_missing_server_binaries_fail_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(postgres_support, "BIN_GLOB", str(tmp_path / "none" / "*" / "bin"))
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        postgres_support.find_bin_dir()
