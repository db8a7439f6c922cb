"""The ``tokenferry gateway`` process: configuration errors, keys, the admin listener, and
what happens when its own Workload API goes away.
"""

from __future__ import annotations

import argparse
import os
import socket as socket_module
import stat
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway.app import StartupError, serve
from gateway.config import GatewayConfig, add_arguments, config_from_args
from gateway_client import IdentityUnavailable
from tests.support.gateway_stack import (
    ADMIN_TOKEN,
    GATEWAY_ID,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service, start_service, tokenferry_command
from tokenferry.cli.main import main


def run_gateway(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFERRY_GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run(
        tokenferry_command("gateway", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


BASE = ["--oidc-issuer", "http://127.0.0.1:1/realms/dev", "--oidc-audience", "tokenferry"]


def test_the_process_fails_clearly_on_bad_flags() -> None:
    result = run_gateway(["--listen", "nonsense", "--spiffe-socket", "/x", *BASE])
    assert result.returncode == 1
    assert "--listen: 'nonsense' is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_gateway(["--no-such-flag"])
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "127.0.0.1:99999", "--spiffe-socket", "/x", *BASE], {}, "out of range"),
        (["--spiffe-socket", "/x"], {}, "--oidc-issuer"),
        (
            ["--spiffe-socket", "/x", "--oidc-issuer", "ftp://x", "--oidc-audience", "a"],
            {},
            "http(s)",
        ),
        ([*BASE], {"SPIFFE_ENDPOINT_SOCKET": ""}, "SPIFFE identity"),
        (
            ["--spiffe-socket", "/x", *BASE],
            {"TOKENFERRY_GATEWAY_LOG_LEVEL": "loud"},
            "environment variable TOKENFERRY_GATEWAY_LOG_LEVEL",
        ),
        (["--spiffe-socket", "/x", *BASE, "--trust-domain", "Bad Domain"], {}, "--trust-domain"),
        (
            ["--spiffe-socket", "/x", *BASE, "--dev-admin-token", "short"],
            {},
            "at least 8 characters",
        ),
    ],
)
def test_bad_flags_and_env_are_user_errors(
    args: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["gateway", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err


def config_for(*args: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(args)), environ={})


async def test_startup_refusals(tmp_path: Path) -> None:
    socket = ["--spiffe-socket", str(tmp_path / "none.sock")]
    db = ["--db", str(tmp_path / "g.db")]
    good_key = tmp_path / "good.key"
    good_key.write_text("C" * 43 + "\n")
    # PostgreSQL: dev mode creates no key (replicas must share one); an unreachable
    # server is reported with the URL's password redacted.
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    pg = ["--db", f"postgresql://gw:hunter2-secret@127.0.0.1:{closed_port}/tokenferry"]
    with pytest.raises(StartupError, match="no encryption key"):
        await serve(config_for(*socket, *BASE, *pg, "--dev-admin-token", ADMIN_TOKEN))
    with pytest.raises(StartupError, match="cannot connect to PostgreSQL") as caught:
        await serve(config_for(*socket, *BASE, *pg, "--key-file", str(good_key)))
    assert f"postgresql://gw:***@127.0.0.1:{closed_port}/tokenferry" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    # Outside dev mode, no key means no start.
    with pytest.raises(StartupError, match="no encryption key"):
        await serve(config_for(*socket, *BASE, *db))
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("short\n")
    with pytest.raises(StartupError, match=r"bad\.key: line 1"):
        await serve(config_for(*socket, *BASE, *db, "--key-file", str(bad_key)))
    # A missing Workload API is reported after a bounded wait.
    with pytest.raises(StartupError, match="own JWT-SVID"):
        await serve(
            config_for(*socket, *BASE, *db, "--dev-admin-token", ADMIN_TOKEN), identity_wait=0.5
        )


async def test_gateway_workload_api_down_is_503_and_keys_and_env(
    tmp_path: Path, services: list[Service]
) -> None:
    stack = start_gateway_stack(tmp_path, services)
    key_path = Path(str(stack.db_path) + ".key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(stack.db_path.stat().st_mode) == 0o600
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.admin_url + "/healthz") as response:
            assert response.status == 200
        async with session.get(stack.admin_url + "/metrics") as response:
            assert "tokenferry_gateway_broker_requests_total" in await response.text()
    async with stack.admin() as admin:
        await admin.create_profile(exchange_profile_yaml("orders-api", stack.token_endpoint))
        await admin.create_provider("orders", "orders-api", {"user_token": stack.user_token()})
        await admin.put_sandbox("a", sandbox_id("a"), ["orders"])
    client, source = stack.supervisor("a")
    async with client:
        assert await client.supervisor_config() is not None  # bundles now cached
        stack.spiffe.stop()
        with pytest.raises(IdentityUnavailable) as caught:
            await client.intermediate_token("orders", "access_token")
        assert caught.value.status == 503
        assert "own JWT-SVID" in caught.value.detail
    await source.close()
    assert stack.gateway.alive()

    # A second gateway on the same database with another key is refused at start-up.
    other_key = tmp_path / "other.key"
    other_key.write_text("A" * 43 + "\n")
    with pytest.raises(StartupError, match="does not match"):
        await serve(
            config_for(
                "--db", str(stack.db_path), "--key-file", str(other_key),
                "--spiffe-socket", str(tmp_path / "gone.sock"), *BASE,
            )
        )  # fmt: skip


async def test_environment_variables_configure_the_gateway(
    tmp_path: Path, services: list[Service]
) -> None:
    # Only the gateway's SPIFFE agent: nothing here needs the IdP to answer.
    agent = start_service(
        "spiffe-gateway",
        ["dev", "spiffe", "--socket", str(tmp_path / "gw.sock"), "--spiffe-id", GATEWAY_ID],
        tmp_path / "logs",
    )
    services.append(agent)
    issuer = "http://127.0.0.1:9/realms/nowhere"
    key_file = tmp_path / "gw.key"
    key_file.write_text("B" * 43 + "\n")
    env = {
        "TOKENFERRY_GATEWAY_LISTEN": "127.0.0.1:0",
        "TOKENFERRY_GATEWAY_ADMIN_LISTEN": "127.0.0.1:0",
        "TOKENFERRY_GATEWAY_DB": str(tmp_path / "env.db"),
        "TOKENFERRY_GATEWAY_SPIFFE_SOCKET": str(agent.ready["socket"]),
        "TOKENFERRY_GATEWAY_OIDC_ISSUER": issuer,
        "TOKENFERRY_GATEWAY_OIDC_AUDIENCE": "env-audience",
        "TOKENFERRY_GATEWAY_KEY_FILE": str(key_file),
        "TOKENFERRY_GATEWAY_SUPERVISOR_AUDIENCE": "env-supervisor-aud",
        "TOKENFERRY_GATEWAY_CLI_CLIENT_ID": "env-cli",
        "TOKENFERRY_GATEWAY_TRUST_DOMAIN": "example.org,other.org",
        "TOKENFERRY_GATEWAY_LOG_LEVEL": "debug",
    }
    service = start_service("gateway-env", ["gateway"], tmp_path / "logs", env=env)
    services.append(service)
    async with (
        aiohttp.ClientSession() as session,
        session.get(service.ready["url"] + "/v1/auth/config") as response,
    ):
        config = await response.json()
    assert config == {
        "issuer": issuer,
        "client_id": "env-cli",
        "audience": "env-audience",
        "supervisor_audience": "env-supervisor-aud",
    }
    # No dev admin token in the environment: the static token is not accepted.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            service.ready["url"] + "/v1/providers",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response,
    ):
        assert response.status == 401
    assert not Path(str(tmp_path / "env.db") + ".key").exists()
