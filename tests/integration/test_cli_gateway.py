"""The operator/user CLI against a real gateway, dev IdP and dev SPIFFE agent (subprocesses).

Most commands run in-process through ``tokenferry.cli.main.main`` (the same code path as
the console script, without paying the interpreter start-up per command); a few run as
real subprocesses to show exit codes and the absence of tracebacks end to end.

The dev IdP here issues 20-second user tokens, i.e. tokens that always "expire within
30 s": every use of a device-flow login refreshes it first, so the refresh path is
exercised for real.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.gateway_stack import (
    ADMIN_TOKEN,
    GatewayStack,
    client_credentials_profile_yaml,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service, tokenferry_command
from tokenferry.cli.common import format_time
from tokenferry.cli.main import main
from tokenferry.login import StoredLogin, TokenStore
from tokenferry.tokens import peek_jwt_claims

TOKEN_TTL = 20


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    services: list[Service] = []
    try:
        yield start_gateway_stack(
            tmp_path_factory.mktemp("cli-stack"),
            services,
            extra_idp_args=("--device-interval", "1", "--token-ttl", str(TOKEN_TTL)),
        )
    finally:
        for service in reversed(services):
            service.stop()


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    """Runs ``tokenferry ARGS`` in-process with this test's config dir and environment."""

    def __init__(
        self, stack: GatewayStack, monkeypatch: pytest.MonkeyPatch, capsys: Any, home: Path
    ) -> None:
        self.stack = stack
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.home = home
        monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
        monkeypatch.setenv("TOKENFERRY_GATEWAY", stack.url)
        monkeypatch.delenv("TOKENFERRY_TOKEN", raising=False)
        self.store = TokenStore(home / "tokenferry")

    def __call__(self, *argv: str, token: str | None = None, stdin: str | None = None) -> Result:
        with self.monkeypatch.context() as patch:
            if token is not None:
                patch.setenv("TOKENFERRY_TOKEN", token)
            if stdin is not None:
                import io

                patch.setattr("sys.stdin", io.StringIO(stdin))
            self.capsys.readouterr()
            try:
                rc = main(list(argv))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            captured = self.capsys.readouterr()
        assert "Traceback" not in captured.err
        return Result(rc, captured.out, captured.err)

    def admin(self, *argv: str, stdin: str | None = None) -> Result:
        return self(*argv, token=ADMIN_TOKEN, stdin=stdin)

    def login(self) -> StoredLogin:
        result = self("login")
        assert result.rc == 0, result.err
        login = self.store.get(self.stack.url)
        assert login is not None
        return login

    def store_user_token(self, sub: str = "alice", ttl: int = 600) -> StoredLogin:
        """A login without a refresh token, holding a dev IdP user token of ``ttl`` s."""
        token = self.stack.user_token(sub, ttl=ttl)
        claims = peek_jwt_claims(token)
        assert claims is not None
        login = StoredLogin(
            gateway=self.stack.url,
            issuer=self.stack.issuer,
            client_id="tokenferry-cli",
            token_endpoint=self.stack.token_endpoint,
            access_token=token,
            refresh_token=None,
            expires_at=float(claims["exp"]),
            subject=sub,
        )
        self.store.save(login)
        return login


