"""The gateway's records, on SQLite (one replica) or PostgreSQL (several replicas).

Every write runs inside ``Store.transaction()`` (any exception rolls back), so a request
that fails halfway — bad input found late, a client that disconnects, a crash — leaves
nothing behind. Reads use ``Store.read()``: one consistent snapshot that never observes
another request's uncommitted writes.

The SQL of each query is written once, with ``?`` placeholders; a small backend object
per database (``_SqliteBackend``, ``_PostgresBackend``) supplies what differs: the
placeholder style, column types, how a transaction begins, connection vs pool, and the
lock that serialises migrations when several replicas start at once.

Several replicas on one PostgreSQL database must not lose updates, so every
read-modify-write is a single statement (``revision = revision + 1 … RETURNING``,
``INSERT … ON CONFLICT``), and uniqueness races surface as the same ``Duplicate`` a
sequential conflict gives.

Credential values are stored only sealed (``gateway.crypto``): the plaintext never
reaches the database.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aiosqlite
import asyncpg

from gateway.crypto import DecryptionError, Keyring, SealedValue, associated_data

# Each migration is a list of statements applied in one transaction together with the
# bump of ``schema_version``; a failed migration leaves the previous version intact.
# ``{blob}`` and ``{float}`` are the backend's column types (BLOB/BYTEA, REAL/DOUBLE
# PRECISION); everything else is common SQL.
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
            nonce {blob},
            ciphertext {blob},
            expires_at {float},
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
            nonce {blob},
            ciphertext {blob}
        )""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
_KEY_CHECK_PLAINTEXT = "tokenferry-gateway key check"
_KEY_CHECK_AD = b"tokenferry-gateway/key-check/v1"
# pg_advisory_xact_lock key for start-up work (migrations, key check): one constant for
# every tokenferry gateway, so replicas starting together take turns.
_STARTUP_LOCK_KEY = 0x746F6B656E6665  # "tokenfe"

PG_POOL_MIN = 1
PG_POOL_MAX = 10
PG_CONNECT_TIMEOUT = 10.0
PG_COMMAND_TIMEOUT = 30.0


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


class _Conflict(Exception):
    """A statement violated a constraint (unique key, foreign key) — any backend."""


def utc_now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- where the database is ------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with any password (user info or ``password=`` parameter) shown as ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k == "password" for k, _ in pairs):
                query = urlencode(
                    [(k, "***" if k == "password" else v) for k, v in pairs], safe="*/:"
                )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return f"{url.split(':', 1)[0]}://(unparseable URL)"


def _url_secrets(url: str) -> tuple[str, ...]:
    """Every spelling of the URL's password, for scrubbing messages that might echo it."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
        found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "password"]
    except ValueError:
        pass
    found += [unquote(s) for s in found]
    return tuple(s for s in dict.fromkeys(found) if s)


@dataclass(frozen=True)
class Database:
    """Where the records live: a SQLite file path or a PostgreSQL URL."""

    kind: Literal["sqlite", "postgresql"]
    # A PostgreSQL URL may carry a password: never in reprs, logs or messages.
    location: str = field(repr=False)

    @classmethod
    def sqlite(cls, path: str) -> Database:
        return cls("sqlite", path)

    @property
    def display(self) -> str:
        """Safe to log and to show in errors."""
        return self.location if self.kind == "sqlite" else redact_url(self.location)

    def scrub(self, text: str) -> str:
        """``text`` (e.g. a driver's error) with this database's password removed."""
        if self.kind == "postgresql":
            for secret in _url_secrets(self.location):
                text = text.replace(secret, "***")
        return text


# --- backends: the only place SQLite and PostgreSQL differ ------------------------------

# Rows are sqlite3.Row or asyncpg.Record: both are read by column name.
Row = Any


