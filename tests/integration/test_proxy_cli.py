"""``tokenferry proxy`` start-up errors and ``tokenferry proxy ca``, as a user runs them."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import yaml

from tests.support.procs import tokenferry_command

TE = "http://127.0.0.1:9/realms/dev/protocol/openid-connect/token"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tokenferry_command(*args), capture_output=True, text=True, timeout=60, check=False
    )


def write_profile(directory: Path, grant_type: str = "client_credentials") -> None:
    directory.mkdir(exist_ok=True)
    credentials: list[dict[str, object]] = [
        {"name": "access_token", "token_grant": {"grant_type": grant_type, "token_endpoint": TE}}
    ]
    if grant_type == "token_exchange":
        credentials[0]["token_grant"] = {
            "grant_type": grant_type,
            "token_endpoint": TE,
            "subject_token": {"source": "provider_credential", "credential": "user_token"},
        }
        credentials.append({"name": "user_token"})
    (directory / "p.yaml").write_text(
        yaml.safe_dump(
            {"id": "orders-api", "credentials": credentials, "endpoints": [{"host": "a.example"}]}
        )
    )


def proxy_args(tmp_path: Path, providers: Path, *extra: str) -> list[str]:
    return [
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--confdir",
        str(tmp_path / "confdir"),
        "--spiffe-socket",
        str(tmp_path / "no.sock"),
        "--profiles",
        str(tmp_path / "profiles"),
        "--providers",
        str(providers),
        *extra,
    ]


def test_config_errors_exit_1_naming_file_and_field(tmp_path: Path) -> None:
    write_profile(tmp_path / "profiles", "token_exchange")
    providers = tmp_path / "providers.yaml"
    providers.write_text(
        "providers:\n  - {name: orders, profile: orders-api}\n"
        "  - {name: other, profile: orderz-api}\n"
    )
    result = run(*proxy_args(tmp_path, providers))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{providers}: providers[1].profile: no profile 'orderz-api'" in result.stderr
    # token_exchange needs the gateway: a clear start-up error in local-files mode.
    assert f"{providers}: providers[0].profile: profile 'orders-api'" in result.stderr
    assert "token_exchange" in result.stderr and "client_credentials only" in result.stderr


def test_busy_admin_port_and_missing_files_are_user_errors(tmp_path: Path) -> None:
    write_profile(tmp_path / "profiles")
    providers = tmp_path / "providers.yaml"
    providers.write_text("providers:\n  - {name: orders, profile: orders-api}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = proxy_args(tmp_path, providers)
        args[args.index("--admin-listen") + 1] = f"127.0.0.1:{port}"
        result = run(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"--admin-listen 127.0.0.1:{port}: cannot listen" in result.stderr

    result = run("proxy", "--profiles", str(tmp_path / "profiles"))
    assert result.returncode == 1 and "--providers FILE are required" in result.stderr


def test_proxy_ca_prints_path_and_pem(tmp_path: Path) -> None:
    confdir = tmp_path / "ca"
    path = run("proxy", "ca", "--confdir", str(confdir))
    assert path.returncode == 0, path.stderr
    ca_file = Path(path.stdout.strip())
    assert ca_file == confdir / "mitmproxy-ca-cert.pem" and ca_file.is_file()
    pem = run("proxy", "ca", "--confdir", str(confdir), "--pem")
    assert pem.returncode == 0
    assert pem.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert pem.stdout == ca_file.read_text()
    # The private key never leaves the confdir through this command.
    assert "PRIVATE KEY" not in pem.stdout