@pytest.fixture
def cli(
    stack: GatewayStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> Cli:
    return Cli(stack, monkeypatch, capsys, tmp_path / "config")


def grant_counts(stack: GatewayStack, grant: str) -> dict[str, int]:
    counts: dict[str, int] = stack.idp_stats().get("by_grant", {}).get(grant, {})
    return dict(counts)


def write_profile(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def import_profile(cli: Cli, tmp_path: Path, profile_id: str, text: str | None = None) -> None:
    text = text or exchange_profile_yaml(profile_id, cli.stack.token_endpoint)
    result = cli.admin("profile", "import", str(write_profile(tmp_path, profile_id, text)))
    assert result.rc == 0, result.err


def exp_of(token: str) -> str | None:
    claims = peek_jwt_claims(token)
    assert claims is not None
    return format_time(float(claims["exp"]))


# --------------------------------------------------------------------------- login


def test_device_login_stores_tokens_privately_and_refreshes_on_use(cli: Cli) -> None:
    before = grant_counts(cli.stack, "device_code")
    old_umask = os.umask(0o022)
    try:
        result = cli("login", "--output", "json")
    finally:
        os.umask(old_umask)
    assert result.rc == 0, result.err
    after = grant_counts(cli.stack, "device_code")
    # The dev IdP answers authorization_pending once, then issues the tokens.
    assert after.get("authorization_pending", 0) == before.get("authorization_pending", 0) + 1
    assert after.get("ok", 0) == before.get("ok", 0) + 1
    assert f"To log in, open {cli.stack.issuer}/device and enter the code " in result.err
    summary = result.json()
    assert summary["gateway"] == cli.stack.url
    assert summary["issuer"] == cli.stack.issuer
    assert summary["subject"] == "alice"
    assert summary["refreshable"] is True

    assert stat.S_IMODE(cli.store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.store.directory.stat().st_mode) == 0o700
    login = cli.store.get(cli.stack.url)
    assert login is not None and login.refresh_token
    claims = peek_jwt_claims(login.access_token)
    assert claims is not None
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        cli.stack.issuer,
        "alice",
        ["tokenferry"],
    )
    assert login.expires_at == claims["exp"]
    assert login.access_token not in result.out + result.err

    # The token expires within 30 s (20 s tokens): using it refreshes it first.
    refreshed_before = grant_counts(cli.stack, "refresh_token").get("ok", 0)
    listed = cli("provider", "list", "-o", "json")
    assert listed.rc == 0, listed.err
    assert isinstance(listed.json()["providers"], list)
    assert grant_counts(cli.stack, "refresh_token").get("ok", 0) == refreshed_before + 1
    again = cli.store.get(cli.stack.url)
    assert again is not None
    assert again.refresh_token != login.refresh_token  # rotated and saved
    assert again.access_token != login.access_token
    assert stat.S_IMODE(cli.store.path.stat().st_mode) == 0o600

    out = cli("logout")
    assert out.rc == 0 and f"logged out of {cli.stack.url}" in out.err
    assert cli.store.get(cli.stack.url) is None


# --------------------------------------------------------------------------- --from-oidc-token


def test_from_oidc_token_refreshes_first_and_keeps_the_refresh_token_local(
    cli: Cli, tmp_path: Path
) -> None:
    import_profile(cli, tmp_path, "orders-oidc")
    first = cli.login()
    assert first.refresh_token is not None

    created = cli(
        "provider",
        "create",
        "orders-oidc",
        "--profile",
        "orders-oidc",
        "--from-oidc-token",
        "-o",
        "json",
    )
    assert created.rc == 0, created.err
    used = cli.store.get(cli.stack.url)
    assert used is not None and used.refresh_token is not None
    # The login token expired within 30 s, so it was refreshed before being stored.
    assert used.access_token != first.access_token
    record = created.json()
    assert record["owner"] == "alice"
    credentials = {c["name"]: c for c in record["credentials"]}
    assert credentials["user_token"]["has_value"] is True
    assert credentials["user_token"]["expires_at"] == exp_of(used.access_token)

    updated = cli("provider", "update", "orders-oidc", "--from-oidc-token", "-o", "json")
    assert updated.rc == 0, updated.err
    latest = cli.store.get(cli.stack.url)
    assert latest is not None and latest.refresh_token is not None
    record = updated.json()
    assert record["revision"] == 2
    credentials = {c["name"]: c for c in record["credentials"]}
    assert credentials["user_token"]["expires_at"] == exp_of(latest.access_token)

    stored = cli.stack.raw_database_bytes()
    for refresh_token in (first.refresh_token, used.refresh_token, latest.refresh_token):
        assert refresh_token.encode() not in stored
    # The subject token itself is stored, but sealed: never in plain text.
    assert latest.access_token.encode() not in stored
    assert latest.access_token not in created.out + updated.out + created.err + updated.err


def test_from_oidc_token_stores_an_unrefreshable_token_with_its_own_expiry(
    cli: Cli, tmp_path: Path
) -> None:
    import_profile(cli, tmp_path, "orders-plain")
    login = cli.store_user_token(ttl=600)
    refreshes = grant_counts(cli.stack, "refresh_token")
    result = cli(
        "provider",
        "create",
        "orders-plain",
        "--profile",
        "orders-plain",
        "--from-oidc-token",
        "--credential",
        "user_token",
        "-o",
        "json",
    )
    assert result.rc == 0, result.err
    record = result.json()
    (credential,) = [c for c in record["credentials"] if c["name"] == "user_token"]
    assert credential["expires_at"] == exp_of(login.access_token)
    assert cli.store.get(cli.stack.url) == login
    assert grant_counts(cli.stack, "refresh_token") == refreshes


TWO_SUBJECTS = """\
id: {id}
credentials:
  - name: user_a
  - name: user_b
  - name: token_a
    token_grant:
      grant_type: token_exchange
      token_endpoint: {endpoint}
      subject_token: {{source: provider_credential, credential: user_a}}
  - name: token_b
    token_grant:
      grant_type: token_exchange
      token_endpoint: {endpoint}
      subject_token: {{source: provider_credential, credential: user_b}}
endpoints:
  - {{host: a.example.org}}
"""


def test_from_oidc_token_needs_a_single_or_named_subject_credential(
    cli: Cli, tmp_path: Path
) -> None:
    endpoint = cli.stack.token_endpoint
    import_profile(
        cli, tmp_path, "two-subjects", TWO_SUBJECTS.format(id="two-subjects", endpoint=endpoint)
    )
    import_profile(
        cli, tmp_path, "reports-cc", client_credentials_profile_yaml("reports-cc", endpoint)
    )
    cli.store_user_token()

    ambiguous = cli("provider", "create", "two", "--profile", "two-subjects", "--from-oidc-token")
    assert ambiguous.rc == 1
    assert ambiguous.err.strip() == (
        "error: profile 'two-subjects' has several subject credentials (user_a, user_b): "
        "choose one with --credential KEY"
    )
    wrong = cli(
        "provider",
        "create",
        "two",
        "--profile",
        "two-subjects",
        "--from-oidc-token",
        "--credential",
        "token_a",
    )
    assert wrong.rc == 1
    assert "not a subject credential of profile 'two-subjects' (candidates: user_a, user_b)" in (
        wrong.err
    )
    none = cli("provider", "create", "cc", "--profile", "reports-cc", "--from-oidc-token")
    assert none.rc == 1
    assert "profile 'reports-cc' has no subject credential" in none.err
    # Nothing was created by the failed attempts.
    assert cli("provider", "get", "two").rc == 1

    chosen = cli(
        "provider",
        "create",
        "two",
        "--profile",
        "two-subjects",
        "--from-oidc-token",
        "--credential",
        "user_b",
        "-o",
        "json",
    )
    assert chosen.rc == 0, chosen.err
    stored = {c["name"]: c["has_value"] for c in chosen.json()["credentials"]}
    assert stored.get("user_b") is True
    assert stored.get("user_a") in (None, False)

    both = cli(
        "provider",
        "create",
        "x",
        "--profile",
        "reports-cc",
        "--from-oidc-token",
        "--runtime-credentials",
    )
    assert both.rc == 2
    assert "--from-oidc-token cannot be combined with --runtime-credentials" in both.err


# --------------------------------------------------------------------------- values and records


def test_credential_values_from_files_and_stdin_and_removal(cli: Cli, tmp_path: Path) -> None:
    import_profile(cli, tmp_path, "orders-values")
    secret_file = tmp_path / "user-token"
    secret_file.write_text("file-secret-value-123\n")
    created = cli.admin(
        "provider",
        "create",
        "values",
        "--profile",
        "orders-values",
        "--credential",
        f"user_token=@{secret_file}",
        "--credential-expires-at",
        "user_token=2030-01-01T00:00:00Z",
        "-o",
        "json",
    )
    assert created.rc == 0, created.err
    assert created.json()["credentials"] == [
        {"name": "user_token", "has_value": True, "expires_at": "2030-01-01T00:00:00Z"}
    ]
    assert "file-secret-value-123" not in created.out

    updated = cli.admin(
        "provider",
        "update",
        "values",
        "--credential",
        "user_token=-",
        "-o",
        "json",
        stdin="stdin-secret-value-456\n",
    )
    assert updated.rc == 0, updated.err
    assert updated.json()["revision"] == 2
    stored = cli.stack.raw_database_bytes()
    assert b"file-secret-value-123" not in stored and b"stdin-secret-value-456" not in stored

    removed = cli.admin("provider", "update", "values", "--remove-credential", "user_token")
    assert removed.rc == 0, removed.err
    shown = cli.admin("provider", "get", "values", "-o", "json").json()
    assert shown["revision"] == 3
    assert all(not c["has_value"] for c in shown["credentials"])

    table = cli.admin("provider", "get", "values")
    assert table.rc == 0
    assert "orders-values" in table.out and "revision" in table.out

    runtime = cli.admin(
        "provider",
        "create",
        "runtime",
        "--profile",
        "orders-values",
        "--runtime-credentials",
        "-o",
        "json",
    )
    assert runtime.rc == 0, runtime.err
    assert all(not c["has_value"] for c in runtime.json()["credentials"])

    listed = cli.admin("provider", "list", "-o", "json").json()
    names = {p["name"] for p in listed["providers"]}
    assert {"values", "runtime"} <= names
    assert cli.admin("provider", "delete", "runtime").rc == 0
    gone = cli.admin("provider", "get", "runtime")
    assert gone.rc == 1
    assert gone.err.strip() == "error: not found: provider 'runtime' does not exist"


def test_profile_import_list_show(cli: Cli, tmp_path: Path) -> None:
    text = exchange_profile_yaml("orders-shown", cli.stack.token_endpoint)
    path = write_profile(tmp_path, "orders-shown", text)
    imported = cli.admin("profile", "import", str(path))
    assert imported.rc == 0, imported.err
    assert "profile 'orders-shown' imported" in imported.err
    assert "api.example.org" in imported.out

    again = cli.admin("profile", "import", str(path))
    assert again.rc == 1
    assert again.err.startswith("error: already exists: ")
    assert "orders-shown" in again.err

    bad = write_profile(tmp_path, "bad", "id: Bad_Id\ncredentials: []\nendpoints: []\nextra: 1\n")
    rejected = cli.admin("profile", "import", str(bad))
    assert rejected.rc == 1
    assert f"error: {bad}: id: " in rejected.err
    assert "nothing was sent to the gateway" in rejected.err

    listed = cli.admin("profile", "list", "-o", "json")
    assert listed.rc == 0
    ids = [p["id"] for p in listed.json()["profiles"]]
    assert "orders-shown" in ids and "Bad_Id" not in ids

    shown = cli.admin("profile", "show", "orders-shown")
    assert shown.rc == 0
    for expected in ("user_token", "access_token", "token_exchange", "api.example.org", "orders"):
        assert expected in shown.out
    source = cli.admin("profile", "show", "orders-shown", "--source")
    assert source.out == text
    as_json = cli.admin("profile", "show", "orders-shown", "-o", "json").json()
    assert as_json["id"] == "orders-shown" and as_json["source"] == text

    missing = cli.admin("profile", "show", "no-such-profile")
    assert missing.rc == 1 and missing.err.startswith("error: not found: ")

    cli.store_user_token("bob")
    forbidden = cli("profile", "delete", "orders-shown")
    assert forbidden.rc == 1
    assert forbidden.err.strip() == "error: forbidden: only an admin may delete profiles"


def test_sandbox_commands(cli: Cli, tmp_path: Path) -> None:
    import_profile(cli, tmp_path, "orders-sbx")
    for name in ("sbx-p1", "sbx-p2"):
        made = cli.admin(
            "provider", "create", name, "--profile", "orders-sbx", "--runtime-credentials"
        )
        assert made.rc == 0, made.err

    registered = cli.admin(
        "sandbox",
        "register",
        "agent-1",
        "--spiffe-id",
        sandbox_id("agent-1"),
        "--provider",
        "sbx-p1",
        "-o",
        "json",
    )
    assert registered.rc == 0, registered.err
    assert registered.json()["providers"] == ["sbx-p1"]
    assert registered.json()["spiffe_id"] == sandbox_id("agent-1")

    attached = cli.admin("sandbox", "attach", "agent-1", "sbx-p2", "-o", "json")
    assert attached.rc == 0, attached.err
    assert sorted(attached.json()["providers"]) == ["sbx-p1", "sbx-p2"]
    detached = cli.admin("sandbox", "detach", "agent-1", "sbx-p1", "-o", "json")
    assert detached.json()["providers"] == ["sbx-p2"]

    # Re-registering without --provider keeps the attached providers.
    kept = cli.admin(
        "sandbox", "register", "agent-1", "--spiffe-id", sandbox_id("agent-1"), "-o", "json"
    )
    assert kept.json()["providers"] == ["sbx-p2"]

    listed = cli.admin("sandbox", "list", "-o", "json").json()
    assert "agent-1" in {s["name"] for s in listed["sandboxes"]}
    table = cli.admin("sandbox", "list")
    assert "agent-1" in table.out and sandbox_id("agent-1") in table.out

    bad_id = cli.admin("sandbox", "register", "agent-2", "--spiffe-id", "https://example.org/x")
    assert bad_id.rc == 1
    assert bad_id.err.startswith("error: invalid request: field 'spiffe_id': ")
    missing = cli.admin("sandbox", "attach", "agent-1", "no-such-provider")
    assert missing.rc == 1 and missing.err.startswith("error: not found: ")

    assert cli.admin("sandbox", "delete", "agent-1").rc == 0
    assert cli.admin("sandbox", "get", "agent-1").rc == 1


# --------------------------------------------------------------------------- error paths


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_error_messages_and_exit_codes(cli: Cli, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    unreachable = cli.admin("provider", "list", "--gateway", url)
    assert unreachable.rc == 1
    assert unreachable.err.startswith(f"error: cannot reach the gateway at {url}: ")
    assert unreachable.err.rstrip().endswith("is it running? set --gateway or TOKENFERRY_GATEWAY")
    login_unreachable = cli("login", "--gateway", url)
    assert login_unreachable.rc == 1
    assert login_unreachable.err.startswith(f"error: cannot reach the gateway at {url}")

    not_logged_in = cli("provider", "list")
    assert not_logged_in.rc == 1
    assert not_logged_in.err.strip() == (
        f"error: not logged in to {cli.stack.url}: run tokenferry login --gateway {cli.stack.url}"
    )

    refused = cli("provider", "list", token="not-the-admin-token")
    assert refused.rc == 1
    assert refused.err.startswith("error: the token in TOKENFERRY_TOKEN was refused")

    # A stored token the gateway does not accept (signed by nobody it trusts).
    login = cli.store_user_token()
    cli.store.save(
        StoredLogin(
            gateway=login.gateway,
            issuer=login.issuer,
            client_id=login.client_id,
            token_endpoint=login.token_endpoint,
            access_token="garbage.token.value",
            refresh_token=None,
            expires_at=None,
        )
    )
    stale = cli("provider", "list")
    assert stale.rc == 1
    assert stale.err.startswith("error: not logged in or token expired: run tokenferry login")

    import_profile(cli, tmp_path, "orders-errors")
    assert (
        cli.admin(
            "provider", "create", "admins", "--profile", "orders-errors", "--runtime-credentials"
        ).rc
        == 0
    )
    duplicate = cli.admin(
        "provider", "create", "admins", "--profile", "orders-errors", "--runtime-credentials"
    )
    assert duplicate.rc == 1 and duplicate.err.startswith("error: already exists: ")

    cli.store_user_token("alice")
    forbidden = cli("provider", "update", "admins", "--credential", "user_token=v")
    assert forbidden.rc == 1
    assert forbidden.err.strip() == "error: forbidden: provider 'admins' belongs to another user"

    unknown_credential = cli.admin("provider", "update", "admins", "--credential", "no_such=v")
    assert unknown_credential.rc == 1
    assert unknown_credential.err.startswith("error: invalid request: ")
    assert "no_such" in unknown_credential.err

    no_profile = cli.admin("provider", "create", "p", "--profile", "nope", "--runtime-credentials")
    assert no_profile.rc == 1 and "nope" in no_profile.err

    for argv, message in (
        (("provider", "create", "p", "--profile", "x"), "give --credential KEY=VALUE"),
        (("provider", "create", "p", "--profile", "x", "--credential", "k"), "expected KEY=VALUE"),
        (("provider", "update", "p"), "nothing to change"),
        (("provider", "create", "p"), "--profile"),
        (("provider", "list", "--output", "yaml"), "invalid choice"),
    ):
        usage = cli.admin(*argv)
        assert usage.rc == 2, argv
        assert message in usage.err
        assert "usage: tokenferry" in usage.err


def run_tokenferry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFERRY_")}
    full_env.update(env)
    return subprocess.run(
        tokenferry_command(*args),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_console_script_exit_codes_and_clean_errors(stack: GatewayStack, tmp_path: Path) -> None:
    env = {
        "XDG_CONFIG_HOME": str(tmp_path),
        "TOKENFERRY_GATEWAY": stack.url,
        "TOKENFERRY_TOKEN": ADMIN_TOKEN,
    }
    listed = run_tokenferry("sandbox", "list", "--output", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout)["sandboxes"], list)

    usage = run_tokenferry("provider", "create", "p", "--profile", "x", env=env)
    assert usage.returncode == 2
    assert "usage: tokenferry provider create" in usage.stderr
    assert usage.stdout == ""

    url = f"http://127.0.0.1:{closed_port()}"
    down = run_tokenferry("provider", "get", "x", env={**env, "TOKENFERRY_GATEWAY": url})
    assert down.returncode == 1
    assert down.stdout == ""
    assert down.stderr.startswith(f"error: cannot reach the gateway at {url}")
    assert "Traceback" not in down.stderr


def test_auth_config_is_what_login_uses(stack: GatewayStack) -> None:
    config = requests.get(f"{stack.url}/v1/auth/config", timeout=10).json()
    assert config["issuer"] == stack.issuer
    assert config["client_id"] == "tokenferry-cli"