class _Session(ABC):
    """Statements on one open transaction; constraint violations raise ``_Conflict``."""

    @abstractmethod
    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abstractmethod
    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    @abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abstractmethod
    async def execute_guarded(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Like ``execute``, but after a ``_Conflict`` the transaction is still usable."""


class _SqliteSession(_Session):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            async with self._conn.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.IntegrityError as exc:
            raise _Conflict(str(exc)) from exc

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            async with self._conn.execute(sql, params) as cursor:
                return int(cursor.rowcount)
        except sqlite3.IntegrityError as exc:
            raise _Conflict(str(exc)) from exc

    async def execute_guarded(self, sql: str, params: Sequence[Any] = ()) -> int:
        # SQLite undoes just the failing statement; the transaction goes on.
        return await self.execute(sql, params)


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …`` (our SQL has no ``?`` literals)."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _changed(status: str) -> int:
    # asyncpg returns the command tag: "INSERT 0 1", "UPDATE 2", "DELETE 0".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PostgresSession(_Session):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return list(await self._conn.fetch(_numbered(sql), *params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise _Conflict(type(exc).__name__) from exc

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            return _changed(await self._conn.execute(_numbered(sql), *params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise _Conflict(type(exc).__name__) from exc

    async def execute_guarded(self, sql: str, params: Sequence[Any] = ()) -> int:
        # A failed statement aborts a PostgreSQL transaction; a savepoint (a nested
        # asyncpg transaction) confines the failure to this statement.
        async with self._conn.transaction():
            return await self.execute(sql, params)


class _Backend(ABC):
    blob_type: str
    float_type: str

    def __init__(self, database: Database) -> None:
        self.database = database

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[_Session]:
        """One write transaction: committed at the end of the block, rolled back on error."""

    @abstractmethod
    def read(self) -> AbstractAsyncContextManager[_Session]:
        """A consistent read-only snapshot."""

    @abstractmethod
    def exclusive(self) -> AbstractAsyncContextManager[_Session]:
        """A write transaction that also excludes every other process's start-up work."""

    @abstractmethod
    async def close(self) -> None: ...

    def migration_sql(self, statement: str) -> str:
        return statement.format(blob=self.blob_type, float=self.float_type)


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


class _SqliteBackend(_Backend):
    """One connection guarded by one lock: SQLite has a single writer anyway."""

    blob_type = "BLOB"
    float_type = "REAL"

    def __init__(self, database: Database, conn: aiosqlite.Connection) -> None:
        super().__init__(database)
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, database: Database) -> _SqliteBackend:
        path = database.location
        _create_private(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each write is
            # exactly the transaction we say it is.
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            await conn.close()
            raise DatabaseError(f"database {path}: {exc}") from exc
        return cls(database, conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Session]:
        async with self._lock:
            # IMMEDIATE takes the write lock now, so two processes on one file (e.g. a
            # second gateway started by mistake) wait rather than fail mid-transaction.
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteSession(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_Session]:
        async with self._lock:
            await self._conn.execute("BEGIN")
            try:
                yield _SqliteSession(self._conn)
            finally:
                await self._conn.execute("ROLLBACK")

    def exclusive(self) -> AbstractAsyncContextManager[_Session]:
        # BEGIN IMMEDIATE already excludes every other writer of the file.
        return self.transaction()

    async def close(self) -> None:
        await self._conn.close()


class _PostgresBackend(_Backend):
    """A connection pool: requests of one replica run concurrently, as do replicas."""

    blob_type = "BYTEA"
    float_type = "DOUBLE PRECISION"

    def __init__(self, database: Database, pool: Any) -> None:
        super().__init__(database)
        self._pool = pool

    @classmethod
    async def connect(cls, database: Database) -> _PostgresBackend:
        try:
            pool = await asyncpg.create_pool(
                database.location,
                min_size=PG_POOL_MIN,
                max_size=PG_POOL_MAX,
                timeout=PG_CONNECT_TIMEOUT,
                command_timeout=PG_COMMAND_TIMEOUT,
            )
        except Exception as exc:
            # Driver messages may quote the DSN; only the scrubbed text goes further.
            detail = database.scrub(str(exc)) or type(exc).__name__
            raise DatabaseError(
                f"cannot connect to PostgreSQL database {database.display}: {detail}"
            ) from None
        return cls(database, pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Session]:
        # READ COMMITTED: each statement sees the latest committed rows, and the writes
        # themselves are single atomic statements (see the module docstring).
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PostgresSession(conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_Session]:
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield _PostgresSession(conn)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[_Session]:
        async with self._pool.acquire() as conn, conn.transaction():
            # Released at commit/rollback: replicas starting at once migrate in turn.
            await conn.execute(f"SELECT pg_advisory_xact_lock({_STARTUP_LOCK_KEY})")
            yield _PostgresSession(conn)

    async def close(self) -> None:
        await self._pool.close()


# --- records --------------------------------------------------------------------------


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
    """Typed operations on one open transaction (or read snapshot), on any backend."""

    def __init__(self, session: _Session, keyring: Keyring) -> None:
        self._db = session
        self._keyring = keyring

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._db.fetch_all(sql, params)

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return await self._db.fetch_one(sql, params)

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self._db.execute(sql, params)

    # --- profiles -----------------------------------------------------------------

    @staticmethod
    def _profile(row: Row) -> ProfileRow:
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
            await self._db.execute_guarded(
                "INSERT INTO profiles (id, source, parsed, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (profile_id, source, json.dumps(parsed, sort_keys=True), now, now),
            )
        except _Conflict as exc:
            raise Duplicate(f"profile {profile_id!r} already exists") from exc

    async def profile_delete(self, profile_id: str) -> None:
        users = await self._all(
            "SELECT name FROM providers WHERE profile_id = ? ORDER BY name", (profile_id,)
        )
        if users:
            names = ", ".join(repr(r["name"]) for r in users)
            raise InUse(f"profile {profile_id!r} is used by provider(s) {names}")
        try:
            deleted = await self._db.execute_guarded(
                "DELETE FROM profiles WHERE id = ?", (profile_id,)
            )
        except _Conflict as exc:
            # Another replica created a provider on it since the check above.
            raise InUse(f"profile {profile_id!r} is used by a provider") from exc
        if deleted == 0:
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

    async def _provider(self, row: Row) -> ProviderRow:
        return ProviderRow(
            name=row["name"],
            profile_id=row["profile_id"],
            owner=row["owner"],
            revision=int(row["revision"]),
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
            await self._db.execute_guarded(
                "INSERT INTO providers (name, profile_id, owner, revision, created_at, updated_at)"
                " VALUES (?, ?, ?, 1, ?, ?)",
                (name, profile_id, owner, now, now),
            )
        except _Conflict as exc:
            if await self.provider_get(name) is not None:
                raise Duplicate(f"provider {name!r} already exists") from exc
            raise Missing(f"profile {profile_id!r} does not exist") from exc

    async def provider_update(self, name: str, *, profile_id: str | None = None) -> int:
        """Bump the revision (and optionally switch the profile); returns the new revision.

        One statement: concurrent updates from several replicas each bump exactly once.
        """
        try:
            row = await self._one(
                "UPDATE providers SET profile_id = COALESCE(?, profile_id),"
                " revision = revision + 1, updated_at = ? WHERE name = ? RETURNING revision",
                (profile_id, utc_now_text(), name),
            )
        except _Conflict as exc:
            raise Missing(f"profile {profile_id!r} does not exist") from exc
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

    async def _sandbox(self, row: Row) -> SandboxRow:
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
        try:
            await self._db.execute_guarded(
                "INSERT INTO sandboxes (name, spiffe_id, owner, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " spiffe_id = excluded.spiffe_id, updated_at = excluded.updated_at",
                (name, spiffe_id, owner, now, now),
            )
        except _Conflict as exc:
            # Another replica registered this SPIFFE ID since the check above.
            raise Duplicate(f"SPIFFE ID {spiffe_id!r} is already registered") from exc

    async def sandbox_set_providers(self, name: str, providers: Sequence[str]) -> None:
        await self._exec("DELETE FROM sandbox_providers WHERE sandbox = ?", (name,))
        for provider in providers:
            await self.sandbox_attach(name, provider)

    async def sandbox_attach(self, name: str, provider: str) -> None:
        try:
            await self._db.execute_guarded(
                "INSERT INTO sandbox_providers (sandbox, provider) VALUES (?, ?)"
                " ON CONFLICT (sandbox, provider) DO NOTHING",
                (name, provider),
            )
        except _Conflict as exc:
            if await self._one("SELECT 1 FROM providers WHERE name = ?", (provider,)) is None:
                raise Missing(f"provider {provider!r} does not exist") from exc
            raise Missing(f"sandbox {name!r} does not exist") from exc
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


# --- the store ------------------------------------------------------------------------


class Store:
    """The records on one database; open with ``await Store.open(database, keyring)``."""

    def __init__(self, backend: _Backend, keyring: Keyring) -> None:
        self._backend = backend
        self._keyring = keyring
        self.database = backend.database

    @classmethod
    async def open(cls, database: Database | str, keyring: Keyring) -> Store:
        """Connect, migrate and check the key; a plain string is a SQLite path."""
        if isinstance(database, str):
            database = Database.sqlite(database)
        backend: _Backend
        if database.kind == "postgresql":
            backend = await _PostgresBackend.connect(database)
        else:
            backend = await _SqliteBackend.connect(database)
        store = cls(backend, keyring)
        try:
            await store._migrate()
            await store._check_key()
        except (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            await backend.close()
            detail = database.scrub(str(exc)) or type(exc).__name__
            raise DatabaseError(f"database {database.display}: {detail}") from None
        except BaseException:
            await backend.close()
            raise
        return store

    async def close(self) -> None:
        await self._backend.close()

    async def ping(self) -> None:
        """Raise if the database does not answer (for /healthz)."""
        async with self.read() as tx:
            await tx._one("SELECT 1")

    async def schema_version(self) -> int:
        async with self._backend.read() as db:
            return await self._schema_version(db)

    @staticmethod
    async def _schema_version(db: _Session) -> int:
        row = await db.fetch_one("SELECT MAX(version) AS version FROM schema_version")
        return int(row["version"]) if row and row["version"] is not None else 0

    async def _migrate(self) -> None:
        # One version per transaction, each under the start-up lock: a replica that
        # waited for another one's migration finds the work done and skips it.
        for _ in range(SCHEMA_VERSION + 1):
            async with self._backend.exclusive() as db:
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                    " applied_at TEXT NOT NULL)"
                )
                current = await self._schema_version(db)
                if current > SCHEMA_VERSION:
                    raise DatabaseError(
                        f"database {self.database.display} has schema version {current}, newer "
                        f"than this build understands ({SCHEMA_VERSION}); upgrade tokenferry"
                    )
                if current == SCHEMA_VERSION:
                    return
                version = current + 1
                for statement in MIGRATIONS[version - 1]:
                    await db.execute(self._backend.migration_sql(statement))
                await db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, utc_now_text()),
                )

    async def _check_key(self) -> None:
        """Refuse a key that does not match the database; re-seal values under old keys.

        The re-sealing runs at every start, not only when the current key changed: with
        several replicas, one still running with the old key first may have sealed new
        values with it after another replica's rotation.
        """
        async with self._backend.exclusive() as db:
            tx = Tx(db, self._keyring)
            row = await tx._one(
                "SELECT key_id, nonce, ciphertext FROM meta WHERE name = 'key_check'"
            )
            sealed = (
                SealedValue(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"]))
                if row is not None
                else None
            )
            if sealed is not None:
                try:
                    self._keyring.open(sealed, _KEY_CHECK_AD)
                except DecryptionError as exc:
                    raise DatabaseError(
                        f"the encryption key does not match database {self.database.display} "
                        "(values were sealed with another key)"
                    ) from exc
            if sealed is None or sealed.key_id != self._keyring.current_id:
                await tx._exec("DELETE FROM meta WHERE name = 'key_check'")
                check = self._keyring.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_AD)
                await tx._exec(
                    "INSERT INTO meta (name, key_id, nonce, ciphertext)"
                    " VALUES ('key_check', ?, ?, ?)",
                    (check.key_id, check.nonce, check.ciphertext),
                )
            # Rotation: every value sealed with an older key is re-sealed with the current one.
            stale = await tx._all(
                "SELECT provider, name, key_id FROM provider_credentials"
                " WHERE ciphertext IS NOT NULL AND key_id != ?",
                (self._keyring.current_id,),
            )
            for item in stale:
                try:
                    value, expires_at = await tx.credential_value(item["provider"], item["name"])
                except DecryptionError:
                    raise DatabaseError(
                        f"database {self.database.display}: credential {item['name']!r} of "
                        f"provider {item['provider']!r} is sealed with key {item['key_id']}, "
                        "which is not among the configured keys; add that key as a further "
                        "line of the key file"
                    ) from None
                await tx.credential_put(
                    item["provider"], item["name"], CredentialWrite(value, expires_at)
                )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One write transaction: committed when the block ends, rolled back on any error."""
        async with self._backend.transaction() as db:
            yield Tx(db, self._keyring)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        """A consistent read; never sees another request's uncommitted writes."""
        async with self._backend.read() as db:
            yield Tx(db, self._keyring)


def parse_database_option(value: str) -> Database:
    """``--db``: a SQLite path (or ``sqlite:///path``), or a ``postgresql://`` URL."""
    if value.startswith(("postgres://", "postgresql://")):
        database = Database("postgresql", value)
        try:
            urlsplit(value).port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise DatabaseError(f"--db {database.display}: invalid port in URL") from None
        return database
    if value.startswith("postgresql+"):
        # SQLAlchemy driver suffixes (postgresql+asyncpg://) name a driver we choose.
        scheme = value.split("://", 1)[0]
        raise DatabaseError(f"--db: use a plain postgresql:// URL instead of {scheme}://")
    if value.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
        value = value[len("sqlite:///") :]
    elif "://" in value:
        scheme = value.split("://", 1)[0]
        raise DatabaseError(f"--db: unknown database URL scheme {scheme!r}")
    if not value:
        raise DatabaseError("--db: empty path")
    parent = Path(value).expanduser().resolve().parent
    if not parent.is_dir():
        raise DatabaseError(f"--db {value!r}: directory {parent} does not exist")
    return Database.sqlite(str(Path(value).expanduser()))
