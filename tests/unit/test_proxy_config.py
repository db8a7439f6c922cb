from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import Address, ConfigError, load_file_config, parse_providers
from tokenferry.profiles import Credential, Endpoint, Profile, TokenGrant

TE = "https://idp.example.org/realms/r/protocol/openid-connect/token"


def cc_profile(pid: str = "orders-api") -> Profile:
    return Profile(
        id=pid,
        credentials=(Credential("access_token", token_grant=TokenGrant("client_credentials", TE)),),
        endpoints=(Endpoint("api.example.org"),),
    )


def test_valid_providers_document() -> None:
    config = parse_providers(
        {
            "sandbox": "ci-7",
            "providers": [
                {"name": "orders", "profile": "orders-api"},
                {"name": "orders2", "profile": "orders-api", "revision": 5},
            ],
        },
        "providers.yaml",
        {"orders-api": cc_profile()},
    )
    assert config.sandbox == "ci-7"
    assert [(p.name, p.revision, p.profile.id) for p in config.providers] == [
        ("orders", 1, "orders-api"),
        ("orders2", 5, "orders-api"),
    ]


def test_every_problem_is_reported_with_file_and_field() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_providers(
            {
                "providerz": [],
                "providers": [
                    {"name": "orders", "profile": "orders-api", "color": "red"},
                    {"name": "orders", "profile": "orders-api"},
                    {"name": "x", "profile": "missing"},
                    {"name": "bad name!", "profile": "orders-api", "revision": 0},
                    "just a string",
                ],
            },
            "p.yaml",
            {"orders-api": cc_profile()},
        )
    text = str(excinfo.value)
    assert "p.yaml: providerz: unknown key" in text
    assert "p.yaml: providers[0].color: unknown key" in text
    assert "p.yaml: providers[1].name: duplicate provider name 'orders'" in text
    assert "p.yaml: providers[2].profile: no profile 'missing'" in text
    assert "p.yaml: providers[3].name:" in text
    assert "p.yaml: providers[3].revision: must be a positive integer, got 0" in text
    assert "p.yaml: providers[4]: must be a mapping" in text


def test_token_exchange_profile_is_a_startup_error_in_file_mode() -> None:
    profile = Profile(
        id="obo",
        credentials=(
            Credential("user_token"),
            Credential(
                "access_token",
                token_grant=TokenGrant("token_exchange", TE, subject_token=None),
            ),
        ),
        endpoints=(Endpoint("api.example.org"),),
    )
    with pytest.raises(ConfigError, match=r"providers\[0\]\.profile: .*token_exchange.*gateway"):
        parse_providers(
            {"providers": [{"name": "o", "profile": "obo"}]}, "p.yaml", {"obo": profile}
        )


def test_files_round_trip_and_bad_yaml(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "orders.yaml").write_text(
        yaml.safe_dump(
            {
                "id": "orders-api",
                "credentials": [
                    {
                        "name": "access_token",
                        "token_grant": {"grant_type": "client_credentials", "token_endpoint": TE},
                    }
                ],
                "endpoints": [{"host": "api.example.org"}],
            }
        )
    )
    providers = tmp_path / "providers.yaml"
    providers.write_text("providers:\n  - {name: orders, profile: orders-api}\n")
    config = load_file_config(profiles, providers)
    assert config.providers[0].profile.endpoints[0].host == "api.example.org"

    providers.write_text("providers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_file_config(profiles, providers)
    with pytest.raises(ConfigError, match="cannot read providers file"):
        load_file_config(profiles, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a directory"):
        load_file_config(tmp_path / "nodir", providers)

    (profiles / "broken.yaml").write_text("id: Bad_Id\ncredentials: []\nendpoints: []\n")
    providers.write_text("providers:\n  - {name: orders, profile: orders-api}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_file_config(profiles, providers)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("0", "127.0.0.1", 0),
        (":9464", "127.0.0.1", 9464),
        ("[::1]:8443", "::1", 8443),
        ("localhost:0", "localhost", 0),
    ],
)
def test_listen_address_parsing(text: str, host: str, port: int) -> None:
    assert Address.parse(text) == Address(host, port)


@pytest.mark.parametrize("text", ["127.0.0.1:http", "127.0.0.1:70000", "nonsense"])
def test_listen_address_errors(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|0-65535"):
        Address.parse(text)
