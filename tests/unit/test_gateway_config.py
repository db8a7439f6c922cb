from __future__ import annotations

import argparse

import pytest

from gateway.config import (
    DEFAULT_ADMIN_LISTEN,
    OPTIONS,
    ConfigError,
    GatewayConfig,
    add_arguments,
    config_from_args,
    parse_hostport,
)

REQUIRED = {
    "TOKENFERRY_GATEWAY_OIDC_ISSUER": "https://idp.example.org/realms/r1",
    "TOKENFERRY_GATEWAY_OIDC_AUDIENCE": "tokenferry",
    "TOKENFERRY_GATEWAY_SPIFFE_SOCKET": "unix:/run/spire/agent.sock",
}


def config(argv: list[str], env: dict[str, str]) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ=env)


def test_every_option_has_an_environment_variable() -> None:
    names = {option.env for option in OPTIONS}
    assert "TOKENFERRY_GATEWAY_LISTEN" in names
    assert len(names) == len(OPTIONS)
    assert all(name.startswith("TOKENFERRY_GATEWAY_") for name in names)


def test_environment_fills_in_and_flags_win() -> None:
    env = {**REQUIRED, "TOKENFERRY_GATEWAY_LISTEN": "127.0.0.1:7000"}
    from_env = config([], env)
    assert (from_env.listen_host, from_env.listen_port) == ("127.0.0.1", 7000)
    assert (from_env.admin_host, from_env.admin_port) == tuple(
        [DEFAULT_ADMIN_LISTEN.split(":")[0], int(DEFAULT_ADMIN_LISTEN.split(":")[1])]
    )
    assert from_env.spiffe_socket == "unix:/run/spire/agent.sock"
    assert not from_env.dev_mode
    from_flag = config(["--listen", "0.0.0.0:0", "--trust-domain", "a.org"], env)
    assert (from_flag.listen_host, from_flag.listen_port) == ("0.0.0.0", 0)
    assert from_flag.trust_domains == ("a.org",)


def test_repeatable_trust_domains_from_env_and_secrets_hidden() -> None:
    env = {
        **REQUIRED,
        "TOKENFERRY_GATEWAY_TRUST_DOMAIN": "a.org,spiffe://b.org",
        "TOKENFERRY_GATEWAY_DEV_ADMIN_TOKEN": "super-secret-admin",
        "TOKENFERRY_GATEWAY_KEY": "key-material",
    }
    loaded = config([], env)
    assert loaded.trust_domains == ("a.org", "b.org")
    assert loaded.dev_mode
    assert "super-secret-admin" not in repr(loaded)
    assert "key-material" not in repr(loaded)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--oidc-issuer"),
        (["--listen", "localhost"], REQUIRED, "--listen: 'localhost' is not HOST:PORT"),
        ([], {**REQUIRED, "TOKENFERRY_GATEWAY_ADMIN_LISTEN": "h:x"}, "TOKENFERRY_GATEWAY_ADMIN"),
        (["--svid-dir", "/d"], REQUIRED, "cannot be combined"),
        ([], {k: v for k, v in REQUIRED.items() if "SOCKET" not in k}, "SPIFFE identity"),
    ],
)
def test_errors_name_the_flag_or_variable(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config(argv, env)


def test_svid_files_and_spiffe_endpoint_socket() -> None:
    env = {k: v for k, v in REQUIRED.items() if "SOCKET" not in k}
    files = config(["--svid-dir", "/d", "--bundle-file", "/b.json"], env)
    assert (files.svid_dir, files.bundle_file, files.spiffe_socket) == ("/d", "/b.json", None)
    standard = config([], {**env, "SPIFFE_ENDPOINT_SOCKET": "unix:/s.sock"})
    assert standard.spiffe_socket == "unix:/s.sock"


def test_parse_hostport_ipv6() -> None:
    assert parse_hostport("[::1]:8443", "x") == ("::1", 8443)
