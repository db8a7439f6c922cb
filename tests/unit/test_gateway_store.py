"""``--db`` parsing and what the gateway shows of a database URL.

The store itself is tested on both backends in
``tests/integration/test_gateway_store_backends.py`` (SQLite and a real PostgreSQL).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.crypto import Keyring
from gateway.store import Database, DatabaseError, Store, parse_database_option, redact_url


def test_parse_database_option_sqlite(tmp_path: Path) -> None:
    assert parse_database_option(str(tmp_path / "a.db")) == Database.sqlite(str(tmp_path / "a.db"))
    assert parse_database_option(f"sqlite:///{tmp_path}/a.db").location == f"{tmp_path}/a.db"
    with pytest.raises(DatabaseError, match="unknown database URL scheme 'mysql'"):
        parse_database_option("mysql://h/db")
    with pytest.raises(DatabaseError, match="does not exist"):
        parse_database_option(str(tmp_path / "missing-dir" / "a.db"))
    with pytest.raises(DatabaseError, match="empty path"):
        parse_database_option("sqlite:///")


def test_parse_database_option_postgresql() -> None:
    for url in ("postgresql://u@h/db", "postgres://u@h:5433/db", "postgresql:///db?host=/run"):
        database = parse_database_option(url)
        assert database.kind == "postgresql" and database.location == url
    with pytest.raises(DatabaseError, match="plain postgresql:// URL"):
        parse_database_option("postgresql+asyncpg://u@h/db")
    with pytest.raises(DatabaseError, match="invalid port") as caught:
        parse_database_option("postgresql://u:pw-in-url@h:notaport/db")
    assert "pw-in-url" not in str(caught.value)


def test_passwords_never_shown() -> None:
    url = "postgresql://gw:s3cr%40t@db.example:5432/tokenferry?sslmode=require&password=p2"
    database = parse_database_option(url)
    assert database.display == (
        "postgresql://gw:***@db.example:5432/tokenferry?sslmode=require&password=***"
    )
    assert "s3cr" not in repr(database) and "p2" not in repr(database)
    # Driver messages that echo the password, raw or decoded, are scrubbed.
    assert database.scrub("failed for s3cr%40t and s3cr@t and p2") == (
        "failed for *** and *** and ***"
    )
    assert redact_url("postgresql://gw@h/db") == "postgresql://gw@h/db"
    assert redact_url("postgresql://[::1/db") == "postgresql://(unparseable URL)"
    assert Database.sqlite("/x/g.db").display == "/x/g.db"


async def test_unreachable_server_is_reported_without_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = parse_database_option(f"postgresql://gw:hunter2@127.0.0.1:{port}/db")
    with pytest.raises(DatabaseError, match="cannot connect to PostgreSQL") as caught:
        await Store.open(database, Keyring([b"\x01" * 32]))
    assert f"gw:***@127.0.0.1:{port}" in str(caught.value)
    assert "hunter2" not in str(caught.value)
