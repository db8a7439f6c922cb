"""The trusted-token-endpoint rule (gateway.trust) and its flags (gateway.config)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, add_arguments, config_from_args
from gateway.trust import EndpointTrust, TrustUnavailable, build_trusted, normalize_endpoint
from tokenferry.profiles import load_profile_text

IDP = "https://idp.example.org/realms/r1/protocol/openid-connect/token"
ISSUER = "https://idp.example.org/realms/r1"
ATTACKER = "https://evil.example.net/realms/r1/protocol/openid-connect/token"
BASE = ["--oidc-issuer", ISSUER, "--oidc-audience", "tokenferry", "--spiffe-socket", "/x"]


def profile(endpoint: str, svid_audience: str | None = None, *, cc_endpoint: str = IDP) -> Any:
    extra = f"\n      jwt_svid_audience: {svid_audience}" if svid_audience else ""
    text = f"""\
id: p
credentials:
  - name: user_token
  - name: access_token
    token_grant:
      grant_type: token_exchange
      token_endpoint: {endpoint}{extra}
      subject_token: {{source: provider_credential, credential: user_token}}
  - name: service_token
    token_grant:
      grant_type: client_credentials
      token_endpoint: {cc_endpoint}
endpoints:
  - {{host: api.example.org}}
"""
    return load_profile_text(text, "p.yaml")[0]


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        (IDP, IDP),
        ("HTTPS://IDP.Example.ORG:443/realms/r1/t", "https://idp.example.org/realms/r1/t"),
        ("http://127.0.0.1:80/t", "http://127.0.0.1/t"),
        ("http://127.0.0.1:8080/t?x=1", "http://127.0.0.1:8080/t?x=1"),
        ("http://[::1]:9000/t", "http://[::1]:9000/t"),
        ("https://idp.example.org", "https://idp.example.org/"),
        ("https://idp.example.org@evil.example.net/t", None),
        ("https://user:pw@idp.example.org/t", None),
        ("https://idp.example.org/t#frag", None),
        ("ftp://idp.example.org/t", None),
        ("https:///t", None),
        ("https://idp.example.org:99999/t", None),
    ],
)
def test_normalize_endpoint(url: str, normal: str | None) -> None:
    assert normalize_endpoint(url) == normal


def test_untrusted_endpoint_is_named_with_its_field_path() -> None:
    trusted = build_trusted([(IDP, ())], ())
    problems = trusted.profile_problems(profile(ATTACKER, ISSUER, cc_endpoint=ATTACKER))
    assert [path for path, _ in problems] == [
        "credentials[1].token_grant.token_endpoint",
        "credentials[2].token_grant.token_endpoint",
    ]
    assert ATTACKER in problems[0][1] and f"trusted: {IDP}" in problems[0][1]


def test_trusted_endpoint_in_another_spelling_is_trusted() -> None:
    trusted = build_trusted([(IDP, ())], ())
    assert (
        trusted.profile_problems(
            profile(IDP.replace("idp.", "IDP.").replace("/realms", ":443/realms"))
        )
        == []
    )


@pytest.mark.parametrize(
    ("svid_audience", "allowed"),
    [
        (None, True),  # derived (SPEC §4.2): the Keycloak issuer of that endpoint
        (ISSUER, True),  # the same, written out
        (IDP, True),  # the token endpoint URL itself (RFC 7523)
        ("https://other-idp.example.org/realms/r1", False),
        ("https://idp.example.org/realms/r2", False),  # another realm of the same server
        ("spiffe://example.org/gateway", False),
    ],
)
def test_svid_audience_must_belong_to_the_endpoint(
    svid_audience: str | None, allowed: bool
) -> None:
    trusted = build_trusted([(IDP, ())], ())
    problems = trusted.profile_problems(profile(IDP, svid_audience))
    if allowed:
        assert problems == []
    else:
        assert [path for path, _ in problems] == ["credentials[1].token_grant.jwt_svid_audience"]
        assert "--trusted-svid-audience" in problems[0][1]


def test_trusted_svid_audience_extends_the_allowed_audiences() -> None:
    other = "https://idp.example.org/realms/r2"
    trusted = build_trusted([(IDP, ())], (other,))
    assert trusted.profile_problems(profile(IDP, other)) == []
    # Only at a trusted endpoint: the audience list never makes an endpoint trusted.
    assert trusted.profile_problems(profile(ATTACKER, other))


async def test_discovery_names_the_endpoint_and_its_issuer_once() -> None:
    calls: list[int] = []

    async def discovery() -> dict[str, Any]:
        calls.append(1)
        return {"issuer": "https://login.example.org", "token_endpoint": IDP}

    trust = EndpointTrust(
        issuer="https://login.example.org", endpoints=(), svid_audiences=(), discovery=discovery
    )
    first = await trust.resolve()
    assert await trust.resolve() is first
    assert calls == [1]
    assert first.profile_problems(profile(IDP, "https://login.example.org")) == []
    assert first.profile_problems(profile(ATTACKER))


async def test_discovery_failure_is_reported_and_retried() -> None:
    answers: list[Any] = [
        OSError("connection refused"),
        {"token_endpoint": 7},
        {"token_endpoint": IDP},
    ]

    async def discovery() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    trust = EndpointTrust(issuer=ISSUER, endpoints=(), svid_audiences=(), discovery=discovery)
    with pytest.raises(TrustUnavailable, match="discovery document: connection refused"):
        await trust.resolve()
    with pytest.raises(TrustUnavailable, match="no usable token_endpoint"):
        await trust.resolve()
    assert (await trust.resolve()).profile_problems(profile(IDP)) == []


async def test_configured_endpoints_replace_discovery() -> None:
    async def discovery() -> dict[str, Any]:
        raise AssertionError("not consulted when endpoints are configured")

    trust = EndpointTrust(
        issuer=ISSUER, endpoints=(ATTACKER,), svid_audiences=(), discovery=discovery
    )
    trusted = await trust.resolve()
    assert trusted.profile_problems(profile(ATTACKER, cc_endpoint=ATTACKER)) == []
    assert trusted.profile_problems(profile(IDP))


# --- flags and environment variables -----------------------------------------------------


def config(*args: str, env: dict[str, str] | None = None) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args([*BASE, *args]), environ=env or {})


def test_defaults() -> None:
    cfg = config()
    assert cfg.trusted_token_endpoints == ()
    assert cfg.trusted_svid_audiences == ()
    assert cfg.admin_subjects == ()
    assert cfg.profiles_admin_only is False


def test_repeatable_flags_and_the_switch() -> None:
    cfg = config(
        *("--trusted-token-endpoint", IDP, "--trusted-token-endpoint", ATTACKER),
        *("--trusted-svid-audience", "aud-1"),
        *("--admin-subject", "carol", "--admin-subject", "dave"),
        "--profiles-admin-only",
    )
    assert cfg.trusted_token_endpoints == (IDP, ATTACKER)
    assert cfg.trusted_svid_audiences == ("aud-1",)
    assert cfg.admin_subjects == ("carol", "dave")
    assert cfg.profiles_admin_only is True


def test_environment_lists_are_comma_or_space_separated() -> None:
    cfg = config(
        env={
            "TOKENFERRY_GATEWAY_TRUSTED_TOKEN_ENDPOINTS": f"{IDP}, {ATTACKER}",
            "TOKENFERRY_GATEWAY_ADMIN_SUBJECTS": "carol dave\n erin,",
            "TOKENFERRY_GATEWAY_TRUSTED_SVID_AUDIENCES": "aud-1",
            "TOKENFERRY_GATEWAY_PROFILES_ADMIN_ONLY": "Yes",
        }
    )
    assert cfg.trusted_token_endpoints == (IDP, ATTACKER)
    assert cfg.admin_subjects == ("carol", "dave", "erin")
    assert cfg.trusted_svid_audiences == ("aud-1",)
    assert cfg.profiles_admin_only is True
    # The command line wins over the variable.
    cfg = config("--admin-subject", "zoe", env={"TOKENFERRY_GATEWAY_ADMIN_SUBJECTS": "carol"})
    assert cfg.admin_subjects == ("zoe",)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--trusted-token-endpoint", "idp.example.org/token"],
            {},
            "--trusted-token-endpoint: 'idp.example.org/token' is not an http(s) URL",
        ),
        (
            [],
            {"TOKENFERRY_GATEWAY_TRUSTED_TOKEN_ENDPOINTS": "https://u:p@idp.example.org/t"},
            "environment variable TOKENFERRY_GATEWAY_TRUSTED_TOKEN_ENDPOINTS: "
            "'https://u:p@idp.example.org/t' is not an http(s) URL",
        ),
        (["--admin-subject", " "], {}, "--admin-subject: an empty value is not allowed"),
        (
            [],
            {"TOKENFERRY_GATEWAY_PROFILES_ADMIN_ONLY": "maybe"},
            "environment variable TOKENFERRY_GATEWAY_PROFILES_ADMIN_ONLY: 'maybe' is not one of",
        ),
    ],
)
def test_bad_values_name_the_flag_or_the_variable(
    args: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config(*args, env=env)
    assert message in str(caught.value)
