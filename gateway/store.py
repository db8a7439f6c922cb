"""The gateway's records on SQLite (aiosqlite), with versioned schema migrations.

All access goes through one connection guarded by one lock, and every write runs inside
``Store.transaction()`` (``BEGIN IMMEDIATE`` … ``COMMIT``; any exception rolls back), so a
request that fails halfway — bad input found late, a client that disconnects, a crash —
leaves nothing behind. Reads use ``Store.read()`` so they never observe another
request's uncommitted writes on the shared connection.

Credential values are stored only sealed (``gateway.crypto``): the plaintext never
reaches the database file.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.crypto import DecryptionError, Keyring, SealedValue, associated_data

# Each migration is a list of statements applied in one transaction together with the
# bump of ``schema_version``; a failed migration leaves the previous version intact.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE profiles (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            parsed TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE providers (
            name TEXT PRIMARY KEY,
            profile_id TEXT NOT NULL REFERENCES profiles(id),
            owner TEXT NOT NULL,
            revision INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE provider_credentials (
            provider TEXT NOT NULL REFERENCES providers(name) ON DELETE CASCADE,
            name TEXT NOT NULL,
            key_id TEXT,
            nonce BLOB,
            ciphertext BLOB,
            expires_at REAL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (provider, name)
        )""",
        """CREATE TABLE sandboxes (
            name TEXT PRIMARY KEY,
            spiffe_id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE sandbox_providers (
            sandbox TEXT NOT NULL REFERENCES sandboxes(name) ON DELETE CASCADE,
            provider TEXT NOT NULL REFERENCES providers(name) ON DELETE CASCADE,
            PRIMARY KEY (sandbox, provider)
        )""",
        """CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            key_id TEXT,
            nonce BLOB,
            ciphertext BLOB
        )""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
_KEY_CHECK_PLAINTEXT = "tokenferry-gateway key check"
_KEY_CHECK_AD = b"tokenferry-gateway/key-check/v1"


class StoreError(Exception):
    """Base of storage errors a request can cause."""


class Missing(StoreError):
    """A referenced record does not exist."""


class Duplicate(StoreError):
    """A unique name or SPIFFE ID is taken."""


class InUse(StoreError):
    """The record is still referenced (e.g. a profile used by providers)."""


class DatabaseError(Exception):
    """The database cannot be opened/migrated, or the key does not match it."""


def utc_now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ProfileRow:
    id: str
    source: str
    parsed: dict[str, Any]
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class CredentialRow:
    name: str
    has_value: bool
    expires_at: float | None
    updated_at: str


@dataclass(frozen=True)
class ProviderRow:
    name: str
    profile_id: str
    owner: str
    revision: int
    credentials: tuple[CredentialRow, ...]
    created_at: str
    updated_at: str

    def credential(self, name: str) -> CredentialRow | None:
        return next((c for c in self.credentials if c.name == name), None)


@dataclass(frozen=True)
class SandboxRow:
    name: str
    spiffe_id: str
    owner: str
    providers: tuple[str, ...]
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class CredentialWrite:
    """A credential to store: ``value`` None records the key without a value."""

    value: str | None = field(repr=False)
    expires_at: float | None


class Tx:
    """Typed operations on one open transaction (or read snapshot)."""

    def __init__(self, conn: aiosqlite.Connection, keyring: Keyring) -> None:
        self._conn = conn
        self._keyring = keyring

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._conn.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        async with self._conn.execute(sql, params) as cursor:
            row: sqlite3.Row | None = await cursor.fetchone()
            return row

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._conn.execute(sql, params) as cursor:
            return int(cursor.rowcount)

    # --- profiles -----------------------------------------------------------------

    @staticmethod
    def _profile(row: sqlite3.Row) -> ProfileRow:
        return ProfileRow(
            id=row["id"],
            source=row["source"],
            parsed=json.loads(row["parsed"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def profile_get(self, profile_id: str) -> ProfileRow | None:
        row = await self._one("SELECT * FROM profiles WHERE id = ?", (profile_id,))
        return self._profile(row) if row else None

    async def profile_list(self) -> list[ProfileRow]:
        return [self._profile(r) for r in await self._all("SELECT * FROM profiles ORDER BY id")]

    async def profile_insert(self, profile_id: str, source: str, parsed: dict[str, Any]) -> None:
        now = utc_now_text()
        try:
            await self._exec(
                "INSERT INTO profiles (id, source, parsed, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (profile_id, source, json.dumps(parsed, sort_keys=True), now, now),
            )
        except sqlite3.IntegrityError as exc:
            raise Duplicate(f"profile {profile_id!r} already exists") from exc

    async def profile_delete(self, profile_id: str) -> None:
        users = await self._all(
            "SELECT name FROM providers WHERE profile_id = ? ORDER BY name", (profile_id,)
        )
        if users:
            names = ", ".join(repr(r["name"]) for r in users)
            raise InUse(f"profile {profile_id!r} is used by provider(s) {names}")
        if await self._exec("DELETE FROM profiles WHERE id = ?", (profile_id,)) == 0:
            raise Missing(f"profile {profile_id!r} does not exist")

    # --- providers ----------------------------------------------------------------

    async def _credentials(self, provider: str) -> tuple[CredentialRow, ...]:
        rows = await self._all(
            "SELECT name, ciphertext IS NOT NULL AS has_value, expires_at, updated_at"
            " FROM provider_credentials WHERE provider = ? ORDER BY name",
            (provider,),
        )
        return tuple(
            CredentialRow(r["name"], bool(r["has_value"]), r["expires_at"], r["updated_at"])
            for r in rows
        )

    async def _provider(self, row: sqlite3.Row) -> ProviderRow:
        return ProviderRow(
            name=row["name"],
            profile_id=row["profile_id"],
            owner=row["owner"],
            revision=row["revision"],
            credentials=await self._credentials(row["name"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def provider_get(self, name: str) -> ProviderRow | None:
        row = await self._one("SELECT * FROM providers WHERE name = ?", (name,))
        return await self._provider(row) if row else None

    async def provider_list(self) -> list[ProviderRow]:
        rows = await self._all("SELECT * FROM providers ORDER BY name")
        return [await self._provider(r) for r in rows]

    async def provider_insert(self, name: str, profile_id: str, owner: str) -> None:
        now = utc_now_text()
        try:
            await self._exec(
                "INSERT INTO providers (name, profile_id, owner, revision, created_at, updated_at)"
                " VALUES (?, ?, ?, 1, ?, ?)",
                (name, profile_id, owner, now, now),
            )
        except sqlite3.IntegrityError as exc:
            if await self.provider_get(name) is not None:
                raise Duplicate(f"provider {name!r} already exists") from exc
            raise Missing(f"profile {profile_id!r} does not exist") from exc

    async def provider_update(self, name: str, *, profile_id: str | None = None) -> int:
        """Bump the revision (and optionally switch the profile); returns the new revision."""
        now = utc_now_text()
        if profile_id is not None:
            await self._exec(
                "UPDATE providers SET profile_id = ? WHERE name = ?", (profile_id, name)
            )
        await self._exec(
            "UPDATE providers SET revision = revision + 1, updated_at = ? WHERE name = ?",
            (now, name),
        )
        row = await self._one("SELECT revision FROM providers WHERE name = ?", (name,))
        if row is None:
            raise Missing(f"provider {name!r} does not exist")
        return int(row["revision"])

    async def credential_put(self, provider: str, name: str, write: CredentialWrite) -> None:
        sealed = (
            self._keyring.seal(write.value, associated_data(provider, name))
            if write.value is not None
            else None
        )
        await self._exec(
            "INSERT INTO provider_credentials"
            " (provider, name, key_id, nonce, ciphertext, expires_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (provider, name) DO UPDATE SET key_id = excluded.key_id,"
            " nonce = excluded.nonce, ciphertext = excluded.ciphertext,"
            " expires_at = excluded.expires_at, updated_at = excluded.updated_at",
            (
                provider,
                name,
                sealed.key_id if sealed else None,
                sealed.nonce if sealed else None,
                sealed.ciphertext if sealed else None,
                write.expires_at,
                utc_now_text(),
            ),
        )

    async def credential_delete(self, provider: str, name: str) -> bool:
        count = await self._exec(
            "DELETE FROM provider_credentials WHERE provider = ? AND name = ?", (provider, name)
        )
        return count > 0

    async def credential_value(self, provider: str, name: str) -> tuple[str | None, float | None]:
        """The decrypted value (None when stored without one) and its expiry."""
        row = await self._one(
            "SELECT key_id, nonce, ciphertext, expires_at FROM provider_credentials"
            " WHERE provider = ? AND name = ?",
            (provider, name),
        )
        if row is None or row["ciphertext"] is None:
            return None, row["expires_at"] if row else None
        sealed = SealedValue(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"]))
        return self._keyring.open(sealed, associated_data(provider, name)), row["expires_at"]

    async def provider_delete(self, name: str) -> None:
        if await self._exec("DELETE FROM providers WHERE name = ?", (name,)) == 0:
            raise Missing(f"provider {name!r} does not exist")

    # --- sandboxes ----------------------------------------------------------------

    async def _sandbox(self, row: sqlite3.Row) -> SandboxRow:
        providers = await self._all(
            "SELECT provider FROM sandbox_providers WHERE sandbox = ? ORDER BY provider",
            (row["name"],),
        )
        return SandboxRow(
            name=row["name"],
            spiffe_id=row["spiffe_id"],
            owner=row["owner"],
            providers=tuple(p["provider"] for p in providers),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def sandbox_get(self, name: str) -> SandboxRow | None:
        row = await self._one("SELECT * FROM sandboxes WHERE name = ?", (name,))
        return await self._sandbox(row) if row else None

    async def sandbox_by_spiffe_id(self, spiffe_id: str) -> SandboxRow | None:
        row = await self._one("SELECT * FROM sandboxes WHERE spiffe_id = ?", (spiffe_id,))
        return await self._sandbox(row) if row else None

    async def sandbox_list(self) -> list[SandboxRow]:
        rows = await self._all("SELECT * FROM sandboxes ORDER BY name")
        return [await self._sandbox(r) for r in rows]

    async def sandbox_put(self, name: str, spiffe_id: str, owner: str) -> None:
        """Create the sandbox, or change its SPIFFE ID (the owner stays)."""
        now = utc_now_text()
        clash = await self.sandbox_by_spiffe_id(spiffe_id)
        if clash is not None and clash.name != name:
            raise Duplicate(f"SPIFFE ID {spiffe_id!r} is already registered to {clash.name!r}")
        await self._exec(
            "INSERT INTO sandboxes (name, spiffe_id, owner, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " spiffe_id = excluded.spiffe_id, updated_at = excluded.updated_at",
            (name, spiffe_id, owner, now, now),
        )

    async def sandbox_set_providers(self, name: str, providers: Sequence[str]) -> None:
        await self._exec("DELETE FROM sandbox_providers WHERE sandbox = ?", (name,))
        for provider in providers:
            await self.sandbox_attach(name, provider)

    async def sandbox_attach(self, name: str, provider: str) -> None:
        if await self._one("SELECT 1 FROM providers WHERE name = ?", (provider,)) is None:
            raise Missing(f"provider {provider!r} does not exist")
        await self._exec(
            "INSERT OR IGNORE INTO sandbox_providers (sandbox, provider) VALUES (?, ?)",
            (name, provider),
        )
        await self._touch_sandbox(name)

    async def sandbox_detach(self, name: str, provider: str) -> bool:
        count = await self._exec(
            "DELETE FROM sandbox_providers WHERE sandbox = ? AND provider = ?", (name, provider)
        )
        await self._touch_sandbox(name)
        return count > 0

    async def _touch_sandbox(self, name: str) -> None:
        await self._exec(
            "UPDATE sandboxes SET updated_at = ? WHERE name = ?", (utc_now_text(), name)
        )

    async def sandbox_delete(self, name: str) -> None:
        if await self._exec("DELETE FROM sandboxes WHERE name = ?", (name,)) == 0:
            raise Missing(f"sandbox {name!r} does not exist")


def _create_private(path: str) -> None:
    """Create the database file owner-only from the first byte.

    It holds sealed credentials and the registry of who may obtain tokens; SQLite gives
    its WAL/SHM files the same mode.
    """
    if path == ":memory:" or Path(path).exists():
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseError(f"cannot create database {path}: {exc.strerror}") from exc


class Store:
    """One SQLite database; open with ``await Store.open(path, keyring)``."""

    def __init__(self, conn: aiosqlite.Connection, keyring: Keyring, path: str) -> None:
        self._conn = conn
        self._keyring = keyring
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: str, keyring: Keyring) -> Store:
        _create_private(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each write is
            # exactly the transaction we say it is.
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        store = cls(conn, keyring, path)
        try:
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA busy_timeout = 5000")
            await store._migrate()
            await store._check_key()
        except sqlite3.Error as exc:
            await conn.close()
            raise DatabaseError(f"database {path}: {exc}") from exc
        except DatabaseError:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        await self._conn.close()

    async def ping(self) -> None:
        """Raise if the database does not answer (for /healthz)."""
        async with self.read() as tx:
            await tx._one("SELECT 1")

    async def schema_version(self) -> int:
        async with self._conn.execute("SELECT MAX(version) FROM schema_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def _migrate(self) -> None:
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
            " applied_at TEXT NOT NULL)"
        )
        current = await self.schema_version()
        if current > SCHEMA_VERSION:
            raise DatabaseError(
                f"database {self.path} has schema version {current}, newer than this "
                f"build understands ({SCHEMA_VERSION}); upgrade tokenferry"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version - 1]:
                    await self._conn.execute(statement)
                await self._conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, utc_now_text()),
                )
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def _check_key(self) -> None:
        """Refuse a key that does not match the database; re-seal values under old keys."""
        async with self._conn.execute(
            "SELECT key_id, nonce, ciphertext FROM meta WHERE name = 'key_check'"
        ) as cursor:
            row = await cursor.fetchone()
        if row is not None:
            sealed = SealedValue(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"]))
            try:
                self._keyring.open(sealed, _KEY_CHECK_AD)
            except DecryptionError as exc:
                raise DatabaseError(
                    f"the encryption key does not match database {self.path} "
                    "(values were sealed with another key)"
                ) from exc
            if sealed.key_id == self._keyring.current_id:
                return
        async with self.transaction() as tx:
            await tx._exec("DELETE FROM meta WHERE name = 'key_check'")
            check = self._keyring.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_AD)
            await tx._exec(
                "INSERT INTO meta (name, key_id, nonce, ciphertext) VALUES ('key_check', ?, ?, ?)",
                (check.key_id, check.nonce, check.ciphertext),
            )
            # Rotation: every value sealed with an older key is re-sealed with the current one.
            stale = await tx._all(
                "SELECT provider, name FROM provider_credentials"
                " WHERE ciphertext IS NOT NULL AND key_id != ?",
                (self._keyring.current_id,),
            )
            for item in stale:
                value, expires_at = await tx.credential_value(item["provider"], item["name"])
                await tx.credential_put(
                    item["provider"], item["name"], CredentialWrite(value, expires_at)
                )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One write transaction: committed when the block ends, rolled back on any error."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn, self._keyring)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        """A consistent read; never sees another request's uncommitted writes."""
        async with self._lock:
            await self._conn.execute("BEGIN")
            try:
                yield Tx(self._conn, self._keyring)
            finally:
                await self._conn.execute("ROLLBACK")


def parse_database_option(value: str) -> str:
    """``--db``: a SQLite path (or ``sqlite:///path``); PostgreSQL is refused clearly."""
    if value.startswith(("postgres://", "postgresql://", "postgresql+")):
        raise DatabaseError(
            "PostgreSQL is not supported in this build of the gateway; use a SQLite path"
        )
    if value.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
        value = value[len("sqlite:///") :]
    elif "://" in value:
        raise DatabaseError(f"--db {value!r}: unknown database URL scheme")
    if not value:
        raise DatabaseError("--db: empty path")
    parent = Path(value).expanduser().resolve().parent
    if not parent.is_dir():
        raise DatabaseError(f"--db {value!r}: directory {parent} does not exist")
    return str(Path(value).expanduser())
