"""A private, throwaway PostgreSQL server for the tests (a pytest plugin).

``postgres_cluster`` (session scope) runs ``initdb`` and ``pg_ctl start`` from the
distribution's server binaries (``/usr/lib/postgresql/<version>/bin``) in a temporary
directory: TCP on 127.0.0.1 at a free port plus a Unix socket in that directory, trust
authentication for local and loopback connections only, no fsync. The whole suite pays
the start-up once. ``postgres_url`` (function scope) creates a fresh database per test.

``initdb`` refuses to run as root, so under root the server runs as the ``postgres``
user (``runuser -u postgres --``) with the directory handed to it. Missing binaries fail
the tests that need them with what to install: a skipped PostgreSQL test would hide a
backend that nobody checked.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "postgres"
START_ATTEMPTS = 3
COMMAND_TIMEOUT = 60


def find_bin_dir() -> Path:
    """The newest installed server version's bin directory; fails the test if none."""
    found = [Path(d) for d in glob.glob(BIN_GLOB) if (Path(d) / "initdb").exists()]
    if not found:
        pytest.fail(
            f"PostgreSQL server binaries not found ({BIN_GLOB}/initdb): the PostgreSQL "
            "store tests need them. Install them with `apt-get install postgresql` "
            "(`make test` does so when run as root).",
            pytrace=False,
        )
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def free_port() -> int:
    # PostgreSQL cannot report a port it chose itself, so take one the kernel just
    # handed out; a lost race is retried with another port (START_ATTEMPTS).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path
    port: int
    run_as: tuple[str, ...]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str, *, password: str | None = None) -> str:
        """A URL for ``database``; a ``password`` is accepted but unused (trust auth)."""
        user = f"{SUPERUSER}:{password}" if password else SUPERUSER
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _server_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def _client_args(self, database: str) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database]

    def psql(self, database: str, sql: str) -> str:
        """Run ``sql``; returns unaligned, tuples-only output."""
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                *("-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *self._client_args(database),
                *("-c", sql),
            ],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def pg_dump(self, database: str) -> bytes:
        """The whole database as the server's own backup tool writes it."""
        result = subprocess.run(
            [str(self.bin_dir / "pg_dump"), *self._client_args(database)],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"pg_dump failed: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def create_database(self) -> str:
        name = "tokenferry_" + uuid.uuid4().hex[:16]
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return name

    def start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.socket_dir}",
                # Throwaway data: durability only costs time here.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        result = self._server_command(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise RuntimeError(
                f"pg_ctl start failed ({result.returncode}): {result.stderr.strip()}\n{log[-2000:]}"
            )

    def stop(self) -> None:
        self._server_command(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"
        )


def start_cluster() -> PostgresCluster:
    bin_dir = find_bin_dir()
    run_as: tuple[str, ...] = ()
    root = Path(tempfile.mkdtemp(prefix="tokenferry-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(SUPERUSER)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(
                f"running as root, the test server must run as user {SUPERUSER!r}, which "
                "does not exist (the postgresql package creates it)",
                pytrace=False,
            )
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ("runuser", "-u", SUPERUSER, "--")
    cluster = PostgresCluster(bin_dir=bin_dir, root=root, port=0, run_as=run_as)
    try:
        cluster.socket_dir.mkdir()
        if run_as:
            os.chown(cluster.socket_dir, user.pw_uid, user.pw_gid)
        result = cluster._server_command(
            str(bin_dir / "initdb"),
            "-D",
            str(cluster.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "--no-locale",
            "--encoding=UTF8",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr.strip()}")
        for attempt in range(START_ATTEMPTS):
            cluster.port = free_port()
            try:
                cluster.start()
                break
            except RuntimeError:
                if attempt == START_ATTEMPTS - 1:
                    raise
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A URL of a new, empty database on the test server."""
    return postgres_cluster.url(postgres_cluster.create_database())
